//! The operator with the AWS provider, installed with the chart (a ProviderConfig for aws
//! pointed at moto on loopback): a Service of type LoadBalancer gets the DNS name moto reports
//! for its network load balancer, an Ingress the one of its application load balancer (HTTPS
//! with an ACM certificate named by annotation and a TLS Secret imported into ACM), and
//! deleting either deletes its load balancer (and the import).

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use portico_aws::moto::Moto;
use portico_e2e::agent::ECHO_IMAGE;
use portico_e2e::testkit::{
    NS, TestCa, cluster_with_portico, create, deployment, eventually, service,
};
use portico_provider::LoadBalancerName;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn services_and_ingresses_on_the_aws_provider_carry_the_hostnames_moto_reports_until_deleted()
{
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

    // An Ingress to the same Service: an ALB with HTTP and HTTPS listeners, serving a
    // certificate already in ACM and one from a TLS Secret, which is imported.
    let certificate = moto.request_certificate("shop.example.com").await;
    let (chain, key) = TestCa::default().issue(&["blog.example.com"], "blog");
    let blog_tls: Secret = serde_json::from_value(json!({
        "metadata": {"name": "blog-tls"},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": chain, "tls.key": key},
    }))
    .unwrap();
    create(&client, &blog_tls).await;
    let shop: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "shop", "annotations": {"lb.portico.dev/certificates": certificate}},
        "spec": {
            "ingressClassName": "portico",
            "rules": [{"host": "shop.example.com", "http": {"paths": [{
                "path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "web", "port": {"number": 80}}},
            }]}}],
            "tls": [
                {"hosts": ["shop.example.com"]},
                {"hosts": ["blog.example.com"], "secretName": "blog-tls"},
            ],
        },
    }))
    .unwrap();
    let shop = create(&client, &shop).await;
    let alb_name = LoadBalancerName::for_object_uid(&shop.uid().unwrap());
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), NS);
    let alb_hostname = eventually("the Ingress carries a hostname", || async {
        let ing = ingresses.get("shop").await.ok()?;
        ing.status?
            .load_balancer?
            .ingress?
            .first()?
            .hostname
            .clone()
    })
    .await;
    let described = elb
        .describe_load_balancers()
        .names(alb_name.as_str())
        .send()
        .await
        .expect("moto holds the Ingress's load balancer");
    let alb = &described.load_balancers()[0];
    assert_eq!(Some(alb_hostname.as_str()), alb.dns_name());
    assert_eq!(alb.r#type().map(|t| t.as_str()), Some("application"));
    let listeners = elb
        .describe_listeners()
        .load_balancer_arn(alb.load_balancer_arn().unwrap())
        .send()
        .await
        .unwrap();
    let mut served: Vec<(Option<i32>, Option<&str>)> = listeners
        .listeners()
        .iter()
        .map(|l| (l.port(), l.protocol().map(|p| p.as_str())))
        .collect();
    served.sort();
    assert_eq!(
        served,
        [(Some(80), Some("HTTP")), (Some(443), Some("HTTPS"))]
    );
    let acm = moto.acm_client();
    let in_acm = || async {
        let out = acm.list_certificates().send().await.unwrap();
        let mut arns: Vec<String> = out
            .certificate_summary_list()
            .iter()
            .filter_map(|c| c.certificate_arn().map(String::from))
            .collect();
        arns.sort();
        arns
    };
    assert_eq!(
        in_acm().await.len(),
        2,
        "the Secret was imported next to the requested one"
    );
    let https = listeners
        .listeners()
        .iter()
        .find(|l| l.port() == Some(443))
        .unwrap();
    let on_listener = elb
        .describe_listener_certificates()
        .listener_arn(https.listener_arn().unwrap())
        .send()
        .await
        .unwrap();
    let mut on_listener: Vec<String> = on_listener
        .certificates()
        .iter()
        .filter_map(|c| c.certificate_arn().map(String::from))
        .collect();
    on_listener.sort();
    assert_eq!(on_listener, in_acm().await, "both are served");
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
        elb.describe_load_balancers()
            .names(alb_name.as_str())
            .send()
            .await
            .is_err(),
        "moto no longer has the ALB"
    );
    assert_eq!(
        in_acm().await,
        std::slice::from_ref(&certificate),
        "the import went with the Ingress; the user's certificate stays"
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
