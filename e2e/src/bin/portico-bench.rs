//! `portico-bench provisioning`: how fast a Service of type LoadBalancer gets its EXTERNAL-IP
//! and its first successful response, over many Services created at once, on a local cluster
//! with the operator and the local cloud as real processes.
//!
//! Build with `--release` (the operator and local cloud next to this binary are used).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use portico_e2e::agent::ECHO_IMAGE;
use portico_e2e::portico::{Portico, PorticoConfig};
use portico_e2e::testkit::{deployment, echo_via, service};
use portico_e2e::{Testbed, TestbedOptions, install_crypto_provider};
use serde_json::json;

const NS: &str = "bench";

#[derive(Parser, Debug)]
#[command(name = "portico-bench")]
enum Bench {
    /// Create N Services of type LoadBalancer at once; report time to EXTERNAL-IP and to the
    /// first successful response (p50, p99, max).
    Provisioning {
        #[arg(long, default_value_t = 100)]
        services: usize,
        /// Open the client's connections to the API server only when the creates are sent,
        /// inside the measurement (by default they are opened before the clock starts).
        #[arg(long)]
        cold_connections: bool,
        /// Stop the operator before the clock starts and time only the API server's
        /// acknowledgements: what the creates cost without Portico writing alongside them.
        #[arg(long)]
        api_only: bool,
    },
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    install_crypto_provider();
    let Bench::Provisioning {
        services,
        cold_connections,
        api_only,
    } = Bench::parse();
    provisioning(services, !cold_connections, api_only).await
}

fn ip_of(svc: &Service) -> Option<Ipv4Addr> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|i| i.ip.as_deref()?.parse().ok())
}

