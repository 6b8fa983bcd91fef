//! A kube-proxy stand-in for every node: node ports (TCP and UDP) forwarded to ready service
//! endpoints, health check node ports, and the node's own `:10256/healthz`.
//!
//! Listeners follow Services, Endpoints and Nodes live. A listener whose port goes away stops
//! accepting, but its established TCP connections run to their end. A node removed from the
//! cluster keeps its proxy (like a VM that is still up) until the agent stops.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::ResourceExt;
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::watch,
};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

use super::{
    cluster::{Cluster, next_round, ok},
    endpoints::{Backend, Balancer, for_node, local_endpoint_count, ready_backends},
    error::AgentError,
    health::{self, NODE_HEALTH_PORT, NodeHealth, ServiceHealth, TO_BE_DELETED_TAINT},
    net::{self, L4},
};
use crate::address_plan::AddressPlan;

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_SECONDS: u64 = 10800;
/// UDP flows without traffic either way for this long are forgotten.
pub(crate) const UDP_IDLE: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many endpoints a new TCP connection tries before giving up (the first one may have
/// just gone away while the Endpoints object still lists it).
const CONNECT_ATTEMPTS: usize = 3;
/// A node port that could not be bound is tried again after this long.
const REBIND_AFTER: Duration = Duration::from_secs(30);
const RESYNC: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ListenerKey {
    pub node: u8,
    pub protocol: L4,
    pub port: u16,
}

impl ListenerKey {
    fn addr(&self, plan: &AddressPlan) -> SocketAddr {
        SocketAddr::from((plan.node_ip(self.node), self.port))
    }
}

/// Where a node port sends traffic.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ForwardRoute {
    /// `namespace/name:port-name`, for logs.
    pub service_port: String,
    pub node_ip: Ipv4Addr,
    /// `externalTrafficPolicy: Local`: own pods only, and the client's address is kept.
    pub local_only: bool,
    pub affinity: Option<Duration>,
    /// The backends this node may use, already filtered by the traffic policy.
    pub backends: Vec<Backend>,
}

impl ForwardRoute {
    /// The address upstream connections come from: the node's (kube-proxy SNATs) or, for
    /// `Local`, the client's own, so the pod sees who is calling.
    fn source(&self, client: IpAddr) -> IpAddr {
        if self.local_only {
            client
        } else {
            IpAddr::V4(self.node_ip)
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Desired {
    Forward(ForwardRoute),
    Health(ServiceHealth),
}

/// Every listener the nodes should have, plus warnings about what had to be skipped.
pub(crate) fn desired_listeners<'a>(
    plan: &AddressPlan,
    node_count: u8,
    services: &[&'a Service],
    endpoints_of: impl Fn(&str, &str) -> Option<&'a Endpoints>,
) -> (BTreeMap<ListenerKey, Desired>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut services = services.to_vec();
    // Oldest first, so that if two services ever claim one port the older one keeps it.
    services.sort_by_key(|s| {
        (
            s.metadata.creation_timestamp.clone(),
            s.namespace(),
            s.name_any(),
        )
    });
    fn claim(
        out: &mut BTreeMap<ListenerKey, Desired>,
        warnings: &mut Vec<String>,
        key: ListenerKey,
        what: &str,
        desired: Desired,
    ) {
        match out.entry(key) {
            std::collections::btree_map::Entry::Occupied(_) => warnings.push(format!(
                "{what}: node port {} is already used by another service; skipped",
                key.port
            )),
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(desired);
            }
        }
    }
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        if !matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")) {
            continue;
        }
        let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
        let local_only = spec.external_traffic_policy.as_deref() == Some("Local");
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            let seconds = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .filter(|s| *s > 0)
                .unwrap_or(DEFAULT_AFFINITY_SECONDS);
            Duration::from_secs(seconds)
        });
        let endpoints = endpoints_of(&ns, &name);
        for port in spec.ports.iter().flatten() {
            let Some(node_port) = port.node_port.filter(|p| *p != 0) else {
                continue;
            };
            let port_name = port.name.clone().unwrap_or_default();
            let what = format!("service {ns}/{name} port {port_name:?}");
            let Some(node_port) = u16::try_from(node_port).ok() else {
                warnings.push(format!(
                    "{what}: node port {node_port} is out of range; skipped"
                ));
                continue;
            };
            let Some(protocol) = L4::from_k8s(port.protocol.as_deref()) else {
                warnings.push(format!(
                    "{what}: protocol {} is not supported by the testbed's kube-proxy; skipped",
                    port.protocol.as_deref().unwrap_or_default()
                ));
                continue;
            };
            let (backends, skipped) =
                ready_backends(plan, endpoints, &port_name, protocol.as_str());
            warnings.extend(
                skipped
                    .into_iter()
                    .map(|s| format!("{what}: endpoint {s}; skipped")),
            );
            for k in 1..=node_count {
                let route = ForwardRoute {
                    service_port: format!("{ns}/{name}:{port_name}"),
                    node_ip: plan.node_ip(k),
                    local_only,
                    affinity,
                    backends: for_node(&backends, local_only, &plan.node_name(k)),
                };
                let key = ListenerKey {
                    node: k,
                    protocol,
                    port: node_port,
                };
                claim(&mut out, &mut warnings, key, &what, Desired::Forward(route));
            }
        }
        let health_port = spec.health_check_node_port.filter(|p| *p != 0);
        if let (true, Some(port)) = (local_only, health_port) {
            let what = format!("service {ns}/{name} health check");
            let Ok(port) = u16::try_from(port) else {
                warnings.push(format!("{what}: node port {port} is out of range; skipped"));
                continue;
            };
            for k in 1..=node_count {
                let health = ServiceHealth {
                    namespace: ns.clone(),
                    name: name.clone(),
                    local_endpoints: local_endpoint_count(endpoints, &plan.node_name(k)),
                };
                let key = ListenerKey {
                    node: k,
                    protocol: L4::Tcp,
                    port,
                };
                claim(&mut out, &mut warnings, key, &what, Desired::Health(health));
            }
        }
    }
    warnings.sort();
    warnings.dedup();
    (out, warnings)
}

