//! [`Testbed`]: one running cluster — etcd, kube-apiserver, kube-controller-manager and the
//! simulated nodes (the agent) — and the single start-up path both lifecycles use: tests own
//! a `Testbed` value, `portico-testbed up` starts the same thing detached.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use tempfile::TempDir;

use crate::address_plan::{AddressPlan, MAX_NODES};
use crate::agent::AgentConfig;
use crate::binaries::{self, MissingBinary};
use crate::certs::{self, Pki};
use crate::control_plane;
use crate::kubeconfig::{self, Credentials};
use crate::process::{self, ChildProcess, ProcessRecord, ProcessSpec, STOP_GRACE, Supervision};
use crate::readiness::{self, Pending};
use crate::slot::{SlotError, SlotLock, TEST_SLOTS};
use crate::state::{ClusterRecord, StateLayout};

const POLL: Duration = Duration::from_millis(200);
const ETCD: &str = "etcd";
const APISERVER: &str = "kube-apiserver";
const CONTROLLER_MANAGER: &str = "kube-controller-manager";
const AGENT: &str = "agent";

#[derive(Clone, Debug)]
pub struct TestbedOptions {
    /// Simulated nodes, `node-1` … `node-N` (at most [`MAX_NODES`]); 0 runs the control plane
    /// alone, without the agent.
    pub nodes: u8,
    /// The slot to take; `None` takes the first free one from 2 up (1 is the demo's).
    pub slot: Option<u8>,
    /// Where certificates, data, kubeconfigs and logs go; `None` uses a fresh temp dir that is
    /// removed on drop (kept, and its path printed, if the thread is panicking).
    pub state_dir: Option<PathBuf>,
    /// Wait until all nodes are Ready (and treat the agent dying as fatal) before returning.
    pub wait_for_nodes: bool,
    /// How long start-up may take in all.
    pub ready_timeout: Duration,
    /// Create Portico's CRDs once the API server is up, as an installed chart would have; off
    /// for tests of the install itself.
    pub portico_crds: bool,
    /// Nodes' `spec.providerID` prefix (see [`AgentConfig::provider_id_prefix`]).
    pub provider_id_prefix: Option<String>,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        TestbedOptions {
            nodes: 3,
            slot: None,
            state_dir: None,
            wait_for_nodes: true,
            ready_timeout: Duration::from_secs(120),
            portico_crds: true,
            provider_id_prefix: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("installing Portico's CRDs: {0}")]
    Crds(String),
    #[error(transparent)]
    MissingBinary(#[from] MissingBinary),
    #[error("the agent needs the portico-testbed binary: {0:#}")]
    MissingTestbedBinary(anyhow::Error),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("invalid testbed options: {0}")]
    InvalidOptions(String),
    #[error("state dir {} belongs to a cluster that is still running; stop it first", .0.display())]
    StateDirInUse(PathBuf),
    #[error("{name} exited ({status}) before the cluster was ready; its log {}:\n{tail}", log.display())]
    ProcessExited {
        name: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("cluster not ready after {timeout:?}: {pending}; logs in {}; {culprit}'s log ends:\n{tail}", logs.display())]
    NotReady {
        pending: Pending,
        timeout: Duration,
        logs: PathBuf,
        culprit: &'static str,
        tail: String,
    },
    #[error("generating certificates: {0}")]
    Certificates(#[from] rcgen::Error),
    #[error("loading kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

fn io_context(context: impl Into<String>) -> impl FnOnce(io::Error) -> TestbedError {
    let context = context.into();
    move |source| TestbedError::Io { context, source }
}

/// A simulated node's name and the InternalIP it reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub internal_ip: Ipv4Addr,
}

/// Installs aws-lc-rs as rustls' process-wide provider (kube builds its TLS config from it);
/// harmless if a provider is already installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

struct Programs {
    etcd: PathBuf,
    apiserver: PathBuf,
    controller_manager: PathBuf,
    testbed: Option<PathBuf>,
}

/// A running cluster. Its processes die with it: on drop (SIGKILL), on [`Testbed::stop`]
/// (SIGTERM, then SIGKILL), or with the thread that started it.
pub struct Testbed {
    plan: AddressPlan,
    nodes: u8,
    layout: StateLayout,
    admin: kube::Config,
    /// In start order.
    processes: Vec<ChildProcess>,
    /// Whether the agent dying counts as the cluster failing.
    agent_required: bool,
    // Dropped after the processes are gone (Drop::drop runs first), so the slot is never
    // free while something may still listen on its addresses.
    slot: SlotLock,
    temp_dir: Option<TempDir>,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("plan", &self.plan)
            .field("nodes", &self.nodes)
            .field("state_dir", &self.layout.root())
            .field("processes", &self.processes())
            .finish()
    }
}

