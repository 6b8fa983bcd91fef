//! Portico's custom resources, group `portico.dev`, version `v1alpha1`:
//!
//! - [`ProviderConfig`] (cluster-scoped): which cloud serves a `loadBalancerClass` or an
//!   IngressClass, and that cloud's settings;
//! - [`BackendPolicy`] (namespaced, attached to a Service): how its load balancer treats the
//!   targets — health check, affinity, timeouts, draining, PROXY protocol;
//! - [`FrontendPolicy`] (namespaced, attached to an Ingress or a Service): what clients meet —
//!   HTTPS redirect, minimum TLS version, allowed source ranges.
//!
//! The YAML under `charts/portico/crds/` is generated from these types by `portico-crdgen`; a
//! test fails when the two drift. Validation lives in the schema wherever the 1.20 API server
//! can express it (types, enums, ranges, patterns, one-of); the operator reports the rest in
//! each object's status.

pub mod backend_policy;
pub mod condition;
pub mod frontend_policy;
pub mod generate;
pub mod provider_config;
pub mod target_ref;

pub use backend_policy::{BackendPolicy, BackendPolicySpec, BackendPolicyStatus};
pub use condition::{Condition, ConditionStatus};
pub use frontend_policy::{FrontendPolicy, FrontendPolicySpec, FrontendPolicyStatus};
pub use provider_config::{ProviderConfig, ProviderConfigSpec, ProviderConfigStatus};
pub use target_ref::{BackendTargetRef, FrontendTargetKind, FrontendTargetRef};

/// The API group of every Portico resource.
pub const GROUP: &str = "portico.dev";
/// The one served version.
pub const VERSION: &str = "v1alpha1";
