//! BackendPolicies and FrontendPolicies on a live cluster: they change running load balancers,
//! deleting them restores the defaults, and their status says whether they are in force.

use std::net::IpAddr;

use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, Resource};
use portico_crds::{BackendPolicy, FrontendPolicy};
use portico_e2e::testkit::{
    NS, cluster_with_portico, create, echo_via, eventually, load_balancer_answering, service,
};
use serde::de::DeserializeOwned;
use serde_json::json;

async fn apply<K>(client: &Client, body: serde_json::Value) -> K
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    let object: K = serde_json::from_value(body).expect("a valid policy");
    Api::<K>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &object)
        .await
        .expect("the API server takes the policy")
}

fn backend_policy(name: &str, service: &str, spec: serde_json::Value) -> serde_json::Value {
    let mut spec = spec;
    spec["targetRef"] = json!({"kind": "Service", "name": service});
    json!({
        "apiVersion": "portico.dev/v1alpha1",
        "kind": "BackendPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    })
}

/// `(status, reason, message)` of a BackendPolicy's Accepted condition.
async fn backend_accepted(client: &Client, name: &str) -> Option<(String, String, String)> {
    let policy = Api::<BackendPolicy>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .ok()?;
    let c = policy
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Accepted")?;
    Some((format!("{:?}", c.status), c.reason, c.message))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_policy_retunes_a_live_load_balancer_and_deleting_it_restores_the_default() {
    let (_testbed, _portico, client) = cluster_with_portico(|_| {}).await;
    let target = load_balancer_answering(&client, "web").await;

    // A probe on a path kube-proxy does not serve: every node fails it, so the load balancer
    // stops sending traffic anywhere.
    apply::<BackendPolicy>(
        &client,
        backend_policy(
            "strict-probe",
            "web",
            json!({"healthCheck": {"protocol": "HTTP", "path": "/not-served",
                                   "intervalSeconds": 1, "unhealthyThreshold": 1}}),
        ),
    )
    .await;
    eventually("the policy's probe takes every node out", || async {
        echo_via(target, None).await.is_err().then_some(())
    })
    .await;
    let (status, reason, _) = eventually("the policy reports it is in force", || {
        backend_accepted(&client, "strict-probe")
    })
    .await;
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Accepted"));

    Api::<BackendPolicy>::namespaced(client.clone(), NS)
        .delete("strict-probe", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the default probe serves again", || async {
        echo_via(target, None).await.ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_naming_a_missing_service_or_arriving_second_says_so() {
    let (_testbed, _portico, client) = cluster_with_portico(|_| {}).await;
    apply::<BackendPolicy>(
        &client,
        backend_policy("early", "later", json!({"proxyProtocol": false})),
    )
    .await;
    let (status, _, message) = eventually("the missing target is reported", || async {
        backend_accepted(&client, "early")
            .await
            .filter(|(_, reason, _)| reason == "TargetNotFound")
    })
    .await;
    assert_eq!(status, "False");
    assert!(message.contains("later"), "{message}");

    create(
        &client,
        &service("later", "later", json!({"type": "ClusterIP"})),
    )
    .await;
    eventually("the target's arrival is noticed", || async {
        backend_accepted(&client, "early")
            .await
            .filter(|(status, _, _)| status == "True")
    })
    .await;

    apply::<BackendPolicy>(
        &client,
        backend_policy("second", "later", json!({"proxyProtocol": true})),
    )
    .await;
    let (status, _, message) = eventually("the younger policy reports the conflict", || async {
        backend_accepted(&client, "second")
            .await
            .filter(|(_, reason, _)| reason == "Conflicted")
    })
    .await;
    assert_eq!(status, "False");
    assert!(message.contains("early"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frontend_policy_admits_only_its_source_ranges_until_it_is_deleted() {
    let (testbed, _portico, client) = cluster_with_portico(|_| {}).await;
    let target = load_balancer_answering(&client, "guarded").await;
    let (inside, outside) = (testbed.plan().client_ip(1), testbed.plan().client_ip(2));

    apply::<FrontendPolicy>(
        &client,
        json!({
            "apiVersion": "portico.dev/v1alpha1",
            "kind": "FrontendPolicy",
            "metadata": {"name": "office-only", "namespace": NS},
            "spec": {
                "targetRef": {"kind": "Service", "name": "guarded"},
                "sourceRanges": [format!("{inside}/32")]
            }
        }),
    )
    .await;
    eventually("clients outside the range are refused", || async {
        echo_via(target, Some(IpAddr::V4(outside)))
            .await
            .is_err()
            .then_some(())
    })
    .await;
    echo_via(target, Some(IpAddr::V4(inside)))
        .await
        .expect("a client inside the range is served");

    Api::<FrontendPolicy>::namespaced(client.clone(), NS)
        .delete("office-only", &DeleteParams::default())
        .await
        .unwrap();
    eventually("everyone is served again", || async {
        echo_via(target, Some(IpAddr::V4(outside))).await.ok()
    })
    .await;
}