impl Testbed {
    /// Starts a cluster and returns once it is ready (see [`crate::readiness`]): `/readyz`,
    /// the `default` namespace and ServiceAccount (pods are admitted) and, if
    /// `wait_for_nodes`, all nodes Ready.
    ///
    /// The processes are spawned on the calling thread and the kernel kills them when that
    /// thread exits, so call this from a test's own thread or a runtime worker — **never from
    /// `spawn_blocking`**, whose threads exit when idle and would take the cluster with them.
    pub async fn start(options: TestbedOptions) -> Result<Testbed, TestbedError> {
        let slot = match options.slot {
            Some(slot) => SlotLock::take(slot)?,
            None => SlotLock::take_first_free(TEST_SLOTS)?,
        };
        Self::launch(options, slot, Supervision::Owned, None).await
    }

    /// The one start-up path. `testbed_binary` runs the agent (default: the workspace's
    /// `portico-testbed`).
    pub(crate) async fn launch(
        options: TestbedOptions,
        slot: SlotLock,
        supervision: Supervision,
        testbed_binary: Option<PathBuf>,
    ) -> Result<Testbed, TestbedError> {
        let started = Instant::now();
        install_crypto_provider();
        if options.nodes > MAX_NODES {
            return Err(TestbedError::InvalidOptions(format!(
                "{} nodes requested, at most {MAX_NODES} supported",
                options.nodes
            )));
        }
        let programs = Programs {
            etcd: binaries::etcd_binary()?,
            apiserver: binaries::control_plane_binary(APISERVER)?,
            controller_manager: binaries::control_plane_binary(CONTROLLER_MANAGER)?,
            testbed: match (options.nodes, testbed_binary) {
                (0, _) => None,
                (_, Some(path)) => Some(path),
                (_, None) => Some(
                    binaries::workspace_binary("portico-testbed")
                        .map_err(TestbedError::MissingTestbedBinary)?,
                ),
            },
        };

        let (layout, temp_dir) = match &options.state_dir {
            Some(dir) => (StateLayout::new(dir), None),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("portico-testbed-")
                    .tempdir()
                    .map_err(io_context("creating a temp state dir"))?;
                (StateLayout::new(temp.path()), Some(temp))
            }
        };
        prepare_state_dir(&layout)?;

        let plan = slot.plan();
        write_configuration(
            &layout,
            &plan,
            options.nodes,
            options.provider_id_prefix.clone(),
        )?;
        let admin = load_kubeconfig(&layout.admin_kubeconfig()).await?;

