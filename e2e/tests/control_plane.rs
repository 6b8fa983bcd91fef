//! The testbed's control plane and lifecycle, against the real etcd, kube-apiserver and
//! kube-controller-manager 1.20.2.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Pod, Service, ServiceAccount, ServicePort, ServiceSpec,
};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use portico_e2e::process::ProcessRecord;
use portico_e2e::slot::SlotLock;
use portico_e2e::state::ClusterRecord;
use portico_e2e::{AddressPlan, Testbed, TestbedOptions};

/// Slots pinned by the tests that check a slot's addresses after teardown, far above the slots
/// `Testbed::start` hands out from 2 up, so no other test's cluster lands there in between.
const DROP_SLOT: u8 = 197;
const STOP_SLOT: u8 = 196;
const CLI_SLOT: u8 = 195;
const CLI_RESTART_SLOT: u8 = 194;

fn control_plane_only() -> TestbedOptions {
    TestbedOptions {
        nodes: 0,
        ..Default::default()
    }
}

/// The full cluster, nodes included, in a pinned slot.
fn full_cluster(slot: u8) -> TestbedOptions {
    TestbedOptions {
        slot: Some(slot),
        ..Default::default()
    }
}

fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Default::default()
    }
}

fn refuses_connections(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

/// Listening TCP sockets on any of the slot's addresses: the control plane (`127.20.S.*`,
/// which also holds node IPs), the load-balancer pool (`127.22.S.*`), test clients
/// (`127.23.S.*`) and pod listeners (`127.(30+k).S.*`).
fn listeners_in_slot(slot: u8) -> Vec<SocketAddr> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state) = (fields.get(1)?, fields.get(3)?);
            if *state != "0A" {
                return None; // not LISTEN
            }
            let (ip, port) = local.split_once(':')?;
            // /proc/net/tcp prints the address as a host-order (little-endian) u32.
            let ip = std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.swap_bytes());
            let port = u16::from_str_radix(port, 16).ok()?;
            let [a, b, c, _] = ip.octets();
            let ours = a == 127 && c == slot && matches!(b, 20 | 22 | 23 | 31..=80);
            ours.then_some(SocketAddr::from((ip, port)))
        })
        .collect()
}

