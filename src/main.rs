//! The `baby-discord` binary: parse the command line, set up logging, serve.

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use baby_discord::config::{Action, Cli, LogFormat};
use baby_discord::server::Server;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = match Cli::parse().into_action() {
        Action::Bench(args) => return baby_discord::bench::main(args).await,
        Action::Serve(config) => config,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, plain text for log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let server = Server::bind(config).await.context("could not start")?;
    server.run(shutdown_signal()).await
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
