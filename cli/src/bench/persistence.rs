//! `flotilla bench persistence`: state proposals for pre-created flow runs from 1, 64 and 1024
//! concurrent submitters, each waiting for its acknowledgement before sending the next, for a
//! sustained period per case, on a fresh data directory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use flotilla_actors::persistence::{self, PersistenceConfig, PersistenceHandle};
use flotilla_runtime::{
    Command, Decision, Epoch, FlowRunId, NewFlowRun, NodeId, Proposal, Reply, RetryPolicy, RetryRequest,
    State, StateName, Timestamp, TransitionId,
};
use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;

use super::fsync::fdatasync_p50_ms;

#[derive(Debug, Args)]
pub struct PersistenceArgs {
    /// Print one JSON object on one line instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds per case.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Pre-created flow runs the proposals go to.
    #[arg(long, default_value_t = 10_000)]
    runs: usize,
    /// Submitter counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 64, 1024])]
    submitters: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub(super) struct CaseResult {
    submitters: usize,
    commands: u64,
    pub(super) commands_per_s: f64,
    pub(super) ack_p50_ms: f64,
    ack_p99_ms: f64,
    fsyncs_per_s: f64,
    commands_per_fsync: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    fdatasync_p50_ms: f64,
    seconds_per_case: f64,
    runs: usize,
    results: Vec<CaseResult>,
}

/// One pre-created run as its submitter drives it: Pending → Running → Completed → retry.
pub(super) struct Cycle {
    id: FlowRunId,
    epoch: Epoch,
    step: u8,
}

fn node() -> anyhow::Result<NodeId> {
    Ok("bench".parse()?)
}

async fn drive(
    handle: &PersistenceHandle,
    c: &mut Cycle,
    rng: &mut SmallRng,
    node: &NodeId,
) -> anyhow::Result<()> {
    let now = Timestamp::EPOCH;
    let tid = TransitionId::new(now, rng);
    let cmd = match c.step {
        0 => Command::ProposeFlowRunState {
            run: c.id,
            proposal: Proposal::from_worker(
                State::named(StateName::Pending, now),
                tid,
                c.epoch,
                node.clone(),
            ),
        },
        1 => Command::ProposeFlowRunState {
            run: c.id,
            proposal: Proposal::from_worker(
                State::named(StateName::Running, now),
                tid,
                c.epoch,
                node.clone(),
            ),
        },
        2 => Command::ProposeFlowRunState {
            run: c.id,
            proposal: Proposal::from_worker(
                State::named(StateName::Completed, now),
                tid,
                c.epoch,
                node.clone(),
            ),
        },
        _ => Command::RetryFlowRun {
            run: c.id,
            request: RetryRequest {
                transition_id: tid,
                resume: false,
                force: true,
                message: None,
            },
        },
    };
    match handle.submit(cmd).await? {
        Ok(Reply::FlowRunTransition {
            decision: Decision::Accept(_),
            ..
        }) => c.step += 1,
        Ok(Reply::Retried { epoch, .. }) => {
            c.epoch = epoch;
            c.step = 0;
        }
        other => bail!("unexpected answer in the benchmark: {other:?}"),
    }
    Ok(())
}

pub(super) async fn create_runs(handle: &PersistenceHandle, n: usize) -> anyhow::Result<Vec<Cycle>> {
    let mut rng = SmallRng::seed_from_u64(1);
    let ids: Vec<FlowRunId> = (0..n)
        .map(|_| FlowRunId::new(Timestamp::from(chrono::Utc::now()), &mut rng))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in ids.chunks(n.div_ceil(256).max(1)) {
        let chunk = chunk.to_vec();
        let handle = handle.clone();
        tasks.spawn(async move {
            for id in chunk {
                let cmd = Command::CreateFlowRun(
                    NewFlowRun::new(id, "bench", serde_json::Value::Null)
                        .with_options(RetryPolicy::none(), true),
                );
                match handle.submit(cmd).await? {
                    Ok(Reply::FlowRunCreated { .. }) => {}
                    other => bail!("could not create a run: {other:?}"),
                }
            }
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(ids
        .into_iter()
        .map(|id| Cycle {
            id,
            epoch: Epoch::FIRST,
            step: 0,
        })
        .collect())
}

pub(super) async fn run_case(
    handle: &PersistenceHandle,
    cycles: Vec<Cycle>,
    submitters: usize,
    seconds: f64,
) -> anyhow::Result<(CaseResult, Vec<Cycle>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut groups: Vec<Vec<Cycle>> = (0..submitters).map(|_| Vec::new()).collect();
    for (i, c) in cycles.into_iter().enumerate() {
        groups[i % submitters].push(c);
    }
    let syncs_before = handle.stats().await?.log_syncs;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (s, mut group) in groups.into_iter().enumerate() {
        let handle = handle.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut hist = Histogram::<u64>::new(3)?;
            let mut rng = SmallRng::seed_from_u64(s as u64 + 7);
            let node = node()?;
            let mut count = 0u64;
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) && !group.is_empty() {
                let t = Instant::now();
                let len = group.len();
                let c = &mut group[k % len];
                drive(&handle, c, &mut rng, &node).await?;
                hist.record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX))?;
                count += 1;
                if c.step == 0 {
                    k += 1;
                }
            }
            anyhow::Ok((hist, count, group))
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3)?;
    let mut commands = 0;
    let mut back = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (h, n, group) = r??;
        hist.add(h)?;
        commands += n;
        back.extend(group);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let syncs = handle.stats().await?.log_syncs - syncs_before;
    Ok((
        CaseResult {
            submitters,
            commands,
            commands_per_s: commands as f64 / elapsed,
            ack_p50_ms: hist.value_at_quantile(0.5) as f64 / 1e3,
            ack_p99_ms: hist.value_at_quantile(0.99) as f64 / 1e3,
            fsyncs_per_s: syncs as f64 / elapsed,
            commands_per_fsync: if syncs == 0 {
                0.0
            } else {
                commands as f64 / syncs as f64
            },
        },
        back,
    ))
}

pub async fn run(args: PersistenceArgs) -> anyhow::Result<()> {
    if args.runs == 0 || args.submitters.contains(&0) || args.seconds <= 0.0 {
        bail!("--runs, --submitters and --seconds must be positive");
    }
    let dir = tempfile::Builder::new()
        .prefix("flotilla-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let fsync = fdatasync_p50_ms(dir.path(), 200).context("measuring fdatasync")?;
    eprintln!("fdatasync p50 on {}: {fsync:.3} ms", dir.path().display());
    let (handle, join) = persistence::start(PersistenceConfig::new(dir.path().join("data"))).await?;
    eprintln!("creating {} flow runs…", args.runs);
    let mut cycles = create_runs(&handle, args.runs).await?;
    let mut results = Vec::new();
    for &s in &args.submitters {
        eprintln!("{s} submitters for {:.1} s…", args.seconds);
        let (r, back) = run_case(&handle, cycles, s.min(args.runs), args.seconds).await?;
        cycles = back;
        eprintln!(
            "  {:>9.0} commands/s  ack p50 {:.3} ms  p99 {:.3} ms  {:.0} fsyncs/s",
            r.commands_per_s, r.ack_p50_ms, r.ack_p99_ms, r.fsyncs_per_s
        );
        results.push(CaseResult { submitters: s, ..r });
    }
    handle.stop(join).await;
    let report = Report {
        scenario: "persistence",
        fdatasync_p50_ms: fsync,
        seconds_per_case: args.seconds,
        runs: args.runs,
        results,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "persistence: durable commands (fdatasync p50 {:.3} ms)",
            report.fdatasync_p50_ms
        );
        println!(
            "{:>11} {:>14} {:>12} {:>12} {:>11} {:>9}",
            "submitters", "commands/s", "ack p50 ms", "ack p99 ms", "fsyncs/s", "per sync"
        );
        for r in &report.results {
            println!(
                "{:>11} {:>14.0} {:>12.3} {:>12.3} {:>11.0} {:>9.1}",
                r.submitters,
                r.commands_per_s,
                r.ack_p50_ms,
                r.ack_p99_ms,
                r.fsyncs_per_s,
                r.commands_per_fsync
            );
        }
    }
    Ok(())
}
