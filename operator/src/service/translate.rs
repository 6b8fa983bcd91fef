//! Service (plus the cluster's nodes) → the provider-agnostic load balancer model. Pure.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use portico_provider::{
    Frontend, HealthCheck, Listener, LoadBalancerName, LoadBalancerSpec, NetworkFrontend,
    Ownership, Probe, Protocol, SessionAffinity, Target, TargetPool,
};

use super::annotations::{self as ann, AnnotationReader};
use super::nodes::EligibleNode;
use crate::policy::{Attached, apply};

/// kube-proxy's health endpoint, what load balancers probe for `externalTrafficPolicy: Cluster`.
pub const KUBE_PROXY_HEALTH_PORT: u16 = 10256;
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

/// Why a Service cannot be turned into a load balancer; every problem found, for one event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("; "))]
pub struct InvalidService {
    pub problems: Vec<String>,
}

/// The owner recorded on the load balancer of `svc`.
pub fn ownership(cluster_id: &str, svc: &Service) -> Ownership {
    crate::object::ownership(cluster_id, "Service", svc)
}

pub fn load_balancer_name(svc: &Service) -> LoadBalancerName {
    crate::object::load_balancer_name(svc)
}

/// The load balancer `svc` should have, targeting the node ports of `nodes`.
pub fn desired_load_balancer(
    cluster_id: &str,
    svc: &Service,
    nodes: &[EligibleNode],
    policies: &Attached,
) -> Result<LoadBalancerSpec, InvalidService> {
    let spec = svc.spec.clone().unwrap_or_default();
    let mut reader = AnnotationReader::new(svc.metadata.annotations.as_ref());
    let mut problems = Vec::new();

    if svc.metadata.uid.is_none() {
        problems.push("the Service has no UID yet".to_string());
    }

    let requested_address = match spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(raw) => match raw.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                problems.push(format!("loadBalancerIP {raw:?} is not an IP address"));
                None
            }
        },
    };

    let from_policy = match policies.frontend.as_ref().map(apply::source_ranges) {
        None | Some(Ok(None)) => None,
        Some(Ok(Some(ranges))) => Some(ranges),
        Some(Err(mut bad)) => {
            problems.append(&mut bad);
            Some(Vec::new())
        }
    };
    // A FrontendPolicy's ranges replace the Service's own.
    let source_ranges = from_policy.unwrap_or_else(|| {
        source_ranges(
            spec.load_balancer_source_ranges
                .as_deref()
                .unwrap_or_default(),
            reader.raw(ann::SOURCE_RANGES),
            &mut problems,
        )
    });
    let backend_policy = svc
        .metadata
        .name
        .as_ref()
        .and_then(|name| policies.backend.get(name));

    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    let probe = match node_probe(&spec) {
        Ok(probe) => Some(probe),
        Err(problem) => {
            problems.push(problem);
            None
        }
    };
    let health_check = probe.map(|probe| {
        let mut hc = HealthCheck::with_probe(probe);
        if let Some(s) = reader.parse::<u64>(ann::HEALTH_CHECK_INTERVAL, 1..=300) {
            hc.interval = Duration::from_secs(s);
        }
        if let Some(s) = reader.parse::<u64>(ann::HEALTH_CHECK_TIMEOUT, 1..=300) {
            hc.timeout = Duration::from_secs(s);
        }
        if let Some(n) = reader.parse::<u32>(ann::HEALTH_CHECK_HEALTHY_THRESHOLD, 1..=10) {
            hc.healthy_threshold = n;
        }
        if let Some(n) = reader.parse::<u32>(ann::HEALTH_CHECK_UNHEALTHY_THRESHOLD, 1..=10) {
            hc.unhealthy_threshold = n;
        }
        // A probe must finish before the next one starts.
        hc.timeout = hc.timeout.min(hc.interval);
        hc
    });

    let affinity = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
        SessionAffinity::ClientIp { timeout }
    } else {
        SessionAffinity::None
    };
    let proxy_protocol = reader.flag(ann::PROXY_PROTOCOL).unwrap_or(false);

    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        problems.push("the Service has no ports".to_string());
    }
    let mut listeners = Vec::with_capacity(ports.len());
    for port in ports {
        match listener_shape(port) {
            Ok((name, protocol, port, node_port)) => {
                listeners.push((name, protocol, port, node_port))
            }
            Err(problem) => problems.push(problem),
        }
    }

    problems.append(&mut reader.problems);
    if !problems.is_empty() {
        return Err(InvalidService { problems });
    }
    let health_check = health_check.expect("no problems means a probe was chosen");

    let listeners = listeners
        .into_iter()
        .map(|(name, protocol, port, node_port)| {
            let mut listener = Listener {
                name,
                protocol,
                port,
                pool: TargetPool {
                    targets: nodes
                        .iter()
                        .map(|n| Target {
                            node: n.name.clone(),
                            address: n.internal_ip,
                            port: node_port,
                            provider_id: n.provider_id.clone(),
                        })
                        .collect(),
                    health_check: health_check.clone(),
                    affinity: affinity.clone(),
                    proxy_protocol,
                    preserve_client_ip: local,
                    drain_timeout: None,
                },
            };
            if let Some(policy) = backend_policy {
                apply::backend_pool(&mut listener.pool, policy, node_port, false);
            }
            listener
        })
        .collect();

    Ok(LoadBalancerSpec {
        name: load_balancer_name(svc),
        owner: ownership(cluster_id, svc),
        requested_address,
        requested_address_name: None,
        source_ranges,
        frontend: Frontend::Network(NetworkFrontend { listeners }),
    })
}