        let mut testbed = Testbed {
            plan,
            nodes: options.nodes,
            layout,
            admin,
            processes: Vec::new(),
            agent_required: options.wait_for_nodes,
            slot,
            temp_dir,
        };
        let deadline = started + options.ready_timeout;
        match testbed
            .boot(&programs, supervision, &options, deadline)
            .await
        {
            Ok(()) => {
                tracing::info!(slot = plan.slot, elapsed = ?started.elapsed(), "testbed ready");
                Ok(testbed)
            }
            Err(e) => {
                // Keep the logs the error points at.
                if let Some(temp) = testbed.temp_dir.take() {
                    let _ = temp.keep();
                }
                Err(e)
            }
        }
    }

    async fn boot(
        &mut self,
        programs: &Programs,
        supervision: Supervision,
        options: &TestbedOptions,
        deadline: Instant,
    ) -> Result<(), TestbedError> {
        let plan = self.plan;
        let layout = self.layout.clone();
        let pki = layout.pki_files();

        self.spawn(
            ETCD,
            &programs.etcd,
            control_plane::etcd_args(&plan, &layout.etcd_data_dir()),
            supervision,
        )?;
        self.wait_for(deadline, options.ready_timeout, || async move {
            readiness::etcd(&plan).await
        })
        .await?;

        self.spawn(
            APISERVER,
            &programs.apiserver,
            control_plane::apiserver_args(&plan, &pki, &layout.pki_dir()),
            supervision,
        )?;
        let client = self.client().await;
        {
            let client = &client;
            self.wait_for(deadline, options.ready_timeout, || async move {
                readiness::apiserver(client).await
            })
            .await?;
        }

        if options.portico_crds {
            crate::crds::install(&client)
                .await
                .map_err(|e| TestbedError::Crds(e.to_string()))?;
        }

        // The controller manager gives up if the API server is not healthy within 10 s of its
        // start, so it only starts now.
        self.spawn(
            CONTROLLER_MANAGER,
            &programs.controller_manager,
            control_plane::controller_manager_args(
                &plan,
                &layout.controller_manager_kubeconfig(),
                &pki,
            ),
            supervision,
        )?;
        if let Some(testbed) = &programs.testbed {
            let args = vec![
                "agent".into(),
                "--config".into(),
                layout.agent_config().into(),
            ];
            self.spawn(AGENT, testbed, args, supervision)?;
        }

        let wanted_nodes = if options.wait_for_nodes {
            self.nodes
        } else {
            0
        };
        let client = &client;
        self.wait_for(deadline, options.ready_timeout, || async move {
            readiness::cluster(client, &plan, wanted_nodes).await
        })
        .await
    }

    fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: Vec<std::ffi::OsString>,
        supervision: Supervision,
    ) -> Result<(), TestbedError> {
        let spec = ProcessSpec {
            name: name.into(),
            program: program.to_path_buf(),
            args,
            env: Vec::new(),
        };
        let lock_fd = Some(self.slot.raw_fd());
        let child = process::spawn(&spec, &self.layout.log(name), supervision, lock_fd)
            .map_err(io_context(format!("starting {name}")))?;
        tracing::info!(process = name, pid = child.record().pid, "started");
        self.processes.push(child);
        // Recorded right away, so a crash mid-start still leaves `down` something to stop.
        self.record()
            .save(&self.layout.cluster_record())
            .map_err(io_context("writing cluster.json"))
    }

    /// Polls `check` until it passes, failing fast if a process the cluster needs exits.
    async fn wait_for<F, Fut>(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        check: F,
    ) -> Result<(), TestbedError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), Pending>>,
    {
        loop {
            self.check_processes()?;
            let pending = match check().await {
                Ok(()) => return Ok(()),
                Err(pending) => pending,
            };
            if Instant::now() >= deadline {
                let culprit = pending.culprit();
                return Err(TestbedError::NotReady {
                    pending,
                    timeout,
                    logs: self.layout.logs_dir(),
                    culprit,
                    tail: process::log_tail(&self.layout.log(culprit), 20),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn check_processes(&mut self) -> Result<(), TestbedError> {
        let agent_required = self.agent_required;
        for child in &mut self.processes {
            if child.name() == AGENT && !agent_required {
                continue;
            }
            if let Some(status) = child
                .try_exited()
                .map_err(io_context(format!("watching {}", child.name())))?
            {
                return Err(TestbedError::ProcessExited {
                    name: child.name().to_owned(),
                    status: status.to_string(),
                    log: child.log_path().to_path_buf(),
                    tail: process::log_tail(child.log_path(), 20),
                });
            }
        }
        Ok(())
    }

    /// The admin kubeconfig (`system:masters`, context `portico-testbed`).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.layout.admin_kubeconfig()
    }

    /// An admin client. Cheap; make one per runtime (a client is tied to the runtime it was
    /// made on).
    pub async fn client(&self) -> kube::Client {
        install_crypto_provider();
        // The config was loaded and used successfully at start, so this cannot fail short of a
        // broken TLS stack.
        kube::Client::try_from(self.admin.clone()).expect("admin kubeconfig validated at start")
    }

    /// A client authenticating with a bearer token (e.g. a ServiceAccount's) instead of the
    /// admin certificate.
    pub async fn client_with_token(&self, token: &str) -> kube::Client {
        install_crypto_provider();
        let mut config = self.admin.clone();
        config.auth_info = serde_json::from_value(serde_json::json!({ "token": token }))
            .expect("a token is a valid AuthInfo");
        kube::Client::try_from(config).expect("admin kubeconfig validated at start")
    }

    /// The token of ServiceAccount `namespace/name` from the Secret 1.20's token controller
    /// creates for it, waiting up to 30 s for that Secret.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<String, kube::Error> {
        use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
        let client = self.client().await;
        let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(client.clone(), namespace);
        let secrets: kube::Api<Secret> = kube::Api::namespaced(client, namespace);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let account = accounts.get(name).await?;
            for reference in account.secrets.unwrap_or_default() {
                let Some(secret_name) = reference.name else {
                    continue;
                };
                let Some(secret) = secrets.get_opt(&secret_name).await? else {
                    continue;
                };
                if let Some(token) = secret.data.as_ref().and_then(|d| d.get("token")) {
                    return Ok(String::from_utf8_lossy(&token.0).into_owned());
                }
            }
            if Instant::now() >= deadline {
                return Err(kube::Error::Service(
                    format!("no token Secret for ServiceAccount {namespace}/{name} after 30 s")
                        .into(),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn plan(&self) -> AddressPlan {
        self.plan
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        node_infos(&self.plan, self.nodes)
    }

    pub fn state_dir(&self) -> &Path {
        self.layout.root()
    }

    /// `<state>/logs/<process>.log`.
    pub fn log_path(&self, process: &str) -> PathBuf {
        self.layout.log(process)
    }

    /// The processes, in start order, as `cluster.json` records them.
    pub fn processes(&self) -> Vec<ProcessRecord> {
        self.processes.iter().map(|p| p.record().clone()).collect()
    }

    fn record(&self) -> ClusterRecord {
        ClusterRecord {
            slot: self.plan.slot,
            nodes: self.nodes,
            kubeconfig: self.kubeconfig_path(),
            processes: self.processes(),
        }
    }

    /// Stops the cluster gracefully: SIGTERM, up to 10 s, then SIGKILL; returns when every
    /// process is gone.
    pub async fn stop(mut self) -> Result<(), process::Survivors> {
        process::terminate(&mut self.processes, STOP_GRACE).await
        // Drop removes the temp dir and releases the slot.
    }

    /// Lets the cluster outlive this value (for `portico-testbed up`): returns its record, and
    /// neither kills the processes nor removes the state dir.
    pub(crate) fn detach(mut self) -> ClusterRecord {
        let record = self.record();
        for child in std::mem::take(&mut self.processes) {
            child.detach();
        }
        if let Some(temp) = self.temp_dir.take() {
            let _ = temp.keep();
        }
        record
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Kill everything first, then reap, so one slow exit doesn't delay the others' signal.
        for child in self.processes.iter_mut().rev() {
            child.signal(libc::SIGKILL);
        }
        for child in self.processes.iter_mut().rev() {
            child.kill_and_wait();
        }
        if std::thread::panicking()
            && let Some(temp) = self.temp_dir.take()
        {
            let path = temp.keep();
            eprintln!("portico testbed: kept state and logs in {}", path.display());
        }
    }
}

pub fn node_infos(plan: &AddressPlan, nodes: u8) -> Vec<NodeInfo> {
    (1..=nodes)
        .map(|k| NodeInfo {
            name: plan.node_name(k),
            internal_ip: plan.node_ip(k),
        })
        .collect()
}

/// Refuses a state dir whose recorded cluster still runs; otherwise starts it afresh.
fn prepare_state_dir(layout: &StateLayout) -> Result<(), TestbedError> {
    let record = ClusterRecord::load(&layout.cluster_record())
        .map_err(io_context("reading cluster.json"))?;
    if record.is_some_and(|r| !r.running().is_empty()) {
        return Err(TestbedError::StateDirInUse(layout.root().to_path_buf()));
    }
    layout
        .clear()
        .map_err(io_context("clearing the state dir"))?;
    layout
        .create()
        .map_err(io_context("creating the state dir"))
}

fn write_configuration(
    layout: &StateLayout,
    plan: &AddressPlan,
    nodes: u8,
    provider_id_prefix: Option<String>,
) -> Result<(), TestbedError> {
    let pki = Pki::generate(plan)?;
    pki.write(&layout.pki_files())
        .map_err(io_context("writing certificates"))?;
    let server = control_plane::apiserver_url(plan);
    let admin = kubeconfig::kubeconfig(
        &server,
        &pki.ca.cert_pem,
        certs::ADMIN.common_name,
        Credentials::ClientCertificate(&pki.admin),
    );
    kubeconfig::write(&layout.admin_kubeconfig(), &admin)
        .map_err(io_context("writing the admin kubeconfig"))?;
    let controller_manager = kubeconfig::kubeconfig(
        &server,
        &pki.ca.cert_pem,
        certs::CONTROLLER_MANAGER.common_name,
        Credentials::ClientCertificate(&pki.controller_manager),
    );
    kubeconfig::write(&layout.controller_manager_kubeconfig(), &controller_manager)
        .map_err(io_context("writing the controller-manager kubeconfig"))?;
    let agent = AgentConfig {
        plan: *plan,
        nodes,
        kubeconfig: layout.admin_kubeconfig(),
        provider_id_prefix,
    };
    let agent_json = serde_json::to_string_pretty(&agent).expect("serializable");
    std::fs::write(layout.agent_config(), agent_json).map_err(io_context("writing agent.json"))
}

pub(crate) async fn load_kubeconfig(path: &Path) -> Result<kube::Config, TestbedError> {
    let err = |source| TestbedError::Kubeconfig {
        path: path.to_path_buf(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(err)?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_numbered_from_one_with_their_slot_addresses() {
        let infos = node_infos(&AddressPlan::new(4), 2);
        assert_eq!(
            infos,
            vec![
                NodeInfo {
                    name: "node-1".into(),
                    internal_ip: Ipv4Addr::new(127, 20, 4, 1)
                },
                NodeInfo {
                    name: "node-2".into(),
                    internal_ip: Ipv4Addr::new(127, 20, 4, 2)
                },
            ]
        );
    }

    #[test]
    fn a_testbed_and_its_start_can_move_between_tasks() {
        fn send<T: Send>(_: &T) {}
        fn sync<T: Sync>() {}
        let start = Testbed::start(TestbedOptions::default());
        send(&start); // not polled: constructing the future starts nothing
        sync::<Testbed>();
    }

    #[test]
    fn defaults_wait_for_three_ready_nodes_in_a_test_slot() {
        let options = TestbedOptions::default();
        assert_eq!(options.nodes, 3);
        assert!(options.wait_for_nodes);
        assert_eq!(options.slot, None);
    }
}
