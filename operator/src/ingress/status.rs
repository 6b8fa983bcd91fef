//! What an Ingress's `.status.loadBalancer` should say.

use k8s_openapi::api::networking::v1::{
    Ingress, IngressLoadBalancerIngress, IngressLoadBalancerStatus, IngressPortStatus,
};
use portico_provider::LoadBalancerStatus;

/// `.status.loadBalancer` for what the provider reports: the Service form (one entry per
/// address, every port on each), in the Ingress API's types, which have the same shape.
pub fn load_balancer_status(status: &LoadBalancerStatus) -> IngressLoadBalancerStatus {
    let service = crate::service::status::load_balancer_status(status);
    IngressLoadBalancerStatus {
        ingress: service.ingress.map(|list| {
            list.into_iter()
                .map(|i| IngressLoadBalancerIngress {
                    ip: i.ip,
                    hostname: i.hostname,
                    ports: i.ports.map(|ports| {
                        ports
                            .into_iter()
                            .map(|p| IngressPortStatus {
                                port: p.port,
                                protocol: p.protocol,
                                error: p.error,
                            })
                            .collect()
                    }),
                })
                .collect()
        }),
    }
}

pub fn matches(ingress: &Ingress, desired: &IngressLoadBalancerStatus) -> bool {
    let current = ingress
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .unwrap_or_default();
    current == desired.ingress.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use portico_provider::{Address, PortStatus, Protocol};

    #[test]
    fn addresses_carry_every_port() {
        let s = load_balancer_status(&LoadBalancerStatus {
            addresses: vec![Address::Ip("127.22.1.9".parse().unwrap())],
            ports: vec![
                PortStatus {
                    protocol: Protocol::Tcp,
                    port: 80,
                    error: None,
                },
                PortStatus {
                    protocol: Protocol::Tcp,
                    port: 443,
                    error: None,
                },
            ],
        });
        let ingress = &s.ingress.as_ref().unwrap()[0];
        assert_eq!(ingress.ip.as_deref(), Some("127.22.1.9"));
        assert_eq!(ingress.ports.as_ref().unwrap().len(), 2);
        assert!(matches(
            &Ingress {
                status: Some(k8s_openapi::api::networking::v1::IngressStatus {
                    load_balancer: Some(s.clone())
                }),
                ..Default::default()
            },
            &s
        ));
        assert!(!matches(&Ingress::default(), &s));
    }
}
