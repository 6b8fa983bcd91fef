//! The same install flow on an existing kind cluster (`kind` and Docker present): the chart
//! installed with Helm, the operator on the host under the chart's ServiceAccount, the local
//! cloud on the host in front of the kind nodes' node ports. Without kind and Docker these are
//! ignored at build time (`e2e/build.rs`), so the runner lists each one as skipped.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, Resource};
use portico_e2e::kind::{AGNHOST_IMAGE, KindCluster};
use portico_e2e::testkit::{deployment, eventually, http_get_host, service};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

const NS: &str = "default";

async fn create<K>(client: &Client, object: &K)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    K: Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), object)
        .await
        .unwrap();
}

/// Deletes what a test made: the kind cluster outlives the test.
async fn remove<K>(client: &Client, name: &str)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    let _ = Api::<K>::namespaced(client.clone(), NS)
        .delete(name, &DeleteParams::default())
        .await;
}

/// agnhost `netexec` pods `app: <name>` behind a Service of `kind` on port 80.
async fn netexec(client: &Client, name: &str, replicas: i32, kind: &str) {
    let mut pods = deployment(name, replicas, AGNHOST_IMAGE, &[(8080, "TCP")]);
    let template = pods.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    template.containers[0].args = Some(vec!["netexec".into(), "--http-port=8080".into()]);
    create(client, &pods).await;
    create(client, &service(name, name, json!({"type": kind}))).await;
}

async fn remove_netexec(client: &Client, name: &str) {
    remove::<Service>(client, name).await;
    remove::<Deployment>(client, name).await;
}

fn service_ip(svc: &Service) -> Option<Ipv4Addr> {
    let ingress = svc
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?;
    ingress.iter().find_map(|i| i.ip.as_ref()?.parse().ok())
}

fn ingress_ip(ing: &Ingress) -> Option<Ipv4Addr> {
    let ingress = ing
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?;
    ingress.iter().find_map(|i| i.ip.as_ref()?.parse().ok())
}

/// `GET /hostname` on `target` with `Host: host`: the pod name of a 200.
async fn hostname(target: SocketAddr, host: &str) -> Option<String> {
    let (status, body) = http_get_host(target, None, host, "/hostname").await.ok()?;
    (status == 200).then_some(body)
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(portico_kind), ignore = "needs kind and Docker")]
async fn kind_a_load_balancer_service_reaches_every_pod() {
    let cluster = KindCluster::find().expect("a kind cluster");
    let _portico = cluster.start_portico().await.expect("portico starts");
    let client = cluster.client().await.unwrap();
    netexec(&client, "kind-web", 3, "LoadBalancer").await;
    let ip = eventually("kind-web has an EXTERNAL-IP", || async {
        let svc = Api::<Service>::namespaced(client.clone(), NS)
            .get("kind-web")
            .await
            .ok()?;
        service_ip(&svc)
    })
    .await;
    let target = SocketAddr::from((ip, 80));
    let mut pods = BTreeSet::new();
    for _ in 0..200 {
        if let Some(pod) = hostname(target, "kind-web").await {
            pods.insert(pod);
        }
        if pods.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        pods.len(),
        3,
        "every pod answers through {target}: {pods:?}"
    );
    remove_netexec(&client, "kind-web").await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(not(portico_kind), ignore = "needs kind and Docker")]
async fn kind_an_ingress_routes_two_hosts_through_one_address() {
    let cluster = KindCluster::find().expect("a kind cluster");
    let _portico = cluster.start_portico().await.expect("portico starts");
    let client = cluster.client().await.unwrap();
    netexec(&client, "kind-a", 1, "NodePort").await;
    netexec(&client, "kind-b", 1, "NodePort").await;
    let rule = |host: &str, service: &str| {
        json!({
            "host": host,
            "http": {"paths": [{"path": "/", "pathType": "Prefix",
                                "backend": {"service": {"name": service, "port": {"number": 80}}}}]},
        })
    };
    let ingress: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "kind-two-hosts"},
        "spec": {"ingressClassName": "portico",
                 "rules": [rule("a.portico.test", "kind-a"), rule("b.portico.test", "kind-b")]},
    }))
    .unwrap();
    create(&client, &ingress).await;
    let ip = eventually("the Ingress has an address", || async {
        let ingress = Api::<Ingress>::namespaced(client.clone(), NS)
            .get("kind-two-hosts")
            .await
            .ok()?;
        ingress_ip(&ingress)
    })
    .await;
    let target = SocketAddr::from((ip, 80));
    let a = eventually("a.portico.test answers", || {
        hostname(target, "a.portico.test")
    })
    .await;
    let b = eventually("b.portico.test answers", || {
        hostname(target, "b.portico.test")
    })
    .await;
    assert!(
        a.starts_with("kind-a-") && b.starts_with("kind-b-"),
        "{a} / {b}"
    );
    remove::<Ingress>(&client, "kind-two-hosts").await;
    remove_netexec(&client, "kind-a").await;
    remove_netexec(&client, "kind-b").await;
}
