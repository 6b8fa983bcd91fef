//! Test fixtures: a daemon on its own /24 of loopback, small targets that say who they are,
//! and clients that can pose as different hosts by binding their source address.
#![allow(dead_code)]

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use portico_local_cloud::{AddressPool, Daemon, DaemonConfig, LocalCloudProvider};
use portico_provider::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

pub const WAIT: Duration = Duration::from_secs(10);

/// A test's own 127.<a>.<b>.0/24: the pool is .1-.9, clients .50-.99, targets .100-.199, the
/// API .250.
#[derive(Clone, Copy, Debug)]
pub struct Net {
    a: u8,
    b: u8,
}

impl Net {
    pub fn new(a: u8, b: u8) -> Self {
        // 127.90-99 for L4 tests, 127.100-109 for L7 (HTTP) tests.
        assert!(
            (90..=109).contains(&a),
            "tests stay inside 127.90.0.0-127.109.255.255"
        );
        Net { a, b }
    }

    pub fn ip(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, self.a, self.b, last)
    }

    pub fn pool(&self, first: u8, last: u8) -> AddressPool {
        AddressPool::new(self.ip(first), self.ip(last)).unwrap()
    }

    pub fn client(&self, k: u8) -> Ipv4Addr {
        assert!(k < 50);
        self.ip(50 + k)
    }

    pub fn target_ip(&self, k: u8) -> Ipv4Addr {
        assert!(k < 100);
        self.ip(100 + k)
    }
}

/// The daemon's log, on stderr: nextest shows it for a failed test only, so a refused or
/// reset connection comes with the data plane's reason (`RUST_LOG` overrides the level).
fn log_to_stderr() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("portico_local_cloud=debug"));
    // A second cloud in the same test finds the subscriber already set.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

pub struct TestCloud {
    pub net: Net,
    pub daemon: Daemon,
    pub provider: LocalCloudProvider,
    pub state_file: std::path::PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl TestCloud {
    pub async fn start(net: Net) -> TestCloud {
        Self::start_with_pool(net, net.pool(1, 9)).await
    }

    pub async fn start_with_pool(net: Net, pool: AddressPool) -> TestCloud {
        let dir = tempfile::tempdir().unwrap();
        let state_file = dir.path().join("state.json");
        let mut cloud = Self::start_on(net, pool, state_file).await;
        cloud._dir = Some(dir);
        cloud
    }

    /// A daemon on an existing state file (the caller keeps its directory).
    pub async fn start_on(
        net: Net,
        pool: AddressPool,
        state_file: std::path::PathBuf,
    ) -> TestCloud {
        log_to_stderr();
        let daemon = Daemon::start(DaemonConfig {
            listen: SocketAddr::from((net.ip(250), 0)),
            pool,
            state_file: state_file.clone(),
        })
        .await
        .unwrap();
        let provider = daemon.provider();
        TestCloud {
            net,
            daemon,
            provider,
            state_file,
            _dir: None,
        }
    }

    pub async fn stop(self) {
        self.daemon.shutdown().await;
    }

    /// The daemon's /metrics text.
    pub async fn metrics(&self) -> String {
        http_get(self.daemon.api_addr(), "/metrics").await.1
    }

    /// Waits until `lb` has `healthy` probes healthy and `unhealthy` unhealthy.
    pub async fn wait_health(&self, lb: &str, healthy: usize, unhealthy: usize) {
        let lb_label = format!("lb=\"{lb}\"");
        eventually(
            &format!("{lb}: {healthy} healthy, {unhealthy} unhealthy"),
            || async {
                let text = self.metrics().await;
                let count = |state: &str| {
                    text.lines()
                        .filter(|l| l.starts_with("portico_local_cloud_target_health{"))
                        .filter(|l| l.contains(&lb_label))
                        .filter(|l| l.contains(&format!("state=\"{state}\"")) && l.ends_with(" 1"))
                        .count()
                };
                count("healthy") == healthy && count("unhealthy") == unhealthy
            },
        )
        .await;
    }
}

/// A bare HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let status = raw[9..12].parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Polls `check` until it holds, failing the test after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn owner(name: &str) -> Ownership {
    Ownership {
        cluster_id: "test-cluster".into(),
        object_uid: format!("uid-{name}"),
        object_ref: format!("Service/default/{name}"),
    }
}

pub fn target(node: &str, addr: SocketAddr) -> Target {
    Target {
        node: node.into(),
        address: addr.ip(),
        port: addr.port(),
        provider_id: None,
    }
}

/// Probes every `interval` with thresholds of 1, so tests see verdicts quickly.
pub fn fast_check(probe: Probe) -> HealthCheck {
    HealthCheck {
        probe,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    }
}

pub fn listener(
    protocol: Protocol,
    port: u16,
    targets: Vec<Target>,
    check: HealthCheck,
) -> Listener {
    Listener {
        name: format!("{}-{port}", protocol.as_str().to_lowercase()),
        protocol,
        port,
        pool: TargetPool {
            targets,
            health_check: check,
            affinity: SessionAffinity::None,
            proxy_protocol: false,
            preserve_client_ip: false,
            drain_timeout: None,
        },
    }
}

/// A TCP listener on `port` whose targets are health-checked with a TCP connect to their
/// own port.
pub fn tcp_listener(port: u16, targets: &[&TcpTarget]) -> Listener {
    let probe_port = targets.first().map_or(1, |t| t.addr.port());
    listener(
        Protocol::Tcp,
        port,
        targets.iter().map(|t| target(&t.name, t.addr)).collect(),
        fast_check(Probe::Tcp { port: probe_port }),
    )
}

