//! An existing kind cluster as the e2e target, for machines with `kind` and Docker (this
//! project's CI has neither; there the kind tests are compiled as ignored and reported as
//! skipped, by name: see `e2e/build.rs`).
//!
//! The local cloud runs on the host, as with the testbed: its load balancers listen on the
//! host's loopback and forward to the kind nodes' node ports on the Docker network, which the
//! host reaches. The operator is installed with the chart and runs on the host under the
//! chart's ServiceAccount, so no Portico image has to be loaded into kind.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::portico::{Portico, PorticoConfig};
use crate::slot::{SlotLock, TEST_SLOTS};

/// A real image for kind's nodes (the testbed's `portico.dev/echo:1` exists only there):
/// agnhost's `netexec` answers `GET /hostname` with the pod's name.
pub const AGNHOST_IMAGE: &str = "registry.k8s.io/e2e-test-images/agnhost:2.39";

/// A kind cluster with Portico running against it.
pub struct KindCluster {
    pub name: String,
    pub kubeconfig: PathBuf,
    // Held for the addresses of the local cloud and the operator on the host.
    slot: SlotLock,
    state: tempfile::TempDir,
}

impl KindCluster {
    /// `$PORTICO_KIND_CLUSTER`, else the only cluster `kind get clusters` lists.
    pub fn find() -> anyhow::Result<KindCluster> {
        let name = match std::env::var("PORTICO_KIND_CLUSTER") {
            Ok(name) if !name.is_empty() => name,
            _ => {
                let listed = run("kind", &["get", "clusters"])?;
                let clusters: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
                match clusters.as_slice() {
                    [one] => one.to_string(),
                    [] => anyhow::bail!("no kind cluster: `kind create cluster` first"),
                    many => anyhow::bail!(
                        "several kind clusters ({}); choose one with PORTICO_KIND_CLUSTER",
                        many.join(", ")
                    ),
                }
            }
        };
        let state = tempfile::Builder::new().prefix("portico-kind-").tempdir()?;
        let kubeconfig = state.path().join("kubeconfig");
        let text = run("kind", &["get", "kubeconfig", "--name", &name])?;
        std::fs::write(&kubeconfig, text)?;
        Ok(KindCluster {
            name,
            kubeconfig,
            slot: SlotLock::take_first_free(TEST_SLOTS)?,
            state,
        })
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Starts the local cloud and installs and runs the operator against this cluster.
    pub async fn start_portico(&self) -> anyhow::Result<Portico> {
        let config = PorticoConfig::new(
            self.slot.plan(),
            self.kubeconfig.clone(),
            self.state.path().join("portico"),
        );
        Portico::start(config).await
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        crate::portico::admin_client(&self.kubeconfig).await
    }
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
