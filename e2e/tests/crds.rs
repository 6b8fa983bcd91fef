//! Portico's CRDs at a real 1.20 API server: they install, they are structural, and the schema
//! rejects what it can express (types, enums, ranges, patterns, exactly one cloud).

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use kube::{Client, Resource};
use portico_crds::{BackendPolicy, FrontendPolicy, ProviderConfig};
use portico_e2e::{Testbed, TestbedOptions};
use serde_json::{Value, json};

async fn control_plane_with_crds() -> (Testbed, Client) {
    let testbed = Testbed::start(TestbedOptions {
        nodes: 0,
        portico_crds: false,
        ..Default::default()
    })
    .await
    .expect("testbed starts");
    let client = testbed.client().await;
    portico_e2e::crds::install(&client)
        .await
        .expect("CRDs install");
    (testbed, client)
}

fn api_for<K: Resource<DynamicType = ()>>(client: &Client, namespaced: bool) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(&K::group(&()), &K::version(&()), &K::kind(&()));
    let resource = ApiResource::from_gvk_with_plural(&gvk, &K::plural(&()));
    if namespaced {
        Api::namespaced_with(client.clone(), "default", &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    }
}

/// Creates `body` and returns the API server's verdict: `Ok` or the refusal's message.
async fn create(
    api: &Api<DynamicObject>,
    kind: &str,
    name: &str,
    spec: Value,
) -> Result<(), String> {
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "portico.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 422 => Err(status.message),
        Err(e) => panic!("{kind}/{name}: unexpected error {e}"),
    }
}

#[tokio::test]
async fn provider_configs_name_exactly_one_valid_cloud() {
    let (_testbed, client) = control_plane_with_crds().await;
    let api = api_for::<ProviderConfig>(&client, false);
    let kind = "ProviderConfig";

    assert_eq!(
        create(
            &api,
            kind,
            "local",
            json!({"default": true,
                   "local": {"apiAddress": "127.0.0.1:8900", "addressPool": "127.22.0.0/28"}})
        )
        .await,
        Ok(())
    );
    assert_eq!(
        create(
            &api,
            kind,
            "aws",
            json!({
                "loadBalancerClass": "portico.dev/aws",
                "aws": {"region": "eu-west-1", "subnets": ["subnet-0abc"], "scheme": "internal"}
            })
        )
        .await,
        Ok(())
    );

    for (name, spec) in [
        ("no-cloud", json!({"default": true})),
        (
            "two-clouds",
            json!({
                "local": {"apiAddress": "127.0.0.1:8900"},
                "gcp": {"project": "my-project", "region": "europe-west1"}
            }),
        ),
        (
            "bad-region",
            json!({"aws": {"region": "Ireland", "subnets": ["subnet-1"]}}),
        ),
        (
            "no-subnets",
            json!({"aws": {"region": "eu-west-1", "subnets": []}}),
        ),
        (
            "bad-scheme",
            json!({"aws": {"region": "eu-west-1", "subnets": ["subnet-1"], "scheme": "public"}}),
        ),
        (
            "bad-tier",
            json!({"gcp": {"project": "my-project", "region": "europe-west1", "networkTier": "GOLD"}}),
        ),
        (
            "bad-class",
            json!({"loadBalancerClass": "no-prefix", "local": {"apiAddress": "127.0.0.1:8900"}}),
        ),
        (
            "bad-address",
            json!({"local": {"apiAddress": "http://127.0.0.1"}}),
        ),
        (
            "bad-pool",
            json!({"local": {"apiAddress": "127.0.0.1:8900", "addressPool": "the first ten"}}),
        ),
    ] {
        assert!(
            create(&api, kind, name, spec.clone()).await.is_err(),
            "{name}: {spec} was accepted"
        );
    }
}

