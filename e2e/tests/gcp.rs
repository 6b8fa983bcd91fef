//! The operator with the GCP provider, installed with the chart (a ProviderConfig for gcp
//! pointed at the fake Compute Engine API on loopback), on nodes with GCE provider IDs: a
//! Service of type LoadBalancer gets the IP of the address reserved for it, its nodes are
//! the target pool's instances; an Ingress to it gets the IP of its Application load
//! balancer's global address; deleting either deletes every resource it had.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use portico_e2e::agent::ECHO_IMAGE;
use portico_e2e::testbed::TestbedOptions;
use portico_e2e::testkit::{NS, cluster_with_portico_on, create, deployment, eventually, service};
use portico_gcp::fake::FakeCompute;
use portico_provider::LoadBalancerName;
use serde_json::json;

const PROJECT: &str = "shop-prod";
const REGION: &str = "europe-west1";

#[tokio::test(flavor = "multi_thread")]
async fn services_and_ingresses_on_the_gcp_provider_get_their_reserved_ips_until_deleted() {
    let fake = FakeCompute::start(2).await;
    let endpoint = fake.url();
    // What the GCE cloud controller would have set on each node.
    let nodes = TestbedOptions {
        provider_id_prefix: Some(format!("gce://{PROJECT}/europe-west1-b/")),
        ..TestbedOptions::default()
    };
    let (_testbed, portico, client) = cluster_with_portico_on(nodes, |config| {
        config.values = json!({"providerConfig": {
            "provider": "gcp",
            "gcp": {"project": PROJECT, "region": REGION, "endpointUrl": endpoint,
                    "nodeTags": ["shop-nodes"]},
        }});
    })
    .await;
    let instances: Vec<String> = (1..=3)
        .map(|k| {
            format!(
                "https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/europe-west1-b/instances/node-{k}"
            )
        })
        .collect();

    create(&client, &deployment("web", 2, ECHO_IMAGE, &[(8080, "TCP")])).await;
    let svc = create(
        &client,
        &service("web", "web", json!({"type": "LoadBalancer"})),
    )
    .await;
    let lb = LoadBalancerName::for_object_uid(&svc.uid().unwrap());
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let ip = eventually("the Service carries an IP", || async {
        let svc = services.get("web").await.ok()?;
        svc.status?.load_balancer?.ingress?.first()?.ip.clone()
    })
    .await;
    let address = fake
        .resource(PROJECT, &format!("regions/{REGION}/addresses"), lb.as_str())
        .expect("an address reserved for the Service");
    assert_eq!(
        address["address"],
        ip.as_str(),
        "status carries the reserved IP"
    );
    let pool = fake
        .resource(
            PROJECT,
            &format!("regions/{REGION}/targetPools"),
            lb.as_str(),
        )
        .expect("a target pool");
    let mut members: Vec<String> = pool["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect();
    members.sort();
    assert_eq!(members, instances, "every node is an instance of the pool");
    let rule = fake
        .resource(
            PROJECT,
            &format!("regions/{REGION}/forwardingRules"),
            &format!("{lb}-tcp"),
        )
        .expect("a TCP forwarding rule");
    assert_eq!(rule["ports"], json!(["80"]));

    // An Ingress to the same Service: a global address, URL map, proxy and forwarding rule.
    let shop: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "shop"},
        "spec": {
            "ingressClassName": "portico",
            "rules": [{"host": "shop.example.com", "http": {"paths": [{
                "path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "web", "port": {"number": 80}}},
            }]}}],
        },
    }))
    .unwrap();
    let shop = create(&client, &shop).await;
    let alb = LoadBalancerName::for_object_uid(&shop.uid().unwrap());
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), NS);
    let alb_ip = eventually("the Ingress carries an IP", || async {
        let ing = ingresses.get("shop").await.ok()?;
        ing.status?.load_balancer?.ingress?.first()?.ip.clone()
    })
    .await;
    let global = fake
        .resource(PROJECT, "global/addresses", alb.as_str())
        .expect("a global address reserved for the Ingress");
    assert_eq!(global["address"], alb_ip.as_str());
    let map = fake
        .resource(PROJECT, "global/urlMaps", alb.as_str())
        .expect("a URL map");
    assert_eq!(map["hostRules"][0]["hosts"], json!(["shop.example.com"]));
    let held = fake.count();
    ingresses
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the Ingress is gone once its load balancer is", || async {
        ingresses
            .get_opt("shop")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        fake.resource(PROJECT, "global/urlMaps", alb.as_str())
            .is_none()
    );
    assert!(fake.count() < held, "the Ingress's resources went");

    services
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the Service is gone once its load balancer is", || async {
        services.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(fake.count(), 0, "every resource was deleted");
    assert!(
        !portico.operator_log().contains("forbidden"),
        "{}",
        portico.operator_log()
    );
}
