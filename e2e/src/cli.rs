//! `portico-testbed`: the local cluster for humans (and the demo).
//!
//! `up` runs the same start-up as [`Testbed::start`], but detached: the processes get their own
//! session and outlive the command; `cluster.json` in the state dir lets `down` find them again.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::agent::{self, AgentConfig};
use crate::control_plane;
use crate::process::{self, STOP_GRACE, Supervision};
use crate::readiness;
use crate::slot::{DEMO_SLOT, SlotLock, TEST_SLOTS};
use crate::state::{ClusterRecord, StateLayout};
use crate::testbed::{self, Testbed, TestbedOptions};

/// Where the CLI keeps its cluster unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/tmp/portico-testbed";
const DEFAULT_NODES: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "portico-testbed",
    version,
    about = "A local Kubernetes cluster: real control plane (1.20.2), simulated nodes, loopback only"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the cluster, or confirm it already runs; prints the kubeconfig path and nodes.
    Up(UpArgs),
    /// Stop the cluster and remove its state.
    Down(StateDirArg),
    /// Print the admin kubeconfig's path (`export KUBECONFIG=$(portico-testbed kubeconfig)`).
    Kubeconfig(StateDirArg),
    /// Show the cluster's processes and whether it is ready; exits 1 unless it is.
    Status(StateDirArg),
    /// The full demo: `up`, then the local cloud, the operator and a Service of type
    /// LoadBalancer whose EXTERNAL-IP is printed and called.
    Demo(StateDirArg),
    /// Run the simulated nodes (started by `up`).
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct StateDirArg {
    /// State directory [default: $PORTICO_TESTBED_DIR, else /tmp/portico-testbed]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl StateDirArg {
    /// `${PORTICO_TESTBED_DIR:-/tmp/portico-testbed}` unless `--state-dir` is given.
    pub fn resolve(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| {
            std::env::var_os("PORTICO_TESTBED_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
        })
    }
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Simulated nodes (0 = control plane only) [default: 3]
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=50))]
    pub nodes: Option<u8>,
    /// Slot 1-199, or `auto` for the first free one from 2 [default: 1 if free, else auto]
    #[arg(long, value_parser = parse_slot)]
    pub slot: Option<SlotArg>,
    #[command(flatten)]
    pub state: StateDirArg,
    /// Seconds to wait for the cluster to be ready
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotArg {
    Auto,
    Exact(u8),
}

fn parse_slot(text: &str) -> Result<SlotArg, String> {
    if text == "auto" {
        return Ok(SlotArg::Auto);
    }
    match text.parse::<u8>() {
        Ok(slot) if (1..=199).contains(&slot) => Ok(SlotArg::Exact(slot)),
        _ => Err(format!("{text:?} is neither a slot in 1..=199 nor `auto`")),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up(args) => up(args).await,
        Command::Down(args) => down(&StateLayout::new(args.resolve())).await,
        Command::Kubeconfig(args) => kubeconfig(&StateLayout::new(args.resolve())),
        Command::Status(args) => status(&StateLayout::new(args.resolve())).await,
        Command::Demo(args) => Box::pin(crate::demo::run(&StateLayout::new(args.resolve()))).await,
        Command::Agent { config } => run_agent(&config).await,
    }
}

