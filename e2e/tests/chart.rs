//! The Helm chart, installed with a real Helm: it lints and renders for every cloud, refuses
//! values no cloud can work with, installs and upgrades cleanly, and its RBAC is both enough
//! (every e2e test runs the operator under it) and no more than the operator uses.

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::networking::v1::IngressClass;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use portico_crds::ProviderConfig;
use portico_e2e::chart::{self, Helm};
use portico_e2e::portico::http_status;
use portico_e2e::process;
use portico_e2e::testkit::{
    NS, cluster_with_portico, echo_via, eventually, load_balancer_answering,
};
use serde_json::{Value, json};

/// Helm without a cluster (lint and template need none).
fn offline_helm() -> (Helm, tempfile::TempDir) {
    let home = tempfile::tempdir().unwrap();
    let helm = Helm::new(&home.path().join("no-kubeconfig"), home.path())
        .expect("helm is installed (e2e/scripts/install-helm.sh)");
    (helm, home)
}

/// `helm <verb> <chart> --set <each of set>`.
async fn helm_on_chart(helm: &Helm, verb: &str, set: &[&str]) -> anyhow::Result<String> {
    let mut args = vec![verb.to_string()];
    if verb == "template" {
        args.push("portico".into());
    }
    args.push(chart::chart_dir().display().to_string());
    if verb == "lint" {
        args.push("--strict".into());
    }
    for s in set {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    helm.run(args).await
}

const LOCAL: &[&str] = &["providerConfig.local.apiAddress=127.0.0.1:8900"];
const AWS: &[&str] = &[
    "providerConfig.provider=aws",
    "providerConfig.aws.region=eu-west-1",
    "providerConfig.aws.subnets={subnet-0a1b,subnet-2c3d}",
];
const GCP: &[&str] = &[
    "providerConfig.provider=gcp",
    "providerConfig.gcp.project=my-project-1",
    "providerConfig.gcp.region=europe-west1",
];

#[tokio::test]
async fn the_chart_lints_strictly_for_every_cloud() {
    let (helm, _home) = offline_helm();
    for values in [LOCAL, AWS, GCP] {
        helm_on_chart(&helm, "lint", values)
            .await
            .unwrap_or_else(|e| panic!("lint with {values:?}: {e}"));
    }
}

#[tokio::test]
async fn the_rendered_provider_config_names_the_chosen_cloud_only() {
    let (helm, _home) = offline_helm();
    let rendered = helm_on_chart(&helm, "template", AWS).await.unwrap();
    let config: ProviderConfig = documents(&rendered)
        .into_iter()
        .find(|d| d["kind"] == "ProviderConfig")
        .map(|d| serde_json::from_value(d).expect("a ProviderConfig the CRD types read"))
        .expect("a ProviderConfig is rendered");
    let aws = config.spec.aws.expect("the aws section");
    assert_eq!(aws.region, "eu-west-1");
    assert_eq!(aws.subnets, ["subnet-0a1b", "subnet-2c3d"]);
    assert!(config.spec.local.is_none() && config.spec.gcp.is_none());
    assert!(config.spec.default);
}

#[tokio::test]
async fn values_no_cloud_can_work_with_are_refused_before_anything_is_applied() {
    let (helm, _home) = offline_helm();
    let refused = [
        (&["providerConfig.provider=azure"][..], "provider"),
        (&["providerConfig.provider=local"][..], "apiAddress"),
        (
            &[
                "providerConfig.provider=aws",
                "providerConfig.aws.region=eu-west-1",
            ][..],
            "subnets",
        ),
        (&["providerConfig.provider=gcp"][..], "project"),
        (&[LOCAL[0], "replicaCount=-1"][..], "replicaCount"),
    ];
    for (set, names) in refused {
        let error = helm_on_chart(&helm, "template", set)
            .await
            .expect_err(&format!("{set:?} must be refused"));
        assert!(
            error.to_string().contains(names),
            "{set:?}: the refusal names {names}: {error}"
        );
    }
}

/// The YAML documents of `helm template`'s output, as JSON values.
fn documents(rendered: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(rendered)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

/// The Accepted condition's status of ProviderConfig `name`.
async fn accepted(client: &Client, name: &str) -> Option<String> {
    let config = Api::<ProviderConfig>::all(client.clone())
        .get(name)
        .await
        .ok()?;
    config
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Accepted")
        .map(|c| format!("{:?}", c.status))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_installed_chart_serves_a_load_balancer_service_with_its_own_provider_config() {
    // The chart's ProviderConfig sets the part of the local cloud's pool its addresses come
    // from, so the address shows the configuration took effect.
    let (testbed, portico, client) = cluster_with_portico(|config| {
        let (first, _) = config.plan.load_balancer_pool();
        let [a, b, c, _] = first.octets();
        config.values = json!({"providerConfig": {"local": {
            "addressPool": format!("{a}.{b}.{c}.200-{a}.{b}.{c}.209")}}});
    })
    .await;
    let release = portico.config().release.clone();

    let status = eventually("the chart's ProviderConfig is accepted", || {
        accepted(&client, "default")
    })
    .await;
    assert_eq!(status, "True");
    let class = Api::<IngressClass>::all(client.clone())
        .get("portico")
        .await
        .expect("the chart's IngressClass");
    let spec = class.spec.unwrap();
    assert_eq!(
        spec.controller.as_deref(),
        Some("portico.dev/ingress-controller")
    );
    assert_eq!(spec.parameters.unwrap().name, "default");
    let deployment = Api::<Deployment>::namespaced(client.clone(), &release.namespace)
        .get(&release.fullname())
        .await
        .expect("the chart's Deployment");
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some(release.service_account().as_str())
    );

    let target = load_balancer_answering(&client, "first").await;
    let [a, b, c, d] = match target.ip() {
        std::net::IpAddr::V4(ip) => ip.octets(),
        other => panic!("{other} is not IPv4"),
    };
    let (first, _) = testbed.plan().load_balancer_pool();
    assert_eq!([a, b, c], first.octets()[..3]);
    assert!(
        (200..=209).contains(&d),
        "{target} comes from the configuration's addressPool"
    );
    echo_via(target, None)
        .await
        .expect("the first Service of type LoadBalancer answers");
    assert!(
        !portico.operator_log().contains("forbidden"),
        "the operator was refused something it needs:\n{}",
        portico.operator_log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operators_account_is_refused_what_the_operator_does_not_use() {
    let (testbed, portico, admin) = cluster_with_portico(|_| {}).await;
    let release = portico.config().release.clone();
    let token = chart::service_account_token(&admin, &release, Duration::from_secs(600))
        .await
        .unwrap();
    let operator = testbed.client_with_token(&token).await;

    let refused = |what: &str, result: Result<(), kube::Error>| match result {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    };
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "intruder"},
        "spec": {"containers": [{"name": "c", "image": "portico.dev/echo:1"}]},
    }))
    .unwrap();
    refused(
        "create a Pod",
        Api::<Pod>::namespaced(operator.clone(), NS)
            .create(&PostParams::default(), &pod)
            .await
            .map(drop),
    );
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "planted"},
        "stringData": {"k": "v"},
    }))
    .unwrap();
    let secrets = Api::<Secret>::namespaced(operator.clone(), NS);
    refused(
        "create a Secret",
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .map(drop),
    );
    Api::<Secret>::namespaced(admin.clone(), NS)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    refused(
        "patch a Secret",
        secrets
            .patch(
                "planted",
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": {"k": "w"}})),
            )
            .await
            .map(drop),
    );
    refused(
        "delete a Secret",
        secrets
            .delete("planted", &DeleteParams::default())
            .await
            .map(drop),
    );
    let deployments = Api::<Deployment>::namespaced(operator.clone(), &release.namespace);
    refused(
        "list Deployments",
        deployments.list(&ListParams::default()).await.map(drop),
    );
    refused(
        "scale its own Deployment",
        deployments
            .patch(
                &release.fullname(),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 5}})),
            )
            .await
            .map(drop),
    );
    refused(
        "delete a Service",
        Api::<Service>::namespaced(operator.clone(), "default")
            .delete("any", &DeleteParams::default())
            .await
            .map(drop),
    );
    refused(
        "widen its own ClusterRole",
        Api::<ClusterRole>::all(operator.clone())
            .patch(
                &release.fullname(),
                &PatchParams::default(),
                &Patch::Merge(json!({"rules": []})),
            )
            .await
            .map(drop),
    );

    // What it does use, it may: reading Secrets (TLS) is allowed, writing them is not.
    secrets
        .get("planted")
        .await
        .expect("the operator reads TLS Secrets");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_upgrades_in_place_and_uninstalls_without_taking_the_crds() {
    let (_testbed, portico, client) = cluster_with_portico(|_| {}).await;
    let config = portico.config().clone();
    let target = load_balancer_answering(&client, "steady").await;

    // An upgrade that makes the class the default and gives the configuration a class.
    let mut values = config.chart_values();
    chart::merge(
        &mut values,
        &json!({"ingressClass": {"default": true},
                "providerConfig": {"loadBalancerClass": "portico.dev/local"}}),
    );
    let helm = config.helm().unwrap();
    helm.upgrade(&config.release, &values)
        .await
        .expect("helm upgrade succeeds");
    let class = Api::<IngressClass>::all(client.clone())
        .get("portico")
        .await
        .unwrap();
    assert_eq!(
        class
            .annotations()
            .get("ingressclass.kubernetes.io/is-default-class")
            .map(String::as_str),
        Some("true")
    );
    let provider_config = Api::<ProviderConfig>::all(client.clone())
        .get("default")
        .await
        .unwrap();
    assert_eq!(
        provider_config.spec.load_balancer_class.as_deref(),
        Some("portico.dev/local")
    );
    for _ in 0..20 {
        echo_via(target, None)
            .await
            .expect("the load balancer serves through the upgrade");
    }
    let status = helm
        .run([
            "status",
            &config.release.name,
            "-n",
            &config.release.namespace,
            "-o",
            "json",
        ])
        .await
        .unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["version"], 2, "the upgrade is revision 2");
    assert_eq!(status["info"]["status"], "deployed");

    // The load balancer goes with its Service; then the release goes, and the CRDs stay
    // (Helm never deletes crds/, so users' policies survive an uninstall).
    Api::<Service>::namespaced(client.clone(), NS)
        .delete("steady", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the Service is gone with its load balancer", || async {
        Api::<Service>::namespaced(client.clone(), NS)
            .get_opt("steady")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    helm.uninstall(&config.release)
        .await
        .expect("helm uninstall succeeds");
    eventually("the release's ClusterRole is gone", || async {
        Api::<ClusterRole>::all(client.clone())
            .get_opt(&config.release.fullname())
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for name in [
        "providerconfigs.portico.dev",
        "backendpolicies.portico.dev",
        "frontendpolicies.portico.dev",
    ] {
        assert!(
            crds.get_opt(name).await.unwrap().is_some(),
            "{name} survives the uninstall"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_under_the_charts_account_elect_one_leader_and_the_standby_takes_over() {
    let (_testbed, mut portico, client) = cluster_with_portico(|_| {}).await;
    let config = portico.config().clone();
    let standby_metrics = SocketAddr::new(config.plan.operator_metrics().ip(), 8081);
    let spec = config.replica_spec(standby_metrics.port()).unwrap();
    let mut standby = process::spawn(
        &spec,
        &config.log(&spec.name),
        process::Supervision::Owned,
        None,
    )
    .unwrap();
    eventually("the standby serves its health endpoint", || async {
        (http_status(standby_metrics, "/healthz").await == Some(200)).then_some(())
    })
    .await;
    // The first replica holds the Lease: the standby stays unready, doing nothing.
    for _ in 0..10 {
        assert_eq!(
            http_status(standby_metrics, "/readyz").await,
            Some(503),
            "the standby must not lead while the leader holds the Lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lease = Api::<Lease>::namespaced(client.clone(), &config.release.namespace);
    let holder = |lease: Lease| lease.spec?.holder_identity;
    let first = holder(lease.get("portico-operator").await.unwrap()).expect("a holder");

    // The leader stops as a pod does; the standby takes the Lease and serves.
    portico.stop_operator().await.unwrap();
    eventually("the standby becomes the leader", || async {
        (http_status(standby_metrics, "/readyz").await == Some(200)).then_some(())
    })
    .await;
    let second = holder(lease.get("portico-operator").await.unwrap()).expect("a holder");
    assert_ne!(first, second, "the Lease changed hands");
    load_balancer_answering(&client, "after-failover").await;
    assert!(
        !process::log_tail(&config.log(&spec.name), 200).contains("forbidden"),
        "the standby was refused something it needs"
    );
    standby.kill_and_wait();
}