/// A started listener and the channel that updates it in place.
enum Running {
    Forward {
        route: watch::Sender<Arc<ForwardRoute>>,
        _stop: DropGuard,
    },
    Health {
        health: watch::Sender<ServiceHealth>,
        _stop: DropGuard,
    },
}

struct Proxies {
    cluster: Arc<Cluster>,
    running: BTreeMap<ListenerKey, Running>,
    /// Keys that could not be bound, and when to try again.
    failed: HashMap<ListenerKey, Instant>,
    /// Warnings already logged, so a steady state doesn't repeat them.
    warned: HashSet<String>,
}

/// Runs every node's kube-proxy stand-in until the agent stops.
pub(crate) async fn run(cluster: Arc<Cluster>) -> Result<(), AgentError> {
    let plan = cluster.plan;
    // Node health servers first: failing to bind one means another agent owns this slot.
    let mut node_health = Vec::new();
    let started = jiff::Timestamp::now();
    for k in 1..=cluster.node_count {
        let addr = SocketAddr::from((plan.node_ip(k), NODE_HEALTH_PORT));
        let listener = net::bind_tcp(addr).map_err(|source| AgentError::Bind {
            addr,
            protocol: "TCP",
            source,
        })?;
        let (tx, rx) = watch::channel(NodeHealth {
            eligible: true,
            last_updated: started,
        });
        tokio::spawn(health::serve(
            listener,
            cluster.shutdown.clone(),
            move |path| health::node_health_response(path, &rx.borrow(), jiff::Timestamp::now()),
        ));
        node_health.push(tx);
    }
    cluster.services.ready().await?;
    cluster.endpoints.ready().await?;
    cluster.nodes.ready().await?;
    let mut changes = [
        cluster.services.subscribe(),
        cluster.endpoints.subscribe(),
        cluster.nodes.subscribe(),
        cluster.subscribe_removals(),
    ];
    let mut proxies = Proxies {
        cluster: cluster.clone(),
        running: BTreeMap::new(),
        failed: HashMap::new(),
        warned: HashSet::new(),
    };
    loop {
        proxies.reconcile();
        let now = jiff::Timestamp::now();
        for (i, tx) in node_health.iter().enumerate() {
            let eligible = node_eligible(&cluster, i as u8 + 1);
            if eligible != tx.borrow().eligible {
                info!(node = %plan.node_name(i as u8 + 1), eligible, "kube-proxy health changed");
            }
            tx.send_replace(NodeHealth {
                eligible,
                last_updated: now,
            });
        }
        let [a, b, c, d] = &mut changes;
        if !next_round(&mut [a, b, c, d], RESYNC, &cluster.shutdown).await {
            return Ok(());
        }
    }
}