async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let layout = StateLayout::new(args.state.resolve());
    let _exclusive = layout.lock().context("locking the state dir")?;
    if let Some(record) = load_record(&layout)? {
        match health(&record).await {
            Ok(()) => {
                if let Some(conflict) = conflict(&args, &record) {
                    anyhow::bail!(
                        "the cluster in {} already runs with {conflict}; \
                         `portico-testbed down` it first",
                        layout.root().display()
                    );
                }
                println!("cluster already running");
                print_summary(&record, &layout);
                return Ok(ExitCode::SUCCESS);
            }
            Err(why) => {
                eprintln!(
                    "the cluster in {} is unhealthy ({why}); restarting it",
                    layout.root().display()
                );
                teardown(&record, &layout).await?;
            }
        }
    }

    let slot = match args.slot {
        None => SlotLock::take_preferring(DEMO_SLOT)?,
        Some(SlotArg::Auto) => SlotLock::take_first_free(TEST_SLOTS)?,
        Some(SlotArg::Exact(slot)) => SlotLock::take(slot)?,
    };
    let options = TestbedOptions {
        nodes: args.nodes.unwrap_or(DEFAULT_NODES),
        slot: Some(slot.slot()),
        state_dir: Some(layout.root().to_path_buf()),
        wait_for_nodes: true,
        ready_timeout: Duration::from_secs(args.timeout),
        portico_crds: true,
        provider_id_prefix: None,
    };
    let me = std::env::current_exe().context("locating portico-testbed itself")?;
    let launch = Testbed::launch(options, slot, Supervision::Detached, Some(me));
    let launched = tokio::select! {
        launched = launch => Some(launched),
        _ = tokio::signal::ctrl_c() => None,
    };
    // Leaving `select!` dropped the launch future; a half-started Testbed in it has killed
    // what it spawned (the processes are in their own session: the terminal's SIGINT does not
    // reach them).
    let Some(launched) = launched else {
        layout.clear().ok();
        anyhow::bail!("interrupted; nothing left running");
    };
    let testbed = match launched {
        Ok(testbed) => testbed,
        // Failed after spawning: the processes are gone, their logs stay for a look.
        Err(e) if layout.cluster_record().exists() => {
            return Err(anyhow::Error::new(e).context(format!(
                "starting the cluster (logs kept in {}; `portico-testbed down` clears them)",
                layout.logs_dir().display()
            )));
        }
        Err(e) => return Err(anyhow::Error::new(e).context("starting the cluster")),
    };
    let record = testbed.detach();
    println!("cluster ready in {:.1}s", started.elapsed().as_secs_f64());
    print_summary(&record, &layout);
    Ok(ExitCode::SUCCESS)
}

/// What explicitly requested differs from the running cluster, if anything.
fn conflict(args: &UpArgs, record: &ClusterRecord) -> Option<String> {
    if let Some(nodes) = args.nodes
        && nodes != record.nodes
    {
        return Some(format!("{} nodes, not {nodes}", record.nodes));
    }
    if let Some(SlotArg::Exact(slot)) = args.slot
        && slot != record.slot
    {
        return Some(format!("slot {}, not {slot}", record.slot));
    }
    None
}

