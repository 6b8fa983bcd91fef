//! A Service's L4 load balancer as ELBv2 wants it, computed by pure code: one listener and
//! one target group per frontend port (TCP, UDP, or TCP_UDP where one port serves both), the
//! nodes as targets on their node port, health checks and attributes from the pool.

use std::collections::{BTreeMap, BTreeSet};

use portico_provider::{
    LoadBalancerName, NetworkFrontend, Probe, Protocol, SessionAffinity, Target, TargetPool,
};

/// Deregistration delay when the pool sets none (ELBv2's own default).
const DEFAULT_DRAIN_SECONDS: u64 = 300;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPlan {
    pub listeners: Vec<ListenerPlan>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerPlan {
    pub port: u16,
    /// `TCP`, `UDP` or `TCP_UDP`.
    pub protocol: &'static str,
    /// The frontend protocols it serves, for the status.
    pub serves: Vec<Protocol>,
    pub target_group: TargetGroupPlan,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetGroupPlan {
    /// Deterministic, so an interrupted reconcile finds the group it created.
    pub name: String,
    pub protocol: &'static str,
    pub target_type: TargetType,
    /// `(instance id or address, node port)`.
    pub targets: BTreeSet<(String, u16)>,
    pub health_check: HealthCheckPlan,
    pub attributes: BTreeMap<&'static str, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetType {
    /// EC2 instances, from the nodes' `spec.providerID`.
    Instance,
    /// Node addresses, where some node has no AWS instance id.
    Ip,
}

impl TargetType {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetType::Instance => "instance",
            TargetType::Ip => "ip",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckPlan {
    /// `HTTP` or `TCP`.
    pub protocol: &'static str,
    pub port: String,
    pub path: Option<String>,
    /// HTTP status codes that count as healthy (HTTP checks only): the model's 2xx.
    pub matcher: Option<&'static str>,
    pub interval_seconds: i32,
    pub timeout_seconds: i32,
    pub healthy_threshold: i32,
    pub unhealthy_threshold: i32,
}

/// The target group name for `(protocol, port)` of load balancer `lb`: at most 32 characters
/// (`<first 24 of lb>-<t|u|b><port>`), unique per load balancer and port.
pub fn target_group_name(lb: &LoadBalancerName, protocol: &str, port: u16) -> String {
    let letter = match protocol {
        "TCP" => 't',
        "UDP" => 'u',
        _ => 'b',
    };
    let prefix: String = lb.as_str().chars().take(24).collect();
    format!("{prefix}-{letter}{port}")
}

/// The instance id in a node's `providerID` (`aws:///eu-west-1a/i-0123456789abcdef0`).
pub fn instance_id(provider_id: &str) -> Option<&str> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    (id.starts_with("i-") && id.len() > 2).then_some(id)
}

pub fn plan(lb: &LoadBalancerName, frontend: &NetworkFrontend) -> Result<NetworkPlan, String> {
    let mut by_port: BTreeMap<u16, Vec<&portico_provider::Listener>> = BTreeMap::new();
    for listener in &frontend.listeners {
        by_port.entry(listener.port).or_default().push(listener);
    }
    let mut listeners = Vec::new();
    for (port, group) in by_port {
        let (protocol, serves, pool) = match group.as_slice() {
            [one] => (one.protocol.as_str(), vec![one.protocol], &one.pool),
            [a, b] if a.protocol != b.protocol => {
                if a.pool.targets != b.pool.targets || a.pool.health_check != b.pool.health_check {
                    return Err(format!(
                        "port {port} serves TCP and UDP on different node ports or health \
                         checks; an NLB serves both protocols of a port from one target group"
                    ));
                }
                ("TCP_UDP", vec![Protocol::Tcp, Protocol::Udp], &a.pool)
            }
            _ => {
                return Err(format!(
                    "port {port} has more than one listener per protocol"
                ));
            }
        };
        listeners.push(ListenerPlan {
            port,
            protocol,
            serves,
            target_group: target_group(lb, protocol, port, pool),
        });
    }
    Ok(NetworkPlan { listeners })
}

fn target_group(
    lb: &LoadBalancerName,
    protocol: &'static str,
    port: u16,
    pool: &TargetPool,
) -> TargetGroupPlan {
    let (target_type, targets) = targets(pool);
    let mut attributes = BTreeMap::new();
    let sticky = matches!(pool.affinity, SessionAffinity::ClientIp { .. });
    attributes.insert("stickiness.enabled", sticky.to_string());
    attributes.insert("stickiness.type", "source_ip".to_string());
    attributes.insert("proxy_protocol_v2.enabled", pool.proxy_protocol.to_string());
    attributes.insert("deregistration_delay.timeout_seconds", drain_seconds(pool));
    attributes.insert(
        "preserve_client_ip.enabled",
        // Instance targets keep the client's address anyway; IP targets only when asked.
        (pool.preserve_client_ip || target_type == TargetType::Instance).to_string(),
    );
    TargetGroupPlan {
        name: target_group_name(lb, protocol, port),
        protocol,
        target_type,
        targets,
        health_check: health_check(pool),
        attributes,
    }
}

/// The pool's nodes as targets on their node port: instances when every node has an AWS
/// instance id, else addresses.
pub(crate) fn targets(pool: &TargetPool) -> (TargetType, BTreeSet<(String, u16)>) {
    let instances: Option<Vec<&str>> = pool
        .targets
        .iter()
        .map(|t| t.provider_id.as_deref().and_then(instance_id))
        .collect();
    match instances {
        Some(ids) if !ids.is_empty() => (
            TargetType::Instance,
            ids.iter()
                .zip(&pool.targets)
                .map(|(id, t)| (id.to_string(), t.port))
                .collect(),
        ),
        _ => (
            TargetType::Ip,
            pool.targets
                .iter()
                .map(|t: &Target| (t.address.to_string(), t.port))
                .collect(),
        ),
    }
}

pub(crate) fn drain_seconds(pool: &TargetPool) -> String {
    pool.drain_timeout
        .map_or(DEFAULT_DRAIN_SECONDS, |d| d.as_secs().min(3600))
        .to_string()
}

/// ELBv2's ranges (network and application load balancers alike): interval 5–300 s, timeout
/// 2–120 s and below the interval, thresholds 2–10. Values outside are brought to the nearest
/// allowed one.
pub(crate) fn health_check(pool: &TargetPool) -> HealthCheckPlan {
    let hc = &pool.health_check;
    let secs = |d: std::time::Duration| i32::try_from(d.as_secs()).unwrap_or(i32::MAX);
    let interval = secs(hc.interval).clamp(5, 300);
    let timeout = secs(hc.timeout).clamp(2, 120).min(interval);
    let threshold = |n: u32| i32::try_from(n).unwrap_or(10).clamp(2, 10);
    let (protocol, port, path) = match &hc.probe {
        Probe::Http { port, path } => ("HTTP", port.to_string(), Some(path.clone())),
        Probe::Tcp { port } => ("TCP", port.to_string(), None),
    };
    HealthCheckPlan {
        matcher: path.as_ref().map(|_| "200-299"),
        protocol,
        port,
        path,
        interval_seconds: interval,
        timeout_seconds: timeout,
        healthy_threshold: threshold(hc.healthy_threshold),
        unhealthy_threshold: threshold(hc.unhealthy_threshold),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use portico_provider::{HealthCheck, Listener};

    use super::*;

    fn lb() -> LoadBalancerName {
        LoadBalancerName::for_object_uid("4a1c6f0e-8d8e-4f59-9b55-1b2f2a7c9d10")
    }

    fn node(k: u8, port: u16, provider_id: Option<&str>) -> Target {
        Target {
            node: format!("node-{k}"),
            address: format!("10.0.0.{k}").parse().unwrap(),
            port,
            provider_id: provider_id.map(String::from),
        }
    }

    fn pool(targets: Vec<Target>) -> TargetPool {
        TargetPool {
            targets,
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
    fn target_group_names_fit_elbv2_and_differ_per_port_and_protocol() {
        let names = [
            target_group_name(&lb(), "TCP", 80),
            target_group_name(&lb(), "UDP", 80),
            target_group_name(&lb(), "TCP_UDP", 65535),
        ];
        assert_eq!(names[0], "a4a1c6f0e8d8e4f599b551b2-t80");
        assert!(names.iter().all(|n| n.len() <= 32), "{names:?}");
        assert_ne!(names[0], names[1]);
    }

    #[test]
    fn nodes_with_instance_ids_are_instance_targets_on_their_node_port() {
        let targets = vec![
            node(1, 30080, Some("aws:///eu-west-1a/i-0aaa")),
            node(2, 30080, Some("aws:///eu-west-1b/i-0bbb")),
        ];
        let plan = plan(
            &lb(),
            &NetworkFrontend {
                listeners: vec![listener(Protocol::Tcp, 80, pool(targets))],
            },
        )
        .unwrap();
        let tg = &plan.listeners[0].target_group;
        assert_eq!(tg.target_type, TargetType::Instance);
        assert_eq!(
            tg.targets,
            [("i-0aaa".into(), 30080), ("i-0bbb".into(), 30080)].into()
        );
        assert_eq!(tg.health_check.protocol, "HTTP");
        assert_eq!(tg.health_check.port, "10256");
        assert_eq!(tg.health_check.path.as_deref(), Some("/healthz"));
        // NLB minimums: a 2 s interval becomes 5 s, one success becomes two.
        assert_eq!(tg.health_check.interval_seconds, 5);
        assert_eq!(tg.health_check.healthy_threshold, 2);
    }

    #[test]
    fn one_node_without_an_instance_id_makes_the_group_address_targets() {
        let targets = vec![
            node(1, 30080, Some("aws:///eu-west-1a/i-0aaa")),
            node(2, 30080, None),
        ];
        let plan = plan(
            &lb(),
            &NetworkFrontend {
                listeners: vec![listener(Protocol::Tcp, 80, pool(targets))],
            },
        )
        .unwrap();
        let tg = &plan.listeners[0].target_group;
        assert_eq!(tg.target_type, TargetType::Ip);
        assert_eq!(
            tg.targets,
            [("10.0.0.1".into(), 30080), ("10.0.0.2".into(), 30080)].into()
        );
    }

    #[test]
    fn tcp_and_udp_on_one_port_and_node_port_share_a_tcp_udp_listener() {
        let targets = vec![node(1, 30053, None)];
        let frontend = NetworkFrontend {
            listeners: vec![
                listener(Protocol::Tcp, 53, pool(targets.clone())),
                listener(Protocol::Udp, 53, pool(targets)),
                listener(Protocol::Tcp, 80, pool(vec![node(1, 30080, None)])),
            ],
        };
        let plan = plan(&lb(), &frontend).unwrap();
        let summary: Vec<(u16, &str)> = plan
            .listeners
            .iter()
            .map(|l| (l.port, l.protocol))
            .collect();
        assert_eq!(summary, [(53, "TCP_UDP"), (80, "TCP")]);
        assert_eq!(plan.listeners[0].serves, [Protocol::Tcp, Protocol::Udp]);

        let mut split = frontend.clone();
        split.listeners[1].pool.targets[0].port = 30054;
        assert!(super::plan(&lb(), &split).unwrap_err().contains("port 53"));
    }

    #[test]
    fn affinity_proxy_protocol_and_draining_become_target_group_attributes() {
        let mut p = pool(vec![node(1, 30080, None)]);
        p.affinity = SessionAffinity::ClientIp {
            timeout: Duration::from_secs(10800),
        };
        p.proxy_protocol = true;
        p.drain_timeout = Some(Duration::from_secs(30));
        p.preserve_client_ip = true;
        let plan = plan(
            &lb(),
            &NetworkFrontend {
                listeners: vec![listener(Protocol::Tcp, 80, p)],
            },
        )
        .unwrap();
        let a = &plan.listeners[0].target_group.attributes;
        assert_eq!(a["stickiness.enabled"], "true");
        assert_eq!(a["stickiness.type"], "source_ip");
        assert_eq!(a["proxy_protocol_v2.enabled"], "true");
        assert_eq!(a["deregistration_delay.timeout_seconds"], "30");
        assert_eq!(a["preserve_client_ip.enabled"], "true");
    }

    #[test]
    fn instance_ids_come_only_from_aws_provider_ids() {
        assert_eq!(instance_id("aws:///eu-west-1a/i-0123"), Some("i-0123"));
        assert_eq!(instance_id("aws:///i-0123"), Some("i-0123"));
        assert_eq!(instance_id("gce://p/z/vm-1"), None);
        assert_eq!(instance_id("aws:///eu-west-1a/"), None);
    }
}