/// Whether load balancers should keep sending new connections to node `k` (KEP-3836).
fn node_eligible(cluster: &Cluster, k: u8) -> bool {
    if cluster.is_removed(k) {
        return false;
    }
    let Some(node) = cluster.node(k) else {
        return true;
    };
    let Some(node) = ok(&node) else { return true };
    node.metadata.deletion_timestamp.is_none()
        && !node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| ts.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

impl Proxies {
    fn reconcile(&mut self) {
        let cluster = self.cluster.clone();
        let services = cluster.services.valid();
        let services: Vec<&Service> = services.iter().filter_map(|g| ok(g)).collect();
        let endpoints = cluster.endpoints.valid();
        let by_name: HashMap<(String, String), &Endpoints> = endpoints
            .iter()
            .filter_map(|g| ok(g))
            .map(|e| ((e.namespace().unwrap_or_default(), e.name_any()), e))
            .collect();
        let (desired, warnings) =
            desired_listeners(&cluster.plan, cluster.node_count, &services, |ns, name| {
                by_name.get(&(ns.to_owned(), name.to_owned())).copied()
            });
        for warning in &warnings {
            if !self.warned.contains(warning) {
                warn!("{warning}");
            }
        }
        self.warned = warnings.into_iter().collect();

        // Stop what is no longer wanted (or changed kind).
        self.running.retain(|key, running| {
            let keep = matches!(
                (desired.get(key), &*running),
                (Some(Desired::Forward(_)), Running::Forward { .. }) | (Some(Desired::Health(_)), Running::Health { .. })
            );
            if !keep {
                info!(node = key.node, port = key.port, protocol = %key.protocol, "closing node port");
            }
            keep
        });
        self.failed.retain(|key, _| desired.contains_key(key));

        let now = Instant::now();
        for (key, want) in desired {
            match (self.running.get(&key), want) {
                (Some(Running::Forward { route, .. }), Desired::Forward(new)) => {
                    route.send_if_modified(|current| {
                        let changed = **current != new;
                        if changed {
                            *current = Arc::new(new);
                        }
                        changed
                    });
                }
                (Some(Running::Health { health, .. }), Desired::Health(new)) => {
                    health.send_if_modified(|current| {
                        let changed = *current != new;
                        if changed {
                            *current = new;
                        }
                        changed
                    });
                }
                (Some(_), _) => unreachable!("mismatched kinds were stopped above"),
                (None, want) => {
                    if self.failed.get(&key).is_some_and(|retry| *retry > now) {
                        continue;
                    }
                    match self.start(key, want) {
                        Ok(running) => {
                            self.failed.remove(&key);
                            self.running.insert(key, running);
                        }
                        Err(error) => {
                            warn!(%error, "node port skipped; retrying in {}s", REBIND_AFTER.as_secs());
                            self.failed.insert(key, now + REBIND_AFTER);
                        }
                    }
                }
            }
        }
    }

    fn start(&self, key: ListenerKey, want: Desired) -> Result<Running, AgentError> {
        let addr = key.addr(&self.cluster.plan);
        let bind_error = |source| AgentError::Bind {
            addr,
            protocol: key.protocol.as_str(),
            source,
        };
        let stop = self.cluster.shutdown.child_token();
        let running = match (want, key.protocol) {
            (Desired::Forward(route), L4::Tcp) => {
                let listener = net::bind_tcp(addr).map_err(bind_error)?;
                info!(%addr, service = %route.service_port, "node port open (TCP)");
                let (tx, rx) = watch::channel(Arc::new(route));
                tokio::spawn(tcp_forward(
                    listener,
                    rx,
                    stop.clone(),
                    self.cluster.shutdown.clone(),
                ));
                Running::Forward {
                    route: tx,
                    _stop: stop.drop_guard(),
                }
            }
            (Desired::Forward(route), L4::Udp) => {
                let socket = net::bind_udp(addr).map_err(bind_error)?;
                info!(%addr, service = %route.service_port, "node port open (UDP)");
                let (tx, rx) = watch::channel(Arc::new(route));
                tokio::spawn(udp_forward(Arc::new(socket), rx, stop.clone()));
                Running::Forward {
                    route: tx,
                    _stop: stop.drop_guard(),
                }
            }
            (Desired::Health(health), _) => {
                let listener = net::bind_tcp(addr).map_err(bind_error)?;
                info!(%addr, service = %format!("{}/{}", health.namespace, health.name), "health check node port open");
                let (tx, rx) = watch::channel(health);
                tokio::spawn(health::serve(listener, stop.clone(), move |_path| {
                    health::service_health_response(&rx.borrow())
                }));
                Running::Health {
                    health: tx,
                    _stop: stop.drop_guard(),
                }
            }
        };
        Ok(running)
    }
}

async fn tcp_forward(
    listener: TcpListener,
    route: watch::Receiver<Arc<ForwardRoute>>,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    let balancer = Arc::new(Mutex::new(Balancer::default()));
    loop {
        let (client, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "node port accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let route = route.borrow().clone();
        let balancer = balancer.clone();
        // Not tied to `stop`: established connections outlive a removed node port.
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = proxy_tcp(client, peer, &route, &balancer) => {}
            }
        });
    }
}