async fn down(layout: &StateLayout) -> anyhow::Result<ExitCode> {
    let _exclusive = layout.lock().context("locking the state dir")?;
    match load_record(layout)? {
        Some(record) => {
            teardown(&record, layout).await?;
            println!("cluster in {} stopped and removed", layout.root().display());
        }
        None => {
            layout.clear().context("removing leftover state")?;
            println!("no cluster in {}", layout.root().display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn kubeconfig(layout: &StateLayout) -> anyhow::Result<ExitCode> {
    match load_record(layout)? {
        Some(record) => {
            println!("{}", record.kubeconfig.display());
            Ok(ExitCode::SUCCESS)
        }
        None => anyhow::bail!(
            "no cluster in {}; start one with `portico-testbed up`",
            layout.root().display()
        ),
    }
}

async fn status(layout: &StateLayout) -> anyhow::Result<ExitCode> {
    let Some(record) = load_record(layout)? else {
        println!("no cluster in {}", layout.root().display());
        return Ok(ExitCode::FAILURE);
    };
    println!(
        "cluster in {} (slot {}, {} nodes)",
        layout.root().display(),
        record.slot,
        record.nodes
    );
    for p in &record.processes {
        let state = if p.is_running() { "running" } else { "gone" };
        println!("  {:<24} pid {:<8} {state}", p.name, p.pid);
    }
    match health(&record).await {
        Ok(()) => {
            println!("ready");
            print_summary(&record, layout);
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => {
            println!("not ready: {why}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn run_agent(config: &std::path::Path) -> anyhow::Result<ExitCode> {
    // The agent inherited the slot lock from `up` (see `slot`), so it holds the slot already.
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let config: AgentConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    agent::run(config).await?;
    Ok(ExitCode::SUCCESS)
}

fn load_record(layout: &StateLayout) -> anyhow::Result<Option<ClusterRecord>> {
    ClusterRecord::load(&layout.cluster_record())
        .with_context(|| format!("reading the cluster record in {}", layout.root().display()))
}

/// Every process the cluster needs runs and the cluster is ready.
async fn health(record: &ClusterRecord) -> Result<(), String> {
    let mut expected = vec!["etcd", "kube-apiserver", "kube-controller-manager"];
    if record.nodes > 0 {
        expected.push("agent");
    }
    for name in expected {
        match record.processes.iter().find(|p| p.name == name) {
            Some(p) if p.is_running() => {}
            Some(_) => return Err(format!("{name} is not running")),
            None => return Err(format!("{name} was never started")),
        }
    }
    let config = testbed::load_kubeconfig(&record.kubeconfig)
        .await
        .map_err(|e| e.to_string())?;
    let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
    readiness::cluster(&client, &record.plan(), record.nodes)
        .await
        .map_err(|pending| pending.to_string())
}

/// Stops every recorded process (SIGTERM, 10 s, SIGKILL) and removes the state.
async fn teardown(record: &ClusterRecord, layout: &StateLayout) -> anyhow::Result<()> {
    let mut processes = record.processes.clone();
    // Reverse start order: clients before the API server before etcd.
    processes.reverse();
    process::terminate(&mut processes, STOP_GRACE).await?;
    layout.clear().context("removing the state dir")
}

fn print_summary(record: &ClusterRecord, layout: &StateLayout) {
    let plan = record.plan();
    println!("  slot:        {}", record.slot);
    println!("  API server:  {}", control_plane::apiserver_url(&plan));
    println!("  kubeconfig:  {}", record.kubeconfig.display());
    for node in testbed::node_infos(&plan, record.nodes) {
        println!("  node:        {} {}", node.name, node.internal_ip);
    }
    println!("  logs:        {}", layout.logs_dir().display());
    println!("export KUBECONFIG={}", record.kubeconfig.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("portico-testbed").chain(args.iter().copied()))
    }

    #[test]
    fn up_takes_nodes_slot_and_state_dir() {
        let cli = parse(&["up", "--nodes", "2", "--slot", "7", "--state-dir", "/s"]).unwrap();
        let Command::Up(args) = cli.command else {
            panic!("not up")
        };
        assert_eq!(args.nodes, Some(2));
        assert_eq!(args.slot, Some(SlotArg::Exact(7)));
        assert_eq!(args.state.resolve(), PathBuf::from("/s"));
    }

    #[test]
    fn slots_outside_the_plan_and_too_many_nodes_are_rejected() {
        assert!(parse(&["up", "--slot", "0"]).is_err());
        assert!(parse(&["up", "--slot", "200"]).is_err());
        assert!(parse(&["up", "--nodes", "51"]).is_err());
        let cli = parse(&["up", "--slot", "auto"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Up(UpArgs {
                slot: Some(SlotArg::Auto),
                ..
            })
        ));
    }

    #[test]
    fn explicit_arguments_that_differ_from_the_running_cluster_conflict() {
        let record = ClusterRecord {
            slot: 1,
            nodes: 3,
            kubeconfig: "/k".into(),
            processes: vec![],
        };
        let up = |args: &[&str]| match parse(&[&["up"], args].concat()).unwrap().command {
            Command::Up(args) => args,
            _ => unreachable!(),
        };
        assert_eq!(conflict(&up(&[]), &record), None);
        assert_eq!(
            conflict(&up(&["--nodes", "3", "--slot", "1"]), &record),
            None
        );
        assert!(conflict(&up(&["--nodes", "2"]), &record).is_some());
        assert!(conflict(&up(&["--slot", "4"]), &record).is_some());
        assert_eq!(conflict(&up(&["--slot", "auto"]), &record), None);
    }

    #[test]
    fn the_agent_subcommand_is_hidden() {
        use clap::CommandFactory;
        let help = Cli::command().render_help().to_string();
        assert!(!help.contains("agent"));
        assert!(parse(&["agent", "--config", "/s/agent.json"]).is_ok());
    }
}
