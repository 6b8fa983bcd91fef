//! Helpers for the end-to-end tests: objects to create, waiting, and clients that talk to
//! echo pods through node ports and load balancers (always on loopback).

use std::{
    collections::BTreeSet,
    future::Future,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Endpoints, Pod, Service},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

use crate::{
    Testbed, TestbedOptions,
    agent::echo::HttpEcho,
    portico::{Portico, PorticoConfig},
};

pub const NS: &str = "default";
pub const WAIT: Duration = Duration::from_secs(90);

pub async fn three_nodes() -> (Testbed, Client) {
    let testbed = Testbed::start(TestbedOptions {
        nodes: 3,
        ..Default::default()
    })
    .await
    .expect("testbed starts");
    let client = testbed.client().await;
    (testbed, client)
}

/// A Deployment of `image` whose containers declare `ports` (`(port, protocol)`).
pub fn deployment(name: &str, replicas: i32, image: &str, ports: &[(u16, &str)]) -> Deployment {
    let ports: Vec<_> = ports
        .iter()
        .map(|(port, protocol)| json!({"containerPort": port, "protocol": protocol}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "echo", "image": image, "ports": ports}]},
            },
        },
    }))
    .unwrap()
}

/// A Service selecting `app: <app>` with `spec` merged over a single port named `web`.
pub fn service(name: &str, app: &str, spec: serde_json::Value) -> Service {
    let mut base = json!({
        "metadata": {"name": name},
        "spec": {
            "type": "NodePort",
            "selector": {"app": app},
            "ports": [{"name": "web", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    });
    for (key, value) in spec.as_object().unwrap() {
        base["spec"][key] = value.clone();
    }
    serde_json::from_value(base).unwrap()
}

pub async fn create<K>(client: &Client, object: &K) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), object)
        .await
        .unwrap_or_else(|e| panic!("creating {}: {e}", object.name_any()))
}

/// Polls `check` until it yields a value, failing after `WAIT` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn ready_endpoint_ips(client: &Client, name: &str) -> BTreeSet<String> {
    let endpoints = Api::<Endpoints>::namespaced(client.clone(), NS)
        .get_opt(name)
        .await
        .unwrap();
    endpoints
        .and_then(|e| e.subsets)
        .unwrap_or_default()
        .into_iter()
        .flat_map(|s| s.addresses.unwrap_or_default())
        .map(|a| a.ip)
        .collect()
}

pub async fn wait_for_endpoints(client: &Client, name: &str, count: usize) -> BTreeSet<String> {
    eventually(&format!("{name} has {count} ready endpoints"), || async {
        let ips = ready_endpoint_ips(client, name).await;
        (ips.len() == count).then_some(ips)
    })
    .await
}

pub async fn node_port(client: &Client, name: &str) -> u16 {
    let svc = Api::<Service>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .unwrap();
    let port = svc.spec.unwrap().ports.unwrap()[0].node_port.unwrap();
    u16::try_from(port).unwrap()
}

pub async fn running_pods(client: &Client, app: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// One HTTP/1.1 request on a fresh connection (optionally from `source`), so every request is
/// balanced anew.
pub async fn http_get(
    target: SocketAddr,
    source: Option<IpAddr>,
    path: &str,
) -> std::io::Result<(u16, String)> {
    http_get_host(target, source, &target.to_string(), path).await
}

/// One `GET path` with `Host: host` on a fresh connection (from `source` if given):
/// (status, body).
pub async fn http_get_host(
    target: SocketAddr,
    source: Option<IpAddr>,
    host: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let socket = TcpSocket::new_v4()?;
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let exchange = async {
        let mut stream = socket.connect(target).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("no HTTP response: {response:?}"),
            )
        })?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer in 10 s",
            ))
        })
}

pub async fn echo_via(target: SocketAddr, source: Option<IpAddr>) -> std::io::Result<HttpEcho> {
    let (status, body) = http_get(target, source, "/hello?via=node-port").await?;
    assert_eq!(status, 200, "{body}");
    Ok(serde_json::from_str(&body).expect("echo JSON"))
}

/// Waits until every node's proxy serves `port` (the Endpoints the test saw in the API reach
/// the agent's watch a moment later).
pub async fn wait_until_served(testbed: &Testbed, port: u16) {
    for node in testbed.nodes() {
        let target = SocketAddr::from((node.internal_ip, port));
        eventually(
            &format!("{} serves node port {port}", node.name),
            || async { echo_via(target, None).await.ok() },
        )
        .await;
    }
}

/// The pods that answer `requests` fresh connections to `target`.
pub async fn pods_seen(target: SocketAddr, requests: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..requests {
        if let Ok(echo) = echo_via(target, None).await {
            seen.insert(echo.pod);
        }
    }
    seen
}

