//! `flotilla bench failover`: what losing a node costs.
//!
//! 1. Replication alone: three voters over real stores in this process (each its own QUIC
//!    endpoint, Raft log and store), state proposals from 1,024 submitters to the leader for
//!    `--write-seconds`: durable, replicated commands per second.
//! 2. A local cluster of five processes: n1–n3 voters serving only the `ops` work queue, n4 and
//!    n5 workers. Sequential empty flow runs through a voter: the remote run's p50.
//! 3. A soak with both cores kept busy (a spinning thread per core in this process, and a
//!    steady stream of flow runs): how many times a live node was suspected (marked
//!    unreachable), and how many runs did not complete.
//! 4. A shell pipeline of `--steps` steps on a worker SIGKILLed mid-way: how long until the
//!    leader notices, until the run runs again on the other worker, and how many steps done
//!    before the kill ran again (none should).
//! 5. The leader SIGKILLed while 16 clients create runs under idempotency keys: how long until
//!    a write sent after the kill is acknowledged, and whether every acknowledged run is still
//!    there and no key made two runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use flotilla::{COMMAND_FLOW, FlowRunId, NOOP_FLOW, StateType};
use serde::Serialize;

use crate::cluster_cmd::LocalCluster;
use flotilla_actors::replication::local::start_store_voter;
use flotilla_actors::replication::voter::Snapshots;
use flotilla_actors::replication::voter::node_id;
use openraft::async_runtime::WatchReceiver as _;

#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// Print one JSON object on one line instead of a table.
    #[arg(long)]
    json: bool,
    /// How long the soak lasts, in seconds (0: no soak).
    #[arg(long, default_value_t = 300)]
    soak_seconds: u64,
    /// Steps of the pipeline whose worker is killed.
    #[arg(long, default_value_t = 20)]
    steps: u32,
    /// How long each step takes, in milliseconds.
    #[arg(long, default_value_t = 100)]
    step_ms: u64,
    /// How long replicated writes are measured, in seconds.
    #[arg(long, default_value_t = 5.0)]
    write_seconds: f64,
    /// How many submitters write at once.
    #[arg(long, default_value_t = 1024)]
    write_submitters: usize,
    /// Measure the replicated writes only.
    #[arg(long)]
    writes_only: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    soak_s: u64,
    false_suspicions: u64,
    soak_runs: u64,
    soak_runs_not_completed: u64,
    detect_s: f64,
    resume_s: f64,
    steps: u32,
    steps_done_before_kill: usize,
    steps_run_again: usize,
    duplicate_completions: usize,
    leader_failover_s: f64,
    writes_acknowledged: usize,
    lost_acknowledged: usize,
    keys_with_two_runs: usize,
    writes_per_s_3_voters: f64,
    write_ack_p50_ms: f64,
    raft_log_mb_max: f64,
    remote_flow_p50_ms: f64,
    nodes: u32,
}

/// Replicated writes through three voters in one process.
#[derive(Debug, Default, serde::Serialize)]
struct Writes {
    writes_per_s_3_voters: f64,
    write_ack_p50_ms: f64,
    /// The largest Raft log directory of the three at the end (snapshots purge it).
    raft_log_mb_max: f64,
    /// The leader's log purged through this index at the end.
    log_purged_through: u64,
    /// The leader's last applied index.
    applied: u64,
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

pub async fn run(args: FailoverArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (3..=1_000).contains(&args.steps),
        "--steps must be between 3 and 1000"
    );
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    say("replicated writes: 3 voters over real stores, 1,024 submitters…");
    anyhow::ensure!(
        args.write_submitters >= 1,
        "--write-submitters must be at least 1"
    );
    let writes = replicated_writes(args.write_seconds, args.write_submitters).await?;
    say(&format!(
        "  {:.0} commands/s, ack p50 {:.3} ms; {} applied, log purged through {}, largest Raft log {:.1} MB",
        writes.writes_per_s_3_voters,
        writes.write_ack_p50_ms,
        writes.applied,
        writes.log_purged_through,
        writes.raft_log_mb_max
    ));
    if args.writes_only {
        if args.json {
            println!("{}", serde_json::to_string(&writes)?);
        }
        return Ok(());
    }
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let port = super::cluster::free_ports()?;
    say("starting 5 nodes (voters n1-n3 serve only the queue ops; n4, n5 workers)…");
    let mut cluster =
        LocalCluster::start_voters(5, 3, dir.path(), port, &["--quiet-runs"], &["--queues", "ops"]).await?;
    let result = measure(&args, &mut cluster, &say).await;
    cluster.stop().await;
    let mut r = result?;
    r.writes_per_s_3_voters = writes.writes_per_s_3_voters;
    r.write_ack_p50_ms = writes.write_ack_p50_ms;
    r.raft_log_mb_max = writes.raft_log_mb_max;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("cluster of {} nodes on 127.0.0.1 (release build)", r.nodes);
        println!(
            "  soak of {} s with both cores busy: {} false suspicions; {} of {} runs not completed",
            r.soak_s, r.false_suspicions, r.soak_runs_not_completed, r.soak_runs
        );
        println!(
            "  a worker SIGKILLed mid-pipeline: noticed after {:.3} s, its run running again on the other after {:.3} s",
            r.detect_s, r.resume_s
        );
        println!(
            "  steps done before the kill: {}, run again: {} (of {})",
            r.steps_done_before_kill, r.steps_run_again, r.steps
        );
        println!(
            "  the leader SIGKILLed under writes: a write acknowledged {:.3} s after; {} acknowledged, {} lost, {} keys with two runs",
            r.leader_failover_s, r.writes_acknowledged, r.lost_acknowledged, r.keys_with_two_runs
        );
        println!(
            "  3 voters: {:.0} replicated commands/s (ack p50 {:.3} ms); remote empty flow run p50 {:.3} ms",
            r.writes_per_s_3_voters, r.write_ack_p50_ms, r.remote_flow_p50_ms
        );
    }
    Ok(())
}

