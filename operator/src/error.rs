//! The operator's error type.

use portico_provider::ProviderError;

use crate::ingress::translate::InvalidIngress;
use crate::service::translate::InvalidService;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error while {action}: {source}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("Kubernetes API call timed out while {0}")]
    Timeout(&'static str),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("invalid Service: {0}")]
    InvalidService(#[from] InvalidService),
    #[error("invalid Ingress: {0}")]
    InvalidIngress(#[from] InvalidIngress),
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Timeout(_) => "kube_timeout",
            Error::Provider(e) => e.reason(),
            Error::InvalidService(_) => "invalid_service",
            Error::InvalidIngress(_) => "invalid_ingress",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every API write gets this long; a hung call must not hold a reconcile slot forever.
pub const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs one Kubernetes API call under [`API_TIMEOUT`], naming what it was doing on failure.
pub async fn kube_call<T>(
    action: &'static str,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T> {
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(Error::Kube { action, source }),
        Err(_) => Err(Error::Timeout(action)),
    }
}
