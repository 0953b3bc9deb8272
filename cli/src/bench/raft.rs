//! `flotilla bench raft`: replication alone. Voters in this process on 127.0.0.1 (3 by
//! default), each with its own QUIC endpoint, mutual TLS and log on disk (one `fdatasync` per
//! appended batch), elect a leader; writers submit commands to it, each waiting for its commit
//! and apply before the next, for a sustained period per case. The state machine only counts,
//! so this is the ceiling of the replicated log, not of the control state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use flotilla_actors::replication::Logged;
use flotilla_actors::replication::local::{CountingRaft, LocalVoter, config, start_voter};
use flotilla_runtime::{Command, Timestamp};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::fsync::fdatasync_p50_ms;

#[derive(Debug, Args)]
pub struct RaftArgs {
    /// Print one JSON object on one line instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds per case.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Voters (at least 1, at most 7).
    #[arg(long, default_value_t = 3)]
    voters: u64,
    /// Writer counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 64, 1024])]
    writers: Vec<usize>,
}

#[derive(Debug, Serialize)]
struct CaseResult {
    writers: usize,
    commands: u64,
    commands_per_s: f64,
    commit_p50_ms: f64,
    commit_p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    voters: u64,
    fdatasync_p50_ms: f64,
    seconds_per_case: f64,
    results: Vec<CaseResult>,
}

fn command(n: u64) -> Logged {
    Logged {
        now: Timestamp::from_millis(1_800_000_000_000),
        command: Command::DeleteSetting {
            key: format!("work-queue/bench-{n:0>96}"),
            at: Timestamp::EPOCH,
        },
    }
}

async fn case(leader: &CountingRaft, writers: usize, seconds: f64) -> anyhow::Result<CaseResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (raft, stop) = (leader.clone(), stop.clone());
        tasks.spawn(async move {
            let mut hist = Histogram::<u64>::new(3)?;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                raft.client_write(command(w as u64 * 1_000_000_000 + n))
                    .await
                    .map_err(|e| anyhow::anyhow!("a write failed: {e}"))?;
                hist.record(t.elapsed().as_micros() as u64)?;
                n += 1;
            }
            anyhow::Ok(hist)
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3)?;
    while let Some(h) = tasks.join_next().await {
        hist.add(h??)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(CaseResult {
        writers,
        commands: hist.len(),
        commands_per_s: hist.len() as f64 / elapsed,
        commit_p50_ms: hist.value_at_quantile(0.5) as f64 / 1e3,
        commit_p99_ms: hist.value_at_quantile(0.99) as f64 / 1e3,
    })
}

pub async fn run(args: RaftArgs) -> anyhow::Result<()> {
    if !(1..=7).contains(&args.voters) {
        bail!("--voters {}: from 1 to 7", args.voters);
    }
    if args.seconds.is_nan() || args.seconds <= 0.0 {
        bail!("--seconds must be positive");
    }
    let dir = tempfile::Builder::new().prefix("flotilla-bench-").tempdir()?;
    let fsync = fdatasync_p50_ms(dir.path(), 200).context("measuring fdatasync")?;
    let names: Vec<String> = (1..=args.voters).map(|i| format!("n{i}")).collect();
    let certs = dir.path().join("certs");
    flotilla_cluster::certs::init(&certs, &names, &[])?;
    let config = config()?;
    let mut voters: Vec<LocalVoter> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        voters.push(start_voter(dir.path(), &certs, i as u64 + 1, name, None, config.clone()).await?);
    }
    let members: std::collections::BTreeMap<u64, _> = voters
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64 + 1, v.member.clone()))
        .collect();
    voters[0]
        .raft
        .initialize(members)
        .await
        .map_err(|e| anyhow::anyhow!("initializing: {e}"))?;
    let metrics = voters[0]
        .raft
        .wait(Some(Duration::from_secs(30)))
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .map_err(|e| anyhow::anyhow!("no leader within 30 s: {e}"))?;
    let leader_id = metrics.current_leader.context("no leader")?;
    let leader = voters
        .iter()
        .find(|v| v.member.name == format!("n{leader_id}"))
        .context("the leader is not one of the voters")?
        .raft
        .clone();
    // Leadership settles: the first writes may meet a lease still being taken (at most 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = leader.client_write(command(u64::MAX)).await {
        if Instant::now() > deadline {
            bail!("the leader took no write within 30 s: {e}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut results = Vec::new();
    for &w in &args.writers {
        let r = case(&leader, w, args.seconds)
            .await
            .with_context(|| format!("{w} writers"))?;
        if !args.json {
            eprintln!(
                "{:>8} writers {:>10.0} commands/s  commit p50 {:.3} ms  p99 {:.3} ms",
                r.writers, r.commands_per_s, r.commit_p50_ms, r.commit_p99_ms
            );
        }
        results.push(r);
    }
    for v in voters {
        v.stop().await;
    }
    let report = Report {
        scenario: "raft",
        voters: args.voters,
        fdatasync_p50_ms: fsync,
        seconds_per_case: args.seconds,
        results,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!(
            "raft: {} voters in one process over QUIC (fdatasync p50 {fsync:.3} ms)",
            args.voters
        );
    }
    Ok(())
}
