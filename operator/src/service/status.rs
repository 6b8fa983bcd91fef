//! What a Service's status should say: addresses from the provider, and Portico's condition.

use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, PortStatus, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use portico_provider::{Address, LoadBalancerStatus as ProviderStatus};

/// The condition Portico keeps on every Service it serves. `status` is `Unknown` while
/// provisioning, `True` once the load balancer serves, `False` with a reason when it cannot.
pub const CONDITION_TYPE: &str = "portico.dev/LoadBalancerReady";

/// `.status.loadBalancer` for what the provider reports. `ipMode` is left out on purpose: API
/// servers before 1.29 reject it.
pub fn load_balancer_status(status: &ProviderStatus) -> LoadBalancerStatus {
    let ports: Vec<PortStatus> = status
        .ports
        .iter()
        .map(|p| PortStatus {
            port: i32::from(p.port),
            protocol: p.protocol.as_str().to_string(),
            error: p.error.clone(),
        })
        .collect();
    let ingress = status
        .addresses
        .iter()
        .map(|a| {
            let (ip, hostname) = match a {
                Address::Ip(ip) => (Some(ip.to_string()), None),
                Address::Hostname(h) => (None, Some(h.clone())),
            };
            LoadBalancerIngress {
                ip,
                hostname,
                ip_mode: None,
                ports: (!ports.is_empty()).then(|| ports.clone()),
            }
        })
        .collect();
    LoadBalancerStatus {
        ingress: Some(ingress),
    }
}

/// True when the Service's current `.status.loadBalancer` already equals `desired`
/// (an absent list and an empty one are the same).
pub fn load_balancer_status_matches(svc: &Service, desired: &LoadBalancerStatus) -> bool {
    let current = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .unwrap_or_default();
    let desired = desired.ingress.clone().unwrap_or_default();
    current == desired
}

/// The Service's condition list with Portico's condition set to (status, reason, message).
/// Returns `None` when nothing would change. The transition time moves only when the status
/// does, as Kubernetes conventions ask.
pub fn conditions_with(
    svc: &Service,
    status: &str,
    reason: &str,
    message: &str,
    now: Time,
) -> Option<Vec<Condition>> {
    let mut conditions = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let generation = svc.metadata.generation;
    match conditions.iter_mut().find(|c| c.type_ == CONDITION_TYPE) {
        Some(c) if c.status == status && c.reason == reason && c.message == message => None,
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status.to_string();
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = generation;
            Some(conditions)
        }
        None => {
            conditions.push(Condition {
                type_: CONDITION_TYPE.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message: message.to_string(),
                last_transition_time: now,
                observed_generation: generation,
            });
            Some(conditions)
        }
    }
}

/// The Service's conditions without Portico's, or `None` when it has none of ours.
pub fn conditions_without_ours(svc: &Service) -> Option<Vec<Condition>> {
    let conditions = svc.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .any(|c| c.type_ == CONDITION_TYPE)
        .then(|| {
            conditions
                .iter()
                .filter(|c| c.type_ != CONDITION_TYPE)
                .cloned()
                .collect()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceStatus;
    use portico_provider::{PortStatus as ProviderPort, Protocol};

    fn provider_status() -> ProviderStatus {
        ProviderStatus {
            addresses: vec![Address::Ip("127.22.1.5".parse().unwrap())],
            ports: vec![
                ProviderPort {
                    protocol: Protocol::Tcp,
                    port: 80,
                    error: None,
                },
                ProviderPort {
                    protocol: Protocol::Udp,
                    port: 53,
                    error: Some("port in use".into()),
                },
            ],
        }
    }

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn status_lists_each_address_with_every_port() {
        let s = load_balancer_status(&provider_status());
        let ingress = s.ingress.unwrap();
        assert_eq!(ingress.len(), 1);
        assert_eq!(ingress[0].ip.as_deref(), Some("127.22.1.5"));
        assert_eq!(ingress[0].ip_mode, None, "1.20 API servers reject ipMode");
        let ports = ingress[0].ports.as_ref().unwrap();
        assert_eq!((ports[0].port, ports[0].protocol.as_str()), (80, "TCP"));
        assert_eq!(ports[1].error.as_deref(), Some("port in use"));
    }

    #[test]
    fn hostnames_are_reported_as_hostnames() {
        let s = load_balancer_status(&ProviderStatus {
            addresses: vec![Address::Hostname("lb-1.elb.example".into())],
            ports: vec![],
        });
        let ingress = &s.ingress.unwrap()[0];
        assert_eq!(ingress.hostname.as_deref(), Some("lb-1.elb.example"));
        assert_eq!(ingress.ip, None);
        assert_eq!(ingress.ports, None);
    }

    #[test]
    fn unchanged_status_is_recognised() {
        let desired = load_balancer_status(&provider_status());
        let mut svc = Service::default();
        assert!(!load_balancer_status_matches(&svc, &desired));
        svc.status = Some(ServiceStatus {
            load_balancer: Some(desired.clone()),
            conditions: None,
        });
        assert!(load_balancer_status_matches(&svc, &desired));
        assert!(load_balancer_status_matches(
            &Service::default(),
            &LoadBalancerStatus::default()
        ));
    }

    #[test]
    fn condition_transition_time_moves_only_with_its_status() {
        let mut svc = Service::default();
        let first = conditions_with(&svc, "Unknown", "Provisioning", "ensuring", t(1)).unwrap();
        svc.status = Some(ServiceStatus {
            conditions: Some(first),
            load_balancer: None,
        });
        assert_eq!(
            conditions_with(&svc, "Unknown", "Provisioning", "ensuring", t(2)),
            None
        );

        let second = conditions_with(&svc, "Unknown", "Provisioning", "retrying", t(3)).unwrap();
        assert_eq!(second[0].last_transition_time, t(1));
        svc.status.as_mut().unwrap().conditions = Some(second);

        let third = conditions_with(&svc, "True", "Ensured", "ready", t(4)).unwrap();
        assert_eq!(third[0].last_transition_time, t(4));
        assert_eq!(third.len(), 1);
    }

    #[test]
    fn other_controllers_conditions_are_kept() {
        let foreign = Condition {
            type_: "example.com/Other".into(),
            status: "True".into(),
            reason: "X".into(),
            message: String::new(),
            last_transition_time: t(0),
            observed_generation: None,
        };
        let mut svc = Service {
            status: Some(ServiceStatus {
                conditions: Some(vec![foreign.clone()]),
                load_balancer: None,
            }),
            ..Default::default()
        };
        let with = conditions_with(&svc, "True", "Ensured", "ok", t(1)).unwrap();
        assert_eq!(with.len(), 2);
        assert_eq!(conditions_without_ours(&svc), None);
        svc.status.as_mut().unwrap().conditions = Some(with);
        assert_eq!(conditions_without_ours(&svc), Some(vec![foreign]));
    }
}
