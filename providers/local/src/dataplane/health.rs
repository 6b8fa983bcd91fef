//! Active health checks: one prober per distinct (target address, probe) of a load balancer,
//! whose verdict every listener routing to that address reads lock-free.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use portico_provider::{HealthCheck, Probe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The shortest probe period honoured, whatever the spec says, so a typo cannot turn a prober
/// into a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(50);
/// Until a target first passes, a failed probe is retried after this, doubling up to the
/// interval: a new load balancer's targets (a node port opening moments later) should not
/// wait a whole interval to be routed to.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Enough of a response for its status line.
const MAX_STATUS_LINE: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Not probed yet.
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// A target's current verdict, written by its prober and read on every routing decision.
#[derive(Debug, Default)]
pub struct HealthCell(AtomicU8);

impl HealthCell {
    pub fn get(&self) -> Health {
        match self.0.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    pub fn set(&self, health: Health) {
        self.0.store(health as u8, Ordering::Relaxed);
    }

    pub fn with(health: Health) -> Self {
        let cell = HealthCell::default();
        cell.set(health);
        cell
    }
}

/// What is probed: `Probe` itself is not hashable, and the key is per address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeKey {
    pub address: IpAddr,
    pub port: u16,
    /// `Some` for HTTP probes.
    pub http_path: Option<String>,
}

impl ProbeKey {
    pub fn new(address: IpAddr, probe: &Probe) -> Self {
        match probe {
            Probe::Http { port, path } => ProbeKey {
                address,
                port: *port,
                http_path: Some(path.clone()),
            },
            Probe::Tcp { port } => ProbeKey {
                address,
                port: *port,
                http_path: None,
            },
        }
    }

    pub fn kind(&self) -> &'static str {
        if self.http_path.is_some() {
            "http"
        } else {
            "tcp"
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("answered {0:?}")]
    Status(String),
}

/// The probers of one load balancer.
#[derive(Default)]
pub struct HealthRegistry {
    probers: HashMap<ProbeKey, Prober>,
}

struct Prober {
    // Dropped first (fields drop in order), so the task sees the stop before the closed
    // channel.
    _stop: DropGuard,
    cell: Arc<HealthCell>,
    check: watch::Sender<HealthCheck>,
    node: String,
}

impl HealthRegistry {
    /// Runs exactly the probers in `wanted` (key, check, node name for logs): new keys start
    /// probing at once, kept ones take the new check settings, others stop. When two
    /// listeners probe one key with different settings, the first one listed wins.
    pub fn apply(&mut self, lb: &str, wanted: Vec<(ProbeKey, HealthCheck, String)>) {
        let mut seen: HashMap<ProbeKey, ()> = HashMap::with_capacity(wanted.len());
        for (key, check, node) in wanted {
            if seen.insert(key.clone(), ()).is_some() {
                continue;
            }
            match self.probers.get_mut(&key) {
                Some(prober) => {
                    prober.check.send_if_modified(|current| {
                        let changed = *current != check;
                        *current = check;
                        changed
                    });
                    prober.node = node;
                }
                None => {
                    let prober = Prober::start(lb, key.clone(), check, node);
                    self.probers.insert(key, prober);
                }
            }
        }
        self.probers.retain(|key, _| seen.contains_key(key));
    }

    /// The cell a probe's verdicts land in; `None` when `apply` did not ask for it.
    pub fn cell(&self, key: &ProbeKey) -> Option<Arc<HealthCell>> {
        self.probers.get(key).map(|p| p.cell.clone())
    }

    /// Every probe with the node it belongs to and its verdict, for metrics.
    pub fn states(&self) -> impl Iterator<Item = (&ProbeKey, &str, Health)> {
        self.probers
            .iter()
            .map(|(key, p)| (key, p.node.as_str(), p.cell.get()))
    }
}

impl Prober {
    fn start(lb: &str, key: ProbeKey, check: HealthCheck, node: String) -> Self {
        let stop = CancellationToken::new();
        let cell = Arc::new(HealthCell::default());
        let (tx, rx) = watch::channel(check);
        tokio::spawn(run(
            lb.to_string(),
            node.clone(),
            key,
            cell.clone(),
            rx,
            stop.clone(),
        ));
        Prober {
            _stop: stop.drop_guard(),
            cell,
            check: tx,
            node,
        }
    }
}

