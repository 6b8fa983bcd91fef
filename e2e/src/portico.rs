//! Portico on a testbed: the local cloud and the operator as real processes, pointed at the
//! cluster's addresses from its [`AddressPlan`].
//!
//! Tests own them ([`Supervision::Owned`]: they die with the test); the demo detaches them and
//! records them with the cluster, so `portico-testbed down` stops them too.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use portico_local_cloud::LocalCloudProvider;

use crate::address_plan::AddressPlan;
use crate::binaries::workspace_binary;
use crate::process::{self, ChildProcess, ProcessSpec, Supervision};

pub const LOCAL_CLOUD: &str = "local-cloud";
pub const OPERATOR: &str = "operator";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How to run Portico against one cluster.
#[derive(Clone, Debug)]
pub struct PorticoConfig {
    pub plan: AddressPlan,
    pub kubeconfig: PathBuf,
    /// Holds the local cloud's state file and both logs.
    pub state_dir: PathBuf,
    /// The local cloud's address pool; `None` for the plan's whole /24.
    pub pool: Option<String>,
    /// Extra operator flags (e.g. `--gc-seconds=5`).
    pub operator_args: Vec<String>,
}

impl PorticoConfig {
    pub fn new(plan: AddressPlan, kubeconfig: PathBuf, state_dir: PathBuf) -> Self {
        PorticoConfig {
            plan,
            kubeconfig,
            state_dir,
            pool: None,
            operator_args: Vec::new(),
        }
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.state_dir.join("logs").join(format!("{name}.log"))
    }

    fn pool(&self) -> String {
        self.pool.clone().unwrap_or_else(|| {
            let (first, last) = self.plan.load_balancer_pool();
            format!("{first}-{last}")
        })
    }

    pub fn local_cloud_spec(&self) -> anyhow::Result<ProcessSpec> {
        let args = [
            format!("--listen={}", self.plan.local_cloud_api()),
            format!("--pool={}", self.pool()),
            format!(
                "--state-file={}",
                self.state_dir.join("local-cloud.json").display()
            ),
        ];
        Ok(ProcessSpec {
            name: LOCAL_CLOUD.into(),
            program: workspace_binary("portico-local-cloud")?,
            args: args.into_iter().map(OsString::from).collect(),
        })
    }

    pub fn operator_spec(&self) -> anyhow::Result<ProcessSpec> {
        let mut args = vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            "--provider=local".to_string(),
            format!("--local-cloud-api={}", self.plan.local_cloud_api()),
            format!("--metrics-addr={}", self.plan.operator_metrics()),
            "--lease-namespace=kube-system".to_string(),
        ];
        args.extend(self.operator_args.iter().cloned());
        Ok(ProcessSpec {
            name: OPERATOR.into(),
            program: workspace_binary("portico")?,
            args: args.into_iter().map(OsString::from).collect(),
        })
    }
}

/// Starts `spec` and waits until `GET http://<probe><path>` answers 200.
pub async fn start_and_wait(
    spec: &ProcessSpec,
    log: &Path,
    supervision: Supervision,
    probe: SocketAddr,
    path: &str,
) -> anyhow::Result<ChildProcess> {
    let mut child = process::spawn(spec, log, supervision, None)
        .with_context(|| format!("starting {}", spec.name))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_exited() {
            anyhow::bail!(
                "{} exited ({status}):\n{}",
                spec.name,
                process::log_tail(log, 30)
            );
        }
        if http_status(probe, path).await == Some(200) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            child.kill_and_wait();
            anyhow::bail!(
                "{} not ready within {START_TIMEOUT:?}:\n{}",
                spec.name,
                process::log_tail(log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status code of a plain `GET`, or `None` when nothing answers.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await.ok()?;
        let line = String::from_utf8_lossy(&head[..n]).into_owned();
        line.split(' ').nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

/// The local cloud and the operator, owned by a test.
pub struct Portico {
    config: PorticoConfig,
    local_cloud: Option<ChildProcess>,
    operator: Option<ChildProcess>,
}

impl Portico {
    /// Starts the local cloud, then the operator, and waits until both serve.
    pub async fn start(config: PorticoConfig) -> anyhow::Result<Portico> {
        let mut portico = Portico {
            config,
            local_cloud: None,
            operator: None,
        };
        portico.start_local_cloud().await?;
        portico.start_operator().await?;
        Ok(portico)
    }

    pub fn config(&self) -> &PorticoConfig {
        &self.config
    }

    /// A client of the local cloud's API, to look at what it holds.
    pub fn local_cloud(&self) -> LocalCloudProvider {
        LocalCloudProvider::new(self.config.plan.local_cloud_api())
    }

    pub async fn start_local_cloud(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.local_cloud.is_none(), "the local cloud already runs");
        let spec = self.config.local_cloud_spec()?;
        let child = start_and_wait(
            &spec,
            &self.config.log(LOCAL_CLOUD),
            Supervision::Owned,
            self.config.plan.local_cloud_api(),
            "/healthz",
        )
        .await?;
        self.local_cloud = Some(child);
        Ok(())
    }

    /// SIGTERM, as a service manager would stop it.
    pub async fn stop_local_cloud(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.local_cloud.take() {
            process::terminate(&mut [child], process::STOP_GRACE).await?;
        }
        Ok(())
    }

    pub async fn start_operator(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.operator.is_none(), "the operator already runs");
        let spec = self.config.operator_spec()?;
        let child = start_and_wait(
            &spec,
            &self.config.log(OPERATOR),
            Supervision::Owned,
            self.config.plan.operator_metrics(),
            "/readyz",
        )
        .await?;
        self.operator = Some(child);
        Ok(())
    }

    /// SIGKILL: the operator gets no chance to clean up or release its lease, as in a crash.
    pub fn kill_operator(&mut self) {
        if let Some(mut child) = self.operator.take() {
            child.kill_and_wait();
        }
    }

    /// The operator's log so far, for assertion messages.
    pub fn operator_log(&self) -> String {
        process::log_tail(&self.config.log(OPERATOR), 40)
    }
}

impl Drop for Portico {
    fn drop(&mut self) {
        // The operator first, so it does not log errors about a vanished local cloud.
        for child in [self.operator.as_mut(), self.local_cloud.as_mut()]
            .into_iter()
            .flatten()
        {
            child.kill_and_wait();
        }
    }
}