#[tokio::test]
async fn backend_policies_are_range_and_enum_checked() {
    let (_testbed, client) = control_plane_with_crds().await;
    let api = api_for::<BackendPolicy>(&client, true);
    let kind = "BackendPolicy";
    let target = json!({"kind": "Service", "name": "web"});

    assert_eq!(
        create(&api, kind, "full", json!({
            "targetRef": target,
            "healthCheck": {"protocol": "HTTP", "path": "/ready", "port": 8080, "intervalSeconds": 5,
                            "timeoutSeconds": 2, "healthyThreshold": 2, "unhealthyThreshold": 3},
            "sessionAffinity": {"type": "Cookie", "cookieName": "route", "ttlSeconds": 3600},
            "balancing": "RoundRobin",
            "timeouts": {"connectSeconds": 5, "requestSeconds": 30, "idleSeconds": 60},
            "connectionDraining": {"timeoutSeconds": 30},
            "proxyProtocol": false
        }))
        .await,
        Ok(())
    );

    for (name, spec) in [
        ("no-target", json!({"proxyProtocol": true})),
        (
            "pod-target",
            json!({"targetRef": {"kind": "Pod", "name": "web"}}),
        ),
        (
            "zero-interval",
            json!({"targetRef": target, "healthCheck": {"intervalSeconds": 0}}),
        ),
        (
            "relative-path",
            json!({"targetRef": target, "healthCheck": {"path": "healthz"}}),
        ),
        (
            "udp-probe",
            json!({"targetRef": target, "healthCheck": {"protocol": "UDP"}}),
        ),
        (
            "port-zero",
            json!({"targetRef": target, "healthCheck": {"port": 0}}),
        ),
        (
            "threshold-11",
            json!({"targetRef": target, "healthCheck": {"healthyThreshold": 11}}),
        ),
        (
            "sticky-forever",
            json!({"targetRef": target, "sessionAffinity": {"type": "ClientIP", "ttlSeconds": 604801}}),
        ),
        (
            "bad-affinity",
            json!({"targetRef": target, "sessionAffinity": {"type": "Header"}}),
        ),
        (
            "bad-cookie",
            json!({"targetRef": target, "sessionAffinity": {"type": "Cookie", "cookieName": "a b"}}),
        ),
        (
            "bad-algorithm",
            json!({"targetRef": target, "balancing": "Random"}),
        ),
        (
            "long-drain",
            json!({"targetRef": target, "connectionDraining": {"timeoutSeconds": 3601}}),
        ),
        (
            "string-timeout",
            json!({"targetRef": target, "timeouts": {"connectSeconds": "5s"}}),
        ),
    ] {
        assert!(
            create(&api, kind, name, spec.clone()).await.is_err(),
            "{name}: {spec} was accepted"
        );
    }
}

#[tokio::test]
async fn frontend_policies_check_kinds_versions_and_ranges() {
    let (_testbed, client) = control_plane_with_crds().await;
    let api = api_for::<FrontendPolicy>(&client, true);
    let kind = "FrontendPolicy";

    assert_eq!(
        create(
            &api,
            kind,
            "ingress",
            json!({
                "targetRef": {"kind": "Ingress", "name": "site"},
                "redirectToHttps": true,
                "tls": {"minVersion": "1.3"},
                "sourceRanges": ["10.0.0.0/8", "2001:db8::/32"]
            })
        )
        .await,
        Ok(())
    );
    assert_eq!(
        create(
            &api,
            kind,
            "service",
            json!({"targetRef": {"kind": "Service", "name": "db"}, "sourceRanges": ["127.0.0.0/8"]})
        )
        .await,
        Ok(())
    );

    for (name, spec) in [
        (
            "deployment",
            json!({"targetRef": {"kind": "Deployment", "name": "x"}}),
        ),
        (
            "old-tls",
            json!({"targetRef": {"kind": "Ingress", "name": "x"}, "tls": {"minVersion": "1.1"}}),
        ),
        (
            "hostname-range",
            json!({"targetRef": {"kind": "Service", "name": "x"}, "sourceRanges": ["example.com"]}),
        ),
        (
            "bare-address",
            json!({"targetRef": {"kind": "Service", "name": "x"}, "sourceRanges": ["10.0.0.1"]}),
        ),
    ] {
        assert!(
            create(&api, kind, name, spec.clone()).await.is_err(),
            "{name}: {spec} was accepted"
        );
    }
}
