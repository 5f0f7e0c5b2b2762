//! The soak (`scripts/soak.sh --minutes N`): the whole chain under a steady
//! load for minutes, with one fault every `--fault-every`, in turn.
//!
//! Orders and their outbox rows (Event-Forge's own tables) at `--rate` rows/s
//! over `--aggregates` aggregates → two relays on one slot (active and hot
//! standby) → RabbitMQ → the inbox receiver → a `Processor` writing one effect
//! per order. 1 % of the aggregates are unroutable half the time; a few rows
//! are delayed. At the end, one JSON line: every order's effect exactly once,
//! in order per aggregate, nothing parked or pending; per fault the slot's
//! recovery and the duplicates on the wire; each process' memory, file
//! descriptors and threads. Exit 0 only when all hold.

mod faults;
mod flat;
mod fleet;
mod monitor;
mod procs;
mod setup;
mod verify;
mod workload;

use anyhow::{Context, Result};
use clap::Parser;
use faults::Fault;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Minutes of load (faults included; the drain at the end comes on top).
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Time between two faults.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    fault_every: Duration,
    /// Outbox rows per second (one per transaction).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    #[arg(long, default_value_t = 300)]
    aggregates: usize,
    /// The relay binary (release build).
    #[arg(long)]
    relay: PathBuf,
    /// client/examples/inbox_worker.rs, built.
    #[arg(long)]
    worker: PathBuf,
    /// Where the logs and the configuration go.
    #[arg(long)]
    dir: PathBuf,
    /// Leave the tables, slot, exchange and queue behind for a look.
    #[arg(long)]
    keep: bool,
}

/// The slot's lag must be under this within `LAG_WITHIN` of a fault's end.
const LAG_LIMIT: f64 = 1024.0 * 1024.0;
const LAG_WITHIN: Duration = Duration::from_secs(10);
/// Load before the first steady reading of each process.
const WARM_UP: Duration = Duration::from_secs(20);

#[derive(Serialize)]
struct FaultReport {
    fault: &'static str,
    at_seconds: f64,
    /// From injecting it until it was over (the service back, the process replaced).
    took_seconds: f64,
    /// From its end until the slot's lag was under 1 MB (null: not within a minute).
    lag_under_1mb_seconds: Option<f64>,
    /// Deliveries the receiver found already recorded, from this fault to the next.
    wire_duplicates: u64,
}

#[derive(Serialize)]
struct Report {
    ok: bool,
    failures: Vec<String>,
    minutes: f64,
    rate: u32,
    rows_written: u64,
    writes_retried: u64,
    outcome: verify::Outcome,
    faults: Vec<FaultReport>,
    /// Each process' memory, descriptors and threads: at the start, after
    /// each fault, at the end (flat.rs says which reading is its steady one).
    resources: Vec<flat::Reading>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    match run(&args).await {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string(&report).expect("a report is JSON")
            );
            if !report.ok {
                std::process::exit(1);
            }
        }
        Err(e) => {
            // The soak could not go on (a fault not injected, a process not
            // coming back): the same one line, saying why.
            let why = format!("{e:#}");
            println!("{}", serde_json::json!({"ok": false, "failures": [why]}));
            std::process::exit(2);
        }
    }
}

async fn run(args: &Args) -> Result<Report> {
    std::fs::create_dir_all(&args.dir)?;
    faults::clear_alarm();
    let config = setup::prepare(&args.dir).await?;
    let mut fleet = fleet::Fleet::start(&args.relay, &args.worker, &config, &args.dir)
        .await
        .context("starting the relays, the receiver and the processor")?;
    let started = Instant::now();
    let workload = workload::Workload::start(args.rate, args.aggregates);
    let duplicates = monitor::Duplicates::start(fleet.receiver_metrics().await?);
    let mut failures = Vec::new();
    let mut resources = flat::Readings::default();
    let mut faults: Vec<FaultReport> = Vec::new();

    tokio::time::sleep(WARM_UP).await;
    resources.record("start", fleet.resources().await?, false);
    let end = started + Duration::from_secs_f64(args.minutes * 60.0);
    let mut routable = false;
    let mut dups_at_fault = duplicates.total();
    let first = Instant::now();
    for i in 0.. {
        // Fault i at its time on a fixed schedule (at once when the one before
        // ran late); half way before it, the unroutable aggregates become
        // routable (or unroutable again).
        let next = first + args.fault_every * (i as u32 + 1);
        if next + Duration::from_secs(15) > end {
            break;
        }
        tokio::time::sleep_until((next - args.fault_every / 2).into()).await;
        routable = !routable;
        workload::set_routable(routable).await?;
        tokio::time::sleep_until(next.into()).await;
        if let Some(last) = faults.last_mut() {
            last.wire_duplicates = duplicates.total() - dups_at_fault;
        }
        dups_at_fault = duplicates.total();

        let fault = Fault::ALL[i % Fault::ALL.len()];
        eprintln!(
            "soak: {:>6.1}s {}",
            started.elapsed().as_secs_f64(),
            fault.label()
        );
        let at = Instant::now();
        fault
            .inject(&mut fleet)
            .await
            .with_context(|| format!("injecting {}", fault.label()))?;
        let took = at.elapsed();
        duplicates.receiver_moved(fleet.receiver_metrics().await?);
        let lag = monitor::lag_under(LAG_LIMIT, Duration::from_secs(60)).await;
        match lag {
            Some(t) if t <= LAG_WITHIN => {}
            Some(t) => failures.push(format!(
                "{}: the slot's lag took {t:?} to get under 1 MB",
                fault.label()
            )),
            None => failures.push(format!(
                "{}: the slot's lag stayed over 1 MB for a minute",
                fault.label()
            )),
        }
        fleet.check_alive()?;
        resources.record(
            fault.label(),
            fleet.resources().await?,
            fault.reconnects_to_the_broker(),
        );
        faults.push(FaultReport {
            fault: fault.label(),
            at_seconds: at.duration_since(started).as_secs_f64(),
            took_seconds: took.as_secs_f64(),
            lag_under_1mb_seconds: lag.map(|t| t.as_secs_f64()),
            wire_duplicates: 0,
        });
    }
    tokio::time::sleep_until(end.into()).await;
    fleet.check_alive()?;
    resources.record(flat::END, fleet.resources().await?, false);
    if let Some(last) = faults.last_mut() {
        last.wire_duplicates = duplicates.total() - dups_at_fault;
    }

    // Everything routable, the producer stopped: all must drain.
    workload::set_routable(true).await?;
    let retried = workload.retried();
    let written = workload.stop().await;
    let outcome = verify::settle(Duration::from_secs(300)).await?;
    failures.extend(outcome.failures());
    if outcome.orders as u64 != written {
        failures.push(format!(
            "{} orders in the table, {written} written",
            outcome.orders
        ));
    }
    if faults.len() < Fault::ALL.len() {
        failures.push(format!(
            "only {} faults fitted in {} minutes (every {:?}): lengthen the run or shorten --fault-every",
            faults.len(),
            args.minutes,
            args.fault_every
        ));
    }
    failures.extend(resources.failures());
    fleet.stop().await?;
    if !args.keep {
        setup::drop_all(&setup::pg(Duration::from_secs(30)).await?).await?;
    }

    Ok(Report {
        ok: failures.is_empty(),
        failures,
        minutes: args.minutes,
        rate: args.rate,
        rows_written: written,
        writes_retried: retried,
        outcome,
        faults,
        resources: resources.into_all(),
    })
}
