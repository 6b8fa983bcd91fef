//! The trait each cloud implements.

use async_trait::async_trait;

use crate::error::ProviderError;
use crate::model::{LoadBalancerSpec, LoadBalancerStatus, ObservedLoadBalancer, Ownership};
use crate::naming::LoadBalancerName;

/// A cloud that can provision external load balancers.
///
/// Every method is idempotent: calling it twice with the same input has the effect of calling
/// it once, so an interrupted reconcile is finished by simply running it again.
#[async_trait]
pub trait Provider: Send + Sync {
    /// A short name for logs and metrics (`local`, `aws`, `gcp`).
    fn name(&self) -> &'static str;

    /// Create the load balancer, or change an existing one to match `spec`, and return where it
    /// answers. Fails with [`ProviderError::NotOwned`] when a load balancer of that name belongs
    /// to someone else.
    async fn ensure(&self, spec: &LoadBalancerSpec) -> Result<LoadBalancerStatus, ProviderError>;

    /// The load balancer of that name, if it exists.
    async fn get(
        &self,
        name: &LoadBalancerName,
    ) -> Result<Option<ObservedLoadBalancer>, ProviderError>;

    /// Delete the load balancer and everything created for it. Succeeds when it is already
    /// gone; refuses with [`ProviderError::NotOwned`] when `owner` is not its owner.
    async fn delete(&self, name: &LoadBalancerName, owner: &Ownership)
    -> Result<(), ProviderError>;

    /// Every load balancer this provider holds for `cluster_id`, for garbage collection of the
    /// ones whose object is gone.
    async fn list_owned(
        &self,
        cluster_id: &str,
    ) -> Result<Vec<ObservedLoadBalancer>, ProviderError>;
}
