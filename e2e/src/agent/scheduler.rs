//! A small default-scheduler: binds pending pods to the least busy of our nodes that accepts
//! them (taints and tolerations, `nodeSelector`, required node affinity, `unschedulable`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{
        Binding, Node, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference, Pod, Taint,
        Toleration,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    cluster::{Cluster, next_round, ok},
    error::{AgentError, api_call},
};

const DEFAULT_SCHEDULER: &str = "default-scheduler";
/// How often unschedulable pods are retried without any change to prompt it.
const RESYNC: Duration = Duration::from_secs(10);

/// A node as the scheduler weighs it.
#[derive(Clone, Debug)]
pub(crate) struct Candidate<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub taints: &'a [Taint],
    pub unschedulable: bool,
    /// Pods already bound there (not finished).
    pub pods: usize,
    /// Of those, the ones with the same controller as the pod being placed (its "peers").
    pub peers: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Choice {
    Node(String),
    /// No node fits; the message says why, like kube-scheduler's.
    Unschedulable(String),
}

/// Whether this scheduler is responsible for `pod`.
pub(crate) fn wants(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else { return false };
    spec.node_name.as_deref().unwrap_or("").is_empty()
        && spec.scheduler_name.as_deref().unwrap_or(DEFAULT_SCHEDULER) == DEFAULT_SCHEDULER
        && pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Picks the fitting node with the fewest peers (pods of the same controller, like the
/// default SelectorSpread), then the fewest pods, then the first by name.
pub(crate) fn choose_node(pod: &Pod, nodes: &[Candidate<'_>]) -> Choice {
    let spec = pod.spec.clone().unwrap_or_default();
    let tolerations = spec.tolerations.unwrap_or_default();
    let mut reasons = BTreeMap::<String, usize>::new();
    let mut best: Option<&Candidate<'_>> = None;
    for node in nodes {
        let rejection = if node.unschedulable {
            Some("node(s) were unschedulable".to_owned())
        } else if let Some(taint) = node.taints.iter().find(|t| {
            matches!(t.effect.as_str(), "NoSchedule" | "NoExecute")
                && !tolerations.iter().any(|tol| tolerates(tol, t))
        }) {
            Some(format!(
                "node(s) had taint {{{}: {}}}, that the pod didn't tolerate",
                taint.key,
                taint.value.as_deref().unwrap_or("")
            ))
        } else if !spec
            .node_selector
            .iter()
            .flatten()
            .all(|(k, v)| node.labels.get(k) == Some(v))
            || !matches_required_affinity(pod, node)
        {
            Some("node(s) didn't match node selector".to_owned())
        } else {
            None
        };
        match rejection {
            Some(reason) => *reasons.entry(reason).or_default() += 1,
            None => {
                if best
                    .is_none_or(|b| (node.peers, node.pods, node.name) < (b.peers, b.pods, b.name))
                {
                    best = Some(node);
                }
            }
        }
    }
    match best {
        Some(node) => Choice::Node(node.name.to_owned()),
        None if nodes.is_empty() => {
            Choice::Unschedulable("0/0 nodes are available: no nodes in the cluster.".into())
        }
        None => {
            let details: Vec<String> = reasons
                .iter()
                .map(|(reason, n)| format!("{n} {reason}"))
                .collect();
            Choice::Unschedulable(format!(
                "0/{} nodes are available: {}.",
                nodes.len(),
                details.join(", ")
            ))
        }
    }
}

/// Kubernetes' toleration matching (`v1helper.TolerationsTolerateTaint`).
pub(crate) fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_ok = toleration
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = toleration.key.as_deref().unwrap_or("");
    let operator = toleration.operator.as_deref().unwrap_or("Equal");
    let key_ok = if key.is_empty() {
        operator == "Exists"
    } else {
        key == taint.key
    };
    let value_ok = match operator {
        "Exists" => true,
        "Equal" | "" => {
            toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        _ => false,
    };
    effect_ok && key_ok && value_ok
}

fn matches_required_affinity(pod: &Pod, node: &Candidate<'_>) -> bool {
    let Some(terms) = pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|s| &s.node_selector_terms)
    else {
        return true;
    };
    // Terms are ORed; an empty term matches nothing.
    terms.iter().any(|term| term_matches(term, node))
}

fn term_matches(term: &NodeSelectorTerm, node: &Candidate<'_>) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    let name_field = BTreeMap::from([("metadata.name".to_owned(), node.name.to_owned())]);
    expressions
        .iter()
        .all(|r| requirement_matches(r, node.labels))
        && fields.iter().all(|r| requirement_matches(r, &name_field))
}

fn requirement_matches(req: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&req.key);
    let values = req.values.as_deref().unwrap_or_default();
    let as_int = |s: &str| s.parse::<i64>().ok();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(have), Some(bound)) = (
                value.and_then(|v| as_int(v)),
                values.first().and_then(|v| as_int(v)),
            ) else {
                return false;
            };
            if req.operator == "Gt" {
                have > bound
            } else {
                have < bound
            }
        }
        _ => false,
    }
}