/// How a load balancer learns whether a node can serve this Service: kube-proxy's health
/// endpoint for `externalTrafficPolicy: Cluster`, the Service's health check node port for
/// `Local` (it answers 200 only on nodes with a local endpoint).
pub fn node_probe(spec: &ServiceSpec) -> Result<Probe, String> {
    if spec.external_traffic_policy.as_deref() != Some("Local") {
        return Ok(Probe::Http {
            port: KUBE_PROXY_HEALTH_PORT,
            path: "/healthz".into(),
        });
    }
    match spec
        .health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
    {
        Some(port) if port > 0 => Ok(Probe::Http {
            port,
            path: "/healthz".into(),
        }),
        _ => Err(
            "externalTrafficPolicy Local needs a healthCheckNodePort, and there is none"
                .to_string(),
        ),
    }
}

/// Name, protocol, port and node port of one Service port, or why it cannot be served.
fn listener_shape(port: &ServicePort) -> Result<(String, Protocol, u16, u16), String> {
    let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        other => {
            return Err(format!(
                "port {}: protocol {other} is not supported",
                port.port
            ));
        }
    };
    let number = u16::try_from(port.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("port {} is out of range", port.port))?;
    let node_port = port
        .node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            format!(
                "port {number}/{protocol} has no node port (allocateLoadBalancerNodePorts: false \
                 is not supported: Portico's load balancers target node ports)"
            )
        })?;
    let name = match port.name.as_deref().filter(|n| !n.is_empty()) {
        Some(n) => n.to_string(),
        None => format!("{}-{number}", protocol.as_str().to_ascii_lowercase()),
    };
    Ok((name, protocol, number, node_port))
}

