//! moto, the AWS API emulator, as a real server on loopback for tests: started on a free
//! port, its default VPC and subnets looked up, stopped when dropped. Each test starts its
//! own, so state never leaks between tests.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Stdio;
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use aws_sdk_elasticloadbalancingv2::Client;
use aws_sdk_elasticloadbalancingv2::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_elasticloadbalancingv2::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RuntimeComponents,
};
use aws_smithy_runtime_api::box_error::BoxError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// `$PORTICO_MOTO_SERVER`, else the one `e2e/scripts/install-moto.sh` puts in the cache, else
/// `moto_server` on `PATH`.
/// The `moto_server` program.
pub fn moto_server() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("PORTICO_MOTO_SERVER").filter(|v| !v.is_empty()) {
        return path.into();
    }
    let set = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    let cache = set("PORTICO_CACHE").unwrap_or_else(|| {
        set("XDG_CACHE_HOME")
            .unwrap_or_else(|| set("HOME").unwrap_or_else(|| "/".into()).join(".cache"))
            .join("portico")
    });
    let cached = cache.join("moto-5/bin/moto_server");
    if cached.exists() {
        cached
    } else {
        "moto_server".into()
    }
}

pub struct Moto {
    pub addr: SocketAddr,
    child: Child,
}

impl Moto {
    pub async fn start() -> Moto {
        // A free port: bind, read it, release; moto binds it right after.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect(
                "moto_server is installed (e2e/scripts/install-moto.sh; scripts/test.sh runs it)",
            );
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(addr, "/moto-api/", None).await.is_none() {
            assert!(Instant::now() < deadline, "moto did not answer within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Moto { addr, child }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An ELBv2 client of this server with throwaway credentials (moto checks none).
    pub fn client(&self) -> Client {
        let config = aws_sdk_elasticloadbalancingv2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(self.url())
            .credentials_provider(Credentials::new("test", "test", None, None, "moto"))
            .build();
        Client::from_conf(config)
    }

    /// An ACM client of this server.
    pub fn acm_client(&self) -> aws_sdk_acm::Client {
        let config = aws_sdk_acm::Config::builder()
            .behavior_version(aws_sdk_acm::config::BehaviorVersion::latest())
            .region(aws_sdk_acm::config::Region::new("us-east-1"))
            .endpoint_url(self.url())
            .credentials_provider(aws_sdk_acm::config::Credentials::new(
                "test", "test", None, None, "moto",
            ))
            .build();
        aws_sdk_acm::Client::from_conf(config)
    }

    /// A client like [`Moto::client`] that also records the name of every operation it calls,
    /// so a test can tell what a reconcile changed (or that it changed nothing).
    pub fn recording_client(&self) -> (Client, Calls) {
        self.client_with(Calls::default())
    }

    /// A client whose calls fail once `changes` calls that change something have gone
    /// through: what a reconcile killed at that point has done.
    pub fn client_killed_after(&self, changes: usize) -> Client {
        self.client_with(Calls {
            changes_allowed: Some(changes),
            ..Calls::default()
        })
        .0
    }

    fn client_with(&self, calls: Calls) -> (Client, Calls) {
        let config = self
            .client()
            .config()
            .to_builder()
            .interceptor(calls.clone())
            .build();
        (Client::from_conf(config), calls)
    }

    /// A certificate in moto's ACM for `domain`, as a user would have requested it; its ARN.
    pub async fn request_certificate(&self, domain: &str) -> String {
        let body = format!(r#"{{"DomainName":"{domain}"}}"#);
        let answer = request(
            self.addr,
            "POST",
            "/",
            &format!(
                "X-Amz-Target: CertificateManager.RequestCertificate\r\n\
                 Content-Type: application/x-amz-json-1.1\r\n{}",
                auth("acm")
            ),
            &body,
        )
        .await
        .expect("RequestCertificate answers");
        answer
            .split(r#""CertificateArn": ""#)
            .chain(answer.split(r#""CertificateArn":""#))
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map(String::from)
            .unwrap_or_else(|| panic!("no CertificateArn in {answer}"))
    }

    /// Starts `n` EC2 instances (as nodes would be) and returns their ids.
    pub async fn run_instances(&self, n: u8) -> Vec<String> {
        let body = get(
            self.addr,
            &format!(
                "/?Action=RunInstances&Version=2016-11-15&ImageId=ami-12c6146b\
                 &InstanceType=t3.micro&MinCount={n}&MaxCount={n}"
            ),
            Some("ec2"),
        )
        .await
        .expect("RunInstances answers");
        values(&body, "instanceId")
    }

    /// The default VPC and its subnets, through EC2's query API (no EC2 SDK in this build).
    pub async fn default_network(&self) -> (String, Vec<String>) {
        let body = get(
            self.addr,
            "/?Action=DescribeSubnets&Version=2016-11-15",
            Some("ec2"),
        )
        .await
        .expect("DescribeSubnets answers");
        let mut subnets = values(&body, "subnetId");
        subnets.sort();
        subnets.dedup();
        let vpc = values(&body, "vpcId")
            .into_iter()
            .next()
            .expect("a default VPC");
        (vpc, subnets)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The text of every `<tag>…</tag>` in an XML answer, in order.
fn values(body: &str, tag: &str) -> Vec<String> {
    body.split(&format!("<{tag}>"))
        .skip(1)
        .filter_map(|rest| rest.split(&format!("</{tag}>")).next())
        .map(String::from)
        .collect()
}

/// The names of the operations a [`Moto::recording_client`] called, in order.
#[derive(Clone, Debug, Default)]
pub struct Calls {
    made: Arc<Mutex<Vec<String>>>,
    /// Refuse every change after this many, as if the reconcile were killed there.
    changes_allowed: Option<usize>,
}

impl Calls {
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.made.lock().unwrap())
    }

    /// The calls taken so far that change something (everything but Describe*).
    pub fn take_changes(&self) -> Vec<String> {
        self.take()
            .into_iter()
            .filter(|c| !c.starts_with("Describe"))
            .collect()
    }
}

impl Intercept for Calls {
    fn name(&self) -> &'static str {
        "RecordCalls"
    }

    // The operation is the query protocol's `Action=` in the body (the request as sent).
    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let body = context.request().body().bytes().unwrap_or_default();
        let body = String::from_utf8_lossy(body);
        let Some(name) = body
            .split('&')
            .find_map(|kv| kv.strip_prefix("Action="))
            .map(String::from)
        else {
            return Ok(());
        };
        let mut made = self.made.lock().unwrap();
        let changes = made.iter().filter(|c| !c.starts_with("Describe")).count();
        if let Some(allowed) = self.changes_allowed
            && !name.starts_with("Describe")
            && changes >= allowed
        {
            return Err(format!("{name} refused: the reconcile was killed here").into());
        }
        made.push(name);
        Ok(())
    }
}

/// An `Authorization` header scoped to `service`, which is how moto's single server tells
/// services apart (it checks no signature).
fn auth(service: &str) -> String {
    format!(
        "Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/{service}/aws4_request, \
         SignedHeaders=host, Signature=0\r\n"
    )
}

/// `GET path` on moto, for `service`. The body of a 200, else `None`.
async fn get(addr: SocketAddr, path: &str, service: Option<&str>) -> Option<String> {
    request(
        addr,
        "GET",
        path,
        &service.map(auth).unwrap_or_default(),
        "",
    )
    .await
}

/// One HTTP/1.1 request to moto with extra `headers` (each ending in CRLF); the body of a
/// 200, else `None`.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .ok()?
    .ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}
