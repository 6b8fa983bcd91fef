//! Which nodes a load balancer sends traffic to: the upstream service controller's predicates.
//!
//! Readiness is deliberately not one of them (KEP-3458): the load balancer's own health checks
//! take unready nodes out, so a flapping node does not churn every load balancer in the cluster.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

/// Nodes carrying this label (parsed as a bool: `true` or an unparseable value) are excluded.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// The cluster autoscaler's taint on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// A node a load balancer may target.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EligibleNode {
    pub name: String,
    pub internal_ip: IpAddr,
    pub provider_id: Option<String>,
}

/// True when the upstream predicates let `node` serve load balancer traffic.
pub fn is_eligible(node: &Node) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    if let Some(value) = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(EXCLUDE_LABEL))
    {
        // Upstream: excluded unless the value parses as false.
        if value.parse::<bool>().unwrap_or(true) {
            return false;
        }
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !tainted
}

/// The node's InternalIP, the address load balancers target (as cloud providers do).
pub fn internal_ip(node: &Node) -> Option<IpAddr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// The eligible nodes with an InternalIP, sorted by name so the desired state is deterministic.
pub fn eligible_nodes<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<EligibleNode> {
    let mut eligible: Vec<EligibleNode> = nodes
        .into_iter()
        .filter(|n| is_eligible(n))
        .filter_map(|n| {
            Some(EligibleNode {
                name: n.metadata.name.clone()?,
                internal_ip: internal_ip(n)?,
                provider_id: n.spec.as_ref().and_then(|s| s.provider_id.clone()),
            })
        })
        .collect();
    eligible.sort();
    eligible
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    pub fn node(name: &str, ip: &str) -> Node {
        Node {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                provider_id: Some(format!("test://{name}")),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: name.into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.into(),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    fn labelled(value: &str) -> Node {
        let mut n = node("n1", "127.0.0.11");
        n.metadata.labels = Some([(EXCLUDE_LABEL.to_string(), value.to_string())].into());
        n
    }

    #[test]
    fn exclude_label_is_parsed_as_a_bool() {
        assert!(!is_eligible(&labelled("true")));
        assert!(
            !is_eligible(&labelled("yes-please")),
            "unparseable excludes"
        );
        assert!(!is_eligible(&labelled("")), "empty is unparseable");
        assert!(is_eligible(&labelled("false")));
    }

    #[test]
    fn autoscaler_deletion_taint_excludes() {
        let mut n = node("n1", "127.0.0.11");
        n.spec.as_mut().unwrap().taints = Some(vec![Taint {
            key: TO_BE_DELETED_TAINT.into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }]);
        assert!(!is_eligible(&n));
    }

    #[test]
    fn deleting_nodes_are_excluded() {
        let mut n = node("n1", "127.0.0.11");
        n.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        assert!(!is_eligible(&n));
    }

    #[test]
    fn not_ready_nodes_stay_eligible() {
        // No conditions at all (as for an unready node): health checks decide, not us.
        assert!(is_eligible(&node("n1", "127.0.0.11")));
    }

    #[test]
    fn eligible_nodes_are_sorted_and_need_an_internal_ip() {
        let mut no_ip = node("n0", "127.0.0.10");
        no_ip
            .status
            .as_mut()
            .unwrap()
            .addresses
            .as_mut()
            .unwrap()
            .pop();
        let nodes = [node("n2", "127.0.0.12"), no_ip, node("n1", "127.0.0.11")];
        let eligible = eligible_nodes(&nodes);
        let names: Vec<_> = eligible.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["n1", "n2"]);
        assert_eq!(
            eligible[0].internal_ip,
            "127.0.0.11".parse::<IpAddr>().unwrap()
        );
        assert_eq!(eligible[0].provider_id.as_deref(), Some("test://n1"));
    }
}
