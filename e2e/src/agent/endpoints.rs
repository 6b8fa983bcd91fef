//! Which pod a node's kube-proxy stand-in sends a new connection to: the ready endpoints of a
//! service port (matched by port name, as kube-proxy does), filtered by the traffic policy,
//! chosen round robin or by ClientIP session affinity.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Endpoints;

use crate::address_plan::AddressPlan;

/// A ready endpoint, with the loopback address its pod really listens on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Backend {
    /// Where to dial (`plan.pod_listen_address` of the reported IP).
    pub listen: SocketAddr,
    /// The address in the Endpoints object (`10.244.k.m:port`); never dialed.
    pub reported: SocketAddr,
    pub node: Option<String>,
}

/// The ready backends of the service port named `port_name` with `protocol`, sorted, plus one
/// message per address that was left out because it must not be dialed.
pub(crate) fn ready_backends(
    plan: &AddressPlan,
    endpoints: Option<&Endpoints>,
    port_name: &str,
    protocol: &str,
) -> (Vec<Backend>, Vec<String>) {
    let mut backends = Vec::new();
    let mut skipped = Vec::new();
    for subset in endpoints
        .and_then(|e| e.subsets.as_ref())
        .into_iter()
        .flatten()
    {
        let Some(port) = subset.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol
        }) else {
            continue;
        };
        let Ok(port_number) = u16::try_from(port.port) else {
            skipped.push(format!("port {} is out of range", port.port));
            continue;
        };
        for address in subset.addresses.iter().flatten() {
            let Ok(reported) = address.ip.parse::<Ipv4Addr>() else {
                skipped.push(format!("{:?} is not an IPv4 pod address", address.ip));
                continue;
            };
            let Some(listen) = plan.pod_listen_address(reported) else {
                skipped.push(format!(
                    "{reported} is outside the testbed's pod range and is never dialed"
                ));
                continue;
            };
            backends.push(Backend {
                listen: SocketAddr::from((listen, port_number)),
                reported: SocketAddr::from((reported, port_number)),
                node: address.node_name.clone(),
            });
        }
    }
    backends.sort();
    backends.dedup();
    (backends, skipped)
}

/// The backends a node may use: all of them for `Cluster`, only its own for `Local`.
pub(crate) fn for_node(backends: &[Backend], local_only: bool, node: &str) -> Vec<Backend> {
    backends
        .iter()
        .filter(|b| !local_only || b.node.as_deref() == Some(node))
        .cloned()
        .collect()
}

/// Unique ready local pod IPs of a service, as kube-proxy's health check node port counts them.
pub(crate) fn local_endpoint_count(endpoints: Option<&Endpoints>, node: &str) -> usize {
    let mut ips: Vec<&str> = endpoints
        .and_then(|e| e.subsets.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.node_name.as_deref() == Some(node))
        .map(|a| a.ip.as_str())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    ips.len()
}

/// Per-listener choice state: the round-robin position and ClientIP affinity entries.
#[derive(Debug, Default)]
pub(crate) struct Balancer {
    next: usize,
    sticky: HashMap<IpAddr, (SocketAddr, Instant)>,
}

