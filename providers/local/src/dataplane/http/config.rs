//! The configuration every request of an L7 load balancer reads: one immutable [`Snapshot`],
//! replaced as a whole on update so a request sees either the old routes, backends and
//! timeouts or the new ones, never a mix.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use http::uri::Authority;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use portico_provider::routing::RouteTable;
use portico_provider::{ApplicationFrontend, HttpTimeouts, SessionAffinity};

use super::stats::RequestCounters;
use crate::dataplane::health::{HealthCell, HealthRegistry, ProbeKey};
use crate::dataplane::select::{self, PoolSnapshot, Selector};
use crate::dataplane::source_ranges::SourceRanges;

pub struct Snapshot {
    /// Normalised, ready for [`RouteTable::resolve`].
    pub routes: RouteTable,
    pub backends: HashMap<String, BackendPool>,
    /// The HTTPS port plain requests are redirected to, when they are.
    pub redirect_to: Option<u16>,
    pub source_ranges: SourceRanges,
    pub timeouts: HttpTimeouts,
    /// How client connections are served (carries the idle timeout).
    pub server: auto::Builder<TokioExecutor>,
}

/// One backend as requests see it.
pub struct BackendPool {
    /// Targets and client-IP affinity, as the L4 selector wants them.
    pub pool: PoolSnapshot,
    /// Per target, same order as `pool.backends`.
    pub targets: Vec<HttpTarget>,
    /// The affinity cookie's name, when affinity is by cookie.
    pub cookie: Option<String>,
    pub state: Arc<BackendState>,
}

pub struct HttpTarget {
    pub addr: SocketAddr,
    pub authority: Authority,
    /// What the affinity cookie holds for this target: opaque, stable across restarts.
    pub cookie_id: String,
    /// The whole `Set-Cookie` value pinning a client to this target.
    pub set_cookie: Option<HeaderValue>,
}

/// What outlives updates of a backend: its round-robin position, client-IP pins and counters.
#[derive(Debug, Default)]
pub struct BackendState {
    pub selector: Selector,
    pub requests: RequestCounters,
}

impl Snapshot {
    /// `states` holds the backends' lasting state by name; entries of backends that are gone
    /// are dropped and new ones are added.
    pub fn build(
        app: &ApplicationFrontend,
        source_ranges: SourceRanges,
        health: &HealthRegistry,
        states: &mut HashMap<String, Arc<BackendState>>,
    ) -> Snapshot {
        states.retain(|name, _| app.backends.iter().any(|b| &b.name == name));
        let backends = app
            .backends
            .iter()
            .map(|backend| {
                let state = states.entry(backend.name.clone()).or_default().clone();
                let pool = &backend.pool;
                let cookie = match &pool.affinity {
                    SessionAffinity::Cookie { name, ttl } => Some((name, *ttl)),
                    _ => None,
                };
                let targets = pool
                    .targets
                    .iter()
                    .map(|t| {
                        let addr = SocketAddr::new(t.address, t.port);
                        let cookie_id = cookie_id(&backend.name, addr);
                        HttpTarget {
                            addr,
                            authority: Authority::try_from(addr.to_string())
                                .expect("a socket address is a valid authority"),
                            set_cookie: cookie.map(|(name, ttl)| set_cookie(name, &cookie_id, ttl)),
                            cookie_id,
                        }
                    })
                    .collect();
                let selectable = PoolSnapshot {
                    backends: pool
                        .targets
                        .iter()
                        .map(|t| select::Backend {
                            node: t.node.clone(),
                            addr: SocketAddr::new(t.address, t.port),
                            health: health
                                .cell(&ProbeKey::new(t.address, &pool.health_check.probe))
                                .unwrap_or_else(|| Arc::new(HealthCell::default())),
                        })
                        .collect(),
                    affinity: match pool.affinity {
                        SessionAffinity::ClientIp { timeout } => Some(timeout),
                        SessionAffinity::None | SessionAffinity::Cookie { .. } => None,
                    },
                    ..PoolSnapshot::default()
                };
                let pool = BackendPool {
                    pool: selectable,
                    targets,
                    cookie: cookie.map(|(name, _)| name.clone()),
                    state,
                };
                (backend.name.clone(), pool)
            })
            .collect();
        Snapshot {
            routes: app.routes.clone().normalized(),
            backends,
            redirect_to: app
                .https
                .as_ref()
                .filter(|_| app.redirect_to_https)
                .map(|h| h.port),
            source_ranges,
            timeouts: app.timeouts.clone(),
            server: server_builder(app.timeouts.idle),
        }
    }
}

fn server_builder(idle: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper restarts this timer whenever it waits for the next request's head, so it is the
    // keep-alive idle timeout too.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle.max(Duration::from_millis(1)));
    builder.http2().timer(TokioTimer::new());
    builder
}

/// A short FNV-1a hash of the backend and target: names the target without revealing its
/// address, and stays the same across restarts so cookies outlive them.
fn cookie_id(backend: &str, addr: SocketAddr) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(backend.as_bytes());
    feed(&[0]);
    feed(addr.to_string().as_bytes());
    let mut id = String::with_capacity(16);
    let _ = write!(id, "{hash:016x}");
    id
}

/// `<name>=<id>; Path=/; Max-Age=<ttl>; HttpOnly`; a zero ttl makes a session cookie.
fn set_cookie(name: &str, id: &str, ttl: Duration) -> HeaderValue {
    let mut value = format!("{name}={id}; Path=/");
    if !ttl.is_zero() {
        let _ = write!(value, "; Max-Age={}", ttl.as_secs().max(1));
    }
    value.push_str("; HttpOnly");
    HeaderValue::try_from(value).expect("validated cookie names and hex ids form a valid header")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_ids_are_opaque_stable_and_distinct() {
        let a: SocketAddr = "127.0.0.7:8080".parse().unwrap();
        let b: SocketAddr = "127.0.0.8:8080".parse().unwrap();
        let id = cookie_id("web", a);
        assert_eq!(id, cookie_id("web", a));
        assert_ne!(id, cookie_id("web", b));
        assert_ne!(id, cookie_id("api", a));
        assert!(!id.contains("127"), "{id}");
        assert_eq!(id.len(), 16);
    }

    #[test]
    fn set_cookie_carries_path_max_age_and_http_only() {
        assert_eq!(
            set_cookie("route", "abc", Duration::from_secs(3600)),
            "route=abc; Path=/; Max-Age=3600; HttpOnly"
        );
        assert_eq!(
            set_cookie("route", "abc", Duration::ZERO),
            "route=abc; Path=/; HttpOnly"
        );
    }
}
