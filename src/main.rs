//! The `outbox-relay` binary: arguments, configuration, tracing, exit codes.

use anyhow::Context;
use clap::{Parser, Subcommand};
use outbox_relay::config::{Config, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc instead of glibc's allocator: the hot path allocates many small,
/// short-lived buffers on one thread and frees them on another (see docs/performance.md and docs/architecture.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Create the outbox table, publication and slot when missing (and the inbox
    /// table when [inbox] is configured).
    Init {
        #[command(flatten)]
        config: ConfigArg,
        /// Only the inbox table of [inbox] (for a service that only receives).
        #[arg(long)]
        inbox_only: bool,
        /// Split the outbox into N shards: N publications (each with a row filter
        /// on a hash of the aggregate id) and N slots; overrides postgres.shards.
        #[arg(long, value_name = "N")]
        shards: Option<u32>,
    },
    /// Receive: record the [inbox] queue into the inbox table, each message once,
    /// until SIGTERM or SIGINT.
    Inbox(ConfigArg),
    /// Preflight: one line per check, non-zero exit when any fails.
    Check(ConfigArg),
    /// Slot (active, holder pid, confirmed LSN, lag), pending retries, dead letters,
    /// age of the oldest pending message.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Recovery after a lost slot: create a new slot, then re-publish the outbox
    /// rows still pending, oldest first (Event-Forge tables).
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// Re-publish the rows whose status is still 'pending' (required: the only mode).
        #[arg(long, required = true)]
        pending: bool,
        /// Only rows created at or after this time (e.g. "2026-11-28 10:00:00+00").
        #[arg(long)]
        since: Option<String>,
    },
    /// Dead messages: list them, or give them a fresh retry budget.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
}

#[derive(Subcommand)]
enum DeadCommand {
    /// List dead messages (id, aggregate, event type, attempts, last error), oldest first.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON (an array of objects) instead of a table.
        #[arg(long)]
        json: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Skip this many first (paging).
        #[arg(long, default_value_t = 0)]
        offset: i64,
    },
    /// Give dead messages a fresh retry budget; the running relay picks them up at once.
    Requeue {
        #[command(flatten)]
        config: ConfigArg,
        /// Ids to requeue (repeatable).
        #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Requeue every dead message of this relay's slot.
        #[arg(long)]
        all: bool,
    },
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Configuration file (TOML); OUTBOX_RELAY_<SECTION>_<KEY> variables override it.
    #[arg(long, short, env = "OUTBOX_RELAY_CONFIG")]
    config: PathBuf,
    /// With postgres.shards: the shard this command works on (overrides
    /// postgres.shard); `check` and `status` show every shard without it.
    #[arg(long, value_name = "I")]
    shard: Option<u32>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match &cli.command {
        Command::Run(a) | Command::Inbox(a) | Command::Check(a) => a,
        Command::Dead {
            command: DeadCommand::List { config, .. } | DeadCommand::Requeue { config, .. },
        }
        | Command::Status { config, .. }
        | Command::Init { config, .. }
        | Command::Replay { config, .. } => config,
    };
    let shards = match &cli.command {
        Command::Init { shards, .. } => *shards,
        _ => None,
    };
    let config = match load(args, shards) {
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
    let runtime = match tokio::runtime::Builder::new_current_thread()
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
            // Once: tracing writes to stderr (as JSON with --log-format json).
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration file with its environment overrides, then `--shards` and
/// `--shard`.
fn load(
    args: &ConfigArg,
    shards: Option<u32>,
) -> Result<Config, outbox_relay::config::ConfigError> {
    let mut config = Config::load(&args.config)?;
    if let Some(n) = shards {
        config = config.with_shards(n)?;
    }
    if let Some(i) = args.shard {
        config = config.for_shard(i)?;
    }
    Ok(config)
}

async fn dispatch(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    use outbox_relay::admin;
    match command {
        Command::Run(_) => {
            outbox_relay::run(config, shutdown_signal())
                .await
                .context("outbox-relay run")?;
        }
        Command::Inbox(_) => {
            outbox_relay::inbox::receiver::receive(config, shutdown_signal())
                .await
                .context("outbox-relay inbox")?;
        }
        Command::Init { inbox_only, .. } => {
            let lines = if inbox_only {
                admin::init_inbox(&config).await
            } else {
                admin::init(&config).await
            }
            .context("outbox-relay init")?;
            println!("{}", lines.join("\n"));
        }
        Command::Check(_) => {
            let checks = admin::check(&config).await;
            print!("{checks}");
            if !checks.all_ok() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Status { json, .. } => {
            let status = admin::statuses(&config)
                .await
                .context("outbox-relay status")?;
            print_as(&status, json)?;
        }
        Command::Replay { since, .. } => {
            let report = admin::replay_pending(&config, since.as_deref())
                .await
                .context("outbox-relay replay --pending")?;
            print!("{report}");
        }
        Command::Dead {
            command:
                DeadCommand::List {
                    json,
                    limit,
                    offset,
                    ..
                },
        } => {
            let dead = admin::dead_list(&config, limit, offset)
                .await
                .context("outbox-relay dead list")?;
            print_as(&dead, json)?;
        }
        Command::Dead {
            command: DeadCommand::Requeue { ids, all, .. },
        } => {
            let ids = (!all).then_some(ids);
            let done = admin::dead_requeue(&config, ids.as_deref())
                .await
                .context("outbox-relay dead requeue")?;
            println!("requeued {done} message(s) with a fresh retry budget");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `value` as pretty JSON or as its text form.
fn print_as<T: serde::Serialize + std::fmt::Display>(value: &T, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{value}");
    }
    Ok(())
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
    // lapin logs every returned message with its whole body at WARN; the relay logs
    // the failure itself, so that one is quieted unless asked for.
    let level = if level.contains("lapin") {
        level.to_string()
    } else {
        format!("{level},lapin::returned_messages=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&level))
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