async fn provisioning(count: usize, warm_connections: bool, api_only: bool) -> anyhow::Result<()> {
    let testbed = Testbed::start(TestbedOptions {
        nodes: 3,
        ..Default::default()
    })
    .await?;
    let mut portico = Portico::start(PorticoConfig::new(
        testbed.plan(),
        testbed.kubeconfig_path(),
        testbed.state_dir().join("portico"),
    ))
    .await?;
    let client = testbed.client().await;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
        )
        .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let deployments = Api::namespaced(client.clone(), NS);
    deployments
        .create(
            &PostParams::default(),
            &deployment("echo", 3, ECHO_IMAGE, &[(8080, "TCP")]),
        )
        .await?;
    // One Service first, so pods run and node ports serve before the clock starts.
    let warm = lb("warm");
    services.create(&PostParams::default(), &warm).await?;
    wait_answering(&client, "warm").await?;

    let got_ip: Arc<Mutex<HashMap<String, (Instant, Ipv4Addr)>>> = Arc::default();
    // When the bench's own watch first delivers each Service: the earliest moment anyone
    // (Portico included) can learn that it exists, so "appears → EXTERNAL-IP" is the part of
    // the wait that a load-balancer controller is responsible for.
    let appeared: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = tokio::spawn({
        let (services, got_ip, appeared) = (services.clone(), got_ip.clone(), appeared.clone());
        async move {
            let mut events =
                std::pin::pin!(watcher(services, watcher::Config::default()).applied_objects());
            while let Ok(Some(svc)) = events.try_next().await {
                appeared
                    .lock()
                    .unwrap()
                    .entry(svc.name_any())
                    .or_insert_with(Instant::now);
                if let Some(ip) = ip_of(&svc) {
                    got_ip
                        .lock()
                        .unwrap()
                        .entry(svc.name_any())
                        .or_insert((Instant::now(), ip));
                }
            }
        }
    });
    if warm_connections {
        // kube-rs speaks HTTP/1.1, so `count` requests at once take `count` connections: open
        // them now (they stay pooled), or the measurement would include `count` TLS
        // handshakes with the API server. Clients such as kubectl multiplex one HTTP/2
        // connection instead, so a warm connection is the common case.
        let one = ListParams::default().limit(1);
        futures::stream::iter(0..count)
            .map(|_| services.list(&one))
            .buffer_unordered(count)
            .try_collect::<Vec<_>>()
            .await?;
    }
    if api_only {
        portico.stop_operator().await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!(
        "creating {count} Services of type LoadBalancer at once ({} connections{}) …",
        if warm_connections { "warm" } else { "cold" },
        if api_only { ", operator stopped" } else { "" }
    );
    let names: Vec<String> = (0..count).map(|i| format!("svc-{i:03}")).collect();
    let created = futures::stream::iter(names.clone())
        .map(|name| {
            let services = services.clone();
            async move {
                let started = Instant::now();
                services.create(&PostParams::default(), &lb(&name)).await?;
                anyhow::Ok((name, (started, Instant::now())))
            }
        })
        .buffer_unordered(count)
        .try_collect::<HashMap<String, (Instant, Instant)>>()
        .await?;
    let acknowledged: HashMap<String, Instant> = created
        .iter()
        .map(|(n, (_, ack))| (n.clone(), *ack))
        .collect();
    let created: HashMap<String, Instant> = created
        .into_iter()
        .map(|(n, (started, _))| (n, started))
        .collect();
    if api_only {
        watch.abort();
        let mut to_ack: Vec<Duration> = names
            .iter()
            .map(|n| acknowledged[n].saturating_duration_since(created[n]))
            .collect();
        to_ack.sort();
        println!();
        println!("| {count} Services created at once, operator stopped | p50 | p99 | max |");
        println!("|---|---|---|---|");
        println!(
            "| create → the API server acknowledges it | {} | {} | {} |",
            ms(percentile(&to_ack, 50)),
            ms(percentile(&to_ack, 99)),
            ms(*to_ack.last().unwrap())
        );
        return Ok(());
    }

    let answered = futures::stream::iter(names.clone())
        .map(|name| {
            let got_ip = got_ip.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(120);
                let ip = loop {
                    if let Some((_, ip)) = got_ip.lock().unwrap().get(&name) {
                        break *ip;
                    }
                    anyhow::ensure!(Instant::now() < deadline, "{name}: no EXTERNAL-IP");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                };
                let target = SocketAddr::from((ip, 80));
                loop {
                    if echo_via(target, None).await.is_ok() {
                        return anyhow::Ok((name, Instant::now()));
                    }
                    anyhow::ensure!(Instant::now() < deadline, "{name}: {target} never answered");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
        .buffer_unordered(count)
        .try_collect::<HashMap<String, Instant>>()
        .await?;
    watch.abort();
    print_operator_metrics(portico.config().plan.operator_metrics()).await;

    let got_ip = got_ip.lock().unwrap();
    let appeared = appeared.lock().unwrap();
    let mut to_ack: Vec<Duration> = names
        .iter()
        .map(|n| acknowledged[n].saturating_duration_since(created[n]))
        .collect();
    let mut to_ip: Vec<Duration> = names
        .iter()
        .map(|n| got_ip[n].0.saturating_duration_since(created[n]))
        .collect();
    let mut to_answer: Vec<Duration> = names
        .iter()
        .map(|n| answered[n].saturating_duration_since(created[n]))
        .collect();
    let mut appeared_to_ip: Vec<Duration> = names
        .iter()
        .map(|n| got_ip[n].0.saturating_duration_since(appeared[n]))
        .collect();
    println!();
    println!("| {count} Services created at once | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (what, samples) in [
        ("create → the API server acknowledges it", &mut to_ack),
        ("create → EXTERNAL-IP in status", &mut to_ip),
        ("create → first successful response", &mut to_answer),
        (
            "appears in the API (watch) → EXTERNAL-IP in status",
            &mut appeared_to_ip,
        ),
    ] {
        samples.sort();
        println!(
            "| {what} | {} | {} | {} |",
            ms(percentile(samples, 50)),
            ms(percentile(samples, 99)),
            ms(*samples.last().unwrap())
        );
    }
    Ok(())
}

fn lb(name: &str) -> Service {
    service(name, "echo", json!({"type": "LoadBalancer"}))
}

async fn wait_answering(client: &Client, name: &str) -> anyhow::Result<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(ip) = ip_of(&services.get(name).await?)
            && echo_via(SocketAddr::from((ip, 80)), None).await.is_ok()
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{name} never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// The operator's own view: how long its reconciles and provider calls took.
async fn print_operator_metrics(addr: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return;
    }
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    println!("\noperator metrics:");
    for line in text.lines().filter(|l| {
        l.starts_with("portico_reconcile_duration_seconds_sum")
            || l.starts_with("portico_reconcile_duration_seconds_count")
            || l.starts_with("portico_reconciles_total")
            || l.starts_with("portico_provider_calls_total")
    }) {
        println!("  {line}");
    }
}
