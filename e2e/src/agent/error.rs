//! The agent's typed errors.

use std::{fmt::Display, future::Future, io, net::SocketAddr, path::PathBuf, time::Duration};

/// How long any single API write or read may take before the agent gives up on it (and
/// retries at the next reconcile).
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent config: {0}")]
    Config(String),
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("building the API client: {0}")]
    Client(#[source] kube::Error),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("listening on {addr}/{protocol}: {source}")]
    Bind {
        addr: SocketAddr,
        protocol: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
}

impl AgentError {
    fn status(&self) -> Option<&kube::core::Status> {
        match self {
            AgentError::Api {
                source: kube::Error::Api(status),
                ..
            } => Some(status),
            _ => None,
        }
    }

    pub(crate) fn is_not_found(&self) -> bool {
        self.status().is_some_and(|s| s.is_not_found())
    }

    pub(crate) fn is_conflict(&self) -> bool {
        self.status().is_some_and(|s| s.is_conflict())
    }

    pub(crate) fn is_already_exists(&self) -> bool {
        self.status().is_some_and(|s| s.is_already_exists())
    }
}

/// Runs one API call with [`API_TIMEOUT`], naming it in the error.
pub(crate) async fn api_call<T>(
    what: impl Display,
    call: impl Future<Output = kube::Result<T>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(AgentError::Api {
            what: what.to_string(),
            source,
        }),
        Err(_) => Err(AgentError::Timeout {
            what: what.to_string(),
            timeout: API_TIMEOUT,
        }),
    }
}