/// Binds pending pods until the agent stops.
pub(crate) async fn run(cluster: Arc<Cluster>) -> Result<(), AgentError> {
    cluster.pods.ready().await?;
    cluster.nodes.ready().await?;
    let mut pods_changed = cluster.pods.subscribe();
    let mut nodes_changed = cluster.nodes.subscribe();
    let mut removals = cluster.subscribe_removals();
    // Pods we bound that the watch hasn't shown bound yet, so they count towards spreading.
    let mut assumed = HashMap::<String, String>::new();
    loop {
        schedule_pending(&cluster, &mut assumed).await;
        if !next_round(
            &mut [&mut pods_changed, &mut nodes_changed, &mut removals],
            RESYNC,
            &cluster.shutdown,
        )
        .await
        {
            return Ok(());
        }
    }
}

async fn schedule_pending(cluster: &Cluster, assumed: &mut HashMap<String, String>) {
    let pods = cluster.pods.valid();
    let pods: Vec<&Pod> = pods.iter().filter_map(|g| ok(g)).collect();
    let nodes = cluster.nodes.valid();
    let nodes: Vec<&Node> = nodes
        .iter()
        .filter_map(|g| ok(g))
        .filter(|n| {
            n.metadata.deletion_timestamp.is_none()
                && cluster
                    .node_index(&n.name_any())
                    .is_some_and(|k| !cluster.is_removed(k))
        })
        .collect();

    let mut load = HashMap::<String, usize>::new();
    let mut peers = HashMap::<(String, String), usize>::new();
    let mut pending = Vec::new();
    let live_uids: std::collections::HashSet<String> =
        pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
    assumed.retain(|uid, _| live_uids.contains(uid));
    for pod in &pods {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let terminal = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        match pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
            Some(node) if !node.is_empty() => {
                assumed.remove(&uid);
                if !terminal {
                    count(&mut load, &mut peers, node, pod);
                }
            }
            _ => match assumed.get(&uid) {
                Some(node) => count(&mut load, &mut peers, node, pod),
                None if wants(pod) => pending.push(*pod),
                None => {}
            },
        }
    }
    pending.sort_by_key(|p| (p.metadata.creation_timestamp.clone(), p.name_any()));

    let empty_labels = BTreeMap::new();
    for pod in pending {
        let candidates: Vec<Candidate<'_>> = nodes
            .iter()
            .map(|n| {
                let name = n.metadata.name.as_deref().unwrap_or("");
                Candidate {
                    name,
                    labels: n.metadata.labels.as_ref().unwrap_or(&empty_labels),
                    taints: n
                        .spec
                        .as_ref()
                        .and_then(|s| s.taints.as_deref())
                        .unwrap_or_default(),
                    unschedulable: n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true),
                    pods: load.get(name).copied().unwrap_or(0),
                    peers: controller(pod)
                        .and_then(|owner| peers.get(&(name.to_owned(), owner.to_owned())))
                        .copied()
                        .unwrap_or(0),
                }
            })
            .collect();
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        match choose_node(pod, &candidates) {
            Choice::Node(node) => match bind(cluster, &ns, &name, &uid, &node).await {
                Ok(()) => {
                    info!(pod = %format!("{ns}/{name}"), %node, "bound pod");
                    count(&mut load, &mut peers, &node, pod);
                    assumed.insert(uid, node);
                }
                // Someone else bound it, or it is gone: the watch will tell.
                Err(e) if e.is_conflict() || e.is_not_found() => {}
                Err(error) => {
                    warn!(pod = %format!("{ns}/{name}"), %error, "binding failed; will retry")
                }
            },
            Choice::Unschedulable(message) => {
                if let Err(error) = report_unschedulable(cluster, pod, &message).await
                    && !error.is_not_found()
                {
                    warn!(pod = %format!("{ns}/{name}"), %error, "could not report an unschedulable pod");
                }
            }
        }
    }
}

