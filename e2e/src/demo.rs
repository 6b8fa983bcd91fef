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
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

use crate::agent::ECHO_IMAGE;
use crate::agent::echo::HttpEcho;
use crate::cli::{self, Cli};
use crate::portico::{self, LOCAL_CLOUD, OPERATOR, PorticoConfig};
use crate::process::Supervision;
use crate::state::{ClusterRecord, StateLayout};
use crate::testkit::{TestCa, echo_via, https_get};

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
    println!(
        "installing the Helm chart {} as release {}/{} …",
        crate::chart::chart_dir().display(),
        config.release.namespace,
        config.release.name
    );
    config
        .helm()?
        .apply(&config.release, &config.chart_values())
        .await?;
    config.write_operator_kubeconfig().await?;
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
    let ingress_ip = ingress_demo(&client, layout).await?;
    let ca = layout.root().join("portico").join("demo-ca.pem");
    println!("try:   curl http://{ip}/");
    println!("       curl -H 'Host: echo.portico.test' http://{ingress_ip}/");
    println!("       curl -H 'Host: api.portico.test' http://{ingress_ip}/v1/hello");
    println!(
        "       curl --cacert {} --resolve secure.portico.test:443:{ingress_ip} https://secure.portico.test/",
        ca.display()
    );
    println!("       export KUBECONFIG={}", record.kubeconfig.display());
    println!("       kubectl get services,nodes,pods -o wide");
    println!("stop:  target/debug/portico-testbed down");
    Ok(ExitCode::SUCCESS)
}

/// An Ingress with two hosts and a TLS host in front of the echo app and a second one; returns
/// its address once all three answer.
async fn ingress_demo(client: &Client, layout: &StateLayout) -> anyhow::Result<std::net::Ipv4Addr> {
    let ca_file = layout.root().join("portico").join("demo-ca.pem");
    let ca = TestCa::default();
    std::fs::write(&ca_file, ca.root_pem())?;
    let (chain, key) = ca.issue(&["secure.portico.test"], "secure.portico.test");
    let objects: [serde_json::Value; 4] = [
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "api"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "api"}},
                "template": {
                    "metadata": {"labels": {"app": "api"}},
                    "spec": {"containers": [{"name": "echo", "image": ECHO_IMAGE, "ports": [{"containerPort": 8080}]}]},
                },
            },
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "api"},
            "spec": {"type": "NodePort", "selector": {"app": "api"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }),
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "secure-tls"},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": chain, "tls.key": key},
        }),
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": "demo"},
            "spec": {
                "ingressClassName": "portico",
                "tls": [{"hosts": ["secure.portico.test"], "secretName": "secure-tls"}],
                "rules": [
                    {"host": "echo.portico.test", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": APP, "port": {"number": 80}}}}]}},
                    {"host": "api.portico.test", "http": {"paths": [{"path": "/v1", "pathType": "Prefix", "backend": {"service": {"name": "api", "port": {"number": 80}}}}]}},
                    {"host": "secure.portico.test", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": APP, "port": {"number": 80}}}}]}},
                ],
            },
        }),
    ];
    let [deployment, service, secret, ingress] = objects;
    create_if_missing(
        Api::<Deployment>::namespaced(client.clone(), NAMESPACE),
        &serde_json::from_value(deployment)?,
    )
    .await?;
    create_if_missing(
        Api::<Service>::namespaced(client.clone(), NAMESPACE),
        &serde_json::from_value(service)?,
    )
    .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    // A fresh CA each run: the Secret must match the CA file just written.
    let secret: Secret = serde_json::from_value(secret)?;
    match secrets.get_opt("secure-tls").await? {
        Some(_) => {
            secrets
                .replace("secure-tls", &PostParams::default(), &secret)
                .await?;
        }
        None => {
            secrets.create(&PostParams::default(), &secret).await?;
        }
    }
    create_if_missing(
        Api::<Ingress>::namespaced(client.clone(), NAMESPACE),
        &serde_json::from_value(ingress)?,
    )
    .await?;

    println!("waiting for the address of ingress/demo …");
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(90);
    let tls = ca.client_config();
    loop {
        let ip = ingresses
            .get("demo")
            .await?
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .and_then(|i| i.into_iter().find_map(|i| i.ip))
            .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok());
        if let Some(ip) = ip {
            let plain = |host: &'static str, path: &'static str| async move {
                let mut stream = tokio::net::TcpStream::connect((ip, 80)).await.ok()?;
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let req =
                    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
                stream.write_all(req.as_bytes()).await.ok()?;
                let mut out = String::new();
                stream.read_to_string(&mut out).await.ok()?;
                let body = out.split_once("\r\n\r\n")?.1.to_string();
                out.starts_with("HTTP/1.1 200")
                    .then(|| serde_json::from_str::<HttpEcho>(&body).ok())?
            };
            let echo = plain("echo.portico.test", "/").await;
            let api = plain("api.portico.test", "/v1/hello").await;
            let secure = https_get(
                tls.clone(),
                SocketAddr::from((ip, 443)),
                "secure.portico.test",
                "/",
            )
            .await
            .ok()
            .filter(|r| r.0 == 200)
            .and_then(|r| serde_json::from_str::<HttpEcho>(&r.1).ok());
            if let (Some(echo), Some(api), Some(secure)) = (echo, api, secure) {
                println!(
                    "  http://echo.portico.test/ via {ip} answered from pod {}",
                    echo.pod
                );
                println!(
                    "  http://api.portico.test/v1/hello via {ip} answered from pod {}",
                    api.pod
                );
                println!(
                    "  https://secure.portico.test/ via {ip} answered from pod {}",
                    secure.pod
                );
                println!("\ningress/demo has address {ip}");
                return Ok(ip);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "ingress/demo did not answer within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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
