//! A kubelet for all our nodes: runs pods whose containers all use the echo image in-process,
//! reports their status, and finishes their deletion.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use k8s_openapi::{
    api::core::v1::{
        Container, ContainerState, ContainerStateRunning, ContainerStateWaiting, ContainerStatus,
        Pod, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{
    ECHO_IMAGE,
    cluster::{Cluster, next_round, ok},
    echo::{self, EchoIdentity, EchoListener},
    error::{AgentError, api_call},
    is_echo_image,
    net::L4,
};
use crate::address_plan::{AddressPlan, MAX_PODS_PER_NODE};

/// Periodic re-check: retries of failed listeners, writes the API lost.
const RESYNC: Duration = Duration::from_secs(5);
/// How long after a failed bind a container tries again (like a kubelet's restart back-off).
const RETRY_LISTEN: Duration = Duration::from_secs(10);
/// A status write is repeated only when it isn't visible this long after being sent.
const REWRITE_AFTER: Duration = Duration::from_secs(5);
/// Port of a container that declares none.
const DEFAULT_PORT: u16 = 8080;
/// At most this many API writes at once.
const CONCURRENT_WRITES: usize = 8;

/// Pod indices `m` in use on each node (`10.244.k.m`), by pod UID.
#[derive(Debug, Default)]
pub(crate) struct IndexAllocator {
    used: HashMap<u8, BTreeMap<u8, String>>,
}

impl IndexAllocator {
    /// The lowest free index on node `k`, or `preferred` if it is free (a pod the agent ran
    /// before a restart keeps its address).
    pub fn allocate(&mut self, k: u8, uid: &str, preferred: Option<u8>) -> Option<u8> {
        let used = self.used.entry(k).or_default();
        let m = preferred
            .filter(|m| (1..=MAX_PODS_PER_NODE).contains(m) && !used.contains_key(m))
            .or_else(|| (1..=MAX_PODS_PER_NODE).find(|m| !used.contains_key(m)))?;
        used.insert(m, uid.to_owned());
        Some(m)
    }

    pub fn free(&mut self, k: u8, m: u8) {
        if let Some(used) = self.used.get_mut(&k) {
            used.remove(&m);
        }
    }
}

/// What one container is doing.
enum ContainerRun {
    Running {
        since: jiff::Timestamp,
        _listeners: Vec<EchoListener>,
    },
    Waiting {
        reason: &'static str,
        message: String,
        retry_at: Option<Instant>,
    },
}

/// A pod this kubelet has taken on.
struct PodRuntime {
    /// `namespace/name`, for logs.
    key: String,
    node: u8,
    /// The container images it was started with; a changed image restarts the pod.
    images: Vec<Option<String>>,
    index: Option<u8>,
    started: jiff::Timestamp,
    containers: Vec<ContainerRun>,
    /// Readiness last reported, and since when.
    ready: (bool, jiff::Timestamp),
    /// The status last sent, and when.
    last_write: Option<(Value, Instant)>,
    last_delete: Option<Instant>,
}

impl PodRuntime {
    fn all_running(&self) -> bool {
        self.containers
            .iter()
            .all(|c| matches!(c, ContainerRun::Running { .. }))
    }

    /// Stops every container (closing its listeners); the pod keeps its index until it is gone.
    fn stop(&mut self) {
        for c in &mut self.containers {
            *c = ContainerRun::Waiting {
                reason: "Terminating",
                message: "the pod is being deleted".into(),
                retry_at: None,
            };
        }
    }
}

fn container_images(pod: &Pod) -> Vec<Option<String>> {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| c.image.clone())
        .collect()
}

/// The containers (and init containers) whose image the kubelet can't run, with that image.
fn unsupported_images(pod: &Pod) -> Vec<(String, String)> {
    pod.spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .filter(|c| !c.image.as_deref().is_some_and(is_echo_image))
        .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
        .collect()
}

