//! What a policy changes in a load balancer. Pure: the translators call these on the model
//! they built from the Service or Ingress, so a policy overrides defaults and annotations.

use std::time::Duration;

use ipnet::IpNet;
use portico_crds::backend_policy::{HealthCheckProtocol, SessionAffinityType};
use portico_crds::frontend_policy::TlsVersion as PolicyTlsVersion;
use portico_crds::{BackendPolicySpec, FrontendPolicySpec};
use portico_provider::model::TlsVersion;
use portico_provider::{HttpTimeouts, Probe, SessionAffinity, TargetPool};

/// Kubernetes' default ClientIP affinity timeout, used for policies that give no TTL.
const DEFAULT_TTL: Duration = Duration::from_secs(10_800);
const DEFAULT_COOKIE: &str = "portico-affinity";

/// Overlays `policy` on `pool`. `node_port` is the port the pool targets (a TCP probe checks it
/// unless the policy names another); `l7` when the pool is an Ingress backend, where cookie
/// affinity applies and PROXY protocol does not.
pub fn backend_pool(pool: &mut TargetPool, policy: &BackendPolicySpec, node_port: u16, l7: bool) {
    if let Some(hc) = &policy.health_check {
        let check = &mut pool.health_check;
        check.probe = match hc.protocol {
            HealthCheckProtocol::Tcp => Probe::Tcp {
                port: hc.port.unwrap_or(node_port),
            },
            HealthCheckProtocol::Http => {
                let (port, path) = match &check.probe {
                    Probe::Http { port, path } => (*port, path.clone()),
                    Probe::Tcp { port } => (*port, "/healthz".to_string()),
                };
                Probe::Http {
                    port: hc.port.unwrap_or(port),
                    path: hc.path.clone().unwrap_or(path),
                }
            }
        };
        if let Some(s) = hc.interval_seconds {
            check.interval = Duration::from_secs(s.into());
        }
        if let Some(s) = hc.timeout_seconds {
            check.timeout = Duration::from_secs(s.into());
        }
        if let Some(n) = hc.healthy_threshold {
            check.healthy_threshold = n;
        }
        if let Some(n) = hc.unhealthy_threshold {
            check.unhealthy_threshold = n;
        }
        // A probe must finish before the next one starts.
        check.timeout = check.timeout.min(check.interval);
    }
    if let Some(affinity) = &policy.session_affinity {
        let ttl = affinity
            .ttl_seconds
            .map(|s| Duration::from_secs(s.into()))
            .unwrap_or(DEFAULT_TTL);
        match affinity.type_ {
            SessionAffinityType::None => pool.affinity = SessionAffinity::None,
            SessionAffinityType::ClientIp => {
                pool.affinity = SessionAffinity::ClientIp { timeout: ttl };
            }
            // An L4 load balancer sees no cookies; the policy's status says so.
            SessionAffinityType::Cookie if l7 => {
                pool.affinity = SessionAffinity::Cookie {
                    name: affinity
                        .cookie_name
                        .clone()
                        .unwrap_or_else(|| DEFAULT_COOKIE.into()),
                    ttl,
                };
            }
            SessionAffinityType::Cookie => {}
        }
    }
    if let Some(on) = policy.proxy_protocol
        && !l7
    {
        pool.proxy_protocol = on;
    }
    if let Some(draining) = &policy.connection_draining {
        pool.drain_timeout = Some(Duration::from_secs(draining.timeout_seconds.into()));
    }
}

/// The backend's own timeouts: the policy's, filled in from the frontend's `base`.
pub fn backend_timeouts(policy: &BackendPolicySpec, base: &HttpTimeouts) -> Option<HttpTimeouts> {
    let t = policy.timeouts.as_ref()?;
    let secs =
        |s: Option<u32>, default: Duration| s.map_or(default, |s| Duration::from_secs(s.into()));
    Some(HttpTimeouts {
        connect: secs(t.connect_seconds, base.connect),
        request: secs(t.request_seconds, base.request),
        idle: secs(t.idle_seconds, base.idle),
    })
}

/// The policy's source ranges, parsed; `Err` lists the ones that are not CIDRs (the schema's
/// pattern lets some through, e.g. `999.0.0.0/8`).
pub fn source_ranges(policy: &FrontendPolicySpec) -> Result<Option<Vec<IpNet>>, Vec<String>> {
    let Some(raw) = &policy.source_ranges else {
        return Ok(None);
    };
    let mut ranges = Vec::with_capacity(raw.len());
    let mut bad = Vec::new();
    for r in raw {
        match r.parse::<IpNet>() {
            Ok(net) => ranges.push(net.trunc()),
            Err(_) => bad.push(format!("FrontendPolicy source range {r:?} is not a CIDR")),
        }
    }
    if !bad.is_empty() {
        return Err(bad);
    }
    ranges.sort();
    ranges.dedup();
    Ok(Some(ranges))
}

pub fn min_tls_version(policy: &FrontendPolicySpec) -> Option<TlsVersion> {
    policy.tls.as_ref()?.min_version.map(|v| match v {
        PolicyTlsVersion::Tls12 => TlsVersion::Tls12,
        PolicyTlsVersion::Tls13 => TlsVersion::Tls13,
    })
}

