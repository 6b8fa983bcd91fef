//! The data plane: the L4 proxy serving one load balancer's listeners.
//!
//! Each listener runs one accept (or receive) task that owns its socket; the routing
//! configuration reaches it as an immutable [`select::PoolSnapshot`] through a `watch`
//! channel, so an update swaps it without stopping the socket or touching established
//! connections. Health verdicts come from [`health`] probers shared by all listeners.

pub mod affinity;
pub mod health;
pub mod proxy_protocol;
pub mod select;
pub mod source_ranges;
mod tcp;
mod udp;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;
use portico_provider::{Listener, PortStatus, Protocol, SessionAffinity};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::health::{HealthCell, HealthRegistry, ProbeKey};
use self::select::{Backend, PoolSnapshot, Selector};
use self::source_ranges::SourceRanges;

/// Traffic counters of one listener, bumped lock-free by its connections.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections (TCP) or flows (UDP) that were sent to a target.
    pub accepted: AtomicU64,
    /// Refused because the client is outside the source ranges.
    pub rejected_source: AtomicU64,
    /// Refused because no target was usable (all unhealthy, or none could be connected).
    pub rejected_no_target: AtomicU64,
    /// Connections or flows open now.
    pub active: AtomicU64,
    /// Bytes from clients to targets.
    pub bytes_in: AtomicU64,
    /// Bytes from targets to clients.
    pub bytes_out: AtomicU64,
}

impl Stats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Keeps [`Stats::active`] right however a connection ends.
struct ActiveGuard(Arc<Stats>);