/// The size of the files in `dir` and below.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    })
}

/// Durable commands per second through three voters in this process, `submitters` at the
/// leader; their acknowledgement's p50 in ms; and how far snapshots purged the logs.
async fn replicated_writes(seconds: f64, submitters: usize) -> anyhow::Result<Writes> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let names = ["v1", "v2", "v3"].map(String::from);
    flotilla_cluster::certs::init(&dir.path().join("certs"), &names, &[])?;
    let mut voters = Vec::new();
    for n in &names {
        voters.push(start_store_voter(dir.path(), &dir.path().join("certs"), n, Snapshots::default()).await?);
    }
    let members: BTreeMap<u64, flotilla_actors::replication::Member> = voters
        .iter()
        .map(|v| (node_id(&v.member.name), v.member.clone()))
        .collect();
    voters[0]
        .voter
        .raft
        .initialize(members)
        .await
        .context("forming the voters")?;
    let m = voters[0]
        .voter
        .raft
        .wait(Some(Duration::from_secs(30)))
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .context("electing a leader")?;
    let leader = m.current_leader.context("no leader")?;
    let leading = voters
        .iter()
        .find(|v| node_id(&v.member.name) == leader)
        .context("the leader is not a voter")?;
    // Leading, with what it committed on taking the lead applied.
    leading
        .voter
        .raft
        .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
        .await
        .context("the leader cannot serve yet")?;
    let handle = leading.persistence.clone();
    let result = async {
        let cycles = super::persistence::create_runs(&handle, 10_000).await?;
        let (r, _) = super::persistence::run_case(&handle, cycles, submitters, seconds).await?;
        let m = leading.voter.raft.metrics().borrow_watched().clone();
        let raft_log_bytes = names
            .iter()
            .map(|n| dir_bytes(&dir.path().join(n).join("raft")))
            .max()
            .unwrap_or(0);
        anyhow::Ok(Writes {
            writes_per_s_3_voters: r.commands_per_s.round(),
            write_ack_p50_ms: r.ack_p50_ms,
            raft_log_mb_max: (raft_log_bytes as f64 / 1e5).round() / 10.0,
            log_purged_through: m.purged.map_or(0, |p| p.index),
            applied: m.last_applied.map_or(0, |p| p.index),
        })
    }
    .await;
    for v in voters {
        v.stop().await;
    }
    result
}

/// Spins on every core until `stop`.
fn burn(stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    (0..cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..10_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
                    }
                }
            })
        })
        .collect()
}

