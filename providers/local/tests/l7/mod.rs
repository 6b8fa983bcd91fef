//! L7 test fixtures: HTTP targets that say who they are and echo the headers they received,
//! HTTP/1.1, HTTP/2 and TLS clients bound to a chosen source address, and spec builders.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portico_provider::routing::{HostMatch, HostRoutes, PathMatch, PathRoute, RouteTable};
use portico_provider::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::common::{WAIT, fast_check, owner, target};

/// Every test target listens on this port of its own address.
pub const TARGET_PORT: u16 = 31080;

/// An HTTP target answering `<name>\n` followed by the request line and headers it got, one
/// `name: value` per line. `/slow` answers after [`SLOW`]; an `Upgrade` request is switched
/// and the connection then greets with `<name>\n` and echoes.
pub struct HttpTarget {
    pub name: String,
    pub addr: SocketAddr,
    /// Connections that carried at least one request (health probes only connect).
    used_connections: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

pub const SLOW: Duration = Duration::from_millis(800);

impl HttpTarget {
    pub async fn start(name: &str, ip: Ipv4Addr) -> HttpTarget {
        let listener = TcpListener::bind((ip, TARGET_PORT)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let who: Arc<str> = name.into();
        let used_connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let used = used_connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let (stream, _) = crate::common::accept(&listener).await;
                let (who, used) = (who.clone(), used.clone());
                tokio::spawn(async move {
                    let first = std::sync::atomic::AtomicBool::new(true);
                    let service = service_fn(move |req| {
                        if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                            used.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        answer(who.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        HttpTarget {
            name: name.into(),
            addr,
            used_connections,
            task,
        }
    }

    /// How many connections have carried requests to this target.
    pub fn used_connections(&self) -> usize {
        self.used_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for HttpTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    who: Arc<str>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if let Some(protocol) = req.headers().get(http::header::UPGRADE).cloned() {
        let upgrade = hyper::upgrade::on(&mut req);
        let greeting = format!("{who}\n");
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut io = TokioIo::new(upgraded);
            let _ = io.write_all(greeting.as_bytes()).await;
            let mut buf = [0u8; 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        response
            .headers_mut()
            .insert(http::header::UPGRADE, protocol);
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        return Ok(response);
    }
    if req.uri().path().starts_with("/slow") {
        tokio::time::sleep(SLOW).await;
    }
    let mut body = format!("{who}\n{} {}\n", req.method(), req.uri());
    for (name, value) in req.headers() {
        body.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert("x-target", who.parse().unwrap());
    Ok(response)
}

/// A response as the tests look at it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The target that answered (the first line of its body).
    pub fn target(&self) -> &str {
        self.body.lines().next().unwrap_or("")
    }

    /// A header as the target received it.
    pub fn received(&self, name: &str) -> Option<&str> {
        self.body
            .lines()
            .skip(2)
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
    }

    /// The request line as the target received it.
    pub fn request_line(&self) -> &str {
        self.body.lines().nth(1).unwrap_or("")
    }
}

pub async fn reply(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("the body arrives in time")
        .expect("the body arrives whole")
        .to_bytes();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub async fn tcp_from(source: Ipv4Addr, dst: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    tokio::time::timeout(WAIT, socket.connect(dst))
        .await
        .expect("connects in time")
        .expect("connects")
}

/// True when a request from `source` gets no answer: the connection is reset at once.
pub async fn refused(source: Ipv4Addr, dst: SocketAddr) -> bool {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let Ok(stream) = socket.connect(dst).await else {
        return true;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return true;
    };
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("refused in time")
        .is_err()
}

/// One HTTP/1.1 keep-alive connection; every request goes over it.
pub struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl H1 {
    pub async fn connect(source: Ipv4Addr, dst: SocketAddr) -> H1 {
        Self::over(tcp_from(source, dst).await).await
    }

    pub async fn over<I>(io: I) -> H1
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        H1 { sender }
    }

    /// `GET path` with `Host: host` and extra headers.
    pub async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.try_get(host, path, headers)
            .await
            .expect("the request succeeds")
    }

    /// `method path` with `Host: host`.
    pub async fn request(&mut self, method: &str, host: &str, path: &str) -> Reply {
        self.try_request(method, host, path, &[])
            .await
            .expect("the request succeeds")
    }

    pub async fn try_get(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, hyper::Error> {
        self.try_request("GET", host, path, headers).await
    }

    pub async fn try_request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, hyper::Error> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        tokio::time::timeout(WAIT, self.sender.ready())
            .await
            .expect("the connection is ready in time")?;
        let response = tokio::time::timeout(
            WAIT,
            self.sender.send_request(req.body(Empty::new()).unwrap()),
        )
        .await
        .expect("an answer in time")?;
        Ok(reply(response).await)
    }
}

/// One HTTP/2 connection (prior knowledge on plain TCP, or ALPN over TLS).
pub struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
}

impl H2 {
    pub async fn over<I>(io: I) -> H2
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .unwrap();
        tokio::spawn(conn);
        H2 { sender }
    }

    /// `GET http://<authority><path>`: HTTP/2 sends the authority as `:authority`.
    pub async fn get(&mut self, authority: &str, path: &str) -> Reply {
        let req = Request::get(format!("http://{authority}{path}"))
            .version(http::Version::HTTP_2)
            .body(Empty::new())
            .unwrap();
        let response = tokio::time::timeout(WAIT, self.sender.send_request(req))
            .await
            .expect("an answer in time")
            .unwrap();
        reply(response).await
    }
}

/// A plain `Request` over a one-shot connection: (status, headers, body).
pub async fn get_once(source: Ipv4Addr, dst: SocketAddr, host: &str, path: &str) -> Reply {
    H1::connect(source, dst).await.get(host, path, &[]).await
}

// --- TLS ---------------------------------------------------------------------------------

/// A self-signed certificate for `hosts`, as PEM, with its DER to compare against.
pub struct TestCert {
    pub pem: String,
    pub key: String,
    pub der: Vec<u8>,
}

impl TestCert {
    pub fn new(hosts: &[&str]) -> TestCert {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(hosts).unwrap();
        TestCert {
            pem: cert.pem(),
            key: signing_key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    pub fn certificate(&self, name: &str, hosts: &[&str]) -> Certificate {
        Certificate {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            source: CertificateSource::Pem {
                chain: self.pem.clone(),
                key: self.key.clone(),
            },
        }
    }
}

pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A client trusting exactly `roots`, offering h2 and http/1.1 (or only `alpn`).
pub fn tls_client(roots: &[&TestCert], alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    install_crypto();
    let mut store = rustls::RootCertStore::empty();
    for cert in roots {
        store
            .add(rustls::pki_types::CertificateDer::from(cert.der.clone()))
            .unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A verified TLS connection with SNI `server_name`, and the certificate the server showed.
pub async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    source: Ipv4Addr,
    dst: SocketAddr,
    server_name: &str,
) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    let tcp = tcp_from(source, dst).await;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("the certificate verifies");
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (tls, der)
}

// --- specs -------------------------------------------------------------------------------

/// A backend over `targets`, health-checked by TCP connect on the target port.
pub fn backend(name: &str, targets: &[&HttpTarget]) -> Backend {
    let targets: Vec<(&str, SocketAddr)> =
        targets.iter().map(|t| (t.name.as_str(), t.addr)).collect();
    backend_at(name, &targets)
}

/// [`backend`] over targets of any kind, given as (node, address).
pub fn backend_at(name: &str, targets: &[(&str, SocketAddr)]) -> Backend {
    Backend {
        name: name.into(),
        timeouts: None,
        pool: TargetPool {
            targets: targets
                .iter()
                .map(|(node, addr)| target(node, *addr))
                .collect(),
            health_check: fast_check(Probe::Tcp { port: TARGET_PORT }),
            affinity: SessionAffinity::None,
            proxy_protocol: false,
            preserve_client_ip: false,
            drain_timeout: None,
        },
    }
}

pub fn prefix(path: &str, backend: &str) -> PathRoute {
    PathRoute {
        path: PathMatch::prefix(path),
        backend: backend.into(),
    }
}

pub fn exact(path: &str, backend: &str) -> PathRoute {
    PathRoute {
        path: PathMatch::Exact(path.into()),
        backend: backend.into(),
    }
}

pub fn host(host: Option<&str>, paths: Vec<PathRoute>) -> HostRoutes {
    HostRoutes {
        host: HostMatch::parse(host),
        paths,
    }
}

pub fn routes(hosts: Vec<HostRoutes>, default_backend: Option<&str>) -> RouteTable {
    RouteTable {
        hosts,
        default_backend: default_backend.map(Into::into),
    }
}

/// Plain HTTP on port 80.
pub fn app(routes: RouteTable, backends: Vec<Backend>) -> ApplicationFrontend {
    ApplicationFrontend {
        http_port: 80,
        https: None,
        redirect_to_https: false,
        routes,
        backends,
        timeouts: HttpTimeouts::default(),
    }
}

pub fn app_spec(name: &str, app: ApplicationFrontend) -> LoadBalancerSpec {
    LoadBalancerSpec {
        name: name.parse().unwrap(),
        owner: owner(name),
        requested_address: None,
        requested_address_name: None,
        source_ranges: Vec::new(),
        frontend: Frontend::Application(app),
    }
}
