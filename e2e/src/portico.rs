//! Portico on a testbed: the local cloud and the operator as real processes, pointed at the
//! cluster's addresses from its [`AddressPlan`]. The operator is installed as users install it,
//! with the Helm chart, and runs on the host under the chart's ServiceAccount, so the API server
//! holds it to the chart's RBAC (the simulated nodes run only the echo image, not the
//! operator's, so the chart's Deployment is scaled to 0).
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
use crate::chart::{self, Helm, Release};
use crate::process::{self, ChildProcess, ProcessSpec, Supervision};

pub const LOCAL_CLOUD: &str = "local-cloud";
pub const OPERATOR: &str = "operator";
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The AWS SDK's credential chain stops at these, so an operator with an AWS ProviderConfig
/// (pointed at moto on loopback) never asks the instance metadata service, which is not on
/// loopback and must never be dialed.
const OPERATOR_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];
/// How long the operator's ServiceAccount token is valid (the demo's operator runs detached).
const TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

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
    /// The chart's release.
    pub release: Release,
    /// Chart values merged over the testbed's (see [`chart::local_values`]).
    pub values: serde_json::Value,
}

impl PorticoConfig {
    pub fn new(plan: AddressPlan, kubeconfig: PathBuf, state_dir: PathBuf) -> Self {
        PorticoConfig {
            plan,
            kubeconfig,
            state_dir,
            pool: None,
            operator_args: Vec::new(),
            release: Release::default(),
            values: serde_json::json!({}),
        }
    }

    /// The chart's values for this testbed: the local cloud as the default provider, the
    /// Deployment scaled to 0 (the operator runs on the host), then [`Self::values`].
    pub fn chart_values(&self) -> serde_json::Value {
        let mut values = chart::local_values(
            self.plan.local_cloud_api(),
            &serde_json::json!({"replicaCount": 0}),
        );
        chart::merge(&mut values, &self.values);
        values
    }

    /// Helm for this testbed, with its own home under the state directory.
    pub fn helm(&self) -> anyhow::Result<Helm> {
        Ok(Helm::new(&self.kubeconfig, &self.state_dir.join("helm"))?)
    }

    /// The kubeconfig the operator uses: the chart's ServiceAccount token.
    pub fn operator_kubeconfig(&self) -> PathBuf {
        self.state_dir.join("operator.kubeconfig")
    }

    /// Writes [`Self::operator_kubeconfig`] for the release's ServiceAccount.
    pub async fn write_operator_kubeconfig(&self) -> anyhow::Result<()> {
        let admin_text = std::fs::read_to_string(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        let admin = admin_client(&self.kubeconfig).await?;
        let token = chart::service_account_token(&admin, &self.release, TOKEN_LIFETIME).await?;
        let config = chart::kubeconfig_with_token(
            &admin_text,
            &format!(
                "system:serviceaccount:{}:{}",
                self.release.namespace,
                self.release.service_account()
            ),
            &token,
        )?;
        std::fs::create_dir_all(&self.state_dir)?;
        crate::kubeconfig::write(&self.operator_kubeconfig(), &config)
            .context("writing the operator's kubeconfig")
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
            env: Vec::new(),
        })
    }

    /// The operator as a second replica would run: the same account and Lease, its own
    /// metrics address (`port` on the operator's address).
    pub fn replica_spec(&self, port: u16) -> anyhow::Result<ProcessSpec> {
        let mut spec = self.operator_spec()?;
        let metrics = SocketAddr::new(self.plan.operator_metrics().ip(), port);
        for arg in &mut spec.args {
            if arg.to_string_lossy().starts_with("--metrics-addr=") {
                *arg = format!("--metrics-addr={metrics}").into();
            }
        }
        spec.name = format!("{OPERATOR}-{port}");
        Ok(spec)
    }

    pub fn operator_spec(&self) -> anyhow::Result<ProcessSpec> {
        // As the chart's Deployment runs it: the provider from the chart's ProviderConfig, the
        // IngressClass from the chart, the Lease in the release namespace.
        let mut args = vec![
            format!("--kubeconfig={}", self.operator_kubeconfig().display()),
            format!("--metrics-addr={}", self.plan.operator_metrics()),
            format!("--lease-namespace={}", self.release.namespace),
            "--ingress-class=".to_string(),
        ];
        args.extend(self.operator_args.iter().cloned());
        Ok(ProcessSpec {
            name: OPERATOR.into(),
            program: workspace_binary("portico")?,
            args: args.into_iter().map(OsString::from).collect(),
            env: OPERATOR_ENV
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
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

/// A client with the admin kubeconfig at `path`.
pub async fn admin_client(path: &Path) -> anyhow::Result<kube::Client> {
    crate::install_crypto_provider();
    let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
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
        let helm = portico.config.helm()?;
        helm.install(&portico.config.release, &portico.config.chart_values())
            .await?;
        portico.config.write_operator_kubeconfig().await?;
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

    /// SIGTERM, as Kubernetes stops a pod: the operator releases its lease on the way out.
    pub async fn stop_operator(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.operator.take() {
            process::terminate(&mut [child], process::STOP_GRACE).await?;
        }
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
