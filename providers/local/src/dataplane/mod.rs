//! The data plane: the L4 proxy serving one load balancer's listeners, or the L7 proxy
//! ([`http`]) serving its HTTP(S) ports.
//!
//! Each TCP listener runs one accept loop per proxy worker ([`workers`]), each on a socket of
//! its own, and each UDP listener one receive loop; the routing configuration reaches them as
//! an immutable [`select::PoolSnapshot`] through a `watch` channel, so an update swaps it
//! without stopping the sockets or touching established connections. Health verdicts come
//! from [`health`] probers shared by all listeners.

pub mod affinity;
pub mod health;
pub mod http;
pub mod proxy_protocol;
pub mod select;
pub mod source_ranges;
mod spare_buffers;
#[cfg(target_os = "linux")]
mod splice;
mod tcp;
mod udp;
pub mod workers;

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

/// What a load balancer serves, validated (see [`crate::cloud::validate`]).
#[derive(Debug)]
pub enum Plan {
    Network(Vec<Listener>),
    Application(Box<http::Plan>),
}

/// One load balancer's listeners and probers on its address.
pub struct LoadBalancer {
    name: String,
    address: IpAddr,
    listeners: BTreeMap<ListenerKey, RunningListener>,
    ports: Vec<PortStatus>,
    health: HealthRegistry,
    /// Cancelled when the load balancer goes away: closes every connection it carries.
    connections: CancellationToken,
    /// Present while the load balancer is an application (L7) one.
    http: Option<http::HttpFrontend>,
}

struct RunningListener {
    name: String,
    config: watch::Sender<Arc<PoolSnapshot>>,
    stop: CancellationToken,
    /// TCP: one accept loop per proxy worker; UDP: the one receive loop.
    tasks: Vec<JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl RunningListener {
    /// Once every loop of the listener has ended and its sockets are closed.
    async fn stopped(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
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
            http: None,
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
        if let Some(http) = self.http.take() {
            // An application load balancer turned network one: its HTTP ports go first.
            http.shutdown().await;
        }
        let wanted: BTreeMap<ListenerKey, &Listener> = listeners
            .iter()
            .map(|l| ((l.protocol, l.port), l))
            .collect();
        self.remove_listeners(|k| !wanted.contains_key(k)).await;

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

    /// Applies a validated plan: L4 listeners, or an HTTP(S) frontend.
    pub async fn apply_plan(&mut self, source_ranges: &[IpNet], plan: &Plan) -> Vec<PortStatus> {
        let plan = match plan {
            Plan::Network(listeners) => return self.apply(source_ranges, listeners).await,
            Plan::Application(plan) => plan,
        };
        // A network load balancer turned application one: its L4 listeners go first.
        self.remove_listeners(|_| true).await;
        self.health.apply(&self.name, plan.probes());
        let http = self.http.get_or_insert_with(|| {
            http::HttpFrontend::new(
                &self.name,
                self.address,
                self.connections.child_token(),
                plan,
                &self.health,
            )
        });
        let ports = http.apply(source_ranges, plan, &self.health).await;
        self.ports = ports.clone();
        ports
    }

    /// Stops the L4 listeners whose key matches; their TCP connections run on.
    async fn remove_listeners(&mut self, remove: impl Fn(&ListenerKey) -> bool) {
        let removed: Vec<ListenerKey> = self
            .listeners
            .keys()
            .filter(|k| remove(k))
            .copied()
            .collect();
        for key in removed {
            if let Some(listener) = self.listeners.remove(&key) {
                listener.stop.cancel();
                // Waiting lets a later apply bind the same port again straight away.
                listener.stopped().await;
                tracing::info!(lb = %self.name, protocol = %key.0, port = key.1, "listener removed");
            }
        }
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
        if let Some(http) = self.http.take() {
            http.shutdown().await;
        }
        for listener in std::mem::take(&mut self.listeners).into_values() {
            listener.stop.cancel();
            listener.stopped().await;
        }
    }

    /// L4 listeners, then HTTP(S) ports (named `http` and `https`).
    pub fn listener_stats(&self) -> impl Iterator<Item = ListenerStats<'_>> {
        let l4 = self
            .listeners
            .iter()
            .map(|(&(protocol, port), l)| ListenerStats {
                name: &l.name,
                protocol,
                port,
                stats: &l.stats,
            });
        let l7 = self.http.iter().flat_map(|h| {
            h.port_stats().map(|p| ListenerStats {
                name: if p.tls { "https" } else { "http" },
                protocol: Protocol::Tcp,
                port: p.port,
                stats: p.stats,
            })
        });
        l4.chain(l7)
    }

    /// The HTTP frontend, while this is an application load balancer.
    pub fn http(&self) -> Option<&http::HttpFrontend> {
        self.http.as_ref()
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
            drain_timeout: pool.drain_timeout,
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
        let tasks = match listener.protocol {
            // On the proxy workers, each with a socket of its own in one reuse-port group:
            // the kernel gives every new connection to one worker, which accepts it and runs
            // it, with its target connection, to the end. No worker is woken for another's
            // connection and none is handed across threads (on the L4 benchmark, tokio's
            // work-stealing runtime spent its difference in those wake-ups).
            Protocol::Tcp => {
                let workers = workers::get();
                let sockets = tcp::bind_group(local, workers.count())?;
                workers.serve_each(sockets, |socket| tcp::serve(socket, ctx.clone()))?
            }
            Protocol::Udp => {
                let socket = udp::bind(local)?;
                vec![tokio::spawn(udp::serve(socket, ctx))]
            }
        };
        tracing::info!(lb = %self.name, listener = %listener.name, protocol = %listener.protocol,
            %local, "listening");
        Ok(RunningListener {
            name: listener.name.clone(),
            config: tx,
            stop,
            tasks,
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

/// What a listener task works with (a TCP listener's accept loops each have a copy).
#[derive(Clone)]
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