/// Nothing of the cluster in `plan`'s slot is left: no recorded process runs, nothing listens
/// on its addresses, and the slot can be taken again.
fn assert_nothing_left(plan: AddressPlan, processes: &[ProcessRecord]) {
    for p in processes {
        assert!(!p.is_running(), "{} (pid {}) still runs", p.name, p.pid);
    }
    let ip = plan.control_plane_ip();
    for port in [6443, 2379, 2380, 2381] {
        let addr = SocketAddr::from((ip, port));
        assert!(
            refuses_connections(addr),
            "something still listens on {addr}"
        );
    }
    assert_eq!(listeners_in_slot(plan.slot), vec![]);
    SlotLock::take(plan.slot).expect("the slot is free again");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_can_list_namespaces_and_create_a_config_map() {
    let testbed = Testbed::start(control_plane_only()).await.unwrap();
    let client = testbed.client().await;

    let namespaces: Vec<String> = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|ns| ns.metadata.name)
        .collect();
    for expected in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(namespaces.iter().any(|n| n == expected), "{namespaces:?}");
    }

    let config_maps: Api<ConfigMap> = Api::namespaced(client, "default");
    config_maps
        .create(
            &PostParams::default(),
            &config_map("greeting", &[("hello", "world")]),
        )
        .await
        .unwrap();
    let read = config_maps.get("greeting").await.unwrap();
    assert_eq!(read.data.unwrap()["hello"], "world");
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_are_admitted_as_soon_as_start_returns() {
    let testbed = Testbed::start(control_plane_only()).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(testbed.client().await, "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "early" },
        "spec": { "containers": [{ "name": "c", "image": "portico.dev/echo:1" }] },
    }))
    .unwrap();
    // No retry: the default ServiceAccount and its token must already exist.
    pods.create(&PostParams::default(), &pod).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn rbac_refuses_a_service_account_without_roles() {
    let testbed = Testbed::start(control_plane_only()).await.unwrap();
    let admin = testbed.client().await;
    let accounts: Api<ServiceAccount> = Api::namespaced(admin, "default");
    let nobody = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("nobody".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    accounts
        .create(&PostParams::default(), &nobody)
        .await
        .unwrap();

    let token = testbed
        .service_account_token("default", "nobody")
        .await
        .unwrap();
    let as_nobody: Client = testbed.client_with_token(&token).await;
    let err = Api::<ConfigMap>::namespaced(as_nobody, "default")
        .list(&ListParams::default())
        .await
        .expect_err("a ServiceAccount without roles may not list ConfigMaps");
    let kube::Error::Api(status) = err else {
        panic!("expected an API error, got {err:?}")
    };
    // Authenticated (not 401) as the ServiceAccount, then refused by RBAC.
    assert!(status.is_forbidden(), "{status:?}");
    assert!(
        status
            .message
            .contains("system:serviceaccount:default:nobody"),
        "{}",
        status.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_manager_leaves_load_balancers_to_portico() {
    let testbed = Testbed::start(control_plane_only()).await.unwrap();
    let services: Api<Service> = Api::namespaced(testbed.client().await, "default");
    let service = Service {
        metadata: ObjectMeta {
            name: Some("lb".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            selector: Some([("app".to_string(), "echo".to_string())].into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();

    let log = std::fs::read_to_string(testbed.log_path("kube-controller-manager")).unwrap();
    assert!(
        log.contains(r#""service" is disabled"#),
        "service controller not disabled"
    );
    assert!(!log.contains(r#"Started "service""#));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = services.get("lb").await.unwrap().status.unwrap_or_default();
    assert_eq!(status.load_balancer.and_then(|lb| lb.ingress), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_run_side_by_side_in_different_slots() {
    let (a, b) = tokio::join!(
        Testbed::start(control_plane_only()),
        Testbed::start(control_plane_only())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.plan().slot, b.plan().slot);
    assert_ne!(a.kubeconfig_path(), b.kubeconfig_path());

    let in_a: Api<ConfigMap> = Api::namespaced(a.client().await, "default");
    let in_b: Api<ConfigMap> = Api::namespaced(b.client().await, "default");
    in_a.create(
        &PostParams::default(),
        &config_map("which", &[("cluster", "a")]),
    )
    .await
    .unwrap();
    in_b.create(
        &PostParams::default(),
        &config_map("which", &[("cluster", "b")]),
    )
    .await
    .unwrap();
    assert_eq!(
        in_a.get("which").await.unwrap().data.unwrap()["cluster"],
        "a"
    );
    assert_eq!(
        in_b.get("which").await.unwrap().data.unwrap()["cluster"],
        "b"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_a_testbed_leaves_no_process_no_listener_and_no_state() {
    let testbed = Testbed::start(full_cluster(DROP_SLOT)).await.unwrap();
    let (plan, processes) = (testbed.plan(), testbed.processes());
    let state_dir = testbed.state_dir().to_path_buf();
    let names: Vec<&str> = processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["etcd", "kube-apiserver", "kube-controller-manager", "agent"]
    );
    let listening = listeners_in_slot(plan.slot);
    assert!(listening.contains(&plan.apiserver()), "{listening:?}");
    assert!(listening.contains(&plan.etcd_client()), "{listening:?}");

    drop(testbed);
    assert_nothing_left(plan, &processes);
    assert!(
        !state_dir.exists(),
        "temp state dir {state_dir:?} left behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_a_testbed_leaves_no_process_and_no_listener() {
    let testbed = Testbed::start(full_cluster(STOP_SLOT)).await.unwrap();
    let (plan, processes) = (testbed.plan(), testbed.processes());
    let started = Instant::now();
    testbed.stop().await.unwrap();
    eprintln!("stopped in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_nothing_left(plan, &processes);
}

// --- the CLI ---------------------------------------------------------------------------------

const CLI: &str = env!("CARGO_BIN_EXE_portico-testbed");

fn cli(args: &[&str], state_dir: &Path) -> Output {
    let output = Command::new(CLI)
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .unwrap();
    eprintln!(
        "$ portico-testbed {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn record(state_dir: &Path) -> ClusterRecord {
    ClusterRecord::load(&state_dir.join("cluster.json"))
        .unwrap()
        .expect("cluster.json")
}

/// A detached cluster outlives a failing test; this takes it down whatever happens.
struct DownOnDrop(PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        if self.0.join("cluster.json").exists() {
            let _ = Command::new(CLI)
                .arg("down")
                .arg("--state-dir")
                .arg(&self.0)
                .output();
        }
    }
}

#[test]
fn cli_up_is_idempotent_and_down_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _guard = DownOnDrop(state.clone());
    let slot = CLI_SLOT.to_string();
    let up_args = ["up", "--nodes", "2", "--slot", slot.as_str()];

    let first = cli(&up_args, &state);
    assert!(first.status.success());
    let kubeconfig = state.join("admin.kubeconfig");
    assert!(stdout(&first).contains(&kubeconfig.display().to_string()));
    let started = record(&state);
    assert_eq!(started.slot, CLI_SLOT);
    assert_eq!(
        started.processes.len(),
        4,
        "etcd, apiserver, controller manager, agent"
    );
    // `up` has exited; its processes hold the slot now.
    assert!(
        SlotLock::take(CLI_SLOT).is_err(),
        "the running cluster's slot was free"
    );

    let second = cli(&up_args, &state);
    assert!(second.status.success());
    assert!(stdout(&second).contains("already running"));
    assert_eq!(
        record(&state),
        started,
        "a second `up` must not restart anything"
    );

    assert!(cli(&["status"], &state).status.success());
    let printed = cli(&["kubeconfig"], &state);
    assert_eq!(stdout(&printed).trim(), kubeconfig.display().to_string());

    let down = cli(&["down"], &state);
    assert!(down.status.success());
    assert_nothing_left(AddressPlan::new(CLI_SLOT), &started.processes);
    assert!(!state.exists());
    assert!(!cli(&["status"], &state).status.success());
    assert!(
        cli(&["down"], &state).status.success(),
        "down is idempotent"
    );
}

#[test]
fn cli_up_restarts_a_half_dead_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _guard = DownOnDrop(state.clone());
    let slot = CLI_RESTART_SLOT.to_string();
    let up_args = ["up", "--nodes", "0", "--slot", slot.as_str()];

    assert!(cli(&up_args, &state).status.success());
    let before = record(&state);
    let apiserver = before
        .processes
        .iter()
        .find(|p| p.name == "kube-apiserver")
        .unwrap();
    assert!(apiserver.signal(libc::SIGKILL).unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while apiserver.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!cli(&["status"], &state).status.success());

    let again = cli(&up_args, &state);
    assert!(again.status.success());
    let after = record(&state);
    for (old, new) in before.processes.iter().zip(&after.processes) {
        assert!(
            !old.is_running(),
            "{} of the old cluster survived",
            old.name
        );
        assert_ne!(old, new);
    }
    assert!(cli(&["status"], &state).status.success());
    assert!(cli(&["down"], &state).status.success());
    assert_nothing_left(AddressPlan::new(CLI_RESTART_SLOT), &after.processes);
}

// --- simulated nodes --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn start_returns_once_all_nodes_are_ready() {
    let started = Instant::now();
    let testbed = Testbed::start(TestbedOptions::default()).await.unwrap();
    eprintln!("ready with 3 nodes in {:?}", started.elapsed());
    let nodes = testbed.nodes();
    assert_eq!(nodes.len(), 3);
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(testbed.client().await);
    for node in nodes {
        let found = api.get(&node.name).await.unwrap();
        assert!(portico_e2e::readiness::is_ready(&found));
    }
}
