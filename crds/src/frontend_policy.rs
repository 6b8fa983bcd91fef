//! `FrontendPolicy`: what clients meet at a load balancer. Attached to one Ingress or Service
//! (of type LoadBalancer) in the same namespace.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::target_ref::FrontendTargetRef;

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portico.dev",
    version = "v1alpha1",
    kind = "FrontendPolicy",
    namespaced,
    shortname = "fpol",
    doc = "What clients meet at the load balancer of an Ingress or a Service: HTTPS redirect, minimum TLS version, allowed source ranges.",
    status = "FrontendPolicyStatus",
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".spec.targetRef.kind"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FrontendPolicySpec {
    pub target_ref: FrontendTargetRef,
    /// Ingress only: answer plain-HTTP requests with a redirect to HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_to_https: Option<bool>,
    /// Ingress only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsPolicy>,
    /// Only clients from these CIDRs reach the load balancer (replaces the Service's
    /// `loadBalancerSourceRanges`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(regex(pattern = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$")))]
    pub source_ranges: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsPolicy {
    /// The lowest TLS version clients may negotiate (default 1.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<TlsVersion>,
    /// Certificates the cloud already holds, by id (ACM ARNs on AWS), served with the
    /// Ingress's TLS Secrets; clouds that hold no certificates (the local cloud) serve the
    /// Secrets only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1, max = 2048)))]
    pub certificates: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FrontendPolicyStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
