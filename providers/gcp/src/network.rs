//! A Service's L4 load balancer as Compute Engine's external passthrough load balancer wants
//! it, computed by pure code: one target pool of the nodes' instances with a legacy HTTP
//! health check, a forwarding rule per protocol, and two firewall rules (clients on the
//! Service's ports, Google's health checkers on the health check's port).
//!
//! A passthrough load balancer keeps the destination address and port: packets reach a node
//! at the load balancer's IP on the Service's port, where kube-proxy takes them (it programs
//! the status's IP), so the firewall opens the Service's ports, not the node ports.

use std::collections::{BTreeMap, BTreeSet};

use portico_provider::{
    LoadBalancerName, NetworkFrontend, Probe, Protocol, SessionAffinity, TargetPool,
};

use crate::names;

/// Where Google's legacy health checkers (the ones target pools use) come from.
pub const HEALTH_CHECK_RANGES: [&str; 3] = ["35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22"];

/// A forwarding rule lists at most this many ports; more become one range.
const MAX_LISTED_PORTS: usize = 5;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPlan {
    pub forwarding_rules: Vec<ForwardingRulePlan>,
    pub target_pool: TargetPoolPlan,
    pub health_check: HealthCheckPlan,
    pub firewall: FirewallPlan,
    pub health_check_firewall: FirewallPlan,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardingRulePlan {
    pub name: String,
    pub protocol: Protocol,
    /// The ports as the rule states them: a list of up to five, else one `"low-high"` range.
    pub ports: Ports,
    /// The ports the Service actually serves (a range may cover more).
    pub serves: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    List(Vec<String>),
    Range(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPoolPlan {
    pub name: String,
    /// Instance links.
    pub instances: BTreeSet<String>,
    /// `NONE` or `CLIENT_IP`.
    pub session_affinity: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckPlan {
    pub name: String,
    pub port: i32,
    pub request_path: String,
    pub check_interval_sec: i32,
    pub timeout_sec: i32,
    pub healthy_threshold: i32,
    pub unhealthy_threshold: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallPlan {
    pub name: String,
    pub source_ranges: Vec<String>,
    /// Ports by protocol (`tcp`, `udp`).
    pub allowed: BTreeMap<&'static str, Vec<String>>,
}

pub fn plan(
    lb: &LoadBalancerName,
    frontend: &NetworkFrontend,
    source_ranges: &[ipnet::IpNet],
) -> Result<NetworkPlan, String> {
    let Some(first) = frontend.listeners.first() else {
        return Err("the Service has no ports".into());
    };
    let pool = &first.pool;
    let mut problems = Vec::new();
    for l in &frontend.listeners {
        // One target pool serves every port: nodes, health check and affinity are shared.
        if l.pool.health_check != pool.health_check || l.pool.affinity != pool.affinity {
            problems.push(format!(
                "port {} has its own health check or affinity; a target pool has one for all ports",
                l.port
            ));
        }
        if l.pool.proxy_protocol {
            problems.push(format!(
                "port {}: a passthrough load balancer cannot send PROXY protocol",
                l.port
            ));
        }
    }
    let session_affinity = match &pool.affinity {
        SessionAffinity::None => "NONE",
        SessionAffinity::ClientIp { .. } => "CLIENT_IP",
        SessionAffinity::Cookie { .. } => {
            problems.push("cookie affinity needs an L7 load balancer".into());
            "NONE"
        }
    };
    let health_check = match health_check(lb, pool) {
        Ok(hc) => hc,
        Err(p) => {
            problems.push(p);
            return Err(problems.join("; "));
        }
    };
    let instances: BTreeSet<String> = pool
        .targets
        .iter()
        .filter_map(|t| t.provider_id.as_deref().and_then(names::instance_link))
        .collect();
    if instances.is_empty() && !pool.targets.is_empty() {
        problems.push(
            "no node has a Compute Engine instance (spec.providerID gce://project/zone/name)"
                .into(),
        );
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }

    let mut by_protocol: BTreeMap<Protocol, Vec<u16>> = BTreeMap::new();
    for l in &frontend.listeners {
        by_protocol.entry(l.protocol).or_default().push(l.port);
    }
    let forwarding_rules = by_protocol
        .iter()
        .map(|(protocol, ports)| {
            let mut ports = ports.clone();
            ports.sort_unstable();
            ports.dedup();
            ForwardingRulePlan {
                name: names::forwarding_rule(lb, *protocol),
                protocol: *protocol,
                ports: if ports.len() <= MAX_LISTED_PORTS {
                    Ports::List(ports.iter().map(u16::to_string).collect())
                } else {
                    Ports::Range(format!("{}-{}", ports[0], ports[ports.len() - 1]))
                },
                serves: ports,
            }
        })
        .collect();
    let allowed = by_protocol
        .iter()
        .map(|(protocol, ports)| {
            let mut ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            ports.sort();
            ports.dedup();
            (
                match protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                },
                ports,
            )
        })
        .collect();
    let mut clients: Vec<String> = source_ranges.iter().map(|r| r.to_string()).collect();
    if clients.is_empty() {
        clients.push("0.0.0.0/0".into());
    }
    Ok(NetworkPlan {
        forwarding_rules,
        target_pool: TargetPoolPlan {
            name: names::base(lb),
            instances,
            session_affinity,
        },
        health_check_firewall: FirewallPlan {
            name: names::health_check(lb),
            source_ranges: HEALTH_CHECK_RANGES.iter().map(|r| r.to_string()).collect(),
            allowed: [("tcp", vec![health_check.port.to_string()])].into(),
        },
        health_check,
        firewall: FirewallPlan {
            name: names::base(lb),
            source_ranges: clients,
            allowed,
        },
    })
}

/// Legacy HTTP health checks take intervals and timeouts of 1–300 s (the timeout within the
/// interval) and thresholds of 1–10; values outside are brought to the nearest allowed one.
fn health_check(lb: &LoadBalancerName, pool: &TargetPool) -> Result<HealthCheckPlan, String> {
    let hc = &pool.health_check;
    let Probe::Http { port, path } = &hc.probe else {
        return Err(
            "target pools take HTTP health checks only; a TCP health check cannot be kept".into(),
        );
    };
    let secs = |d: std::time::Duration| i32::try_from(d.as_secs()).unwrap_or(300).clamp(1, 300);
    let interval = secs(hc.interval);
    let threshold = |n: u32| i32::try_from(n).unwrap_or(10).clamp(1, 10);
    Ok(HealthCheckPlan {
        name: names::health_check(lb),
        port: i32::from(*port),
        request_path: path.clone(),
        check_interval_sec: interval,
        timeout_sec: secs(hc.timeout).min(interval),
        healthy_threshold: threshold(hc.healthy_threshold),
        unhealthy_threshold: threshold(hc.unhealthy_threshold),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use portico_provider::{HealthCheck, Listener, Target};

    use super::*;

    fn lb() -> LoadBalancerName {
        LoadBalancerName::for_object_uid("4a1c6f0e-8d8e-4f59-9b55-1b2f2a7c9d10")
    }

    fn pool(nodes: &[&str]) -> TargetPool {
        TargetPool {
            targets: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| Target {
                    node: n.to_string(),
                    address: format!("10.0.0.{}", i + 1).parse().unwrap(),
                    port: 30080,
                    provider_id: Some(format!("gce://shop/europe-west1-b/{n}")),
                })
                .collect(),
            health_check: HealthCheck::with_probe(Probe::Http {
                port: 10256,
                path: "/healthz".into(),
            }),
            affinity: SessionAffinity::None,
            proxy_protocol: false,
            preserve_client_ip: false,
            drain_timeout: None,
        }
    }

    fn listener(protocol: Protocol, port: u16, pool: TargetPool) -> Listener {
        Listener {
            name: format!("{protocol}-{port}"),
            protocol,
            port,
            pool,
        }
    }

    #[test]
    fn a_service_is_a_target_pool_of_its_nodes_and_a_forwarding_rule_per_protocol() {
        let p = pool(&["node-1", "node-2"]);
        let frontend = NetworkFrontend {
            listeners: vec![
                listener(Protocol::Tcp, 443, p.clone()),
                listener(Protocol::Tcp, 80, p.clone()),
                listener(Protocol::Udp, 53, p),
            ],
        };
        let plan = plan(&lb(), &frontend, &[]).unwrap();
        let rules: Vec<(&str, Protocol, &Ports)> = plan
            .forwarding_rules
            .iter()
            .map(|r| (r.name.as_str(), r.protocol, &r.ports))
            .collect();
        let tcp = format!("{}-tcp", lb());
        let udp = format!("{}-udp", lb());
        assert_eq!(
            rules,
            [
                (
                    tcp.as_str(),
                    Protocol::Tcp,
                    &Ports::List(vec!["80".into(), "443".into()])
                ),
                (udp.as_str(), Protocol::Udp, &Ports::List(vec!["53".into()])),
            ]
        );
        assert_eq!(
            plan.target_pool.instances,
            [
                "https://www.googleapis.com/compute/v1/projects/shop/zones/europe-west1-b/instances/node-1".to_string(),
                "https://www.googleapis.com/compute/v1/projects/shop/zones/europe-west1-b/instances/node-2".to_string(),
            ]
            .into()
        );
        assert_eq!(plan.health_check.port, 10256);
        assert_eq!(plan.health_check.request_path, "/healthz");
        assert_eq!(plan.firewall.source_ranges, ["0.0.0.0/0"]);
        assert_eq!(plan.firewall.allowed["tcp"], ["443", "80"]);
        assert_eq!(plan.firewall.allowed["udp"], ["53"]);
        assert_eq!(plan.health_check_firewall.allowed["tcp"], ["10256"]);
        assert_eq!(plan.health_check_firewall.source_ranges.len(), 3);
    }

    #[test]
    fn more_than_five_ports_become_one_range_and_source_ranges_limit_the_firewall() {
        let p = pool(&["node-1"]);
        let frontend = NetworkFrontend {
            listeners: (8000..8006)
                .map(|port| listener(Protocol::Tcp, port, p.clone()))
                .collect(),
        };
        let ranges = ["192.0.2.0/24".parse().unwrap()];
        let plan = plan(&lb(), &frontend, &ranges).unwrap();
        assert_eq!(
            plan.forwarding_rules[0].ports,
            Ports::Range("8000-8005".into())
        );
        assert_eq!(plan.firewall.source_ranges, ["192.0.2.0/24"]);
    }

    #[test]
    fn client_ip_affinity_is_the_pools_and_health_checks_stay_in_gce_ranges() {
        let mut p = pool(&["node-1"]);
        p.affinity = SessionAffinity::ClientIp {
            timeout: Duration::from_secs(10800),
        };
        p.health_check.interval = Duration::from_secs(1000);
        p.health_check.timeout = Duration::from_secs(0);
        p.health_check.unhealthy_threshold = 50;
        let frontend = NetworkFrontend {
            listeners: vec![listener(Protocol::Tcp, 80, p)],
        };
        let plan = plan(&lb(), &frontend, &[]).unwrap();
        assert_eq!(plan.target_pool.session_affinity, "CLIENT_IP");
        assert_eq!(plan.health_check.check_interval_sec, 300);
        assert_eq!(plan.health_check.timeout_sec, 1);
        assert_eq!(plan.health_check.unhealthy_threshold, 10);
    }

    #[test]
    fn what_a_target_pool_cannot_do_is_refused_with_the_reason() {
        let mut p = pool(&["node-1"]);
        p.proxy_protocol = true;
        p.health_check = HealthCheck::with_probe(Probe::Tcp { port: 30080 });
        let frontend = NetworkFrontend {
            listeners: vec![listener(Protocol::Tcp, 80, p)],
        };
        let e = plan(&lb(), &frontend, &[]).unwrap_err();
        assert!(e.contains("PROXY protocol"), "{e}");
        assert!(e.contains("HTTP health checks only"), "{e}");

        let mut no_instances = pool(&["node-1"]);
        no_instances.targets[0].provider_id = None;
        let frontend = NetworkFrontend {
            listeners: vec![listener(Protocol::Tcp, 80, no_instances)],
        };
        assert!(plan(&lb(), &frontend, &[]).unwrap_err().contains("gce://"));
    }
}
