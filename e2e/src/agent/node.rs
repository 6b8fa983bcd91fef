//! Our Node objects: registration, status heartbeats and node leases, and noticing when a
//! user deletes one of them (the node then leaves the cluster for good).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time},
    },
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    cluster::{Cluster, next_round, ok},
    error::{AgentError, api_call},
};
use crate::address_plan::AddressPlan;

/// How often status and lease are renewed (kubelet's default node-status-update-frequency).
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(10);
const LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_DURATION_SECONDS: i32 = 40;
const VERSION: &str = "v1.20.2";

/// The Node object we create for node `k` (an existing one is never replaced).
pub(crate) fn node_object(
    plan: &AddressPlan,
    k: u8,
    provider_id_prefix: Option<&str>,
    now: jiff::Timestamp,
) -> Node {
    let name = plan.node_name(k);
    Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/hostname".to_owned(), name),
                ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                ("kubernetes.io/arch".to_owned(), "amd64".to_owned()),
            ])),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some(match provider_id_prefix {
                Some(prefix) => format!("{prefix}{}", plan.node_name(k)),
                None => format!("portico-testbed://{}/{}", plan.slot, plan.node_name(k)),
            }),
            ..Default::default()
        }),
        status: Some(node_status(plan, k, now, None)),
    }
}

/// The status we report for node `k`. Conditions keep the transition times of `current`
/// where their status is unchanged.
pub(crate) fn node_status(
    plan: &AddressPlan,
    k: u8,
    now: jiff::Timestamp,
    current: Option<&NodeStatus>,
) -> NodeStatus {
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        let since = current
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        NodeCondition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            last_heartbeat_time: Some(Time(now)),
            last_transition_time: Some(since),
        }
    };
    let resources = BTreeMap::from([
        ("cpu".to_owned(), Quantity("8".into())),
        ("memory".to_owned(), Quantity("32Gi".into())),
        ("pods".to_owned(), Quantity("110".into())),
    ]);
    let id = format!("portico-testbed-{}-{}", plan.slot, k);
    NodeStatus {
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: plan.node_ip(k).to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: plan.node_name(k),
            },
        ]),
        conditions: Some(vec![
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
            condition(
                "NetworkUnavailable",
                "False",
                "RouteCreated",
                "the testbed network is loopback",
            ),
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "kubelet is posting ready status",
            ),
        ]),
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".into(),
            boot_id: id.clone(),
            container_runtime_version: "portico://1".into(),
            kernel_version: "portico-testbed".into(),
            kube_proxy_version: VERSION.into(),
            kubelet_version: VERSION.into(),
            machine_id: id.clone(),
            operating_system: "linux".into(),
            os_image: "Portico testbed".into(),
            system_uuid: id,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates node `k`, or takes over an existing one (only its status is written, so labels,
/// taints and other spec changes made by users survive).
pub(crate) async fn register(cluster: &Cluster, k: u8) -> Result<(), AgentError> {
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let name = cluster.plan.node_name(k);
    let existing = api_call(format!("reading node {name}"), nodes.get_opt(&name)).await?;
    if existing.is_none() {
        let node = node_object(
            &cluster.plan,
            k,
            cluster.provider_id_prefix.as_deref(),
            jiff::Timestamp::now(),
        );
        match api_call(
            format!("creating node {name}"),
            nodes.create(&PostParams::default(), &node),
        )
        .await
        {
            Ok(_) => info!(node = %name, "registered node"),
            Err(e) if e.is_already_exists() => {}
            Err(e) => return Err(e),
        }
    }
    // Also right after a create: some API versions drop status on create.
    patch_status(cluster, k, existing.as_ref()).await
}

async fn patch_status(cluster: &Cluster, k: u8, current: Option<&Node>) -> Result<(), AgentError> {
    let name = cluster.plan.node_name(k);
    let status = node_status(
        &cluster.plan,
        k,
        jiff::Timestamp::now(),
        current.and_then(|n| n.status.as_ref()),
    );
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    // A JSON merge patch replaces the lists we own (conditions, addresses) wholesale and
    // leaves every field we don't report alone.
    api_call(
        format!("updating the status of node {name}"),
        nodes.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        ),
    )
    .await
    .map(drop)
}

