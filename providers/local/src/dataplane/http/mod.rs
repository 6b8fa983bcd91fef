//! The L7 data plane: HTTP(S) load balancers (`Frontend::Application`).
//!
//! One [`HttpFrontend`] per load balancer serves its plain HTTP port and, with TLS, its HTTPS
//! port. Every request reads the current [`config::Snapshot`] (routes, backends, timeouts)
//! with one lock-free load, so an update swaps the snapshot without touching listeners or
//! in-flight requests; certificates rotate the same way inside [`tls::SniResolver`].
//!
//! Modules: [`config`] (the snapshot), [`balance`] (target choice and cookie affinity),
//! [`headers`] (hop-by-hop and forwarding headers), [`h1`] (HTTP/1.1 client connections
//! without hyper for bodiless requests), [`proxy`] (one request through hyper), [`direct`]
//! (bodiless requests on raw pooled connections), [`upstream`] (hyper's client for requests
//! with a body and upgrades), [`pool`] (what their per-worker pools share), [`body`]
//! (response bodies), [`server`] (listeners and client connections), [`tls`] (certificates),
//! [`stats`] (request counters).

pub mod balance;
mod body;
pub mod config;
mod direct;
mod h1;
pub mod headers;
mod pool;
mod proxy;
mod server;
pub mod stats;
pub mod tls;
mod upstream;

use portico_provider::TlsVersion;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use portico_provider::{ApplicationFrontend, PortStatus, Protocol};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use self::config::{BackendState, Snapshot};
use self::proxy::Shared;
use self::stats::RequestCounters;
use self::tls::{CertStore, SniResolver};
use super::health::{HealthRegistry, ProbeKey};
use super::source_ranges::SourceRanges;
use super::{Stats, workers};

pub use self::pool::SWEEP_EVERY as SWEEP_IDLE_EVERY;

/// Closes the calling worker's idle connections to targets that expired or were closed.
pub fn sweep_idle_connections() {
    direct::sweep_idle();
    upstream::sweep_idle();
}

/// A validated application frontend, its certificates parsed.
#[derive(Debug)]
pub struct Plan {
    pub app: ApplicationFrontend,
    /// Present when the frontend has an HTTPS listener.
    pub certificates: Option<Arc<CertStore>>,
}

impl Plan {
    /// The (address, probe) pairs to health-check, with check settings and node names.
    pub fn probes(&self) -> Vec<(ProbeKey, portico_provider::HealthCheck, String)> {
        self.app
            .backends
            .iter()
            .flat_map(|b| {
                b.pool.targets.iter().map(|t| {
                    (
                        ProbeKey::new(t.address, &b.pool.health_check.probe),
                        b.pool.health_check.clone(),
                        t.node.clone(),
                    )
                })
            })
            .collect()
    }

    /// The ports to serve: plain HTTP, then HTTPS when configured (`true` = TLS).
    fn ports(&self) -> Vec<(u16, bool)> {
        let mut ports = vec![(self.app.http_port, false)];
        ports.extend(self.app.https.as_ref().map(|h| (h.port, true)));
        ports
    }
}

/// One L7 load balancer's listeners and configuration.
pub struct HttpFrontend {
    shared: Arc<Shared>,
    address: IpAddr,
    ports: BTreeMap<u16, RunningPort>,
    /// The certificates, the acceptor HTTPS ports were started with, and its minimum version.
    tls: Option<(Arc<SniResolver>, TlsAcceptor, TlsVersion)>,
    /// Backend state that outlives updates, by backend name.
    states: HashMap<String, Arc<BackendState>>,
}

struct RunningPort {
    tls: bool,
    stop: CancellationToken,
    /// One accept loop per proxy worker.
    tasks: Vec<JoinHandle<()>>,
    stats: Arc<Stats>,
}

/// A port's counters with what identifies it, for metrics.
pub struct PortStats<'a> {
    pub port: u16,
    pub tls: bool,
    pub stats: &'a Stats,
}

impl HttpFrontend {
    /// Serves nothing until [`Self::apply`]. `connections` ends every connection when
    /// cancelled.
    pub fn new(
        lb: &str,
        address: IpAddr,
        connections: CancellationToken,
        plan: &Plan,
        health: &HealthRegistry,
    ) -> Self {
        let mut states = HashMap::new();
        let snapshot = Snapshot::build(&plan.app, SourceRanges::default(), health, &mut states);
        HttpFrontend {
            shared: Arc::new(Shared {
                lb: lb.into(),
                config: ArcSwap::from_pointee(snapshot),
                unrouted: RequestCounters::default(),
                connections,
            }),
            address,
            ports: BTreeMap::new(),
            tls: None,
            states,
        }
    }

