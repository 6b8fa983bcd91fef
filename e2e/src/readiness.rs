//! When a cluster is usable, checked step by step so a timeout can say which step is missing.
//!
//! `/readyz` is not enough: the `default` namespace appears only after it, and pods are rejected
//! until the controller manager has created the `default` ServiceAccount *and* (1.20) its token
//! Secret. So the final check is a dry-run Pod create, which runs the very admission chain a
//! real Pod would.

use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Namespace, Node, Pod, PodSpec, ServiceAccount};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::address_plan::AddressPlan;
use crate::control_plane::ETCD_METRICS_PORT;

/// One probe never waits longer than this; a hung listener must not stall the whole wait.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The first readiness step not reached yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pending {
    Etcd,
    ApiServer(String),
    DefaultNamespace,
    DefaultServiceAccount,
    PodAdmission(String),
    Nodes { ready: usize, wanted: u8 },
}

impl Pending {
    /// The process whose log most likely explains why this step is missing.
    pub fn culprit(&self) -> &'static str {
        match self {
            Pending::Etcd => "etcd",
            Pending::ApiServer(_) | Pending::DefaultNamespace => "kube-apiserver",
            Pending::DefaultServiceAccount | Pending::PodAdmission(_) => "kube-controller-manager",
            Pending::Nodes { .. } => "agent",
        }
    }
}

impl fmt::Display for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pending::Etcd => write!(f, "etcd is not healthy"),
            Pending::ApiServer(why) => write!(f, "kube-apiserver is not ready ({why})"),
            Pending::DefaultNamespace => write!(f, "namespace `default` does not exist"),
            Pending::DefaultServiceAccount => {
                write!(
                    f,
                    "ServiceAccount default/default or its token does not exist"
                )
            }
            Pending::PodAdmission(why) => write!(f, "pods are not admitted yet ({why})"),
            Pending::Nodes { ready, wanted } => write!(f, "{ready} of {wanted} nodes are Ready"),
        }
    }
}

async fn probe<T>(
    pending: impl FnOnce(String) -> Pending,
    fut: impl Future<Output = Result<T, String>>,
) -> Result<T, Pending> {
    match tokio::time::timeout(PROBE_TIMEOUT, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(why)) => Err(pending(why)),
        Err(_) => Err(pending("timed out".into())),
    }
}

/// etcd's `/health` on its metrics listener.
pub async fn etcd(plan: &AddressPlan) -> Result<(), Pending> {
    let addr = (plan.control_plane_ip(), ETCD_METRICS_PORT);
    let body = probe(|_| Pending::Etcd, async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let request = format!("GET /health HTTP/1.0\r\nHost: {}\r\n\r\n", addr.0);
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        Ok(response)
    })
    .await?;
    if body.contains(r#""health":"true""#) {
        Ok(())
    } else {
        Err(Pending::Etcd)
    }
}

/// `/readyz` answers `ok`.
pub async fn apiserver(client: &Client) -> Result<(), Pending> {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .expect("static request");
    let text = probe(Pending::ApiServer, async {
        client
            .request_text(request)
            .await
            .map_err(|e| e.to_string())
    })
    .await?;
    if text.trim() == "ok" {
        Ok(())
    } else {
        Err(Pending::ApiServer(text))
    }
}

/// The `default` namespace exists and a Pod would be admitted into it.
pub async fn workloads_admitted(client: &Client) -> Result<(), Pending> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = probe(Pending::ApiServer, async {
        namespaces
            .get_opt("default")
            .await
            .map_err(|e| e.to_string())
    })
    .await?;
    if ns.is_none() {
        return Err(Pending::DefaultNamespace);
    }

    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let sa = probe(Pending::ApiServer, async {
        accounts.get_opt("default").await.map_err(|e| e.to_string())
    })
    .await?;
    let has_token = sa
        .and_then(|sa| sa.secrets)
        .is_some_and(|secrets| !secrets.is_empty());
    if !has_token {
        return Err(Pending::DefaultServiceAccount);
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    probe(Pending::PodAdmission, async {
        pods.create(&dry_run, &probe_pod())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
}

fn probe_pod() -> Pod {
    Pod {
        metadata: ObjectMeta {
            generate_name: Some("portico-readiness-".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "probe".into(),
                image: Some("portico.dev/readiness:never-runs".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `node-1` … `node-<wanted>` all report `Ready=True`.
pub async fn nodes(client: &Client, plan: &AddressPlan, wanted: u8) -> Result<(), Pending> {
    let api: Api<Node> = Api::all(client.clone());
    let list = probe(Pending::ApiServer, async {
        api.list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())
    })
    .await?;
    let expected: Vec<String> = (1..=wanted).map(|k| plan.node_name(k)).collect();
    let ready = list
        .items
        .iter()
        .filter(|node| {
            node.metadata
                .name
                .as_ref()
                .is_some_and(|n| expected.contains(n))
        })
        .filter(|node| is_ready(node))
        .count();
    if ready == usize::from(wanted) {
        Ok(())
    } else {
        Err(Pending::Nodes { ready, wanted })
    }
}

pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// Every API-level step, in order: what "the cluster is usable" means once all processes run.
pub async fn cluster(client: &Client, plan: &AddressPlan, nodes_wanted: u8) -> Result<(), Pending> {
    apiserver(client).await?;
    workloads_admitted(client).await?;
    if nodes_wanted > 0 {
        nodes(client, plan, nodes_wanted).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};

    use super::*;

    fn node(conditions: &[(&str, &str)]) -> Node {
        Node {
            status: Some(NodeStatus {
                conditions: Some(
                    conditions
                        .iter()
                        .map(|(t, s)| NodeCondition {
                            type_: (*t).into(),
                            status: (*s).into(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_node_is_ready_only_with_ready_true() {
        assert!(is_ready(&node(&[
            ("MemoryPressure", "False"),
            ("Ready", "True")
        ])));
        assert!(!is_ready(&node(&[("Ready", "Unknown")])));
        assert!(!is_ready(&node(&[("MemoryPressure", "True")])));
        assert!(!is_ready(&Node::default()));
    }

    #[test]
    fn each_pending_step_points_at_the_log_that_explains_it() {
        assert_eq!(Pending::Etcd.culprit(), "etcd");
        assert_eq!(
            Pending::DefaultServiceAccount.culprit(),
            "kube-controller-manager"
        );
        assert_eq!(
            Pending::Nodes {
                ready: 1,
                wanted: 3
            }
            .culprit(),
            "agent"
        );
        assert_eq!(
            Pending::Nodes {
                ready: 1,
                wanted: 3
            }
            .to_string(),
            "1 of 3 nodes are Ready"
        );
    }
}
