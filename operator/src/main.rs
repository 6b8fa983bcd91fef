//! `portico`: the operator binary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::IngressClass;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};
use portico_crds::ProviderConfig;
use portico_operator::events::EventSink;
use portico_operator::http::Readiness;
use portico_operator::leader::LeaderElector;
use portico_operator::metrics::Metrics;
use portico_operator::provider_config::build::build_provider;
use portico_operator::provider_config::registry::ProviderRegistry;
use portico_operator::service::class::ClassPolicy;
use portico_operator::service::controller::{self, Context, Settings};
use portico_operator::{gc, ingress, node_set, policy, provider_config};
use portico_provider::Provider;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProviderKind {
    /// The bundled local cloud (`portico-local-cloud`).
    #[cfg(feature = "local")]
    Local,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Provisions external load balancers for Services of type LoadBalancer.
#[derive(Parser, Debug)]
#[command(name = "portico", version)]
struct Args {
    /// Kubeconfig to use; without it, `$KUBECONFIG`, `~/.kube/config` or the in-cluster
    /// service account, as kubectl does.
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// A cloud configured on the command line, besides the ProviderConfigs in the cluster
    /// (which are how the Helm chart configures Portico). Serves the classes given with
    /// `--load-balancer-class` and, with `--default-load-balancer`, Services that name no class
    /// when no ProviderConfig is the default.
    #[arg(long, env = "PORTICO_PROVIDER", value_enum)]
    provider: Option<ProviderKind>,
    /// The local cloud's API address (provider `local`).
    #[arg(
        long,
        env = "PORTICO_LOCAL_CLOUD_API",
        default_value = "127.0.0.1:8900"
    )]
    local_cloud_api: SocketAddr,
    /// Identifies this cluster on the cloud side (ownership tags). Defaults to the UID of the
    /// `kube-system` namespace, which is unique per cluster and stable.
    #[arg(long, env = "PORTICO_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// A `loadBalancerClass` Portico serves (repeatable). Defaults to `portico.dev/<provider>`.
    #[arg(
        long = "load-balancer-class",
        env = "PORTICO_LOAD_BALANCER_CLASSES",
        value_delimiter = ','
    )]
    load_balancer_classes: Vec<String>,
    /// Also serve Services that name no `loadBalancerClass` (Portico is the cluster's default).
    #[arg(long, env = "PORTICO_DEFAULT_LOAD_BALANCER", default_value_t = true, action = clap::ArgAction::Set)]
    default_load_balancer: bool,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "PORTICO_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Run only while holding the leader Lease (for several replicas).
    #[arg(long, env = "PORTICO_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    #[arg(long, env = "PORTICO_LEASE_NAME", default_value = "portico-operator")]
    lease_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    lease_namespace: String,
    /// This instance's identity in the Lease and in events. Defaults to host name + random suffix.
    #[arg(long, env = "POD_NAME")]
    instance_id: Option<String>,
    /// The IngressClass Portico creates at start (if missing) with its controller name; empty
    /// to leave IngressClasses to the installer (the Helm chart).
    #[arg(long, env = "PORTICO_INGRESS_CLASS", default_value = "portico")]
    ingress_class: String,
    /// Mark that IngressClass as the cluster's default when creating it.
    #[arg(long, env = "PORTICO_DEFAULT_INGRESS_CLASS", default_value_t = false, action = clap::ArgAction::Set)]
    default_ingress_class: bool,
    /// How often a served load balancer is ensured again even when nothing changed.
    #[arg(long, env = "PORTICO_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// How often orphaned load balancers are looked for.
    #[arg(long, env = "PORTICO_GC_SECONDS", default_value_t = 300)]
    gc_seconds: u64,
    #[arg(long, env = "PORTICO_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One TLS crypto provider for the whole process, before any client is built.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = Args::parse();
    init_tracing(args.log_format);

    let client = kube_client(args.kubeconfig.as_deref())
        .await
        .context("connecting to the Kubernetes API")?;
    let cluster_id = match args.cluster_id.clone() {
        Some(id) => id,
        None => Api::<Namespace>::all(client.clone())
            .get("kube-system")
            .await
            .context("reading the kube-system namespace for the cluster id")?
            .metadata
            .uid
            .context("kube-system has no UID")?,
    };
    let command_line = args.provider.map(|kind| {
        let provider: Arc<dyn Provider> = match kind {
            #[cfg(feature = "local")]
            ProviderKind::Local => Arc::new(portico_local_cloud::LocalCloudProvider::new(
                args.local_cloud_api,
            )),
        };
        let classes = ClassPolicy {
            classes: if args.load_balancer_classes.is_empty() {
                vec![format!("portico.dev/{}", provider.name())]
            } else {
                args.load_balancer_classes.clone()
            },
            serve_unclassed: args.default_load_balancer,
        };
        tracing::info!(provider = provider.name(), classes = ?classes.classes, "provider from the command line");
        (provider, classes)
    });
    let instance = args.instance_id.clone().unwrap_or_else(default_instance_id);
    tracing::info!(%cluster_id, %instance, "starting");

    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(Readiness::default());
    let addr = portico_operator::http::serve(args.metrics_addr, metrics.clone(), ready.clone())
        .await
        .with_context(|| format!("binding the metrics address {}", args.metrics_addr))?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");

    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        }
    });

    let elector = args.leader_elect.then(|| {
        LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), &args.lease_namespace),
            &args.lease_name,
            &instance,
            Duration::from_secs(15),
        )
    });
    if let Some(elector) = &elector {
        tracing::info!(lease = %args.lease_name, namespace = %args.lease_namespace, "waiting for the leader lease");
        tokio::select! {
            _ = elector.acquire() => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        tracing::info!("acquired the leader lease");
    }
    metrics.leader.set(1);
    let lost_leadership = CancellationToken::new();
    if let Some(elector) = elector.clone() {
        let (lost, shutdown) = (lost_leadership.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = elector.hold() => { lost.cancel(); shutdown.cancel(); }
                _ = shutdown.cancelled() => {}
            }
        });
    }

    let (nodes, node_changes) = node_set::watch(client.clone());
    nodes.wait_until_ready().await.context("node cache")?;
    // Without the configurations no Service can be told apart from one that is not ours, so
    // nothing reconciles before they are known.
    let configs = watch_all::<ProviderConfig>(client.clone());
    tokio::select! {
        ready = configs.wait_until_ready() => ready.context("ProviderConfig cache")?,
        _ = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("ProviderConfigs are not listed yet; are Portico's CRDs installed?");
            configs.wait_until_ready().await.context("ProviderConfig cache")?;
        }
    }
    let policies = policy::watch(client.clone());
    policies.wait_until_ready().await.context("policy caches")?;
    let providers = Arc::new(ProviderRegistry::new(
        configs.clone(),
        command_line,
        Box::new(build_provider),
    ));

    let events = EventSink::new(Recorder::new(
        client.clone(),
        Reporter {
            controller: "portico.dev/service-controller".into(),
            instance: Some(instance.clone()),
        },
    ));
    if !args.ingress_class.is_empty() {
        ensure_ingress_class(&client, &args.ingress_class, args.default_ingress_class).await?;
    }
    let ingress_classes = watch_all::<IngressClass>(client.clone());
    ingress_classes
        .wait_until_ready()
        .await
        .context("IngressClass cache")?;
    let config_status_ctx = Arc::new(provider_config::status::Context {
        client: client.clone(),
        configs,
        classes: ingress_classes.clone(),
        providers: providers.clone(),
    });
    let policy_status_ctx = Arc::new(policy::status::Context {
        client: client.clone(),
        policies: policies.clone(),
    });
    let ingress_ctx = Arc::new(ingress::controller::Context::new(
        client.clone(),
        providers.clone(),
        nodes.clone(),
        policies.clone(),
        ingress_classes,
        cluster_id.clone(),
        EventSink::new(Recorder::new(
            client.clone(),
            Reporter {
                controller: "portico.dev/ingress-controller".into(),
                instance: Some(instance.clone()),
            },
        )),
        metrics.clone(),
        Duration::from_secs(args.resync_seconds),
    ));
    let ctx = Arc::new(Context::new(
        client.clone(),
        providers.clone(),
        nodes,
        policies,
        events,
        metrics.clone(),
        Settings {
            cluster_id: cluster_id.clone(),
            resync: Duration::from_secs(args.resync_seconds),
        },
    ));

    tokio::spawn({
        let (client, providers, metrics, shutdown) = (
            client.clone(),
            providers.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        let every = Duration::from_secs(args.gc_seconds.max(1));
        async move {
            loop {
                // The first pass waits a period too, so the controllers settle first.
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.cancelled() => return,
                }
                match gc::collect(&client, &providers, &cluster_id).await {
                    Ok(n) => {
                        metrics.garbage_collected.inc_by(n as u64);
                    }
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                };
            }
        }
    });

    ready.set(true);
    tokio::join!(
        controller::run(
            ctx,
            node_changes.subscribe(),
            shutdown.clone().cancelled_owned()
        ),
        ingress::controller::run(
            ingress_ctx,
            node_changes.subscribe(),
            shutdown.clone().cancelled_owned()
        ),
        provider_config::status::run(config_status_ctx, shutdown.clone().cancelled_owned()),
        policy::status::run(policy_status_ctx, shutdown.clone()),
    );
    ready.set(false);
    metrics.leader.set(0);

    if lost_leadership.is_cancelled() {
        anyhow::bail!("lost the leader lease");
    }
    if let Some(elector) = &elector
        && let Err(e) = elector.release().await
    {
        tracing::warn!(error = %e, "could not release the leader lease");
    }
    Ok(())
}

