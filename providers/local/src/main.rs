//! `portico-local-cloud`: the local cloud daemon.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use portico_local_cloud::{AddressPool, DaemonConfig, daemon};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A local cloud: load balancers on loopback addresses, proxied by Portico's own L4 and HTTP(S) data plane"
)]
struct Args {
    /// Address of the HTTP/JSON API (loopback only).
    #[arg(long, env = "PORTICO_LOCAL_CLOUD_LISTEN", default_value = DaemonConfig::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Addresses given to load balancers: `first-last` or a CIDR, inside 127.0.0.0/8.
    #[arg(
        long,
        env = "PORTICO_LOCAL_CLOUD_POOL",
        default_value = "127.240.0.1-127.240.0.254"
    )]
    pool: AddressPool,
    /// Where load balancers are saved [default: $XDG_STATE_HOME/portico/local-cloud.json].
    #[arg(long, env = "PORTICO_LOCAL_CLOUD_STATE_FILE")]
    state_file: Option<PathBuf>,
    /// Threads the proxies run on, each with its own connections [default: one per CPU].
    #[arg(
        long,
        env = "PORTICO_LOCAL_CLOUD_PROXY_WORKERS",
        default_value_t = 0,
        hide_default_value = true
    )]
    proxy_workers: usize,
    /// Log lines as human-readable text or as JSON objects.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    raise_open_file_limit();
    let config = DaemonConfig {
        listen: args.listen,
        pool: args.pool,
        state_file: args
            .state_file
            .unwrap_or_else(DaemonConfig::default_state_file),
    };
    portico_local_cloud::dataplane::workers::configure(args.proxy_workers);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        daemon::serve(config, shutdown_signal())
            .await
            .context("local cloud failed")
    })
}

/// A proxy holds two descriptors per connection; the common soft limit of 1024 would cap
/// it at ~500 connections, so the soft limit is raised to the hard one.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::warn!(soft = limit.rlim_cur, "cannot raise the open file limit");
            }
        }
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}
