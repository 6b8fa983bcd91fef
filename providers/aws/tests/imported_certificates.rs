//! TLS Secrets on ALBs, against moto's ELBv2 and ACM: a Secret's certificate is imported
//! into ACM once and served, a rotation re-imports onto the same ARN (the listener never
//! changes), and a certificate the Ingress no longer names, or whose Ingress is deleted, is
//! deleted from ACM.

use aws_sdk_acm::Client as Acm;
use portico_aws::moto::Moto;
use portico_aws::{AwsProvider, AwsSettings};
use portico_provider::routing::{HostMatch, HostRoutes, PathMatch, PathRoute, RouteTable};
use portico_provider::*;

fn secret(host: &str) -> Certificate {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec![host.to_string()]).unwrap();
    Certificate {
        name: "default/shop-tls".into(),
        hosts: vec![host.into()],
        source: CertificateSource::Pem {
            chain: cert.pem(),
            key: signing_key.serialize_pem(),
        },
    }
}

fn shop(certificates: Vec<Certificate>) -> LoadBalancerSpec {
    let uid = "7a1b-shop";
    LoadBalancerSpec {
        name: LoadBalancerName::for_object_uid(uid),
        owner: Ownership {
            cluster_id: "c1".into(),
            object_uid: uid.into(),
            object_ref: "Ingress/default/shop".into(),
        },
        requested_address: None,
        requested_address_name: None,
        source_ranges: vec![],
        frontend: Frontend::Application(ApplicationFrontend {
            http_port: 80,
            https: (!certificates.is_empty()).then_some(HttpsListener {
                port: 443,
                certificates,
                min_tls_version: TlsVersion::Tls12,
            }),
            redirect_to_https: false,
            routes: RouteTable {
                hosts: vec![HostRoutes {
                    host: HostMatch::parse(Some("shop.example.com")),
                    paths: vec![PathRoute {
                        path: PathMatch::prefix("/"),
                        backend: "shop-80".into(),
                    }],
                }],
                default_backend: None,
            },
            backends: vec![Backend {
                name: "shop-80".into(),
                pool: TargetPool {
                    targets: vec![Target {
                        node: "node-1".into(),
                        address: "10.0.1.1".parse().unwrap(),
                        port: 30080,
                        provider_id: None,
                    }],
                    health_check: HealthCheck::with_probe(Probe::Http {
                        port: 30080,
                        path: "/".into(),
                    }),
                    affinity: SessionAffinity::None,
                    proxy_protocol: false,
                    preserve_client_ip: false,
                    drain_timeout: None,
                },
                timeouts: None,
            }],
            timeouts: HttpTimeouts::default(),
        }),
    }
}

async fn imported(acm: &Acm) -> Vec<String> {
    let out = acm.list_certificates().send().await.unwrap();
    let mut arns: Vec<String> = out
        .certificate_summary_list()
        .iter()
        .filter_map(|s| s.certificate_arn().map(String::from))
        .collect();
    arns.sort();
    arns
}

async fn served(moto: &Moto, spec: &LoadBalancerSpec) -> Vec<String> {
    let elb = moto.client();
    let lb = elb
        .describe_load_balancers()
        .names(spec.name.as_str())
        .send()
        .await
        .unwrap();
    let listeners = elb
        .describe_listeners()
        .load_balancer_arn(lb.load_balancers()[0].load_balancer_arn().unwrap())
        .send()
        .await
        .unwrap();
    listeners
        .listeners()
        .iter()
        .flat_map(|l| l.certificates())
        .filter_map(|c| c.certificate_arn().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_secret_is_imported_once_rotated_in_place_and_deleted_when_no_longer_named() {
    let moto = Moto::start().await;
    let (vpc, subnets) = moto.default_network().await;
    let acm = moto.acm_client();
    let aws = AwsProvider::new(
        moto.client(),
        AwsSettings {
            subnets,
            vpc_id: Some(vpc),
            ..AwsSettings::default()
        },
    )
    .with_acm(moto.acm_client());

    let spec = shop(vec![secret("shop.example.com")]);
    let status = aws.ensure(&spec).await.unwrap();
    assert_eq!(
        status.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
        [80, 443]
    );
    let first = imported(&acm).await;
    assert_eq!(first.len(), 1, "the Secret is imported");
    assert_eq!(served(&moto, &spec).await, first, "and served");
    let tags = acm
        .list_tags_for_certificate()
        .certificate_arn(&first[0])
        .send()
        .await
        .unwrap();
    let tag = |k: &str| {
        tags.tags()
            .iter()
            .find(|t| t.key() == k)
            .and_then(|t| t.value())
            .map(String::from)
    };
    assert_eq!(
        tag("portico.dev/certificate").as_deref(),
        Some("default/shop-tls")
    );
    assert_eq!(tag("portico.dev/object-uid").as_deref(), Some("7a1b-shop"));

    aws.ensure(&spec).await.unwrap();
    assert_eq!(
        imported(&acm).await,
        first,
        "the same Secret again imports nothing"
    );

    // Rotation: new material for the same Secret lands on the same ARN.
    let rotated = shop(vec![secret("shop.example.com")]);
    aws.ensure(&rotated).await.unwrap();
    assert_eq!(imported(&acm).await, first, "re-imported in place");
    assert_eq!(
        served(&moto, &rotated).await,
        first,
        "the listener is untouched"
    );
    let tags = acm
        .list_tags_for_certificate()
        .certificate_arn(&first[0])
        .send()
        .await
        .unwrap();
    let prints: Vec<&str> = tags
        .tags()
        .iter()
        .filter(|t| t.key() == "portico.dev/fingerprint")
        .filter_map(|t| t.value())
        .collect();
    assert_eq!(prints.len(), 1);
    assert_ne!(Some(prints[0].to_string()), tag("portico.dev/fingerprint"));

    // TLS dropped: the import goes once the listener no longer serves it.
    aws.ensure(&shop(vec![])).await.unwrap();
    assert_eq!(imported(&acm).await, Vec::<String>::new());

    // And deleting the Ingress deletes its imports.
    aws.ensure(&spec).await.unwrap();
    assert_eq!(imported(&acm).await.len(), 1);
    aws.delete(&spec.name, &spec.owner).await.unwrap();
    assert_eq!(imported(&acm).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_import_whose_reconcile_was_killed_before_serving_it_is_found_not_duplicated() {
    let moto = Moto::start().await;
    let (vpc, subnets) = moto.default_network().await;
    let acm = moto.acm_client();
    let settings = AwsSettings {
        subnets,
        vpc_id: Some(vpc),
        ..AwsSettings::default()
    };
    let spec = shop(vec![secret("shop.example.com")]);
    // Killed right after importing and tagging (ACM calls go through; ELB changes stop once
    // the load balancer exists).
    let killed =
        AwsProvider::new(moto.client_killed_after(1), settings.clone()).with_acm(moto.acm_client());
    assert!(killed.ensure(&spec).await.is_err());
    assert_eq!(imported(&acm).await.len(), 1);

    let aws = AwsProvider::new(moto.client(), settings).with_acm(moto.acm_client());
    aws.ensure(&spec).await.unwrap();
    let arns = imported(&acm).await;
    assert_eq!(
        arns.len(),
        1,
        "the earlier import is found by its tags and reused"
    );
    assert_eq!(served(&moto, &spec).await, arns);
}
