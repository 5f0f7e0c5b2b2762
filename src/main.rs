//! The `outbox-relay` binary: arguments, configuration, tracing, exit codes.

use anyhow::Context;
use clap::{Parser, Subcommand};
use outbox_relay::config::{Config, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Delivers transactional outbox rows from PostgreSQL to RabbitMQ through logical replication"
)]
struct Cli {
    /// Log format; overrides [log] format.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay until SIGTERM or SIGINT.
    Run(ConfigArg),
    /// Create the outbox table, publication and slot when missing.
    Init(ConfigArg),
    /// Preflight: one line per check, non-zero exit when any fails.
    Check(ConfigArg),
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Configuration file (TOML); OUTBOX_RELAY_<SECTION>_<KEY> variables override it.
    #[arg(long, short, env = "OUTBOX_RELAY_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = match &cli.command {
        Command::Run(a) | Command::Init(a) | Command::Check(a) => a.config.clone(),
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(
        cli.log_format.unwrap_or(config.log.format),
        &config.log.level,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command, config)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(_) => {
            outbox_relay::run(config, shutdown_signal())
                .await
                .context("outbox-relay run")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Init(_) => {
            for line in outbox_relay::admin::init(&config)
                .await
                .context("outbox-relay init")?
            {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(_) => {
            let checks = outbox_relay::admin::check(&config).await;
            for c in &checks {
                println!("{c}");
            }
            Ok(if checks.iter().all(|c| c.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_tracing(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