/// The UID of the pod's controller (ReplicaSet, StatefulSet, …), if it has one.
fn controller(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

fn count(
    load: &mut HashMap<String, usize>,
    peers: &mut HashMap<(String, String), usize>,
    node: &str,
    pod: &Pod,
) {
    *load.entry(node.to_owned()).or_default() += 1;
    if let Some(owner) = controller(pod) {
        *peers
            .entry((node.to_owned(), owner.to_owned()))
            .or_default() += 1;
    }
}

async fn bind(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    uid: &str,
    node: &str,
) -> Result<(), AgentError> {
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            // The API server only binds the pod with this UID (not a same-named successor).
            uid: Some(uid.to_owned()),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.to_owned()),
            ..Default::default()
        },
    };
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    api_call(
        format!("binding pod {ns}/{name} to {node}"),
        pods.create_subresource::<_, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        ),
    )
    .await
    .map(drop)
}

async fn report_unschedulable(
    cluster: &Cluster,
    pod: &Pod,
    message: &str,
) -> Result<(), AgentError> {
    let current = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"));
    if current.is_some_and(|c| {
        c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
            && c.message.as_deref() == Some(message)
    }) {
        return Ok(());
    }
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    info!(pod = %format!("{ns}/{name}"), %message, "pod is unschedulable");
    let now = Time(jiff::Timestamp::now());
    // Strategic merge: conditions merge by type, so other conditions stay.
    let patch = json!({"status": {"conditions": [{
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": message,
        "lastProbeTime": null,
        "lastTransitionTime": now,
    }]}});
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    api_call(
        format!("reporting pod {ns}/{name} unschedulable"),
        pods.patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch)),
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Affinity, NodeAffinity, NodeSelector, PodSpec};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some(value.into()),
            effect: effect.into(),
            ..Default::default()
        }
    }

    fn pod(spec: PodSpec) -> Pod {
        Pod {
            spec: Some(spec),
            ..Default::default()
        }
    }

    struct Nodes {
        labels: Vec<BTreeMap<String, String>>,
        taints: Vec<Vec<Taint>>,
    }

    impl Nodes {
        fn three() -> Nodes {
            Nodes {
                labels: (1..=3)
                    .map(|k| labels(&[("kubernetes.io/hostname", &format!("node-{k}"))]))
                    .collect(),
                taints: vec![vec![], vec![], vec![]],
            }
        }

        fn candidates(&self, pods: [usize; 3]) -> Vec<Candidate<'_>> {
            const NAMES: [&str; 3] = ["node-1", "node-2", "node-3"];
            (0..3)
                .map(|i| Candidate {
                    name: NAMES[i],
                    labels: &self.labels[i],
                    taints: &self.taints[i],
                    unschedulable: false,
                    pods: pods[i],
                    peers: 0,
                })
                .collect()
        }
    }

    #[test]
    fn pods_go_to_the_node_with_fewest_pods() {
        let nodes = Nodes::three();
        let p = pod(PodSpec::default());
        assert_eq!(
            choose_node(&p, &nodes.candidates([2, 1, 1])),
            Choice::Node("node-2".into())
        );
        assert_eq!(
            choose_node(&p, &nodes.candidates([0, 0, 0])),
            Choice::Node("node-1".into())
        );
        assert_eq!(
            choose_node(&p, &nodes.candidates([3, 2, 0])),
            Choice::Node("node-3".into())
        );
    }

    #[test]
    fn replicas_of_one_controller_spread_before_total_load_counts() {
        let nodes = Nodes::three();
        let mut candidates = nodes.candidates([0, 3, 3]);
        candidates[0].peers = 1;
        assert_eq!(
            choose_node(&pod(PodSpec::default()), &candidates),
            Choice::Node("node-2".into())
        );
    }

    #[test]
    fn cordoned_nodes_and_untolerated_taints_are_skipped() {
        let mut nodes = Nodes::three();
        nodes.taints[0] = vec![taint("dedicated", "db", "NoSchedule")];
        nodes.taints[2] = vec![taint("soft", "x", "PreferNoSchedule")];
        let mut candidates = nodes.candidates([0, 5, 9]);
        candidates[1].unschedulable = true;
        // PreferNoSchedule doesn't block.
        assert_eq!(
            choose_node(&pod(PodSpec::default()), &candidates),
            Choice::Node("node-3".into())
        );

        let tolerant = pod(PodSpec {
            tolerations: Some(vec![Toleration {
                key: Some("dedicated".into()),
                operator: Some("Equal".into()),
                value: Some("db".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert_eq!(
            choose_node(&tolerant, &candidates),
            Choice::Node("node-1".into())
        );
    }

    #[test]
    fn toleration_matching_follows_kubernetes() {
        let t = taint("k", "v", "NoExecute");
        let tol = |key: Option<&str>,
                   op: Option<&str>,
                   value: Option<&str>,
                   effect: Option<&str>| Toleration {
            key: key.map(Into::into),
            operator: op.map(Into::into),
            value: value.map(Into::into),
            effect: effect.map(Into::into),
            ..Default::default()
        };
        assert!(
            tolerates(&tol(None, Some("Exists"), None, None), &t),
            "tolerate everything"
        );
        assert!(tolerates(
            &tol(Some("k"), Some("Exists"), None, Some("NoExecute")),
            &t
        ));
        assert!(
            tolerates(&tol(Some("k"), None, Some("v"), None), &t),
            "Equal by default"
        );
        assert!(!tolerates(&tol(Some("k"), None, Some("w"), None), &t));
        assert!(!tolerates(
            &tol(Some("k"), Some("Exists"), None, Some("NoSchedule")),
            &t
        ));
        assert!(
            !tolerates(&tol(None, Some("Equal"), None, None), &t),
            "empty key needs Exists"
        );
    }

    #[test]
    fn node_selector_and_required_affinity_are_honoured() {
        let mut nodes = Nodes::three();
        nodes.labels[1].insert("disk".into(), "ssd".into());
        let selective = pod(PodSpec {
            node_selector: Some(labels(&[("disk", "ssd")])),
            ..Default::default()
        });
        assert_eq!(
            choose_node(&selective, &nodes.candidates([0, 7, 0])),
            Choice::Node("node-2".into())
        );

        let pinned = pod(PodSpec {
            affinity: Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_fields: Some(vec![NodeSelectorRequirement {
                                key: "metadata.name".into(),
                                operator: "In".into(),
                                values: Some(vec!["node-3".into()]),
                            }]),
                            ..Default::default()
                        }],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(
            choose_node(&pinned, &nodes.candidates([0, 0, 4])),
            Choice::Node("node-3".into())
        );
    }

    #[test]
    fn when_nothing_fits_the_message_says_why_per_node() {
        let mut nodes = Nodes::three();
        nodes.taints[0] = vec![taint("dedicated", "db", "NoSchedule")];
        let mut candidates = nodes.candidates([0, 0, 0]);
        candidates[1].unschedulable = true;
        let p = pod(PodSpec {
            node_selector: Some(labels(&[("disk", "ssd")])),
            ..Default::default()
        });
        assert_eq!(
            choose_node(&p, &candidates),
            Choice::Unschedulable(
                "0/3 nodes are available: 1 node(s) didn't match node selector, \
                 1 node(s) had taint {dedicated: db}, that the pod didn't tolerate, \
                 1 node(s) were unschedulable."
                    .into()
            )
        );
        assert!(matches!(choose_node(&p, &[]), Choice::Unschedulable(m) if m.starts_with("0/0")));
    }

    #[test]
    fn only_unbound_default_scheduler_pods_are_ours() {
        assert!(wants(&pod(PodSpec::default())));
        assert!(wants(&pod(PodSpec {
            scheduler_name: Some("default-scheduler".into()),
            ..Default::default()
        })));
        assert!(!wants(&pod(PodSpec {
            scheduler_name: Some("custom".into()),
            ..Default::default()
        })));
        assert!(!wants(&pod(PodSpec {
            node_name: Some("node-1".into()),
            ..Default::default()
        })));
    }
}
