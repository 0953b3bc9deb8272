//! `flotilla bench failover`: what losing a worker costs, on a local 3-node cluster started as
//! child processes (a control node serving only the `ops` work queue, two workers):
//!
//! 1. a soak with both cores kept busy (a spinning thread per core in this process, and a
//!    steady stream of flow runs): how many times a live node was suspected (marked
//!    unreachable), and how many runs did not complete;
//! 2. a shell pipeline of `--steps` steps on a worker SIGKILLed mid-way: how long until the
//!    control node notices, until the run runs again on the other worker, and how many steps
//!    done before the kill ran again (none should).
//!
//! The loss of the control node itself is not measured here: it needs the replicated control
//! state (`--voters`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use flotilla::{COMMAND_FLOW, FlowRunId, NOOP_FLOW, StateType};
use serde::Serialize;

use crate::cluster_cmd::LocalCluster;

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
    nodes: u32,
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

pub async fn run(args: FailoverArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (3..=1_000).contains(&args.steps),
        "--steps must be between 3 and 1000"
    );
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let port = super::cluster::free_ports()?;
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    say("starting 3 nodes (n1 serves only the queue ops)…");
    let mut cluster =
        LocalCluster::start_with(3, dir.path(), port, &["--quiet-runs"], &["--queues", "ops"]).await?;
    let result = measure(&args, &mut cluster, &say).await;
    cluster.stop().await;
    let r = result?;
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
    }
    Ok(())
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

async fn measure(
    args: &FailoverArgs,
    cluster: &mut LocalCluster,
    say: &impl Fn(&str),
) -> anyhow::Result<Report> {
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
        nodes: 3,
    })
}