fn unsupported_message(image: &str) -> String {
    format!(
        "image {image:?} can't run on the Portico testbed: its kubelet only runs the built-in \
         echo image {ECHO_IMAGE} (portico.dev/echo with any tag)"
    )
}

/// The ports a container listens on: its declared ports, or 8080/TCP if it declares none.
pub(crate) fn container_ports(c: &Container) -> Result<Vec<(u16, L4)>, String> {
    let declared = c.ports.as_deref().unwrap_or_default();
    if declared.is_empty() {
        return Ok(vec![(DEFAULT_PORT, L4::Tcp)]);
    }
    let mut ports = Vec::new();
    for p in declared {
        let protocol = L4::from_k8s(p.protocol.as_deref()).ok_or_else(|| {
            format!(
                "protocol {} of port {} is not supported by the echo image (TCP and UDP are)",
                p.protocol.as_deref().unwrap_or_default(),
                p.container_port
            )
        })?;
        let port = u16::try_from(p.container_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("container port {} is out of range", p.container_port))?;
        if !ports.contains(&(port, protocol)) {
            ports.push((port, protocol));
        }
    }
    Ok(ports)
}

/// Starts one echo container's listeners; any failure leaves it waiting with none open.
fn start_container(
    c: &Container,
    id: &Arc<EchoIdentity>,
    listen: Ipv4Addr,
    reported: Ipv4Addr,
) -> ContainerRun {
    let ports = match container_ports(c) {
        Ok(ports) => ports,
        Err(message) => {
            return ContainerRun::Waiting {
                reason: "UnsupportedPort",
                message,
                retry_at: None,
            };
        }
    };
    let mut listeners = Vec::with_capacity(ports.len());
    for (port, protocol) in ports {
        let addr = SocketAddr::from((listen, port));
        let started = match protocol {
            L4::Tcp => echo::start_tcp(addr, id.clone()),
            L4::Udp => echo::start_udp(addr, id.clone()),
        };
        match started {
            Ok(listener) => listeners.push(listener),
            Err(error) => {
                let (reason, message) = if error.kind() == std::io::ErrorKind::AddrInUse {
                    (
                        "PortInUse",
                        format!(
                            "port {port}/{protocol} is already in use on the pod's address \
                             {reported} (another container of the pod, or another process, holds \
                             {addr}); retrying every {}s",
                            RETRY_LISTEN.as_secs()
                        ),
                    )
                } else {
                    (
                        "ListenFailed",
                        format!(
                            "listening on {addr}/{protocol} for pod address {reported}: {error}"
                        ),
                    )
                };
                return ContainerRun::Waiting {
                    reason,
                    message,
                    retry_at: Some(Instant::now() + RETRY_LISTEN),
                };
            }
        }
    }
    ContainerRun::Running {
        since: jiff::Timestamp::now(),
        _listeners: listeners,
    }
}

/// Seconds precision, as the API stores times, so written and observed statuses compare equal.
fn now_secs() -> jiff::Timestamp {
    jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).expect("valid time")
}

/// The index a pod reported before (`10.244.k.m` on node `k`), if any.
fn previous_index(pod: &Pod, k: u8) -> Option<u8> {
    let ip: Ipv4Addr = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
    let [a, b, node, m] = ip.octets();
    (a == 10 && b == 244 && node == k).then_some(m)
}

