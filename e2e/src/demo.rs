//! `portico-testbed demo`: the whole job on the embedded default. A local cluster, the local
//! cloud and the operator (detached, recorded with the cluster so `down` stops them too), an
//! echo Deployment and a Service of type LoadBalancer whose EXTERNAL-IP is printed and called.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

use crate::agent::ECHO_IMAGE;
use crate::cli::{self, Cli};
use crate::portico::{self, LOCAL_CLOUD, OPERATOR, PorticoConfig};
use crate::process::Supervision;
use crate::state::{ClusterRecord, StateLayout};
use crate::testkit::echo_via;

const NAMESPACE: &str = "default";
const APP: &str = "echo";

pub async fn run(layout: &StateLayout) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let up = Cli::try_parse_from([
        "portico-testbed".as_ref(),
        "up".as_ref(),
        "--state-dir".as_ref(),
        layout.root().as_os_str(),
    ])?;
    if cli::run(up).await? != ExitCode::SUCCESS {
        anyhow::bail!("the cluster did not come up");
    }
    let mut record = ClusterRecord::load(&layout.cluster_record())?
        .context("the cluster record vanished after `up`")?;
    let config = PorticoConfig::new(
        record.plan(),
        record.kubeconfig.clone(),
        layout.root().join("portico"),
    );
    ensure_running(&mut record, layout, &config, LOCAL_CLOUD).await?;
    ensure_running(&mut record, layout, &config, OPERATOR).await?;

    let client = kube_client(&record).await?;
    apply_demo(&client).await?;
    println!("waiting for the EXTERNAL-IP of service/{APP} …");
    let ip = wait_for_external_ip(&client).await?;
    let target = SocketAddr::from((ip, 80));
    let mut pods = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pods.len() < 3 && Instant::now() < deadline {
        match echo_via(target, None).await {
            Ok(echo) => {
                if pods.insert(echo.pod.clone()) {
                    println!(
                        "  http://{target}/ answered from pod {} on {}",
                        echo.pod, echo.node
                    );
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    anyhow::ensure!(!pods.is_empty(), "{target} did not answer within a minute");
    println!(
        "\nservice/{APP} has EXTERNAL-IP {ip} (ready in {:.1}s)",
        started.elapsed().as_secs_f64()
    );
    println!("try:   curl http://{ip}/");
    println!("       export KUBECONFIG={}", record.kubeconfig.display());
    println!("       kubectl get services,nodes,pods -o wide");
    println!("stop:  target/debug/portico-testbed down");
    Ok(ExitCode::SUCCESS)
}

/// Starts `name` detached unless it already runs, and records it with the cluster.
async fn ensure_running(
    record: &mut ClusterRecord,
    layout: &StateLayout,
    config: &PorticoConfig,
    name: &str,
) -> anyhow::Result<()> {
    if record
        .processes
        .iter()
        .any(|p| p.name == name && p.is_running())
    {
        return Ok(());
    }
    let (spec, probe, path) = match name {
        LOCAL_CLOUD => (
            config.local_cloud_spec()?,
            config.plan.local_cloud_api(),
            "/healthz",
        ),
        _ => (
            config.operator_spec()?,
            config.plan.operator_metrics(),
            "/readyz",
        ),
    };
    let child =
        portico::start_and_wait(&spec, &config.log(name), Supervision::Detached, probe, path)
            .await?;
    record.processes.retain(|p| p.name != name);
    record.processes.push(child.detach());
    record.save(&layout.cluster_record())?;
    println!("  {name}: running (log {})", config.log(name).display());
    Ok(())
}

async fn kube_client(record: &ClusterRecord) -> anyhow::Result<Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&record.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

/// Creates the demo objects; ones that already exist are left as they are.
async fn apply_demo(client: &Client) -> anyhow::Result<()> {
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": APP},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": APP}},
            "template": {
                "metadata": {"labels": {"app": APP}},
                "spec": {"containers": [{
                    "name": "echo", "image": ECHO_IMAGE,
                    "ports": [{"containerPort": 8080}],
                }]},
            },
        },
    }))?;
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": APP},
        "spec": {
            "type": "LoadBalancer",
            "selector": {"app": APP},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }))?;
    create_if_missing(Api::namespaced(client.clone(), NAMESPACE), &deployment).await?;
    create_if_missing(Api::namespaced(client.clone(), NAMESPACE), &service).await
}

async fn create_if_missing<K>(api: Api<K>, object: &K) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn wait_for_external_ip(client: &Client) -> anyhow::Result<std::net::Ipv4Addr> {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let svc = services.get(APP).await?;
        let ip = svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .and_then(|i| i.into_iter().find_map(|i| i.ip))
            .and_then(|ip| ip.parse().ok());
        if let Some(ip) = ip {
            return Ok(ip);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no EXTERNAL-IP within a minute; see the operator log"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
