//! The operator with the AWS provider, installed with the chart (a ProviderConfig for aws
//! pointed at moto on loopback): a Service of type LoadBalancer gets the DNS name moto reports
//! for its network load balancer, and deleting the Service deletes the load balancer.

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use portico_aws::moto::Moto;
use portico_e2e::agent::ECHO_IMAGE;
use portico_e2e::testkit::{NS, cluster_with_portico, create, deployment, eventually, service};
use portico_provider::LoadBalancerName;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_service_on_the_aws_provider_carries_the_hostname_moto_reports_until_it_is_deleted() {
    let moto = Moto::start().await;
    let (vpc, subnets) = moto.default_network().await;
    let endpoint = moto.url();
    let (_testbed, portico, client) = cluster_with_portico(|config| {
        config.values = json!({"providerConfig": {
            "provider": "aws",
            "aws": {"region": "us-east-1", "subnets": subnets, "vpcId": vpc,
                    "endpointUrl": endpoint, "tags": {"team": "edge"}},
        }});
    })
    .await;
    create(&client, &deployment("web", 2, ECHO_IMAGE, &[(8080, "TCP")])).await;
    let svc = create(
        &client,
        &service("web", "web", json!({"type": "LoadBalancer"})),
    )
    .await;
    let name = LoadBalancerName::for_object_uid(&svc.uid().unwrap());

    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let hostname = eventually("the Service carries a hostname", || async {
        let svc = services.get("web").await.ok()?;
        svc.status?
            .load_balancer?
            .ingress?
            .first()?
            .hostname
            .clone()
    })
    .await;
    let elb = moto.client();
    let described = elb
        .describe_load_balancers()
        .names(name.as_str())
        .send()
        .await
        .expect("moto holds the load balancer");
    let lb = &described.load_balancers()[0];
    assert_eq!(
        Some(hostname.as_str()),
        lb.dns_name(),
        "status carries moto's DNS name"
    );
    assert_eq!(lb.r#type().map(|t| t.as_str()), Some("network"));
    let listeners = elb
        .describe_listeners()
        .load_balancer_arn(lb.load_balancer_arn().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        listeners
            .listeners()
            .iter()
            .map(|l| l.port())
            .collect::<Vec<_>>(),
        [Some(80)]
    );

    services
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the Service is gone once its load balancer is", || async {
        services.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;
    let gone = elb
        .describe_load_balancers()
        .names(name.as_str())
        .send()
        .await;
    assert!(gone.is_err(), "moto no longer has it: {gone:?}");
    assert!(
        !portico.operator_log().contains("forbidden"),
        "{}",
        portico.operator_log()
    );
}
