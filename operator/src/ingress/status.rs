//! What an Ingress's `.status.loadBalancer` should say.

use k8s_openapi::api::networking::v1::{
    Ingress, IngressLoadBalancerIngress, IngressLoadBalancerStatus, IngressPortStatus,
};
use portico_provider::{Address, LoadBalancerStatus};

pub fn load_balancer_status(status: &LoadBalancerStatus) -> IngressLoadBalancerStatus {
    let ports: Vec<IngressPortStatus> = status
        .ports
        .iter()
        .map(|p| IngressPortStatus {
            port: i32::from(p.port),
            protocol: p.protocol.as_str().to_string(),
            error: p.error.clone(),
        })
        .collect();
    IngressLoadBalancerStatus {
        ingress: Some(
            status
                .addresses
                .iter()
                .map(|a| {
                    let (ip, hostname) = match a {
                        Address::Ip(ip) => (Some(ip.to_string()), None),
                        Address::Hostname(h) => (None, Some(h.clone())),
                    };
                    IngressLoadBalancerIngress {
                        ip,
                        hostname,
                        ports: (!ports.is_empty()).then(|| ports.clone()),
                    }
                })
                .collect(),
        ),
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
    use portico_provider::{PortStatus, Protocol};

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