/// Watches membership until `stop`: every time a node goes from reachable to unreachable.
fn watch(
    client: flotilla::Client,
    stop: Arc<AtomicBool>,
    suspicions: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut reachable: BTreeMap<String, bool> = BTreeMap::new();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(s) = client.cluster_status().await {
                for m in s.nodes {
                    let was = reachable.insert(m.name.to_string(), m.reachable);
                    if was == Some(true) && !m.reachable {
                        suspicions.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

async fn soak(
    args: &FailoverArgs,
    cluster: &LocalCluster,
    say: &impl Fn(&str),
) -> anyhow::Result<(u64, u64, u64)> {
    if args.soak_seconds == 0 {
        return Ok((0, 0, 0));
    }
    say(&format!(
        "soak: {} s with both cores busy and runs flowing…",
        args.soak_seconds
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let suspicions = Arc::new(AtomicU64::new(0));
    let watcher = watch(cluster.client.clone(), stop.clone(), suspicions.clone());
    let burners = burn(&stop);
    let (runs, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let until = Instant::now() + Duration::from_secs(args.soak_seconds);
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (client, runs, failed) = (cluster.client.clone(), runs.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            while Instant::now() < until {
                let ok = match client.run(NOOP_FLOW, serde_json::Value::Null).await {
                    Ok(id) => matches!(
                        client.wait_for(id, Duration::from_secs(60)).await,
                        Ok(r) if r.lifecycle.state.kind == StateType::Completed
                    ),
                    Err(_) => false,
                };
                runs.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for c in clients {
        c.await?;
    }
    stop.store(true, Ordering::Relaxed);
    for b in burners {
        let _ = b.join();
    }
    watcher.await?;
    Ok((
        suspicions.load(Ordering::Relaxed),
        runs.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    ))
}

/// Polls `check` every 20 ms until it gives a value, for at most `within`.
async fn until<T, F>(what: &str, within: Duration, mut check: impl FnMut() -> F) -> anyhow::Result<T>
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The p50 of sequential empty flow runs, request to completion, in ms.
async fn remote_flow_p50(client: &flotilla::Client, runs: usize) -> anyhow::Result<f64> {
    for _ in 0..50 {
        let id = client.run(NOOP_FLOW, serde_json::Value::Null).await?;
        client.wait(id).await?;
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    for _ in 0..runs {
        let t = Instant::now();
        let id = client.run(NOOP_FLOW, serde_json::Value::Null).await?;
        let run = client.wait(id).await?;
        anyhow::ensure!(
            run.lifecycle.state.kind == StateType::Completed,
            "flow run {id} ended {}",
            run.lifecycle.state
        );
        hist.record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX))?;
    }
    Ok(hist.value_at_quantile(0.5) as f64 / 1000.0)
}

/// What writers saw around the leader's loss.
struct LeaderLoss {
    failover: Duration,
    acknowledged: usize,
    lost: usize,
    keys_with_two_runs: usize,
}

/// Kills the leader while 16 clients create runs under keys; see [`LeaderLoss`].
async fn lose_leader(cluster: &mut LocalCluster) -> anyhow::Result<LeaderLoss> {
    let client = cluster.client.clone();
    let leader = client
        .cluster_status()
        .await?
        .replication
        .and_then(|r| r.leader)
        .context("no leader in the cluster's status")?;
    let killed_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let stop_at = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..16 {
        let (client, killed_at, stop_at) = (client.clone(), killed_at.clone(), stop_at.clone());
        writers.spawn(async move {
            // (key, id, sent after the kill, acknowledged at)
            let mut acked: Vec<(String, FlowRunId, bool, Instant)> = Vec::new();
            let mut j = 0u64;
            while !stop_at.load(Ordering::Relaxed) {
                let key = format!("failover-{w}-{j}");
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let killed = killed_at.lock().map(|k| k.is_some()).unwrap_or(false);
                    match client
                        .run_with_key(NOOP_FLOW, serde_json::Value::Null, &key)
                        .await
                    {
                        Ok(id) => {
                            acked.push((key.clone(), id, killed, Instant::now()));
                            break;
                        }
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => return Err(anyhow::anyhow!("a write not acknowledged within 20 s: {e}")),
                    }
                }
                j += 1;
            }
            Ok(acked)
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.kill(&leader).await?;
    let killed = Instant::now();
    if let Ok(mut k) = killed_at.lock() {
        *k = Some(killed);
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop_at.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    while let Some(r) = writers.join_next().await {
        acked.extend(r??);
    }
    let failover = acked
        .iter()
        .filter(|a| a.2)
        .map(|a| a.3.saturating_duration_since(killed))
        .min()
        .context("no write sent after the leader's loss was acknowledged")?;
    let mut by_key: BTreeMap<&str, std::collections::BTreeSet<FlowRunId>> = BTreeMap::new();
    for (key, id, ..) in &acked {
        by_key.entry(key).or_default().insert(*id);
    }
    let mut lost = 0;
    for (_, id, ..) in &acked {
        if client.flow_run(*id).await.is_err() {
            lost += 1;
        }
    }
    Ok(LeaderLoss {
        failover,
        acknowledged: acked.len(),
        lost,
        keys_with_two_runs: by_key.values().filter(|ids| ids.len() > 1).count(),
    })
}

async fn measure(
    args: &FailoverArgs,
    cluster: &mut LocalCluster,
    say: &impl Fn(&str),
) -> anyhow::Result<Report> {
    say("remote flow runs: 200 sequential empty runs…");
    let status = cluster.client.cluster_status().await?;
    let leader_addr = status
        .replication
        .as_ref()
        .and_then(|r| r.leader.as_ref())
        .and_then(|l| status.nodes.iter().find(|m| m.name.as_str() == l))
        .map(|m| m.addr.clone())
        .context("no leader in the cluster's status")?;
    let at_leader = flotilla::Client::connect(&leader_addr, &cluster.certs).await?;
    let via_follower = remote_flow_p50(&cluster.client, 200).await?;
    let remote_flow_p50_ms = remote_flow_p50(&at_leader, 200).await?;
    say(&format!(
        "  p50 {remote_flow_p50_ms:.3} ms at the leader, {via_follower:.3} ms through the first voter"
    ));
    let (false_suspicions, soak_runs, soak_failed) = soak(args, cluster, say).await?;

    say(&format!(
        "a pipeline of {} steps of {} ms; its worker is killed mid-way…",
        args.steps, args.step_ms
    ));
    let client = cluster.client.clone();
    let steps: Vec<serde_json::Value> = (0..args.steps)
        .map(|_| {
            let wait = format!("sleep {:.3}", args.step_ms as f64 / 1000.0);
            serde_json::json!(["sh", "-c", wait])
        })
        .collect();
    let id: FlowRunId = client
        .run(COMMAND_FLOW, serde_json::json!({ "steps": steps }))
        .await?;
    let done = |runs: &[flotilla::TaskRun]| -> BTreeMap<String, u32> {
        runs.iter()
            .filter(|t| t.lifecycle.state.kind == StateType::Completed)
            .map(|t| (t.key.task_key.clone(), t.lifecycle.run_count))
            .collect()
    };
    let third = (args.steps / 3).max(1) as usize;
    let (node, before) = until("a third of the steps done", Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            let run = client.flow_run(id).await.ok()?;
            let node = run
                .owner
                .filter(|_| run.lifecycle.state.kind == StateType::Running)?;
            let before = done(&client.task_runs(id).await.ok()?);
            (before.len() >= third).then_some((node, before))
        }
    })
    .await?;
    let before = {
        // What completed up to the kill (read again just before it).
        let now = done(&client.task_runs(id).await?);
        if now.len() >= before.len() { now } else { before }
    };
    cluster.kill(node.as_str()).await?;
    let t = Instant::now();
    let detect = until("the killed worker noticed", Duration::from_secs(30), || {
        let (client, node) = (client.clone(), node.clone());
        async move {
            let s = client.cluster_status().await.ok()?;
            s.nodes
                .iter()
                .any(|m| m.name == node && !m.reachable)
                .then(|| t.elapsed())
        }
    })
    .await?;
    let resume = until("the run running on another node", Duration::from_secs(30), || {
        let (client, node) = (client.clone(), node.clone());
        async move {
            let run = client.flow_run(id).await.ok()?;
            let moved = run.owner.as_ref().is_some_and(|o| *o != node);
            let going = matches!(
                run.lifecycle.state.kind,
                StateType::Running | StateType::Completed
            );
            (moved && going).then(|| t.elapsed())
        }
    })
    .await?;
    let run = client.wait_for(id, Duration::from_secs(120)).await?;
    anyhow::ensure!(
        run.lifecycle.state.kind == StateType::Completed,
        "the pipeline ended {}",
        run.lifecycle.state
    );
    let after = done(&client.task_runs(id).await?);
    anyhow::ensure!(
        after.len() == args.steps as usize,
        "{} of {} steps completed",
        after.len(),
        args.steps
    );
    let run_again = before
        .iter()
        .filter(|(step, count)| after.get(*step) != Some(*count))
        .count();
    say("the leader killed while 16 clients write…");
    let loss = lose_leader(cluster).await?;
    Ok(Report {
        scenario: "failover",
        soak_s: args.soak_seconds,
        false_suspicions,
        soak_runs,
        soak_runs_not_completed: soak_failed,
        detect_s: secs(detect),
        resume_s: secs(resume),
        steps: args.steps,
        steps_done_before_kill: before.len(),
        steps_run_again: run_again,
        duplicate_completions: run_again,
        leader_failover_s: secs(loss.failover),
        writes_acknowledged: loss.acknowledged,
        lost_acknowledged: loss.lost,
        keys_with_two_runs: loss.keys_with_two_runs,
        writes_per_s_3_voters: 0.0,
        write_ack_p50_ms: 0.0,
        raft_log_mb_max: 0.0,
        remote_flow_p50_ms: (remote_flow_p50_ms * 1000.0).round() / 1000.0,
        nodes: 5,
    })
}
