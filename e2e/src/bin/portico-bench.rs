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
        /// Send the creates this many milliseconds apart instead of all at once: how long one
        /// Service waits when the API server is not working through a burst.
        #[arg(long, value_name = "MS")]
        interval_ms: Option<u64>,
    },
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    install_crypto_provider();
    let Bench::Provisioning {
        services,
        cold_connections,
        api_only,
        interval_ms,
    } = Bench::parse();
    let pacing = Pacing(interval_ms.map(Duration::from_millis));
    provisioning(services, !cold_connections, api_only, pacing).await
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

/// How the creates are sent: all at once, or one every so often.
#[derive(Clone, Copy)]
struct Pacing(Option<Duration>);

impl std::fmt::Display for Pacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => write!(f, "created at once"),
            Some(every) => write!(f, "created one every {} ms", every.as_millis()),
        }
    }
}

async fn provisioning(
    count: usize,
    warm_connections: bool,
    api_only: bool,
    pacing: Pacing,
) -> anyhow::Result<()> {
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

    let got_ip: Arc<SeenIps> = Arc::default();
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
        "creating {count} Services of type LoadBalancer, {pacing} ({} connections{}) …",
        if warm_connections { "warm" } else { "cold" },
        if api_only { ", operator stopped" } else { "" }
    );
    let names: Vec<String> = (0..count).map(|i| format!("svc-{i:03}")).collect();
    // Each Service's first response is awaited from its own acknowledgement on, so one
    // Service's figure never includes the time the bench took to send the others.
    let timelines = create_all(&services, names.iter().map(|n| lb(n)), pacing, |name| {
        let got_ip = got_ip.clone();
        async move {
            if api_only {
                return Ok(None);
            }
            first_answer(&got_ip, &name).await.map(Some)
        }
    })
    .await?;
    let created: HashMap<String, Instant> =
        timelines.iter().map(|(n, t)| (n.clone(), t.sent)).collect();
    let acknowledged: HashMap<String, Instant> = timelines
        .iter()
        .map(|(n, t)| (n.clone(), t.acknowledged))
        .collect();
    if api_only {
        watch.abort();
        let to_ack: Vec<Duration> = names
            .iter()
            .map(|n| acknowledged[n].saturating_duration_since(created[n]))
            .collect();
        // The same burst of Services that need no cluster IP and no node port: what the API
        // server's IP and port allocation adds to each create.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let headless = create_all(
            &services,
            (0..count).map(|i| headless(&format!("headless-{i:03}"))),
            pacing,
            |_| async { Ok(None) },
        )
        .await?;
        let headless_ack: Vec<Duration> = headless
            .values()
            .map(|t| t.acknowledged.saturating_duration_since(t.sent))
            .collect();
        println!();
        println!("| {count} Services {pacing}, operator stopped | p50 | p99 | max |");
        println!("|---|---|---|---|");
        for (what, mut samples) in [
            (
                "type LoadBalancer: create → the API server acknowledges it",
                to_ack,
            ),
            (
                "headless (no cluster IP, no node port): create → acknowledged",
                headless_ack,
            ),
        ] {
            samples.sort();
            println!(
                "| {what} | {} | {} | {} |",
                ms(percentile(&samples, 50)),
                ms(percentile(&samples, 99)),
                ms(*samples.last().unwrap())
            );
        }
        return Ok(());
    }

    let answered: HashMap<String, Instant> = timelines
        .into_iter()
        .filter_map(|(n, t)| Some((n, t.answered?)))
        .collect();
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
    println!("| {count} Services {pacing} | p50 | p99 | max |");
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

/// One Service's way through the bench.
struct Timeline {
    /// The create was sent.
    sent: Instant,
    /// The API server answered the create.
    acknowledged: Instant,
    /// The Service's load balancer first answered, when that was awaited.
    answered: Option<Instant>,
}

/// Sends the creates as `pacing` says, without waiting for earlier ones to be answered; after
/// each acknowledgement runs `then` for that Service (which may wait for its first answer).
async fn create_all<F, Fut>(
    services: &Api<Service>,
    objects: impl Iterator<Item = Service>,
    pacing: Pacing,
    then: F,
) -> anyhow::Result<HashMap<String, Timeline>>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = anyhow::Result<Option<Instant>>>,
{
    let objects: Vec<Service> = objects.collect();
    let count = objects.len();
    let first = tokio::time::Instant::now();
    let then = &then;
    futures::stream::iter(objects.into_iter().enumerate())
        .map(|(i, svc)| async move {
            if let Some(every) = pacing.0 {
                tokio::time::sleep_until(first + every * i as u32).await;
            }
            let sent = Instant::now();
            services.create(&PostParams::default(), &svc).await?;
            let acknowledged = Instant::now();
            let answered = then(svc.name_any()).await?;
            anyhow::Ok((
                svc.name_any(),
                Timeline {
                    sent,
                    acknowledged,
                    answered,
                },
            ))
        })
        .buffer_unordered(count)
        .try_collect()
        .await
}

type SeenIps = Mutex<HashMap<String, (Instant, Ipv4Addr)>>;

/// When `name` first answered through its load balancer, once the watch has seen its
/// EXTERNAL-IP (polled every 2 ms, as a client retrying would).
async fn first_answer(got_ip: &SeenIps, name: &str) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let ip = loop {
        if let Some((_, ip)) = got_ip.lock().unwrap().get(name) {
            break *ip;
        }
        anyhow::ensure!(Instant::now() < deadline, "{name}: no EXTERNAL-IP");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let target = SocketAddr::from((ip, 80));
    loop {
        if echo_via(target, None).await.is_ok() {
            return Ok(Instant::now());
        }
        anyhow::ensure!(Instant::now() < deadline, "{name}: {target} never answered");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn headless(name: &str) -> Service {
    service(
        name,
        "echo",
        json!({"type": "ClusterIP", "clusterIP": "None"}),
    )
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