    /// Brings the frontend to `plan`: the new snapshot and certificates apply to the next
    /// request and handshake; kept ports keep their sockets and connections; removed ports
    /// stop accepting and let their connections finish. Returns one status per port.
    pub async fn apply(
        &mut self,
        source_ranges: &[IpNet],
        plan: &Plan,
        health: &HealthRegistry,
    ) -> Vec<PortStatus> {
        let mut new_acceptor = false;
        if let Some(certificates) = &plan.certificates {
            let min = plan
                .app
                .https
                .as_ref()
                .map(|h| h.min_tls_version)
                .unwrap_or_default();
            match &self.tls {
                // Same versions: rotate in place, so no handshake ever sees a gap.
                Some((resolver, _, version)) if *version == min => {
                    resolver.rotate(certificates.clone())
                }
                _ => {
                    let resolver = Arc::new(SniResolver::new(certificates.clone()));
                    let acceptor = TlsAcceptor::from(tls::server_config(resolver.clone(), min));
                    self.tls = Some((resolver, acceptor, min));
                    new_acceptor = true;
                }
            }
        }
        let snapshot = Snapshot::build(
            &plan.app,
            SourceRanges::new(source_ranges),
            health,
            &mut self.states,
        );
        self.shared.config.store(Arc::new(snapshot));

        let wanted = plan.ports();
        let stale: Vec<u16> = self
            .ports
            .iter()
            // A new acceptor (other TLS versions) takes a restart of the HTTPS ports; their
            // open connections finish on the old one.
            .filter(|(port, running)| {
                !wanted.contains(&(**port, running.tls)) || (running.tls && new_acceptor)
            })
            .map(|(port, _)| *port)
            .collect();
        for port in stale {
            if let Some(running) = self.ports.remove(&port) {
                running.stop.cancel();
                // Waiting lets the port be bound again straight away (plain <-> TLS).
                join_all(running.tasks).await;
                tracing::info!(lb = %self.shared.lb, port, "HTTP listener removed");
            }
        }

        let mut statuses = Vec::with_capacity(wanted.len());
        for (port, tls) in wanted {
            let error = if self.ports.contains_key(&port) {
                None
            } else {
                match self.start_port(port, tls) {
                    Ok(running) => {
                        self.ports.insert(port, running);
                        None
                    }
                    Err(e) => {
                        tracing::warn!(lb = %self.shared.lb, port, error = %e, "cannot serve port");
                        Some(e.to_string())
                    }
                }
            };
            statuses.push(PortStatus {
                protocol: Protocol::Tcp,
                port,
                error,
            });
        }
        statuses
    }

    fn start_port(&self, port: u16, tls: bool) -> std::io::Result<RunningPort> {
        let local = SocketAddr::new(self.address, port);
        let socket = super::tcp::bind(local)?;
        let stop = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        let acceptor = if tls {
            let (_, acceptor, _) = self
                .tls
                .as_ref()
                .expect("an HTTPS port comes with certificates");
            Some(acceptor.clone())
        } else {
            None
        };
        let port = Arc::new(server::Port {
            shared: self.shared.clone(),
            local,
            tls: acceptor,
            stats: stats.clone(),
            stop: stop.clone(),
        });
        let tasks =
            workers::get().serve_on_all(socket, |socket| server::serve(socket, port.clone()))?;
        tracing::info!(lb = %self.shared.lb, %local, tls, "listening (HTTP)");
        Ok(RunningPort {
            tls,
            stop,
            tasks,
            stats,
        })
    }

    /// Stops every listener and closes every connection.
    pub async fn shutdown(mut self) {
        self.shared.connections.cancel();
        for running in std::mem::take(&mut self.ports).into_values() {
            running.stop.cancel();
            join_all(running.tasks).await;
        }
    }

    pub fn port_stats(&self) -> impl Iterator<Item = PortStats<'_>> {
        self.ports.iter().map(|(&port, running)| PortStats {
            port,
            tls: running.tls,
            stats: &running.stats,
        })
    }

    /// Responses by backend (sorted by name), then those no backend answered (`None`).
    pub fn request_stats(&self) -> Vec<(Option<&str>, &RequestCounters)> {
        let mut stats: Vec<_> = self
            .states
            .iter()
            .map(|(name, state)| (Some(name.as_str()), &state.requests))
            .collect();
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        stats.push((None, &self.shared.unrouted));
        stats
    }
}

/// Waits for every accept loop to end (a panicked one counts as ended).
async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

impl Drop for HttpFrontend {
    /// Dropped without [`Self::shutdown`], the sockets are still released.
    fn drop(&mut self) {
        self.shared.connections.cancel();
        for running in self.ports.values() {
            running.stop.cancel();
        }
    }
}