impl ActiveGuard {
    fn new(stats: &Arc<Stats>) -> Self {
        stats.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(stats.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

type ListenerKey = (Protocol, u16);

/// One load balancer's listeners and probers on its address.
pub struct LoadBalancer {
    name: String,
    address: IpAddr,
    listeners: BTreeMap<ListenerKey, RunningListener>,
    ports: Vec<PortStatus>,
    health: HealthRegistry,
    /// Cancelled when the load balancer goes away: closes every connection it carries.
    connections: CancellationToken,
}

struct RunningListener {
    name: String,
    config: watch::Sender<Arc<PoolSnapshot>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    stats: Arc<Stats>,
}

/// A listener's counters with what identifies it, for metrics.
pub struct ListenerStats<'a> {
    pub name: &'a str,
    pub protocol: Protocol,
    pub port: u16,
    pub stats: &'a Stats,
}

impl LoadBalancer {
    pub fn new(name: impl Into<String>, address: IpAddr) -> Self {
        LoadBalancer {
            name: name.into(),
            address,
            listeners: BTreeMap::new(),
            ports: Vec::new(),
            health: HealthRegistry::default(),
            connections: CancellationToken::new(),
        }
    }

    pub fn address(&self) -> IpAddr {
        self.address
    }

    /// Makes the running listeners match `listeners`: kept ones get the new configuration in
    /// place, new ones are bound, removed ones stop accepting (their TCP connections run on).
    /// Returns one status per listener, in order; a port that could not be bound carries the
    /// error and is tried again by the next `apply`.
    pub async fn apply(
        &mut self,
        source_ranges: &[IpNet],
        listeners: &[Listener],
    ) -> Vec<PortStatus> {
        let wanted: BTreeMap<ListenerKey, &Listener> = listeners
            .iter()
            .map(|l| ((l.protocol, l.port), l))
            .collect();

        let removed: Vec<ListenerKey> = self
            .listeners
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in removed {
            if let Some(listener) = self.listeners.remove(&key) {
                listener.stop.cancel();
                // Waiting lets a later apply bind the same port again straight away.
                let _ = listener.task.await;
                tracing::info!(lb = %self.name, protocol = %key.0, port = key.1, "listener removed");
            }
        }

        let probes = listeners
            .iter()
            .flat_map(|l| {
                l.pool.targets.iter().map(|t| {
                    (
                        ProbeKey::new(t.address, &l.pool.health_check.probe),
                        l.pool.health_check.clone(),
                        t.node.clone(),
                    )
                })
            })
            .collect();
        self.health.apply(&self.name, probes);

        let ranges = SourceRanges::new(source_ranges);
        let mut ports = Vec::with_capacity(listeners.len());
        for listener in listeners {
            let key = (listener.protocol, listener.port);
            let snapshot = Arc::new(self.snapshot(listener, &ranges));
            let error = match self.listeners.get_mut(&key) {
                Some(running) => {
                    running.name.clone_from(&listener.name);
                    running.config.send_replace(snapshot);
                    None
                }
                None => match self.start_listener(listener, snapshot).await {
                    Ok(running) => {
                        self.listeners.insert(key, running);
                        None
                    }
                    Err(e) => {
                        tracing::warn!(lb = %self.name, protocol = %key.0, port = key.1, error = %e,
                            "cannot serve port");
                        Some(e.to_string())
                    }
                },
            };
            ports.push(PortStatus {
                protocol: listener.protocol,
                port: listener.port,
                error,
            });
        }
        self.ports = ports.clone();
        ports
    }

    /// The statuses of the last [`Self::apply`].
    pub fn ports(&self) -> &[PortStatus] {
        &self.ports
    }

    /// True when some listener of the last apply could not be bound.
    pub fn has_failed_ports(&self) -> bool {
        self.ports.iter().any(|p| p.error.is_some())
    }

    /// Stops every listener and prober and closes every connection.
    pub async fn shutdown(mut self) {
        self.connections.cancel();
        for listener in std::mem::take(&mut self.listeners).into_values() {
            listener.stop.cancel();
            let _ = listener.task.await;
        }
    }

    pub fn listener_stats(&self) -> impl Iterator<Item = ListenerStats<'_>> {
        self.listeners
            .iter()
            .map(|(&(protocol, port), l)| ListenerStats {
                name: &l.name,
                protocol,
                port,
                stats: &l.stats,
            })
    }

    pub fn health(&self) -> &HealthRegistry {
        &self.health
    }

    fn snapshot(&self, listener: &Listener, ranges: &SourceRanges) -> PoolSnapshot {
        let pool = &listener.pool;
        let backends = pool
            .targets
            .iter()
            .map(|t| Backend {
                node: t.node.clone(),
                addr: SocketAddr::new(t.address, t.port),
                health: self
                    .health
                    .cell(&ProbeKey::new(t.address, &pool.health_check.probe))
                    .unwrap_or_else(|| Arc::new(HealthCell::default())),
            })
            .collect();
        PoolSnapshot {
            backends,
            affinity: match pool.affinity {
                SessionAffinity::ClientIp { timeout } => Some(timeout),
                // Refused by validation for L4 listeners: there is no cookie to read.
                SessionAffinity::None | SessionAffinity::Cookie { .. } => None,
            },
            proxy_protocol: pool.proxy_protocol,
            preserve_client_ip: pool.preserve_client_ip,
            source_ranges: ranges.clone(),
        }
    }

    async fn start_listener(
        &self,
        listener: &Listener,
        snapshot: Arc<PoolSnapshot>,
    ) -> std::io::Result<RunningListener> {
        let local = SocketAddr::new(self.address, listener.port);
        let (tx, rx) = watch::channel(snapshot);
        let stop = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        let ctx = ListenerContext {
            lb: self.name.clone().into(),
            local,
            config: rx,
            selector: Arc::new(Selector::default()),
            stats: stats.clone(),
            stop: stop.clone(),
            connections: self.connections.clone(),
        };
        let task = match listener.protocol {
            Protocol::Tcp => {
                let socket = tcp::bind(local)?;
                tokio::spawn(tcp::serve(socket, ctx))
            }
            Protocol::Udp => {
                let socket = udp::bind(local)?;
                tokio::spawn(udp::serve(socket, ctx))
            }
        };
        tracing::info!(lb = %self.name, listener = %listener.name, protocol = %listener.protocol,
            %local, "listening");
        Ok(RunningListener {
            name: listener.name.clone(),
            config: tx,
            stop,
            task,
            stats,
        })
    }
}

impl Drop for LoadBalancer {
    /// A load balancer dropped without [`Self::shutdown`] still releases its sockets.
    fn drop(&mut self) {
        self.connections.cancel();
        for listener in self.listeners.values() {
            listener.stop.cancel();
        }
    }
}

/// What a listener task works with.
struct ListenerContext {
    lb: Arc<str>,
    local: SocketAddr,
    config: watch::Receiver<Arc<PoolSnapshot>>,
    selector: Arc<Selector>,
    stats: Arc<Stats>,
    /// Stop accepting (the listener was removed).
    stop: CancellationToken,
    /// Close every connection (the load balancer was deleted).
    connections: CancellationToken,
}

impl ListenerContext {
    /// The current configuration; costs an atomic load unless it changed.
    fn current(&mut self, cached: &mut Arc<PoolSnapshot>) {
        if self.config.has_changed().unwrap_or(false) {
            *cached = self.config.borrow_and_update().clone();
        }
    }
}