pub fn spec(name: &str, listeners: Vec<Listener>) -> LoadBalancerSpec {
    LoadBalancerSpec {
        name: name.parse().unwrap(),
        owner: owner(name),
        requested_address: None,
        requested_address_name: None,
        source_ranges: Vec::new(),
        frontend: Frontend::Network(NetworkFrontend { listeners }),
    }
}

pub fn address_of(status: &LoadBalancerStatus) -> Ipv4Addr {
    match status.addresses.as_slice() {
        [Address::Ip(IpAddr::V4(a))] => *a,
        other => panic!("expected one IPv4 address, got {other:?}"),
    }
}

/// How a [`TcpTarget`] greets a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Greeting {
    /// `<name> <peer address>\n`, then echo.
    Plain,
    /// Reads a PROXY v2 header first, then `<name> <header as hex>\n`, then echo.
    ProxyV2,
}

/// The next connection of a test server. An accept error is logged and passed over, as a real
/// server does: a target that stopped listening would be blamed on the load balancer.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                let local = listener.local_addr().ok();
                eprintln!("test server on {local:?}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A TCP target that greets every connection with who it is and then echoes.
pub struct TcpTarget {
    pub name: String,
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpTarget {
    /// All test targets share one port number on different addresses, as node ports do.
    pub async fn start(name: &str, ip: Ipv4Addr, port: u16, greeting: Greeting) -> TcpTarget {
        let listener = TcpListener::bind((ip, port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let who = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let (stream, peer) = accept(&listener).await;
                let who = who.clone();
                tokio::spawn(async move {
                    let _ = serve_target(stream, peer, &who, greeting).await;
                });
            }
        });
        TcpTarget {
            name: name.into(),
            addr,
            task,
        }
    }
}

impl Drop for TcpTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_target(
    mut stream: TcpStream,
    peer: SocketAddr,
    who: &str,
    greeting: Greeting,
) -> std::io::Result<()> {
    let hello = match greeting {
        Greeting::Plain => format!("{who} {peer}\n"),
        Greeting::ProxyV2 => {
            let mut fixed = [0u8; 16];
            stream.read_exact(&mut fixed).await?;
            let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
            let mut rest = vec![0u8; len];
            stream.read_exact(&mut rest).await?;
            let hex: String = fixed
                .iter()
                .chain(&rest)
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("{who} {hex}\n")
        }
    };
    stream.write_all(hello.as_bytes()).await?;
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// A UDP target answering every datagram with `<name> <peer> <payload>`.
pub struct UdpTarget {
    pub name: String,
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl UdpTarget {
    pub async fn start(name: &str, ip: Ipv4Addr, port: u16) -> UdpTarget {
        let socket = UdpSocket::bind((ip, port)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let who = name.to_string();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let reply = format!("{who} {peer} {}", String::from_utf8_lossy(&buf[..n]));
                let _ = socket.send_to(reply.as_bytes(), peer).await;
            }
        });
        UdpTarget {
            name: name.into(),
            addr,
            task,
        }
    }
}

impl Drop for UdpTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP health endpoint answering 200 or 503 as told.
pub struct HealthServer {
    healthy: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl HealthServer {
    pub async fn start(ip: Ipv4Addr, port: u16) -> HealthServer {
        let listener = TcpListener::bind((ip, port)).await.unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = healthy.clone();
        let task = tokio::spawn(async move {
            loop {
                let (mut stream, _) = accept(&listener).await;
                let ok = flag.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let status = if ok {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    };
                    let _ = stream
                        .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
                        .await;
                });
            }
        });
        HealthServer { healthy, task }
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client connection, line oriented.
pub struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    pub local: SocketAddr,
}

/// A TCP connection from `source` (any port) to `dst`, given up after [`WAIT`].
pub async fn connect_from(source: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    tokio::time::timeout(WAIT, socket.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))?
}

impl Conn {
    /// Connects from `source` (any port) to `dst`.
    pub async fn open(source: Ipv4Addr, dst: SocketAddr) -> std::io::Result<Conn> {
        let stream = connect_from(source, dst).await?;
        let local = stream.local_addr()?;
        let (r, w) = stream.into_split();
        Ok(Conn {
            reader: BufReader::new(r),
            writer: w,
            local,
        })
    }

    /// The next line, or `None` at EOF or reset.
    pub async fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match tokio::time::timeout(WAIT, self.reader.read_line(&mut line)).await {
            Ok(Ok(0)) | Ok(Err(_)) => None,
            Ok(Ok(_)) => Some(line.trim_end().to_string()),
            Err(_) => panic!("no line within {WAIT:?}"),
        }
    }

    /// Sends a line and expects it echoed back.
    pub async fn echo(&mut self, text: &str) -> bool {
        if self
            .writer
            .write_all(format!("{text}\n").as_bytes())
            .await
            .is_err()
        {
            return false;
        }
        self.line().await.as_deref() == Some(text)
    }

    /// True once the proxy has closed (or reset) the connection.
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(WAIT, self.reader.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// Which target answers a new connection from `source` to `dst` (the first word of its
/// greeting); `None` when the connection is refused or closed without a greeting.
pub async fn who(source: Ipv4Addr, dst: SocketAddr) -> Option<String> {
    let mut conn = Conn::open(source, dst).await.ok()?;
    let line = conn.line().await?;
    Some(line.split(' ').next().unwrap().to_string())
}

/// Targets answering `n` connections in a row.
pub async fn whos(source: Ipv4Addr, dst: SocketAddr, n: usize) -> Vec<String> {
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        names.push(who(source, dst).await.expect("a target answers"));
    }
    names
}
