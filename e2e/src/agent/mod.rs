//! Simulated nodes: the Node objects, a scheduler, a kubelet that runs the built-in echo image
//! in-process, and a kube-proxy stand-in per node.

use std::path::PathBuf;

use crate::address_plan::AddressPlan;

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
}