/// `spec.loadBalancerSourceRanges`, or else the legacy annotation (comma separated).
fn source_ranges(
    field: &[String],
    annotation: Option<&str>,
    problems: &mut Vec<String>,
) -> Vec<IpNet> {
    let raw: Vec<&str> = if !field.is_empty() {
        field.iter().map(String::as_str).collect()
    } else {
        annotation
            .map(|a| {
                a.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut ranges = Vec::with_capacity(raw.len());
    for r in raw {
        match r.parse::<IpNet>() {
            Ok(net) => ranges.push(net.trunc()),
            Err(_) => problems.push(format!("source range {r:?} is not a CIDR")),
        }
    }
    ranges.sort();
    ranges.dedup();
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ClientIPConfig, ServiceSpec, SessionAffinityConfig};

    fn nodes() -> Vec<EligibleNode> {
        vec![
            EligibleNode {
                name: "node-1".into(),
                internal_ip: "127.20.1.1".parse().unwrap(),
                provider_id: Some("p://1".into()),
            },
            EligibleNode {
                name: "node-2".into(),
                internal_ip: "127.20.1.2".parse().unwrap(),
                provider_id: None,
            },
        ]
    }

    fn port(name: Option<&str>, protocol: &str, port: i32, node_port: i32) -> ServicePort {
        ServicePort {
            name: name.map(Into::into),
            protocol: Some(protocol.into()),
            port,
            node_port: Some(node_port),
            ..Default::default()
        }
    }

    fn service() -> Service {
        Service {
            metadata: kube::api::ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                uid: Some("0b6f4c1e-1111-2222-3333-444455556666".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ports: Some(vec![
                    port(Some("http"), "TCP", 80, 30080),
                    port(None, "UDP", 53, 30053),
                ]),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn with_annotation(mut svc: Service, key: &str, value: &str) -> Service {
        svc.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into());
        svc
    }

    fn listeners(spec: &LoadBalancerSpec) -> &[Listener] {
        let Frontend::Network(n) = &spec.frontend else {
            panic!("a Service becomes a network load balancer");
        };
        &n.listeners
    }

    #[test]
    fn every_service_port_becomes_a_listener_on_every_nodes_node_port() {
        let lb = desired_load_balancer("c1", &service(), &nodes(), &Attached::default()).unwrap();
        assert_eq!(
            lb.name.as_str(),
            "a0b6f4c1e111122223333444455556666"[..32].to_string()
        );
        assert_eq!(lb.owner.object_ref, "Service/shop/web");
        assert_eq!(lb.owner.cluster_id, "c1");
        let ls = listeners(&lb);
        assert_eq!(ls.len(), 2);
        assert_eq!(
            (ls[0].name.as_str(), ls[0].protocol, ls[0].port),
            ("http", Protocol::Tcp, 80)
        );
        assert_eq!(
            (ls[1].name.as_str(), ls[1].protocol, ls[1].port),
            ("udp-53", Protocol::Udp, 53)
        );
        let targets: Vec<_> = ls[1]
            .pool
            .targets
            .iter()
            .map(|t| (t.address.to_string(), t.port))
            .collect();
        assert_eq!(
            targets,
            [
                ("127.20.1.1".into(), 30053),
                ("127.20.1.2".to_string(), 30053)
            ]
        );
        assert_eq!(ls[0].pool.targets[0].provider_id.as_deref(), Some("p://1"));
    }

    #[test]
    fn cluster_policy_probes_kube_proxy_and_does_not_preserve_the_client() {
        let lb = desired_load_balancer("c1", &service(), &nodes(), &Attached::default()).unwrap();
        let pool = &listeners(&lb)[0].pool;
        assert_eq!(
            pool.health_check.probe,
            Probe::Http {
                port: 10256,
                path: "/healthz".into()
            }
        );
        assert!(!pool.preserve_client_ip);
    }

    #[test]
    fn local_policy_probes_the_health_check_node_port_and_keeps_the_client_address() {
        let mut svc = service();
        let spec = svc.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32111);
        let lb = desired_load_balancer("c1", &svc, &nodes(), &Attached::default()).unwrap();
        let pool = &listeners(&lb)[0].pool;
        assert_eq!(
            pool.health_check.probe,
            Probe::Http {
                port: 32111,
                path: "/healthz".into()
            }
        );
        assert!(pool.preserve_client_ip);
    }

    #[test]
    fn client_ip_affinity_uses_the_configured_timeout_or_the_kubernetes_default() {
        let mut svc = service();
        svc.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
        let lb = desired_load_balancer("c1", &svc, &nodes(), &Attached::default()).unwrap();
        assert_eq!(
            listeners(&lb)[0].pool.affinity,
            SessionAffinity::ClientIp {
                timeout: DEFAULT_AFFINITY_TIMEOUT
            }
        );
        svc.spec.as_mut().unwrap().session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(60),
            }),
        });
        let lb = desired_load_balancer("c1", &svc, &nodes(), &Attached::default()).unwrap();
        assert_eq!(
            listeners(&lb)[0].pool.affinity,
            SessionAffinity::ClientIp {
                timeout: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn source_ranges_come_from_the_field_else_the_legacy_annotation() {
        let svc = with_annotation(service(), ann::SOURCE_RANGES, "10.0.0.0/8, 127.0.0.1/32");
        let lb = desired_load_balancer("c1", &svc, &nodes(), &Attached::default()).unwrap();
        assert_eq!(lb.source_ranges.len(), 2);
        let mut svc = svc;
        svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["127.5.0.0/16".into()]);
        let lb = desired_load_balancer("c1", &svc, &nodes(), &Attached::default()).unwrap();
        assert_eq!(
            lb.source_ranges,
            vec!["127.5.0.0/16".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn annotations_tune_health_checks_and_proxy_protocol() {
        let svc = with_annotation(service(), ann::HEALTH_CHECK_INTERVAL, "5");
        let svc = with_annotation(svc, ann::HEALTH_CHECK_TIMEOUT, "9");
        let svc = with_annotation(svc, ann::HEALTH_CHECK_UNHEALTHY_THRESHOLD, "3");
        let svc = with_annotation(svc, ann::PROXY_PROTOCOL, "true");
        let lb = desired_load_balancer("c1", &svc, &nodes(), &Attached::default()).unwrap();
        let pool = &listeners(&lb)[0].pool;
        assert_eq!(pool.health_check.interval, Duration::from_secs(5));
        assert_eq!(
            pool.health_check.timeout,
            Duration::from_secs(5),
            "clamped to the interval"
        );
        assert_eq!(pool.health_check.unhealthy_threshold, 3);
        assert!(pool.proxy_protocol);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let svc = with_annotation(service(), ann::PROXY_PROTOCOL, "yes");
        let svc = with_annotation(svc, ann::HEALTH_CHECK_INTERVAL, "0");
        let mut svc = with_annotation(svc, ann::SOURCE_RANGES, "not-a-cidr");
        let spec = svc.spec.as_mut().unwrap();
        spec.load_balancer_ip = Some("nope".into());
        spec.ports.as_mut().unwrap().push(ServicePort {
            port: 9,
            protocol: Some("SCTP".into()),
            node_port: Some(30009),
            ..Default::default()
        });
        let err = desired_load_balancer("c1", &svc, &nodes(), &Attached::default()).unwrap_err();
        assert_eq!(err.problems.len(), 5, "{err}");
        assert!(err.to_string().contains("lb.portico.dev/proxy-protocol"));
        assert!(err.to_string().contains("SCTP"));
    }

    #[test]
    fn ports_without_node_ports_are_rejected() {
        let mut svc = service();
        svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = None;
        let err = desired_load_balancer("c1", &svc, &nodes(), &Attached::default()).unwrap_err();
        assert!(err.to_string().contains("no node port"), "{err}");
    }

    #[test]
    fn no_eligible_nodes_still_yields_a_load_balancer() {
        let lb = desired_load_balancer("c1", &service(), &[], &Attached::default()).unwrap();
        assert!(listeners(&lb).iter().all(|l| l.pool.targets.is_empty()));
    }
}