/// Creates Portico's IngressClass unless one of that name exists (then it is the
/// installer's, and left alone).
async fn ensure_ingress_class(client: &Client, name: &str, default: bool) -> anyhow::Result<()> {
    let classes: Api<IngressClass> = Api::all(client.clone());
    let mut class: IngressClass = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"controller": ingress::class::CONTROLLER},
    }))?;
    if default {
        class.metadata.annotations = Some(
            [(
                ingress::class::DEFAULT_CLASS_ANNOTATION.to_string(),
                "true".to_string(),
            )]
            .into(),
        );
    }
    match classes
        .create(&kube::api::PostParams::default(), &class)
        .await
    {
        Ok(_) => tracing::info!(%name, "created IngressClass"),
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e).context("creating the IngressClass"),
    }
    Ok(())
}

/// A cache of every object of kind `K`, kept current in the background.
fn watch_all<K>(client: Client) -> kube::runtime::reflector::Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    let (store, writer) = kube::runtime::reflector::store();
    let stream = kube::runtime::reflector::reflector(
        writer,
        kube::runtime::watcher(Api::<K>::all(client), Default::default()),
    )
    .default_backoff()
    .touched_objects();
    tokio::spawn(stream.for_each(|_| async {}));
    store
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let Some(path) = kubeconfig else {
        return Ok(Client::try_default().await?);
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "portico".into());
    format!("{host}-{:08x}", rand_suffix())
}

fn rand_suffix() -> u32 {
    // Good enough to tell two replicas on one host apart.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id().rotate_left(16)
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