async fn renew_lease(cluster: &Cluster, k: u8) -> Result<(), AgentError> {
    let name = cluster.plan.node_name(k);
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), LEASE_NAMESPACE);
    let spec = LeaseSpec {
        holder_identity: Some(name.clone()),
        lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
        renew_time: Some(MicroTime(jiff::Timestamp::now())),
        ..Default::default()
    };
    let renewed = api_call(
        format!("renewing the lease of {name}"),
        leases.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        ),
    )
    .await;
    match renewed {
        Err(e) if e.is_not_found() => {}
        other => return other.map(drop),
    }
    // Owned by the Node, as the kubelet does, so the lease goes away with it.
    let owner = cluster
        .node(k)
        .and_then(|g| ok(&g).and_then(|n| n.metadata.uid.clone()))
        .map(|uid| OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: name.clone(),
            uid,
            ..Default::default()
        });
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(LEASE_NAMESPACE.into()),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(spec),
    };
    match api_call(
        format!("creating the lease of {name}"),
        leases.create(&PostParams::default(), &lease),
    )
    .await
    {
        Err(e) if e.is_already_exists() => Ok(()),
        other => other.map(drop),
    }
}

/// Keeps node `k` Ready until it is removed from the cluster or the agent stops.
pub(crate) async fn heartbeat(cluster: Arc<Cluster>, k: u8) -> Result<(), AgentError> {
    let name = cluster.plan.node_name(k);
    let mut ticker = tokio::time::interval(HEARTBEAT);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cluster.shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        if cluster.is_removed(k) {
            return Ok(());
        }
        let current = cluster.node(k).and_then(|g| ok(&g).cloned());
        match patch_status(&cluster, k, current.as_ref()).await {
            Err(e) if e.is_not_found() => {
                if cluster.mark_removed(k) {
                    info!(node = %name, "node was deleted: it leaves the cluster (its kube-proxy keeps serving)");
                }
                return Ok(());
            }
            Err(error) => warn!(node = %name, %error, "node heartbeat failed"),
            Ok(()) => {}
        }
        if let Err(error) = renew_lease(&cluster, k).await {
            warn!(node = %name, %error, "lease renewal failed");
        }
    }
}

/// Watches for users deleting our nodes: a node once seen and then gone is removed for good.
pub(crate) async fn track_removals(cluster: Arc<Cluster>) -> Result<(), AgentError> {
    cluster.nodes.ready().await?;
    let mut changed = cluster.nodes.subscribe();
    let mut seen = vec![false; usize::from(cluster.node_count) + 1];
    loop {
        for k in 1..=cluster.node_count {
            if cluster.node(k).is_some() {
                seen[usize::from(k)] = true;
            } else if seen[usize::from(k)] && cluster.mark_removed(k) {
                info!(node = %cluster.plan.node_name(k), "node was deleted: it leaves the cluster (its kube-proxy keeps serving)");
            }
        }
        if !next_round(
            &mut [&mut changed],
            Duration::from_secs(60),
            &cluster.shutdown,
        )
        .await
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_node_is_labelled_addressed_and_ready() {
        let plan = AddressPlan::new(4);
        let now = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        let node = node_object(&plan, 2, None, now);
        let json = serde_json::to_value(&node).unwrap();
        assert_eq!(
            json["metadata"]["labels"]["kubernetes.io/hostname"],
            "node-2"
        );
        assert_eq!(json["metadata"]["labels"]["kubernetes.io/os"], "linux");
        assert_eq!(json["spec"]["providerID"], "portico-testbed://4/node-2");
        assert_eq!(
            json["status"]["addresses"],
            json!([{"type": "InternalIP", "address": "127.20.4.2"}, {"type": "Hostname", "address": "node-2"}])
        );
        let ready = json["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True");
        assert_eq!(
            json["status"]["capacity"],
            json!({"cpu": "8", "memory": "32Gi", "pods": "110"})
        );
        assert_eq!(json["status"]["nodeInfo"]["kubeletVersion"], "v1.20.2");
        assert_eq!(json["status"]["nodeInfo"]["osImage"], "Portico testbed");
        for field in [
            "machineID",
            "systemUUID",
            "bootID",
            "kernelVersion",
            "containerRuntimeVersion",
            "kubeProxyVersion",
            "operatingSystem",
            "architecture",
        ] {
            assert!(json["status"]["nodeInfo"][field].is_string(), "{field}");
        }
    }

    #[test]
    fn heartbeats_move_heartbeat_times_but_keep_transition_times() {
        let plan = AddressPlan::new(4);
        let t0 = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        let t1 = jiff::Timestamp::from_second(1_700_000_010).unwrap();
        let first = node_status(&plan, 1, t0, None);
        let mut unknown = first.clone();
        unknown.conditions.as_mut().unwrap()[4].status = "Unknown".into();
        let next = node_status(&plan, 1, t1, Some(&first));
        let ready = &next.conditions.as_ref().unwrap()[4];
        assert_eq!(ready.last_heartbeat_time, Some(Time(t1)));
        assert_eq!(ready.last_transition_time, Some(Time(t0)));
        // After the controller marked it Unknown, Ready=True is a new transition.
        let recovered = node_status(&plan, 1, t1, Some(&unknown));
        assert_eq!(
            recovered.conditions.as_ref().unwrap()[4].last_transition_time,
            Some(Time(t1))
        );
    }
}
