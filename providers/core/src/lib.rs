//! The provider-agnostic side of Portico: a model of external load balancers with no
//! Kubernetes types in it, and the [`Provider`] trait that AWS, GCP and the local cloud implement.

pub mod error;
pub mod model;
pub mod naming;
pub mod provider;
pub mod routing;

pub use error::ProviderError;
pub use model::*;
pub use naming::LoadBalancerName;
pub use provider::Provider;