impl Balancer {
    /// Picks a backend for a new connection or flow from `client`. With `affinity`, a client
    /// keeps its backend while it is still ready and the client was seen within the timeout
    /// (every pick refreshes it, like iptables' `recent` match).
    pub fn pick(
        &mut self,
        backends: &[Backend],
        client: IpAddr,
        affinity: Option<Duration>,
        now: Instant,
    ) -> Option<Backend> {
        if backends.is_empty() {
            return None;
        }
        if let Some(timeout) = affinity {
            self.sticky
                .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < timeout);
            if let Some((listen, seen)) = self.sticky.get_mut(&client)
                && let Some(backend) = backends.iter().find(|b| b.listen == *listen)
            {
                *seen = now;
                return Some(backend.clone());
            }
        }
        let backend = backends[self.next % backends.len()].clone();
        self.next = self.next.wrapping_add(1);
        if affinity.is_some() {
            self.sticky.insert(client, (backend.listen, now));
        }
        Some(backend)
    }

    /// Forgets `client`'s affinity (its backend failed).
    pub fn forget(&mut self, client: IpAddr) {
        self.sticky.remove(&client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset};

    fn plan() -> AddressPlan {
        AddressPlan::new(3)
    }

    fn address(ip: &str, node: &str) -> EndpointAddress {
        EndpointAddress {
            ip: ip.into(),
            node_name: Some(node.into()),
            ..Default::default()
        }
    }

    fn port(name: Option<&str>, number: i32, protocol: &str) -> EndpointPort {
        EndpointPort {
            name: name.map(Into::into),
            port: number,
            protocol: Some(protocol.into()),
            ..Default::default()
        }
    }

    fn endpoints() -> Endpoints {
        Endpoints {
            subsets: Some(vec![EndpointSubset {
                addresses: Some(vec![
                    address("10.244.2.1", "node-2"),
                    address("10.244.1.1", "node-1"),
                    address("10.96.0.10", "node-1"),
                ]),
                not_ready_addresses: Some(vec![address("10.244.3.1", "node-3")]),
                ports: Some(vec![
                    port(Some("http"), 8080, "TCP"),
                    port(Some("dns"), 53, "UDP"),
                ]),
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn only_ready_mapped_addresses_of_the_named_port_are_backends() {
        let (backends, skipped) = ready_backends(&plan(), Some(&endpoints()), "http", "TCP");
        let listen: Vec<String> = backends.iter().map(|b| b.listen.to_string()).collect();
        assert_eq!(listen, ["127.31.3.1:8080", "127.32.3.1:8080"]);
        assert_eq!(backends[0].reported.to_string(), "10.244.1.1:8080");
        assert_eq!(
            skipped.len(),
            1,
            "the 10.96 address is never dialed: {skipped:?}"
        );
    }

    #[test]
    fn ports_are_matched_by_name_and_protocol() {
        let (dns, _) = ready_backends(&plan(), Some(&endpoints()), "dns", "UDP");
        assert_eq!(dns.len(), 2);
        assert_eq!(dns[0].listen.port(), 53);
        assert!(
            ready_backends(&plan(), Some(&endpoints()), "dns", "TCP")
                .0
                .is_empty()
        );
        assert!(
            ready_backends(&plan(), Some(&endpoints()), "", "TCP")
                .0
                .is_empty()
        );
        assert!(ready_backends(&plan(), None, "http", "TCP").0.is_empty());
    }

    #[test]
    fn local_traffic_policy_keeps_only_the_nodes_own_pods() {
        let (backends, _) = ready_backends(&plan(), Some(&endpoints()), "http", "TCP");
        assert_eq!(for_node(&backends, false, "node-3").len(), 2);
        let local = for_node(&backends, true, "node-2");
        assert_eq!(local.len(), 1);
        assert_eq!(local[0].node.as_deref(), Some("node-2"));
        assert!(for_node(&backends, true, "node-3").is_empty());
    }

    #[test]
    fn health_checks_count_ready_local_pods_only() {
        assert_eq!(local_endpoint_count(Some(&endpoints()), "node-1"), 2);
        assert_eq!(local_endpoint_count(Some(&endpoints()), "node-3"), 0);
        assert_eq!(local_endpoint_count(None, "node-1"), 0);
    }

    #[test]
    fn round_robin_visits_every_backend_in_turn() {
        let (backends, _) = ready_backends(&plan(), Some(&endpoints()), "http", "TCP");
        let mut balancer = Balancer::default();
        let client: IpAddr = "127.0.0.1".parse().unwrap();
        let now = Instant::now();
        let picks: Vec<_> = (0..4)
            .map(|_| balancer.pick(&backends, client, None, now).unwrap().listen)
            .collect();
        assert_eq!(picks[0], picks[2]);
        assert_eq!(picks[1], picks[3]);
        assert_ne!(picks[0], picks[1]);
        assert_eq!(balancer.pick(&[], client, None, now), None);
    }

    #[test]
    fn client_ip_affinity_sticks_until_it_expires() {
        let (backends, _) = ready_backends(&plan(), Some(&endpoints()), "http", "TCP");
        let mut balancer = Balancer::default();
        let alice: IpAddr = "127.0.0.1".parse().unwrap();
        let bob: IpAddr = "127.0.0.2".parse().unwrap();
        let timeout = Some(Duration::from_secs(10));
        let t0 = Instant::now();
        let first = balancer.pick(&backends, alice, timeout, t0).unwrap();
        // Other clients move the round robin on, alice stays, and each visit refreshes her.
        balancer.pick(&backends, bob, timeout, t0);
        for s in [5, 10, 15] {
            let at = t0 + Duration::from_secs(s);
            assert_eq!(balancer.pick(&backends, alice, timeout, at).unwrap(), first);
        }
        // After a quiet spell longer than the timeout she is balanced afresh: round robin
        // has moved on (carol takes the next slot), so she lands elsewhere and sticks there.
        let later = t0 + Duration::from_secs(26);
        let carol: IpAddr = "127.0.0.3".parse().unwrap();
        assert_eq!(
            balancer.pick(&backends, carol, timeout, later).unwrap(),
            first
        );
        let fresh = balancer.pick(&backends, alice, timeout, later).unwrap();
        assert_ne!(fresh, first);
        let soon = later + Duration::from_secs(1);
        assert_eq!(balancer.pick(&backends, alice, timeout, soon), Some(fresh));
    }

    #[test]
    fn affinity_to_a_backend_that_went_away_is_dropped() {
        let (backends, _) = ready_backends(&plan(), Some(&endpoints()), "http", "TCP");
        let mut balancer = Balancer::default();
        let alice: IpAddr = "127.0.0.1".parse().unwrap();
        let timeout = Some(Duration::from_secs(10800));
        let now = Instant::now();
        let first = balancer.pick(&backends, alice, timeout, now).unwrap();
        let remaining: Vec<_> = backends.iter().filter(|b| **b != first).cloned().collect();
        let next = balancer.pick(&remaining, alice, timeout, now).unwrap();
        assert_ne!(next, first);
        assert_eq!(balancer.pick(&backends, alice, timeout, now), Some(next));
    }
}
