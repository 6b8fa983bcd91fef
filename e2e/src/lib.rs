//! Portico's local cluster: a real Kubernetes control plane (etcd, kube-apiserver and
//! kube-controller-manager 1.20.2) with simulated nodes, all on loopback, without Docker.
//!
//! Tests start one with [`Testbed::start`]; humans use the `portico-testbed` CLI
//! ([`cli`]), which runs the same start-up path with the processes detached.

pub mod address_plan;
pub mod agent;
pub mod binaries;
pub mod certs;
pub mod chart;
pub mod cli;
pub mod control_plane;
pub mod crds;
pub mod demo;
pub mod kind;
pub mod kubeconfig;
pub mod portico;
pub mod process;
pub mod readiness;
pub mod slot;
pub mod state;
pub mod testbed;
pub mod testkit;

pub use address_plan::AddressPlan;
pub use binaries::workspace_binary;
pub use slot::hold_slot;
pub use testbed::{NodeInfo, Testbed, TestbedError, TestbedOptions, install_crypto_provider};
