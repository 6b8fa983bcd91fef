//! The daemon: the API server and the cloud it drives, started and stopped together.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::client::LocalCloudProvider;
use crate::cloud::Cloud;
use crate::pool::AddressPool;
use crate::store::{Store, StoreError};

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Where the API listens; port 0 picks a free one (see [`Daemon::api_addr`]).
    pub listen: SocketAddr,
    pub pool: AddressPool,
    pub state_file: PathBuf,
}

impl DaemonConfig {
    pub const DEFAULT_LISTEN: &str = "127.0.0.1:8900";

    /// `$XDG_STATE_HOME/portico/local-cloud.json`, else `~/.local/state/portico/local-cloud.json`,
    /// else (no home at all) `./local-cloud.json`.
    pub fn default_state_file() -> PathBuf {
        let base = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|home| PathBuf::from(home).join(".local/state"))
            });
        match base {
            Some(base) => base.join("portico").join("local-cloud.json"),
            None => PathBuf::from("local-cloud.json"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The API is unauthenticated; it is only ever offered on loopback.
    #[error("the API address {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A running daemon. Dropping it without [`Daemon::shutdown`] stops the API but leaves the
/// data plane to the runtime's shutdown.
pub struct Daemon {
    api_addr: SocketAddr,
    cloud: Arc<Cloud>,
    stop: CancellationToken,
    api: JoinHandle<()>,
}

impl Daemon {
    /// Binds the API, restores every load balancer of the state file on its address, and
    /// starts serving.
    pub async fn start(config: DaemonConfig) -> Result<Daemon, DaemonError> {
        if !config.listen.ip().is_loopback() {
            return Err(DaemonError::NotLoopback(config.listen));
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| DaemonError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let api_addr = listener.local_addr().map_err(|source| DaemonError::Bind {
            addr: config.listen,
            source,
        })?;
        let store = Store::new(config.state_file.clone());
        let cloud = Cloud::open(store, config.pool).await?;
        let stop = CancellationToken::new();
        let api = tokio::spawn(api::serve(listener, cloud.clone(), stop.clone()));
        tracing::info!(api = %api_addr, pool = %config.pool, state_file = %config.state_file.display(),
            "local cloud serving");
        Ok(Daemon {
            api_addr,
            cloud,
            stop,
            api,
        })
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// A provider that talks to this daemon.
    pub fn provider(&self) -> LocalCloudProvider {
        LocalCloudProvider::new(self.api_addr)
    }

    /// Stops the API (letting open requests finish), then every listener, prober and
    /// connection. The state file keeps the load balancers for the next start.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        let _ = (&mut self.api).await;
        self.cloud.shutdown().await;
        tracing::info!("local cloud stopped");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Runs a daemon until `shutdown` completes.
pub async fn serve(
    config: DaemonConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let daemon = Daemon::start(config).await?;
    shutdown.await;
    daemon.shutdown().await;
    Ok(())
}
