//! `portico-testbed`: see [`portico_e2e::cli`].

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser;
use portico_e2e::cli::{self, Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // First thing: kube builds its rustls config from the process-wide provider.
    portico_e2e::install_crypto_provider();
    let cli = Cli::parse();
    // Progress goes to stderr, results to stdout; the agent's whole output is its log.
    let default_filter = match cli.command {
        Command::Agent { .. } => "info",
        _ => "portico_e2e=info",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Detached processes log to files, where colour codes are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
