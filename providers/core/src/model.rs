//! What a load balancer should look like, in terms every provider understands.
//!
//! Nothing here knows about Kubernetes: the operator translates Services (and later Ingresses)
//! into these types, and each provider maps them onto its cloud (an NLB, a forwarding rule, or
//! the local cloud's proxy).

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::naming::LoadBalancerName;
use crate::routing::RouteTable;

/// Who a cloud load balancer belongs to. Providers tag every resource with it and refuse to
/// touch a resource whose tags say otherwise, so two clusters (or two operators) sharing one
/// cloud account never adopt or delete each other's load balancers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ownership {
    /// Identifies the cluster (and operator instance) that owns the load balancer.
    pub cluster_id: String,
    /// The UID of the Kubernetes object the load balancer serves.
    pub object_uid: String,
    /// `Kind/namespace/name` of that object, for people reading the cloud console.
    pub object_ref: String,
}

impl Ownership {
    /// True when `other` names the same cluster and object.
    pub fn same_owner(&self, other: &Ownership) -> bool {
        self.cluster_id == other.cluster_id && self.object_uid == other.object_uid
    }
}

/// The desired state of one external load balancer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    pub name: LoadBalancerName,
    pub owner: Ownership,
    /// A specific address the user asked for (`loadBalancerIP`); the provider errors with
    /// [`crate::ProviderError::Invalid`] when it cannot honour it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_address: Option<IpAddr>,
    /// An address the cloud already holds, by name (a GCP reserved address): used, never
    /// released. Providers without named addresses refuse it as invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_address_name: Option<String>,
    /// Client networks allowed to connect; empty means everyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<IpNet>,
    pub frontend: Frontend,
}

/// The two families of load balancer every cloud offers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Frontend {
    /// Passthrough L4 (a Service of type LoadBalancer): AWS NLB, GCP passthrough NLB.
    Network(NetworkFrontend),
    /// HTTP(S) with host/path routing (an Ingress): AWS ALB, GCP external Application LB.
    Application(ApplicationFrontend),
}

/// An L7 load balancer: requests are routed by host and path (see [`crate::routing`]) to
/// backend pools, and balanced per request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationFrontend {
    /// The plain HTTP port (80 for an Ingress).
    pub http_port: u16,
    /// HTTPS, present when any TLS is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https: Option<HttpsListener>,
    /// Answer plain HTTP with a permanent redirect to HTTPS instead of serving it.
    #[serde(default)]
    pub redirect_to_https: bool,
    pub routes: RouteTable,
    /// The pools routes point at, by name.
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub timeouts: HttpTimeouts,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpsListener {
    pub port: u16,
    /// Chosen per connection by SNI; several per listener.
    pub certificates: Vec<Certificate>,
    /// The oldest TLS version a client may negotiate.
    #[serde(default)]
    pub min_tls_version: TlsVersion,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certificate {
    /// Stable within the load balancer (e.g. `namespace/secret`).
    pub name: String,
    /// Host names (possibly `*.example.com`) this certificate is offered for; a certificate
    /// with no hosts is the default for clients that send no matching SNI.
    #[serde(default)]
    pub hosts: Vec<String>,
    pub source: CertificateSource,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum CertificateSource {
    /// PEM material from a Kubernetes TLS Secret; the provider uploads or serves it.
    Pem { chain: String, key: String },
    /// A certificate the cloud already holds (an ACM ARN, a GCP SslCertificate name).
    Reference { id: String },
}

impl std::fmt::Debug for CertificateSource {
    // Keys never end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertificateSource::Pem { chain, .. } => f
                .debug_struct("Pem")
                .field("chain_len", &chain.len())
                .field("key", &"<redacted>")
                .finish(),
            CertificateSource::Reference { id } => {
                f.debug_struct("Reference").field("id", id).finish()
            }
        }
    }
}

/// A named pool of targets that routes send requests to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    pub name: String,
    pub pool: TargetPool,
    /// This backend's own timeouts, instead of the frontend's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpTimeouts>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpTimeouts {
    /// Connecting to a target.
    #[serde(with = "duration_ms")]
    pub connect: Duration,
    /// A whole request/response exchange with a target (not counting upgraded connections).
    #[serde(with = "duration_ms")]
    pub request: Duration,
    /// An idle client keep-alive connection.
    #[serde(with = "duration_ms")]
    pub idle: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        HttpTimeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        }
    }
}

/// An L4 load balancer: one listener per (protocol, port), each forwarding to a pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkFrontend {
    pub listeners: Vec<Listener>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One frontend port. A port that serves both TCP and UDP is two listeners.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Stable within the load balancer (the Service port's name, or `<protocol>-<port>`).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub pool: TargetPool,
}