#[cfg(test)]
mod tests {
    use portico_crds::backend_policy::{
        ConnectionDraining, HealthCheckPolicy, SessionAffinityPolicy, TimeoutsPolicy,
    };
    use portico_crds::target_ref::BackendTargetKind;
    use portico_crds::{BackendTargetRef, FrontendTargetKind, FrontendTargetRef};
    use portico_provider::HealthCheck;

    use super::*;

    fn policy() -> BackendPolicySpec {
        BackendPolicySpec {
            target_ref: BackendTargetRef {
                kind: BackendTargetKind::Service,
                name: "web".into(),
            },
            health_check: None,
            session_affinity: None,
            balancing: None,
            timeouts: None,
            connection_draining: None,
            proxy_protocol: None,
        }
    }

    fn pool() -> TargetPool {
        TargetPool {
            targets: vec![],
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

    #[test]
    fn an_empty_policy_changes_nothing() {
        let mut p = pool();
        backend_pool(&mut p, &policy(), 30080, false);
        assert_eq!(p, pool());
    }

    #[test]
    fn a_tcp_health_check_probes_the_node_port_unless_told_otherwise() {
        let mut spec = policy();
        spec.health_check = Some(HealthCheckPolicy {
            protocol: HealthCheckProtocol::Tcp,
            path: None,
            port: None,
            interval_seconds: Some(3),
            timeout_seconds: Some(10),
            healthy_threshold: Some(1),
            unhealthy_threshold: Some(4),
        });
        let mut p = pool();
        backend_pool(&mut p, &spec, 30080, false);
        assert_eq!(p.health_check.probe, Probe::Tcp { port: 30080 });
        assert_eq!(p.health_check.interval, Duration::from_secs(3));
        assert_eq!(
            p.health_check.timeout,
            Duration::from_secs(3),
            "capped at the interval"
        );
        assert_eq!(p.health_check.unhealthy_threshold, 4);
    }

    #[test]
    fn an_http_health_check_keeps_the_implied_port_and_takes_the_path() {
        let mut spec = policy();
        spec.health_check = Some(HealthCheckPolicy {
            protocol: HealthCheckProtocol::Http,
            path: Some("/ready".into()),
            port: None,
            interval_seconds: None,
            timeout_seconds: None,
            healthy_threshold: None,
            unhealthy_threshold: None,
        });
        let mut p = pool();
        backend_pool(&mut p, &spec, 30080, false);
        assert_eq!(
            p.health_check.probe,
            Probe::Http {
                port: 10256,
                path: "/ready".into()
            }
        );
    }

    #[test]
    fn cookie_affinity_applies_at_l7_only_and_client_ip_at_both() {
        let mut spec = policy();
        spec.session_affinity = Some(SessionAffinityPolicy {
            type_: SessionAffinityType::Cookie,
            cookie_name: None,
            ttl_seconds: Some(60),
        });
        let (mut l4, mut l7) = (pool(), pool());
        backend_pool(&mut l4, &spec, 1, false);
        backend_pool(&mut l7, &spec, 1, true);
        assert_eq!(l4.affinity, SessionAffinity::None);
        assert_eq!(
            l7.affinity,
            SessionAffinity::Cookie {
                name: "portico-affinity".into(),
                ttl: Duration::from_secs(60)
            }
        );
        spec.session_affinity.as_mut().unwrap().type_ = SessionAffinityType::ClientIp;
        backend_pool(&mut l4, &spec, 1, false);
        assert_eq!(
            l4.affinity,
            SessionAffinity::ClientIp {
                timeout: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn proxy_protocol_is_l4_only_and_draining_applies_everywhere() {
        let mut spec = policy();
        spec.proxy_protocol = Some(true);
        spec.connection_draining = Some(ConnectionDraining { timeout_seconds: 5 });
        let (mut l4, mut l7) = (pool(), pool());
        backend_pool(&mut l4, &spec, 1, false);
        backend_pool(&mut l7, &spec, 1, true);
        assert!(l4.proxy_protocol);
        assert!(!l7.proxy_protocol);
        assert_eq!(l7.drain_timeout, Some(Duration::from_secs(5)));
    }

    #[test]
    fn backend_timeouts_fill_in_from_the_frontend() {
        let mut spec = policy();
        assert_eq!(backend_timeouts(&spec, &HttpTimeouts::default()), None);
        spec.timeouts = Some(TimeoutsPolicy {
            connect_seconds: None,
            request_seconds: Some(2),
            idle_seconds: None,
        });
        let base = HttpTimeouts::default();
        let t = backend_timeouts(&spec, &base).unwrap();
        assert_eq!(t.request, Duration::from_secs(2));
        assert_eq!(t.connect, base.connect);
    }

    #[test]
    fn source_ranges_are_parsed_and_bad_ones_named() {
        let mut spec = FrontendPolicySpec {
            target_ref: FrontendTargetRef {
                kind: FrontendTargetKind::Service,
                name: "web".into(),
            },
            redirect_to_https: None,
            tls: None,
            source_ranges: Some(vec!["10.1.2.3/8".into(), "10.0.0.0/8".into()]),
        };
        assert_eq!(
            source_ranges(&spec).unwrap().unwrap(),
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        spec.source_ranges = Some(vec!["999.0.0.0/8".into()]);
        assert!(source_ranges(&spec).unwrap_err()[0].contains("999.0.0.0/8"));
    }
}
