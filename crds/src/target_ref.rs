//! Which object a policy is attached to: always in the policy's own namespace, by name, so a
//! policy can never reach across namespaces.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A BackendPolicy attaches to a Service (its load balancer's target pools, or the Ingress
/// backends that use it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendTargetRef {
    pub kind: BackendTargetKind,
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum BackendTargetKind {
    Service,
}

/// A FrontendPolicy attaches to what clients reach: an Ingress or a Service of type
/// LoadBalancer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FrontendTargetRef {
    pub kind: FrontendTargetKind,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum FrontendTargetKind {
    Service,
    Ingress,
}

impl std::fmt::Display for FrontendTargetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FrontendTargetKind::Service => "Service",
            FrontendTargetKind::Ingress => "Ingress",
        })
    }
}