async fn proxy_tcp(
    mut client: TcpStream,
    peer: SocketAddr,
    route: &ForwardRoute,
    balancer: &Mutex<Balancer>,
) {
    let mut candidates = route.backends.clone();
    for _ in 0..CONNECT_ATTEMPTS {
        let picked = balancer.lock().expect("balancer lock").pick(
            &candidates,
            peer.ip(),
            route.affinity,
            Instant::now(),
        );
        let Some(backend) = picked else { break };
        match net::connect_from(route.source(peer.ip()), backend.listen, CONNECT_TIMEOUT).await {
            Ok(mut upstream) => {
                if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                {
                    debug!(%peer, backend = %backend.reported, %error, "proxied connection ended with an error");
                }
                return;
            }
            Err(error) => {
                debug!(%peer, backend = %backend.reported, %error, "endpoint refused; trying another");
                balancer.lock().expect("balancer lock").forget(peer.ip());
                candidates.retain(|b| *b != backend);
            }
        }
    }
    // No (reachable) endpoint: close, as a REJECT rule would refuse it.
    debug!(%peer, service = %route.service_port, "no endpoint for a new connection");
}

/// One client's UDP flow through a node port.
struct Flow {
    upstream: UdpSocket,
    backend: SocketAddr,
    last_active: Mutex<Instant>,
}

impl Flow {
    fn touch(&self) {
        *self.last_active.lock().expect("flow lock") = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_active.lock().expect("flow lock").elapsed()
    }
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<Flow>>>>;

async fn udp_forward(
    socket: Arc<UdpSocket>,
    route: watch::Receiver<Arc<ForwardRoute>>,
    stop: CancellationToken,
) {
    let flows: Flows = Arc::default();
    let mut balancer = Balancer::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, client) = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(error) => {
                    debug!(%error, "node port recv failed");
                    continue;
                }
            },
        };
        let current = route.borrow().clone();
        let existing = flows.lock().expect("flows lock").get(&client).cloned();
        // Endpoint gone: like kube-proxy clearing conntrack entries, the flow starts over.
        let flow = match existing.filter(|f| current.backends.iter().any(|b| b.listen == f.backend))
        {
            Some(flow) => flow,
            None => {
                let picked = balancer.pick(
                    &current.backends,
                    client.ip(),
                    current.affinity,
                    Instant::now(),
                );
                let Some(backend) = picked else {
                    debug!(%client, service = %current.service_port, "no endpoint for a UDP datagram");
                    continue;
                };
                let upstream = match open_udp_flow(current.source(client.ip()), backend.listen)
                    .await
                {
                    Ok(upstream) => upstream,
                    Err(error) => {
                        debug!(%client, backend = %backend.reported, %error, "could not open a UDP flow");
                        continue;
                    }
                };
                let flow = Arc::new(Flow {
                    upstream,
                    backend: backend.listen,
                    last_active: Mutex::new(Instant::now()),
                });
                flows
                    .lock()
                    .expect("flows lock")
                    .insert(client, flow.clone());
                tokio::spawn(udp_replies(
                    flow.clone(),
                    socket.clone(),
                    client,
                    flows.clone(),
                    stop.clone(),
                ));
                flow
            }
        };
        flow.touch();
        if let Err(error) = flow.upstream.send(&buf[..n]).await {
            debug!(%client, %error, "forwarding a datagram failed");
        }
    }
}