async fn run(
    lb: String,
    node: String,
    key: ProbeKey,
    cell: Arc<HealthCell>,
    mut check: watch::Receiver<HealthCheck>,
    stop: CancellationToken,
) {
    let mut successes = 0u32;
    let mut failures = 0u32;
    // Until the target first passes, failures are retried sooner than the interval.
    let mut passed_once = false;
    let mut retry = FIRST_RETRY;
    loop {
        let started = Instant::now();
        let params = check.borrow_and_update().clone();
        let result = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = probe_once(&key, params.timeout) => r,
        };
        let before = cell.get();
        let after = match &result {
            Ok(()) => {
                failures = 0;
                successes = successes.saturating_add(1);
                // The first verdict counts at once, and so does the first pass of a target
                // that never passed (it was coming up): a new target should not wait several
                // intervals to be routed to (or, failing, stay in the fail-open set).
                if before == Health::Unknown
                    || !passed_once
                    || successes >= params.healthy_threshold
                {
                    Health::Healthy
                } else {
                    before
                }
            }
            Err(_) => {
                successes = 0;
                failures = failures.saturating_add(1);
                if before == Health::Unknown || failures >= params.unhealthy_threshold {
                    Health::Unhealthy
                } else {
                    before
                }
            }
        };
        if after != before {
            cell.set(after);
            match &result {
                Ok(()) => tracing::info!(%lb, %node, address = %key.address, port = key.port,
                    probe = key.kind(), "target is healthy"),
                Err(e) => tracing::info!(%lb, %node, address = %key.address, port = key.port,
                    probe = key.kind(), error = %e, "target is unhealthy"),
            }
        } else if let Err(e) = &result {
            tracing::debug!(%lb, %node, address = %key.address, port = key.port, error = %e, "probe failed");
        }
        let interval = params.interval.max(MIN_INTERVAL);
        passed_once |= result.is_ok();
        let wait = if passed_once {
            interval
        } else {
            let wait = retry.min(interval);
            retry = (retry * 2).min(interval);
            wait
        };
        let next = started + wait;
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
            changed = check.changed() => if changed.is_err() { return },
        }
    }
}

/// One probe of `key`, bounded by `timeout` as a whole.
pub async fn probe_once(key: &ProbeKey, timeout: Duration) -> Result<(), ProbeError> {
    let addr = SocketAddr::new(key.address, key.port);
    let work = async {
        let mut stream = TcpStream::connect(addr).await?;
        if let Some(path) = &key.http_path {
            http_get(&mut stream, addr, path).await?;
        }
        Ok(())
    };
    match tokio::time::timeout(timeout.max(Duration::from_millis(1)), work).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout),
    }
}

async fn http_get(stream: &mut TcpStream, addr: SocketAddr, path: &str) -> Result<(), ProbeError> {
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: portico-local-cloud\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = [0u8; MAX_STATUS_LINE];
    let mut len = 0;
    let line_end = loop {
        if let Some(end) = buf[..len].windows(2).position(|w| w == b"\r\n") {
            break end;
        }
        if len == buf.len() {
            return Err(ProbeError::Status("an over-long status line".into()));
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(ProbeError::Status(
                String::from_utf8_lossy(&buf[..len]).into_owned(),
            ));
        }
        len += n;
    };
    let line = String::from_utf8_lossy(&buf[..line_end]);
    // "HTTP/1.1 204 No Content"
    let mut parts = line.split(' ');
    let version_ok = parts.next().is_some_and(|v| v.starts_with("HTTP/1."));
    let code = parts.next().and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(200..=299) if version_ok => Ok(()),
        _ => Err(ProbeError::Status(line.into_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn http_server(
        status_line: &'static str,
    ) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.90.250.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = vec![0u8; 1024];
            let n = s.read(&mut req).await.unwrap();
            s.write_all(format!("{status_line}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await
                .unwrap();
            String::from_utf8_lossy(&req[..n]).into_owned()
        });
        (addr, task)
    }

    fn http_key(addr: SocketAddr, path: &str) -> ProbeKey {
        ProbeKey::new(
            addr.ip(),
            &Probe::Http {
                port: addr.port(),
                path: path.into(),
            },
        )
    }

    #[tokio::test]
    async fn an_http_probe_sends_a_host_header_and_wants_2xx() {
        let (addr, server) = http_server("HTTP/1.1 204 No Content").await;
        probe_once(&http_key(addr, "/healthz"), Duration::from_secs(2))
            .await
            .unwrap();
        let request = server.await.unwrap();
        assert!(
            request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains(&format!("\r\nHost: {addr}\r\n")),
            "{request}"
        );

        let (addr, _server) = http_server("HTTP/1.1 503 Service Unavailable").await;
        let err = probe_once(&http_key(addr, "/healthz"), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProbeError::Status(ref s) if s.contains("503")),
            "{err}"
        );
    }

    fn tcp_check(key: &ProbeKey, interval: Duration) -> HealthCheck {
        HealthCheck {
            probe: Probe::Tcp { port: key.port },
            interval,
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }

    #[tokio::test]
    async fn a_new_target_that_opens_late_is_healthy_long_before_the_interval() {
        // A port picked free, then closed: the target is not listening yet.
        let listener = std::net::TcpListener::bind("127.90.250.3:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let key = ProbeKey::new(addr.ip(), &Probe::Tcp { port: addr.port() });
        let mut registry = HealthRegistry::default();
        let interval = Duration::from_secs(60);
        registry.apply(
            "lb",
            vec![(key.clone(), tcp_check(&key, interval), "node".into())],
        );
        let cell = registry.cell(&key).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cell.get() != Health::Unhealthy {
            assert!(std::time::Instant::now() < deadline, "never probed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _listener = TcpListener::bind(addr).await.unwrap();
        while cell.get() != Health::Healthy {
            assert!(
                std::time::Instant::now() < deadline,
                "still {:?}: the retry waited for the 60 s interval",
                cell.get()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_tcp_probe_fails_when_nothing_listens() {
        let listener = TcpListener::bind("127.90.250.2:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let key = ProbeKey::new(addr.ip(), &Probe::Tcp { port: addr.port() });
        probe_once(&key, Duration::from_secs(2)).await.unwrap();
        drop(listener);
        assert!(probe_once(&key, Duration::from_secs(2)).await.is_err());
    }
}