/// Where a listener sends traffic and how it picks a target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetPool {
    pub targets: Vec<Target>,
    pub health_check: HealthCheck,
    #[serde(default)]
    pub affinity: SessionAffinity,
    /// Send a PROXY protocol v2 header to targets at the start of each connection.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Targets see the client's own address (`externalTrafficPolicy: Local`), not the
    /// load balancer's.
    #[serde(default)]
    pub preserve_client_ip: bool,
    /// How long connections to a target that left the pool may go on; `None`: until they end.
    #[serde(
        default,
        with = "optional_duration_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub drain_timeout: Option<Duration>,
}

/// A node and the port it serves this pool on (the Service's node port).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// The node's name, for logs and per-target state.
    pub node: String,
    /// The node's InternalIP.
    pub address: IpAddr,
    pub port: u16,
    /// The cloud's instance reference (`Node.spec.providerID`), where the cloud targets
    /// instances rather than addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
}

/// How the load balancer decides a target may receive traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    pub probe: Probe,
    #[serde(with = "duration_ms")]
    pub interval: Duration,
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Consecutive successes before an unhealthy target gets traffic again.
    pub healthy_threshold: u32,
    /// Consecutive failures before a healthy target stops getting traffic.
    pub unhealthy_threshold: u32,
}

impl HealthCheck {
    /// cloud-provider-kind's cadence: probe every 2 s, 2 failures to stop traffic, 1 success to
    /// restore it; the timeout is kept within the interval so probes never overlap.
    pub fn with_probe(probe: Probe) -> Self {
        HealthCheck {
            probe,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Probe {
    /// `GET http://<target address>:<port><path>`, healthy on 2xx.
    Http { port: u16, path: String },
    /// A TCP connect to the target address on `port`.
    Tcp { port: u16 },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum SessionAffinity {
    #[default]
    None,
    /// Connections (flows, for UDP) from one client address go to one target while they keep
    /// coming within `timeout` of each other.
    ClientIp {
        #[serde(with = "duration_ms")]
        timeout: Duration,
    },
    /// L7 only: the load balancer sets cookie `name` naming the target, valid for `ttl`, and
    /// sends requests carrying it to that target while it stays healthy.
    Cookie {
        name: String,
        #[serde(with = "duration_ms")]
        ttl: Duration,
    },
}

/// What the provider reports about a load balancer it serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerStatus {
    pub addresses: Vec<Address>,
    /// One entry per listener; `error` says why a port is not served.
    #[serde(default)]
    pub ports: Vec<PortStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Address {
    Ip(IpAddr),
    Hostname(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortStatus {
    pub protocol: Protocol,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A load balancer the provider found, with who owns it; what garbage collection lists.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservedLoadBalancer {
    pub name: LoadBalancerName,
    pub owner: Ownership,
    pub status: LoadBalancerStatus,
}

/// Durations travel as whole milliseconds in JSON (`"intervalMs"` would leak the unit into
/// every field name; a bare number in ms is what the local cloud's API documents).
mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

mod optional_duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_ms::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LoadBalancerSpec {
        LoadBalancerSpec {
            name: LoadBalancerName::for_object_uid("4a1c6f0e-8d8e-4f59-9b55-1b2f2a7c9d10"),
            owner: Ownership {
                cluster_id: "c1".into(),
                object_uid: "4a1c6f0e-8d8e-4f59-9b55-1b2f2a7c9d10".into(),
                object_ref: "Service/default/web".into(),
            },
            requested_address: None,
            requested_address_name: None,
            source_ranges: vec!["10.0.0.0/8".parse().unwrap()],
            frontend: Frontend::Network(NetworkFrontend {
                listeners: vec![Listener {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    pool: TargetPool {
                        targets: vec![Target {
                            node: "n1".into(),
                            address: "127.0.0.2".parse().unwrap(),
                            port: 30080,
                            provider_id: None,
                        }],
                        health_check: HealthCheck::with_probe(Probe::Http {
                            port: 10256,
                            path: "/healthz".into(),
                        }),
                        affinity: SessionAffinity::ClientIp {
                            timeout: Duration::from_secs(10800),
                        },
                        proxy_protocol: false,
                        preserve_client_ip: false,
                        drain_timeout: None,
                    },
                }],
            }),
        }
    }

    #[test]
    fn spec_survives_a_json_round_trip() {
        let spec = sample();
        let json = serde_json::to_string(&spec).unwrap();
        let back: LoadBalancerSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(spec, back);
    }

    #[test]
    fn durations_are_milliseconds_on_the_wire() {
        let json = serde_json::to_value(sample()).unwrap();
        let pool = &json["frontend"]["listeners"][0]["pool"];
        assert_eq!(pool["healthCheck"]["interval"], 2000);
        assert_eq!(pool["affinity"]["type"], "clientIp");
        assert_eq!(pool["affinity"]["timeout"], 10_800_000);
        assert_eq!(json["frontend"]["type"], "network");
    }

    #[test]
    fn ownership_compares_cluster_and_uid_only() {
        let a = sample().owner;
        let mut b = a.clone();
        b.object_ref = "Service/default/renamed".into();
        assert!(a.same_owner(&b));
        b.cluster_id = "c2".into();
        assert!(!a.same_owner(&b));
    }
}