async fn open_udp_flow(source: IpAddr, backend: SocketAddr) -> std::io::Result<UdpSocket> {
    let upstream = net::bind_udp(SocketAddr::new(source, 0))?;
    upstream.connect(backend).await?;
    Ok(upstream)
}

/// Sends a flow's replies back to its client from the node port, until it idles out.
async fn udp_replies(
    flow: Arc<Flow>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    flows: Flows,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let wait = UDP_IDLE.saturating_sub(flow.idle_for());
        if wait.is_zero() {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            received = tokio::time::timeout(wait, flow.upstream.recv(&mut buf)) => match received {
                Err(_) => continue, // re-check: the client may have sent meanwhile
                Ok(Ok(n)) => {
                    flow.touch();
                    if let Err(error) = socket.send_to(&buf[..n], client).await {
                        debug!(%client, %error, "returning a datagram failed");
                    }
                }
                // E.g. the pod's port is closed: drop the flow so the next datagram re-balances.
                Ok(Err(error)) => {
                    debug!(%client, %error, "UDP flow failed");
                    break;
                }
            },
        }
    }
    let mut flows = flows.lock().expect("flows lock");
    if flows.get(&client).is_some_and(|f| Arc::ptr_eq(f, &flow)) {
        flows.remove(&client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ClientIPConfig, EndpointAddress, EndpointPort, EndpointSubset, ServicePort, ServiceSpec,
        SessionAffinityConfig,
    };
    use kube::api::ObjectMeta;

    fn service(name: &str, spec: ServiceSpec) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec: Some(spec),
            ..Default::default()
        }
    }

    fn port(name: &str, node_port: i32, protocol: &str) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            port: 80,
            node_port: Some(node_port),
            protocol: Some(protocol.into()),
            ..Default::default()
        }
    }

    fn endpoints() -> Endpoints {
        Endpoints {
            subsets: Some(vec![EndpointSubset {
                addresses: Some(vec![
                    EndpointAddress {
                        ip: "10.244.1.1".into(),
                        node_name: Some("node-1".into()),
                        ..Default::default()
                    },
                    EndpointAddress {
                        ip: "10.244.2.1".into(),
                        node_name: Some("node-2".into()),
                        ..Default::default()
                    },
                ]),
                ports: Some(vec![
                    EndpointPort {
                        name: Some("http".into()),
                        port: 8080,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    },
                    EndpointPort {
                        name: Some("dns".into()),
                        port: 53,
                        protocol: Some("UDP".into()),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    fn forward(
        desired: &BTreeMap<ListenerKey, Desired>,
        node: u8,
        protocol: L4,
        port: u16,
    ) -> &ForwardRoute {
        match desired.get(&ListenerKey {
            node,
            protocol,
            port,
        }) {
            Some(Desired::Forward(route)) => route,
            other => panic!("no forward on node-{node} {port}/{protocol}: {other:?}"),
        }
    }

    #[test]
    fn every_node_listens_on_every_node_port_with_its_protocol() {
        let plan = AddressPlan::new(2);
        let svc = service(
            "web",
            ServiceSpec {
                type_: Some("NodePort".into()),
                ports: Some(vec![port("http", 30080, "TCP"), port("dns", 30053, "UDP")]),
                ..Default::default()
            },
        );
        let eps = endpoints();
        let (desired, warnings) = desired_listeners(&plan, 3, &[&svc], |_, _| Some(&eps));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(desired.len(), 6);
        for k in 1..=3 {
            let http = forward(&desired, k, L4::Tcp, 30080);
            assert_eq!(http.backends.len(), 2, "Cluster policy uses every endpoint");
            assert_eq!(http.node_ip, plan.node_ip(k));
            assert_eq!(
                http.source("127.0.0.1".parse().unwrap()),
                IpAddr::V4(plan.node_ip(k))
            );
            assert_eq!(
                forward(&desired, k, L4::Udp, 30053).backends[0]
                    .listen
                    .port(),
                53
            );
        }
    }

    #[test]
    fn local_policy_uses_own_endpoints_keeps_the_client_address_and_serves_health() {
        let plan = AddressPlan::new(2);
        let svc = service(
            "web",
            ServiceSpec {
                type_: Some("LoadBalancer".into()),
                external_traffic_policy: Some("Local".into()),
                health_check_node_port: Some(32000),
                ports: Some(vec![port("http", 30080, "TCP")]),
                ..Default::default()
            },
        );
        let eps = endpoints();
        let (desired, _) = desired_listeners(&plan, 3, &[&svc], |_, _| Some(&eps));
        let on_2 = forward(&desired, 2, L4::Tcp, 30080);
        assert_eq!(on_2.backends.len(), 1);
        assert_eq!(on_2.backends[0].node.as_deref(), Some("node-2"));
        let client: IpAddr = "127.5.6.7".parse().unwrap();
        assert_eq!(on_2.source(client), client);
        assert!(forward(&desired, 3, L4::Tcp, 30080).backends.is_empty());
        let health = |k| match desired.get(&ListenerKey {
            node: k,
            protocol: L4::Tcp,
            port: 32000,
        }) {
            Some(Desired::Health(h)) => h.local_endpoints,
            other => panic!("{other:?}"),
        };
        assert_eq!((health(1), health(2), health(3)), (1, 1, 0));
    }

    #[test]
    fn client_ip_affinity_defaults_to_three_hours() {
        let plan = AddressPlan::new(2);
        let mut spec = ServiceSpec {
            type_: Some("NodePort".into()),
            session_affinity: Some("ClientIP".into()),
            ports: Some(vec![port("http", 30080, "TCP")]),
            ..Default::default()
        };
        let svc = service("web", spec.clone());
        let (desired, _) = desired_listeners(&plan, 1, &[&svc], |_, _| None);
        assert_eq!(
            forward(&desired, 1, L4::Tcp, 30080).affinity,
            Some(Duration::from_secs(10800))
        );
        spec.session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(60),
            }),
        });
        let svc = service("web", spec);
        let (desired, _) = desired_listeners(&plan, 1, &[&svc], |_, _| None);
        assert_eq!(
            forward(&desired, 1, L4::Tcp, 30080).affinity,
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn cluster_ip_services_and_bad_ports_get_no_listeners() {
        let plan = AddressPlan::new(2);
        let internal = service(
            "internal",
            ServiceSpec {
                type_: Some("ClusterIP".into()),
                ports: Some(vec![port("http", 30080, "TCP")]),
                ..Default::default()
            },
        );
        let odd = service(
            "odd",
            ServiceSpec {
                type_: Some("NodePort".into()),
                ports: Some(vec![
                    port("sctp", 30090, "SCTP"),
                    port("big", 70000, "TCP"),
                    port("ok", 30091, "TCP"),
                ]),
                ..Default::default()
            },
        );
        let (desired, warnings) = desired_listeners(&plan, 1, &[&internal, &odd], |_, _| None);
        assert_eq!(desired.keys().map(|k| k.port).collect::<Vec<_>>(), [30091]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
    }

    #[test]
    fn a_node_port_claimed_twice_goes_to_the_first_service_only() {
        let plan = AddressPlan::new(2);
        let spec = ServiceSpec {
            type_: Some("NodePort".into()),
            ports: Some(vec![port("http", 30080, "TCP")]),
            ..Default::default()
        };
        let (a, b) = (service("a", spec.clone()), service("b", spec));
        let (desired, warnings) = desired_listeners(&plan, 1, &[&b, &a], |_, _| None);
        assert_eq!(
            forward(&desired, 1, L4::Tcp, 30080).service_port,
            "shop/a:http"
        );
        assert_eq!(warnings.len(), 1);
    }

    /// A pod-like echo backend and a node-port forwarder wired together on loopback.
    mod forwarding {
        use super::*;
        use crate::agent::echo::{self, EchoIdentity, RawEcho, UdpEcho};
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

        fn backend(listen: SocketAddr, node: &str) -> Backend {
            Backend {
                listen,
                reported: listen,
                node: Some(node.into()),
            }
        }

        fn free_port(ip: &str) -> SocketAddr {
            std::net::TcpListener::bind((ip, 0))
                .unwrap()
                .local_addr()
                .unwrap()
        }

        async fn greeting(addr: SocketAddr) -> RawEcho {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // Speaking first spares the echo's wait for a silent client.
            stream.write_all(b"hi\n").await.unwrap();
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).await.unwrap();
            serde_json::from_str(&line).unwrap()
        }

        fn identity(pod: &str) -> Arc<EchoIdentity> {
            Arc::new(EchoIdentity {
                pod: pod.into(),
                namespace: "t".into(),
                node: "node-1".into(),
            })
        }

        #[tokio::test]
        async fn tcp_node_ports_round_robin_and_snat_to_the_node_ip() {
            let pods = [free_port("127.98.0.1"), free_port("127.98.0.2")];
            let _a = echo::start_tcp(pods[0], identity("a")).unwrap();
            let _b = echo::start_tcp(pods[1], identity("b")).unwrap();
            let node_ip = Ipv4Addr::new(127, 98, 1, 1);
            let front = free_port("127.98.1.1");
            let route = ForwardRoute {
                service_port: "t/svc:".into(),
                node_ip,
                local_only: false,
                affinity: None,
                backends: pods.iter().map(|p| backend(*p, "node-1")).collect(),
            };
            let (_tx, rx) = watch::channel(Arc::new(route));
            let stop = CancellationToken::new();
            tokio::spawn(tcp_forward(
                net::bind_tcp(front).unwrap(),
                rx,
                stop.clone(),
                stop.clone(),
            ));
            let mut seen = Vec::new();
            for _ in 0..4 {
                let hello = greeting(front).await;
                assert!(
                    hello.client.starts_with("127.98.1.1:"),
                    "SNAT to the node IP: {}",
                    hello.client
                );
                seen.push(hello.pod);
            }
            assert_eq!(seen, ["a", "b", "a", "b"]);
            stop.cancel();
        }

        #[tokio::test]
        async fn local_policy_shows_the_client_address_and_long_connections_survive_route_changes()
        {
            let pod = free_port("127.98.2.1");
            let _echo = echo::start_tcp(pod, identity("a")).unwrap();
            let front = free_port("127.98.3.1");
            let route = ForwardRoute {
                service_port: "t/svc:".into(),
                node_ip: Ipv4Addr::new(127, 98, 3, 1),
                local_only: true,
                affinity: None,
                backends: vec![backend(pod, "node-1")],
            };
            let (tx, rx) = watch::channel(Arc::new(route.clone()));
            let stop = CancellationToken::new();
            tokio::spawn(tcp_forward(
                net::bind_tcp(front).unwrap(),
                rx,
                stop.clone(),
                CancellationToken::new(),
            ));
            let client_ip: IpAddr = "127.98.4.4".parse().unwrap();
            let stream = net::connect_from(client_ip, front, CONNECT_TIMEOUT)
                .await
                .unwrap();
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            let hello: RawEcho = serde_json::from_str(&line).unwrap();
            assert!(hello.client.starts_with("127.98.4.4:"), "{}", hello.client);
            // The endpoint leaves and the listener closes; the open connection carries on.
            tx.send_replace(Arc::new(ForwardRoute {
                backends: vec![],
                ..route
            }));
            stop.cancel();
            stream.get_mut().write_all(b"still here\n").await.unwrap();
            line.clear();
            stream.read_line(&mut line).await.unwrap();
            assert_eq!(line, "still here\n");
        }

        #[tokio::test]
        async fn udp_node_ports_answer_from_the_node_port() {
            let pod = free_port("127.98.5.1");
            let _echo = echo::start_udp(pod, identity("u")).unwrap();
            let front = free_port("127.98.6.1");
            let route = ForwardRoute {
                service_port: "t/dns:".into(),
                node_ip: Ipv4Addr::new(127, 98, 6, 1),
                local_only: false,
                affinity: None,
                backends: vec![backend(pod, "node-1")],
            };
            let (_tx, rx) = watch::channel(Arc::new(route));
            let stop = CancellationToken::new();
            tokio::spawn(udp_forward(
                Arc::new(net::bind_udp(front).unwrap()),
                rx,
                stop.clone(),
            ));
            let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            for i in 0..3 {
                client
                    .send_to(format!("q{i}").as_bytes(), front)
                    .await
                    .unwrap();
                let mut buf = [0u8; 2048];
                let (n, from) =
                    tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                        .await
                        .unwrap()
                        .unwrap();
                assert_eq!(from, front, "replies come from the node port");
                let echo: UdpEcho = serde_json::from_slice(&buf[..n]).unwrap();
                assert_eq!(echo.payload, format!("q{i}"));
                assert!(echo.client.starts_with("127.98.6.1:"));
            }
            stop.cancel();
        }
    }
}
