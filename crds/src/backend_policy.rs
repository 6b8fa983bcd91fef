//! `BackendPolicy`: how a Service's load balancer treats its targets. Attached to one Service
//! in the same namespace; applies to the Service's own load balancer and to every Ingress
//! backend that uses the Service.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::target_ref::BackendTargetRef;

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portico.dev",
    version = "v1alpha1",
    kind = "BackendPolicy",
    namespaced,
    shortname = "bpol",
    doc = "How the load balancer of a Service, and every Ingress backend using that Service, treats its targets.",
    status = "BackendPolicyStatus",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackendPolicySpec {
    pub target_ref: BackendTargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinityPolicy>,
    /// How targets are picked: per connection at L4, per request at L7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancing: Option<BalancingAlgorithm>,
    /// L7 only: timeouts towards the targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_draining: Option<ConnectionDraining>,
    /// L4 only: send a PROXY protocol v2 header to the targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckPolicy {
    /// `HTTP` (healthy on 2xx) or `TCP` (healthy when a connection opens).
    #[serde(default)]
    pub protocol: HealthCheckProtocol,
    /// HTTP only; defaults to the path the Service's traffic policy implies (`/healthz`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), regex(pattern = r"^/[^\s]*$"))]
    pub path: Option<String>,
    /// Defaults to the port the Service's traffic policy implies (kube-proxy's health port,
    /// the `healthCheckNodePort`, or the node port itself for TCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 300))]
    pub interval_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 120))]
    pub timeout_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub healthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub unhealthy_threshold: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HealthCheckProtocol {
    #[default]
    Http,
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinityPolicy {
    /// `ClientIP` works at L4 and L7; `Cookie` only at L7.
    #[serde(rename = "type")]
    pub type_: SessionAffinityType,
    /// `Cookie` only; defaults to `portico-affinity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
    )]
    pub cookie_name: Option<String>,
    /// How long a client stays with its target (ClientIP: since its last connection;
    /// Cookie: the cookie's lifetime). Default 10800 (3 h), as Kubernetes' ClientIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub ttl_seconds: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SessionAffinityType {
    None,
    #[serde(rename = "ClientIP")]
    ClientIp,
    Cookie,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BalancingAlgorithm {
    /// The next healthy target in turn (the only algorithm the local cloud implements yet;
    /// the enum grows as providers gain more).
    #[default]
    RoundRobin,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 300))]
    pub connect_seconds: Option<u32>,
    /// From the request's first byte to the response's last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub request_seconds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub idle_seconds: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionDraining {
    /// How long connections to a removed target may finish before they are closed.
    #[schemars(range(min = 0, max = 3600))]
    pub timeout_seconds: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendPolicyStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