/// The status the kubelet reports for `pod` running as `rt`.
fn pod_status(plan: &AddressPlan, pod: &Pod, rt: &PodRuntime) -> PodStatus {
    let spec_containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let ready = rt.all_running();
    let not_ready: Vec<&str> = spec_containers
        .iter()
        .zip(&rt.containers)
        .filter(|(_, run)| !matches!(run, ContainerRun::Running { .. }))
        .map(|(c, _)| c.name.as_str())
        .collect();
    let condition = |type_: &str, status: bool, since: jiff::Timestamp| PodCondition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        last_transition_time: Some(Time(since)),
        reason: (!status).then(|| "ContainersNotReady".to_owned()),
        message: (!status)
            .then(|| format!("containers with unready status: [{}]", not_ready.join(" "))),
        ..Default::default()
    };
    let pod_ip = rt
        .index
        .map(|m| plan.pod_reported_ip(rt.node, m).to_string());
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let statuses = spec_containers
        .iter()
        .zip(&rt.containers)
        .map(|(c, run)| {
            let image = c.image.clone().unwrap_or_default();
            match run {
                ContainerRun::Running { since, .. } => ContainerStatus {
                    name: c.name.clone(),
                    image_id: format!("portico://{image}"),
                    image,
                    container_id: Some(format!("portico://{uid}/{}", c.name)),
                    ready: true,
                    started: Some(true),
                    restart_count: 0,
                    state: Some(ContainerState {
                        running: Some(ContainerStateRunning {
                            started_at: Some(Time(*since)),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ContainerRun::Waiting {
                    reason, message, ..
                } => ContainerStatus {
                    name: c.name.clone(),
                    image,
                    image_id: String::new(),
                    ready: false,
                    started: Some(false),
                    restart_count: 0,
                    state: Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some((*reason).to_owned()),
                            message: Some(message.clone()),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            }
        })
        .collect();
    PodStatus {
        // Like the kubelet: a pod with a container that never started is Pending.
        phase: Some(if ready { "Running" } else { "Pending" }.to_owned()),
        conditions: Some(vec![
            condition("Initialized", true, rt.started),
            condition("Ready", ready, rt.ready.1),
            condition("ContainersReady", ready, rt.ready.1),
            condition("PodScheduled", true, rt.started),
        ]),
        host_ip: Some(plan.node_ip(rt.node).to_string()),
        pod_ips: pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        pod_ip,
        start_time: Some(Time(rt.started)),
        container_statuses: Some(statuses),
        ..Default::default()
    }
}

/// Whether every field of `want` has the same value in `have` (lists must match item by item).
pub(crate) fn json_subset(want: &Value, have: &Value) -> bool {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w
            .iter()
            .all(|(k, v)| h.get(k).is_some_and(|hv| json_subset(v, hv))),
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| json_subset(a, b))
        }
        _ => want == have,
    }
}

struct Kubelet {
    cluster: Arc<Cluster>,
    /// Set when a reconcile left work for a moment later.
    again_soon: bool,
    pods: HashMap<String, PodRuntime>,
    indices: IndexAllocator,
}

enum Action {
    WriteStatus {
        uid: String,
        ns: String,
        name: String,
        status: Value,
    },
    Delete {
        uid: String,
        ns: String,
        name: String,
    },
}

/// Runs pods on our nodes until the agent stops.
pub(crate) async fn run(cluster: Arc<Cluster>) -> Result<(), AgentError> {
    cluster.pods.ready().await?;
    let mut pods_changed = cluster.pods.subscribe();
    let mut removals = cluster.subscribe_removals();
    let mut kubelet = Kubelet {
        cluster: cluster.clone(),
        again_soon: false,
        pods: HashMap::new(),
        indices: IndexAllocator::default(),
    };
    loop {
        let actions = kubelet.reconcile();
        kubelet.perform(actions).await;
        if std::mem::take(&mut kubelet.again_soon) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if !next_round(
            &mut [&mut pods_changed, &mut removals],
            RESYNC,
            &cluster.shutdown,
        )
        .await
        {
            return Ok(());
        }
    }
}

impl Kubelet {
    fn reconcile(&mut self) -> Vec<Action> {
        let cluster = self.cluster.clone();
        let all = cluster.pods.all();
        let present: HashSet<&str> = all.iter().filter_map(|g| g.meta().uid.as_deref()).collect();
        let indices = &mut self.indices;
        self.pods.retain(|uid, rt| {
            let keep = present.contains(uid.as_str());
            if !keep {
                info!(pod = %rt.key, "pod is gone: its listeners are closed and its address is free");
                if let Some(m) = rt.index {
                    indices.free(rt.node, m);
                }
            }
            keep
        });

        let now = Instant::now();
        let mut actions = Vec::new();
        for guard in &all {
            let Some(pod) = ok(guard) else { continue };
            let Some(k) = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .and_then(|n| cluster.node_index(n))
            else {
                continue;
            };
            // A removed node's kubelet is gone; the controller-manager collects its pods.
            if cluster.is_removed(k) {
                continue;
            }
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            let ns = pod.namespace().unwrap_or_default();
            let name = pod.name_any();
            if pod.metadata.deletion_timestamp.is_some() {
                let rt = self.pods.get_mut(&uid);
                let last_delete = rt.as_ref().and_then(|rt| rt.last_delete);
                if let Some(rt) = rt {
                    rt.stop();
                }
                if last_delete.is_none_or(|t| now.duration_since(t) > REWRITE_AFTER) {
                    if let Some(rt) = self.pods.get_mut(&uid) {
                        rt.last_delete = Some(now);
                    }
                    actions.push(Action::Delete { uid, ns, name });
                }
                continue;
            }
            if matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ) {
                if let Some(rt) = self.pods.get_mut(&uid) {
                    rt.stop();
                }
                continue;
            }
            let images = container_images(pod);
            if let Some(rt) = self.pods.get(&uid)
                && rt.images != images
            {
                info!(pod = %format!("{ns}/{name}"), "container images changed: restarting the pod");
                if let Some(m) = rt.index {
                    self.indices.free(k, m);
                }
                self.pods.remove(&uid);
                // Its listeners close when their tasks next run; start it again after that.
                self.again_soon = true;
                continue;
            }
            if !self.pods.contains_key(&uid) {
                let rt = self.start_pod(pod, k, &uid);
                self.pods.insert(uid.clone(), rt);
            }
            let rt = self.pods.get_mut(&uid).expect("just inserted");
            retry_waiting(&cluster.plan, pod, rt);
            let ready = rt.all_running();
            if ready != rt.ready.0 {
                rt.ready = (ready, now_secs());
            }
            let desired =
                serde_json::to_value(pod_status(&cluster.plan, pod, rt)).expect("status JSON");
            let observed = serde_json::to_value(&pod.status).unwrap_or(Value::Null);
            if json_subset(&desired, &observed) {
                continue;
            }
            if rt.last_write.as_ref().is_some_and(|(sent, at)| {
                *sent == desired && now.duration_since(*at) < REWRITE_AFTER
            }) {
                continue; // Sent; the watch hasn't caught up yet.
            }
            rt.last_write = Some((desired.clone(), now));
            actions.push(Action::WriteStatus {
                uid,
                ns,
                name,
                status: desired,
            });
        }
        actions
    }

    fn start_pod(&mut self, pod: &Pod, k: u8, uid: &str) -> PodRuntime {
        let plan = self.cluster.plan;
        let started = now_secs();
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default();
        let unsupported = unsupported_images(pod);
        let pod_name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        let mut rt = PodRuntime {
            key: pod_name.clone(),
            node: k,
            images: container_images(pod),
            index: None,
            started,
            containers: Vec::new(),
            ready: (false, started),
            last_write: None,
            last_delete: None,
        };
        if !unsupported.is_empty() {
            info!(pod = %pod_name, images = ?unsupported, "pod stays Pending: unsupported image");
            rt.containers = containers
                .iter()
                .map(|c| match unsupported.iter().find(|(name, _)| *name == c.name) {
                    Some((_, image)) => ContainerRun::Waiting {
                        reason: "UnsupportedImage",
                        message: unsupported_message(image),
                        retry_at: None,
                    },
                    None => ContainerRun::Waiting {
                        reason: "ContainerCreating",
                        message: format!(
                            "not started: the pod also has containers with images other than {ECHO_IMAGE}"
                        ),
                        retry_at: None,
                    },
                })
                .collect();
            return rt;
        }
        rt.index = self.indices.allocate(k, uid, previous_index(pod, k));
        let Some(m) = rt.index else {
            rt.containers = containers
                .iter()
                .map(|_| ContainerRun::Waiting {
                    reason: "NoPodAddress",
                    message: format!(
                        "node {} already runs {MAX_PODS_PER_NODE} pods",
                        plan.node_name(k)
                    ),
                    retry_at: None,
                })
                .collect();
            return rt;
        };
        let reported = plan.pod_reported_ip(k, m);
        let listen = plan.pod_listen_address(reported).expect("pod range");
        let id = Arc::new(EchoIdentity {
            pod: pod.name_any(),
            namespace: pod.namespace().unwrap_or_default(),
            node: plan.node_name(k),
        });
        rt.containers = containers
            .iter()
            .map(|c| start_container(c, &id, listen, reported))
            .collect();
        info!(pod = %pod_name, ip = %reported, %listen, ready = rt.all_running(), "started pod");
        rt
    }

    async fn perform(&mut self, actions: Vec<Action>) {
        let client = self.cluster.client.clone();
        let results: Vec<(String, Result<(), AgentError>)> = stream::iter(actions)
            .map(|action| {
                let client = client.clone();
                async move {
                    match action {
                        Action::WriteStatus {
                            uid,
                            ns,
                            name,
                            status,
                        } => {
                            let pods: Api<Pod> = Api::namespaced(client, &ns);
                            let result = api_call(
                                format!("writing the status of pod {ns}/{name}"),
                                pods.patch_status(
                                    &name,
                                    &PatchParams::default(),
                                    &Patch::Merge(json!({ "status": status })),
                                ),
                            )
                            .await
                            .map(drop);
                            (uid, result)
                        }
                        Action::Delete { uid, ns, name } => {
                            let pods: Api<Pod> = Api::namespaced(client, &ns);
                            // The containers are stopped: finish the deletion, but only of
                            // this pod, not of a successor with the same name.
                            let params = DeleteParams {
                                grace_period_seconds: Some(0),
                                preconditions: Some(Preconditions {
                                    uid: Some(uid.clone()),
                                    resource_version: None,
                                }),
                                ..Default::default()
                            };
                            let result = api_call(
                                format!("deleting pod {ns}/{name}"),
                                pods.delete(&name, &params),
                            )
                            .await
                            .map(drop);
                            if result.is_ok() {
                                info!(pod = %format!("{ns}/{name}"), "pod deleted");
                            }
                            (uid, result)
                        }
                    }
                }
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .collect()
            .await;
        for (uid, result) in results {
            match result {
                Ok(()) => {}
                Err(e) if e.is_not_found() || e.is_conflict() => {}
                Err(error) => {
                    warn!(%error, "kubelet API call failed; will retry");
                    if let Some(rt) = self.pods.get_mut(&uid) {
                        rt.last_write = None;
                        rt.last_delete = None;
                    }
                }
            }
        }
    }
}

/// Gives containers whose listeners failed another try once their back-off is over.
fn retry_waiting(plan: &AddressPlan, pod: &Pod, rt: &mut PodRuntime) {
    let Some(m) = rt.index else { return };
    let now = Instant::now();
    if !rt
        .containers
        .iter()
        .any(|c| matches!(c, ContainerRun::Waiting { retry_at: Some(at), .. } if *at <= now))
    {
        return;
    }
    let reported = plan.pod_reported_ip(rt.node, m);
    let listen = plan.pod_listen_address(reported).expect("pod range");
    let id = Arc::new(EchoIdentity {
        pod: pod.name_any(),
        namespace: pod.namespace().unwrap_or_default(),
        node: plan.node_name(rt.node),
    });
    let specs = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    for (c, run) in specs.iter().zip(rt.containers.iter_mut()) {
        if matches!(run, ContainerRun::Waiting { retry_at: Some(at), .. } if *at <= now) {
            *run = start_container(c, &id, listen, reported);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, PodSpec};
    use kube::api::ObjectMeta;

    fn container(name: &str, image: &str, ports: &[(i32, &str)]) -> Container {
        Container {
            name: name.into(),
            image: Some(image.into()),
            ports: (!ports.is_empty()).then(|| {
                ports
                    .iter()
                    .map(|(p, proto)| ContainerPort {
                        container_port: *p,
                        protocol: Some((*proto).into()),
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        }
    }

    fn pod(containers: Vec<Container>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("shop".into()),
                uid: Some("u-1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers,
                node_name: Some("node-2".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn echo_images_are_recognised_with_any_tag_or_none() {
        assert!(is_echo_image("portico.dev/echo:1"));
        assert!(is_echo_image("portico.dev/echo"));
        assert!(is_echo_image("portico.dev/echo:latest"));
        assert!(is_echo_image("portico.dev/echo@sha256:abcd"));
        assert!(!is_echo_image("nginx"));
        assert!(!is_echo_image("portico.dev/echoes:1"));
        assert!(!is_echo_image("other.dev/portico.dev/echo:1"));
        assert!(!is_echo_image("portico.dev:5000/echo"));
    }

    #[test]
    fn pods_get_the_lowest_free_index_per_node() {
        let mut indices = IndexAllocator::default();
        assert_eq!(indices.allocate(1, "a", None), Some(1));
        assert_eq!(indices.allocate(1, "b", None), Some(2));
        assert_eq!(indices.allocate(2, "c", None), Some(1));
        indices.free(1, 1);
        assert_eq!(indices.allocate(1, "d", None), Some(1));
        // A pod that had an address before an agent restart keeps it when it is free.
        assert_eq!(indices.allocate(1, "e", Some(9)), Some(9));
        assert_eq!(indices.allocate(1, "f", Some(9)), Some(3));
        for m in 4..=MAX_PODS_PER_NODE {
            if m != 9 {
                assert!(indices.allocate(1, "x", None).is_some());
            }
        }
        assert_eq!(indices.allocate(1, "full", None), None);
    }

    #[test]
    fn a_pod_the_agent_ran_before_a_restart_keeps_its_address() {
        let mut p = pod(vec![]);
        p.status = Some(PodStatus {
            pod_ip: Some("10.244.2.7".into()),
            ..Default::default()
        });
        assert_eq!(previous_index(&p, 2), Some(7));
        assert_eq!(previous_index(&p, 3), None, "an address of another node");
        assert_eq!(previous_index(&pod(vec![]), 2), None);
    }

    #[test]
    fn containers_without_ports_listen_on_8080() {
        assert_eq!(
            container_ports(&container("a", ECHO_IMAGE, &[])),
            Ok(vec![(8080, L4::Tcp)])
        );
        assert_eq!(
            container_ports(&container(
                "a",
                ECHO_IMAGE,
                &[(53, "UDP"), (53, "TCP"), (53, "UDP")]
            )),
            Ok(vec![(53, L4::Udp), (53, L4::Tcp)])
        );
        assert!(container_ports(&container("a", ECHO_IMAGE, &[(9, "SCTP")])).is_err());
    }

    fn runtime(containers: Vec<ContainerRun>, index: Option<u8>) -> PodRuntime {
        let t = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        PodRuntime {
            key: "shop/web-0".into(),
            node: 2,
            images: vec![],
            index,
            started: t,
            containers,
            ready: (false, t),
            last_write: None,
            last_delete: None,
        }
    }

    #[test]
    fn a_running_echo_pod_reports_its_reported_ip_and_is_ready() {
        let plan = AddressPlan::new(5);
        let p = pod(vec![container("web", ECHO_IMAGE, &[(8080, "TCP")])]);
        let since = jiff::Timestamp::from_second(1_700_000_001).unwrap();
        let mut rt = runtime(
            vec![ContainerRun::Running {
                since,
                _listeners: vec![],
            }],
            Some(3),
        );
        rt.ready = (true, since);
        let status = serde_json::to_value(pod_status(&plan, &p, &rt)).unwrap();
        assert_eq!(status["phase"], "Running");
        assert_eq!(status["podIP"], "10.244.2.3");
        assert_eq!(status["podIPs"], json!([{"ip": "10.244.2.3"}]));
        assert_eq!(status["hostIP"], "127.20.5.2");
        let types: Vec<(&str, &str)> = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap()))
            .collect();
        assert_eq!(
            types,
            [
                ("Initialized", "True"),
                ("Ready", "True"),
                ("ContainersReady", "True"),
                ("PodScheduled", "True")
            ]
        );
        let c = &status["containerStatuses"][0];
        assert_eq!(c["ready"], true);
        assert_eq!(c["started"], true);
        assert_eq!(c["restartCount"], 0);
        assert_eq!(c["image"], ECHO_IMAGE);
        assert_eq!(c["containerID"], "portico://u-1/web");
        assert_eq!(c["state"]["running"]["startedAt"], "2023-11-14T22:13:21Z");
    }

    #[test]
    fn a_pod_with_another_image_stays_pending_and_names_the_echo_image() {
        let plan = AddressPlan::new(5);
        let p = pod(vec![
            container("app", "nginx:1.25", &[]),
            container("side", ECHO_IMAGE, &[]),
        ]);
        assert_eq!(
            unsupported_images(&p),
            vec![("app".to_owned(), "nginx:1.25".to_owned())]
        );
        let rt = runtime(
            vec![
                ContainerRun::Waiting {
                    reason: "UnsupportedImage",
                    message: unsupported_message("nginx:1.25"),
                    retry_at: None,
                },
                ContainerRun::Waiting {
                    reason: "ContainerCreating",
                    message: "x".into(),
                    retry_at: None,
                },
            ],
            None,
        );
        let status = serde_json::to_value(pod_status(&plan, &p, &rt)).unwrap();
        assert_eq!(status["phase"], "Pending");
        assert!(status.get("podIP").is_none());
        let waiting = &status["containerStatuses"][0]["state"]["waiting"];
        assert_eq!(waiting["reason"], "UnsupportedImage");
        assert!(waiting["message"].as_str().unwrap().contains(ECHO_IMAGE));
        let ready = &status["conditions"][1];
        assert_eq!(ready["status"], "False");
        assert_eq!(
            ready["message"],
            "containers with unready status: [app side]"
        );
    }

    #[tokio::test]
    async fn two_containers_on_one_port_leave_the_second_waiting_with_port_in_use() {
        let id = Arc::new(EchoIdentity {
            pod: "p".into(),
            namespace: "n".into(),
            node: "node-1".into(),
        });
        let listen = Ipv4Addr::new(127, 99, 0, 1);
        let port = std::net::TcpListener::bind((listen, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let reported = Ipv4Addr::new(10, 244, 1, 1);
        let first = start_container(
            &container("a", ECHO_IMAGE, &[(i32::from(port), "TCP")]),
            &id,
            listen,
            reported,
        );
        let second = start_container(
            &container(
                "b",
                ECHO_IMAGE,
                &[(i32::from(port), "UDP"), (i32::from(port), "TCP")],
            ),
            &id,
            listen,
            reported,
        );
        assert!(matches!(first, ContainerRun::Running { .. }));
        let ContainerRun::Waiting {
            reason,
            message,
            retry_at,
        } = second
        else {
            panic!("second container should wait");
        };
        assert_eq!(reason, "PortInUse");
        assert!(message.contains(&format!("{port}/TCP")), "{message}");
        assert!(retry_at.is_some());
        // The second container's UDP listener is closed again (its task exits on its next
        // poll): the port is free.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(std::net::UdpSocket::bind((listen, port)).is_ok());
    }

    #[test]
    fn status_comparison_ignores_fields_the_kubelet_does_not_own() {
        let want = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
        let have = json!({"phase": "Running", "qosClass": "BestEffort", "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null}]});
        assert!(json_subset(&want, &have));
        let stale =
            json!({"phase": "Pending", "conditions": [{"type": "Ready", "status": "True"}]});
        assert!(!json_subset(&want, &stale));
        let extra = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}, {"type": "X", "status": "True"}]});
        assert!(!json_subset(&want, &extra));
    }
}
