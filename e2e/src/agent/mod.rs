//! Simulated nodes: the Node objects, a scheduler, a kubelet that runs the built-in echo image
//! in-process, and a kube-proxy stand-in per node.
//!
//! Everything runs in one process ([`run`]) and shares one set of watches:
//!
//! * [`node`]: registers `node-1..N`, heartbeats status and leases; a Node a user deletes
//!   leaves the cluster for good (no more pods or heartbeats; its kube-proxy keeps serving).
//! * [`scheduler`]: binds pending pods to the least busy fitting node.
//! * [`kubelet`]: runs pods of [`ECHO_IMAGE`] ([`echo`]), reporting `10.244.k.m` while listening
//!   on `127.(30+k).slot.m`; other images stay Pending (`UnsupportedImage`).
//! * [`kube_proxy`]: node ports, health check node ports and `:10256/healthz` on every node IP.
//!
//! The agent keeps no state of its own: restarted, it takes over existing Nodes (status only)
//! and re-runs echo pods at the addresses they reported. It does not remember which nodes users
//! deleted, though, so a restart re-creates them.

use std::{path::PathBuf, sync::Arc};

use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::address_plan::{AddressPlan, MAX_NODES};

mod cluster;
pub mod echo;
mod endpoints;
mod error;
mod health;
mod kube_proxy;
mod kubelet;
mod net;
mod node;
pub mod proxy_protocol;
mod scheduler;

pub use error::AgentError;

/// The image the simulated kubelet can run. Pods with any other image stay Pending.
pub const ECHO_IMAGE: &str = "portico.dev/echo:1";

/// What the agent process needs to run a cluster's nodes.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AgentConfig {
    pub plan: AddressPlan,
    /// Number of nodes, `node-1` … `node-N`.
    pub nodes: u8,
    /// The admin kubeconfig the agent talks to the API server with.
    pub kubeconfig: PathBuf,
    /// Nodes' `spec.providerID` is this followed by the node name (a cloud's form, e.g.
    /// `gce://project/zone/`); default `portico-testbed://<slot>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id_prefix: Option<String>,
}

/// Whether the simulated kubelet runs `image`: `portico.dev/echo` with any tag or digest.
pub fn is_echo_image(image: &str) -> bool {
    let repository = image.split('@').next().unwrap_or(image);
    let name = match repository.rsplit_once(':') {
        // A colon after the last slash starts a tag; before it, it belongs to a registry port.
        Some((name, tag)) if !tag.contains('/') => name,
        _ => repository,
    };
    name == "portico.dev/echo"
}

/// Runs the cluster's simulated nodes until the process is told to stop (SIGTERM or SIGINT).
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let signalled = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("stopping simulated nodes");
        signalled.cancel();
    });
    Ok(run_until(config, stop).await?)
}

async fn wait_for_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(terminate) => terminate,
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the agent");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs the simulated nodes until `stop` is cancelled or something fails that the agent can't
/// survive (no API client, the node registrations, a node's kube-proxy health port taken).
/// Every listener is closed when it returns.
pub async fn run_until(config: AgentConfig, stop: CancellationToken) -> Result<(), AgentError> {
    if !(1..=MAX_NODES).contains(&config.nodes) {
        return Err(AgentError::Config(format!(
            "nodes must be 1..={MAX_NODES}, not {}",
            config.nodes
        )));
    }
    let kubeconfig =
        Kubeconfig::read_from(&config.kubeconfig).map_err(|source| AgentError::Kubeconfig {
            path: config.kubeconfig.clone(),
            source,
        })?;
    let client_config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|source| AgentError::Kubeconfig {
                path: config.kubeconfig.clone(),
                source,
            })?;
    let client = kube::Client::try_from(client_config).map_err(AgentError::Client)?;

    // Everything below stops with `shutdown`; dropping the guard on any return cancels it.
    let shutdown = stop.child_token();
    let _stop_all = shutdown.clone().drop_guard();
    let cluster = cluster::Cluster::start(
        client,
        config.plan,
        config.nodes,
        config.provider_id_prefix.clone(),
        shutdown.clone(),
    );

    register_nodes(&cluster).await?;
    info!(
        nodes = config.nodes,
        slot = config.plan.slot,
        "nodes registered"
    );

    let mut tasks = JoinSet::new();
    for k in 1..=config.nodes {
        tasks.spawn(node::heartbeat(cluster.clone(), k));
    }
    tasks.spawn(node::track_removals(cluster.clone()));
    tasks.spawn(scheduler::run(cluster.clone()));
    tasks.spawn(kubelet::run(cluster.clone()));
    tasks.spawn(kube_proxy::run(cluster.clone()));

    let outcome = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            finished = tasks.join_next() => match finished {
                Some(Ok(Ok(()))) if !shutdown.is_cancelled() => continue, // e.g. a removed node's heartbeat
                Some(Ok(Ok(()))) | None => break Ok(()),
                Some(Ok(Err(e))) => break Err(e),
                Some(Err(join)) => std::panic::resume_unwind(join.into_panic()),
            },
        }
    };
    shutdown.cancel();
    tasks.shutdown().await;
    outcome
}

/// Registers every node, retrying for a while: the API server may still be settling.
async fn register_nodes(cluster: &Arc<cluster::Cluster>) -> Result<(), AgentError> {
    const ATTEMPTS: u32 = 10;
    for k in 1..=cluster.node_count {
        let mut attempt = 1;
        loop {
            match node::register(cluster, k).await {
                Ok(()) => break,
                Err(e) if attempt < ATTEMPTS => {
                    tracing::warn!(node = %cluster.plan.node_name(k), error = %e, attempt, "registering node failed; retrying");
                    tokio::select! {
                        _ = cluster.shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(std::time::Duration::from_secs(u64::from(attempt))) => {}
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
