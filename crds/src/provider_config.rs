//! `ProviderConfig`: which cloud provisions the load balancers of a `loadBalancerClass` (and of
//! IngressClasses whose `parameters` name it), with that cloud's settings.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portico.dev",
    version = "v1alpha1",
    kind = "ProviderConfig",
    shortname = "pcfg",
    doc = "Which cloud provisions the load balancers of a loadBalancerClass, or of the IngressClasses whose parameters name this configuration.",
    status = "ProviderConfigStatus",
    printcolumn = r#"{"name":"Provider","type":"string","jsonPath":".status.provider"}"#,
    printcolumn = r#"{"name":"Default","type":"boolean","jsonPath":".spec.default"}"#,
    printcolumn = r#"{"name":"Class","type":"string","jsonPath":".spec.loadBalancerClass"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
// Exactly one cloud per configuration; the API server enforces it.
#[schemars(extend("oneOf" = [
    {"required": ["local"]},
    {"required": ["aws"]},
    {"required": ["gcp"]}
]))]
pub struct ProviderConfigSpec {
    /// Serves Services that name no `loadBalancerClass`, and Portico IngressClasses without
    /// `parameters`. When several configurations say so, the oldest wins and the others report
    /// `Conflicted`.
    #[serde(default)]
    pub default: bool,
    /// Services with this `spec.loadBalancerClass` are provisioned by this configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 253),
        regex(
            pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
        )
    )]
    pub load_balancer_class: Option<String>,
    /// Portico's bundled local cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalSettings>,
    /// AWS Elastic Load Balancing v2 (NLB for Services, ALB for Ingresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsSettings>,
    /// Google Compute Engine load balancing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp: Option<GcpSettings>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalSettings {
    /// `host:port` of the local cloud's API, e.g. `127.20.0.251:8900`.
    #[schemars(regex(pattern = r"^[^\s:/]+:[0-9]{1,5}$"))]
    pub api_address: String,
    /// The part of the local cloud's pool this configuration's load balancers take their
    /// addresses from: `first-last`, a CIDR or one address. Unset: the whole pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}(-[0-9]{1,3}(\.[0-9]{1,3}){3}|/[0-9]{1,2})?$"
    ))]
    pub address_pool: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsSettings {
    /// e.g. `eu-west-1`.
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: String,
    /// Subnets the load balancers are placed in (one per availability zone).
    #[schemars(length(min = 1), inner(regex(pattern = r"^subnet-[0-9a-f]+$")))]
    pub subnets: Vec<String>,
    /// Security groups of application load balancers.
    #[serde(default)]
    #[schemars(inner(regex(pattern = r"^sg-[0-9a-f]+$")))]
    pub security_groups: Vec<String>,
    #[serde(default)]
    pub scheme: AwsScheme,
    /// The VPC of the target groups (required by ELBv2 for instance targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^vpc-[0-9a-f]+$"))]
    pub vpc_id: Option<String>,
    /// Extra tags on everything Portico creates (its ownership tags are always added).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Another endpoint for the ELBv2 API (an emulator, a VPC endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub endpoint_url: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AwsScheme {
    #[default]
    #[serde(rename = "internet-facing")]
    InternetFacing,
    #[serde(rename = "internal")]
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcpSettings {
    #[schemars(regex(pattern = r"^[a-z][-a-z0-9]{4,28}[a-z0-9]$"))]
    pub project: String,
    /// e.g. `europe-west1`.
    #[schemars(regex(pattern = r"^[a-z]+-[a-z]+[0-9]+$"))]
    pub region: String,
    #[serde(default = "default_network")]
    #[schemars(length(min = 1))]
    pub network: String,
    #[serde(default)]
    pub network_tier: GcpNetworkTier,
    /// Network tags of the nodes: the firewall rules Portico creates apply to them only
    /// (to every instance of the network when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")))]
    pub node_tags: Vec<String>,
    /// Another endpoint for the Compute Engine API (a fake, a private endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub endpoint_url: Option<String>,
}

fn default_network() -> String {
    "default".into()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum GcpNetworkTier {
    #[default]
    Premium,
    Standard,
}

/// Which cloud a configuration names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    Local,
    Aws,
    Gcp,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Aws => "aws",
            ProviderKind::Gcp => "gcp",
        }
    }
}

impl ProviderConfigSpec {
    /// The one cloud this spec configures; `None` when it names none or several (an API
    /// server without the schema's one-of would let that through).
    pub fn kind(&self) -> Option<ProviderKind> {
        match (&self.local, &self.aws, &self.gcp) {
            (Some(_), None, None) => Some(ProviderKind::Local),
            (None, Some(_), None) => Some(ProviderKind::Aws),
            (None, None, Some(_)) => Some(ProviderKind::Gcp),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderConfigStatus {
    /// `local`, `aws` or `gcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The IngressClasses whose `parameters` name this configuration.
    #[serde(default)]
    pub ingress_classes: Vec<String>,
}