/// Greets like a raw-TCP client: says something first, reads the greeting line and the echo.
pub async fn raw_session(
    target: SocketAddr,
) -> std::io::Result<tokio::io::BufReader<tokio::net::TcpStream>> {
    use tokio::io::AsyncBufReadExt;
    let stream = tokio::net::TcpStream::connect(target).await?;
    let mut stream = tokio::io::BufReader::new(stream);
    stream.get_mut().write_all(b"hello\n").await?;
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    let greeting: serde_json::Value = serde_json::from_str(&line).expect("greeting JSON");
    assert!(greeting["pod"].is_string(), "{greeting}");
    line.clear();
    stream.read_line(&mut line).await?;
    assert_eq!(line, "hello\n");
    Ok(stream)
}

pub async fn still_echoes(stream: &mut tokio::io::BufReader<tokio::net::TcpStream>, text: &str) {
    use tokio::io::AsyncBufReadExt;
    stream
        .get_mut()
        .write_all(format!("{text}\n").as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_line(&mut line))
        .await
        .expect("an echo within 5 s")
        .unwrap();
    assert_eq!(line, format!("{text}\n"));
}

/// A 2-pod echo Deployment `name` behind a Service of type LoadBalancer `name`; its address
/// once it answers.
pub async fn load_balancer_answering(client: &Client, name: &str) -> SocketAddr {
    create(
        client,
        &deployment(name, 2, crate::agent::ECHO_IMAGE, &[(8080, "TCP")]),
    )
    .await;
    create(
        client,
        &service(name, name, json!({"type": "LoadBalancer"})),
    )
    .await;
    let ip = eventually(&format!("{name} has an EXTERNAL-IP"), || async {
        let svc = Api::<Service>::namespaced(client.clone(), NS)
            .get(name)
            .await
            .ok()?;
        svc.status?
            .load_balancer?
            .ingress?
            .first()?
            .ip
            .as_ref()?
            .parse::<std::net::Ipv4Addr>()
            .ok()
    })
    .await;
    let target = SocketAddr::from((ip, 80));
    eventually(&format!("{target} answers"), || async {
        echo_via(target, None).await.ok()
    })
    .await;
    target
}

/// A 3-node cluster with the local cloud, and the operator installed with the Helm chart
/// (which brings the CRDs) running against it under the chart's ServiceAccount.
pub async fn cluster_with_portico(
    tune: impl FnOnce(&mut PorticoConfig),
) -> (Testbed, Portico, Client) {
    cluster_with_portico_on(TestbedOptions::default(), tune).await
}

/// [`cluster_with_portico`] on a testbed started with `options` (its nodes and Portico's CRDs
/// aside: 3 nodes, the chart's CRDs).
pub async fn cluster_with_portico_on(
    options: TestbedOptions,
    tune: impl FnOnce(&mut PorticoConfig),
) -> (Testbed, Portico, Client) {
    let testbed = Testbed::start(TestbedOptions {
        nodes: 3,
        portico_crds: false,
        ..options
    })
    .await
    .expect("testbed starts");
    let mut config = PorticoConfig::new(
        testbed.plan(),
        testbed.kubeconfig_path(),
        testbed.state_dir().join("portico"),
    );
    tune(&mut config);
    let portico = Portico::start(config).await.expect("portico starts");
    let client = testbed.client().await;
    (testbed, portico, client)
}

/// A throwaway certificate authority for TLS tests: issues server certificates and builds a
/// client that trusts only it.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    root: rustls::pki_types::CertificateDer<'static>,
    root_pem: String,
}

impl Default for TestCa {
    fn default() -> Self {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "portico-e2e-ca");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            root: cert.der().clone(),
            root_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }
}

impl TestCa {
    /// The CA certificate, for `curl --cacert`.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// A server certificate for `hosts` with common name `cn`: (chain PEM, key PEM).
    pub fn issue(&self, hosts: &[&str], cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params =
            rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    }

    pub fn client_config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        crate::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root.clone()).expect("root");
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        std::sync::Arc::new(config)
    }
}

/// One HTTPS request on a fresh TLS connection with SNI `host`: (status, body, the server
/// certificate's DER).
pub async fn https_get(
    config: std::sync::Arc<rustls::ClientConfig>,
    target: SocketAddr,
    host: &str,
    path: &str,
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(target).await?;
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(std::io::Error::other)?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        // A peer that closes without close_notify still sent a whole response.
        let _ = tls.read_to_end(&mut response).await;
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other(format!("no HTTP response: {response:?}")))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, body.to_owned(), cert))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer in 10 s",
            ))
        })
}
