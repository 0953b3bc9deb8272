//! Process crashes: a child process submits commands and prints each acknowledged one; the
//! parent kills it with SIGKILL at a random moment, reopens the data directory and checks that
//! every acknowledged command is there, applied once. 20 rounds on one directory, so each round
//! also recovers what the earlier ones left.
//!
//! The child is this test binary run again with `FLOTILLA_CRASH_CHILD_DIR` set (see
//! `crash_child_process`); the seed of a failing run is printed and
//! `FLOTILLA_CRASH_SEED=<seed>` replays its kill times.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on what they set up

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command as Process, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use flotilla_actors::persistence::{self, PersistenceConfig};
use flotilla_runtime::{
    Command, Epoch, FlowRunId, NewFlowRun, NodeId, Proposal, Reply, RetryPolicy, State, StateName, StateType,
    Timestamp, TransitionId,
};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

const CHILD_DIR: &str = "FLOTILLA_CRASH_CHILD_DIR";
const CHILD_ROUND: &str = "FLOTILLA_CRASH_CHILD_ROUND";
const STEPS: [StateName; 3] = [StateName::Pending, StateName::Running, StateName::Completed];

/// The child's work: 8 submitters, each creating runs and taking them to Completed, printing
/// `ACK <key> <step>` once each command is acknowledged. Runs until killed.
async fn child(dir: String, round: u64) {
    let (h, _join) = persistence::start(PersistenceConfig::new(dir))
        .await
        .expect("child: start");
    let mut tasks = Vec::new();
    for s in 0..8u64 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(round * 1000 + s);
            let node: NodeId = "child".parse().unwrap();
            for n in 0.. {
                let key = format!("r{round}-s{s}-n{n}");
                let id = FlowRunId::new(Timestamp::from_millis(1), &mut rng);
                let create = Command::CreateFlowRun(NewFlowRun {
                    id,
                    flow_name: "crash".into(),
                    parameters: serde_json::Value::Null,
                    deployment_id: None,
                    deployment_name: None,
                    parent_task_run: None,
                    idempotency_key: Some(key.clone()),
                    tags: vec![],
                    work_queue: None,
                    retry_policy: RetryPolicy::none(),
                    resume: true,
                    scheduled_time: None,
                    result_storage: None,
                });
                let Ok(Ok(Reply::FlowRunCreated { .. })) = h.submit(create).await else {
                    panic!("child: create")
                };
                ack(&key, 0);
                for (i, name) in STEPS.iter().enumerate() {
                    let p = Proposal::from_worker(
                        State::named(*name, Timestamp::EPOCH),
                        TransitionId::new(Timestamp::EPOCH, &mut rng),
                        Epoch::FIRST,
                        node.clone(),
                    );
                    let Ok(Ok(_)) = h
                        .submit(Command::ProposeFlowRunState { run: id, proposal: p })
                        .await
                    else {
                        panic!("child: propose")
                    };
                    ack(&key, i + 1);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn ack(key: &str, step: usize) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ACK {key} {step}");
    let _ = out.flush();
}

/// Not a test of its own: the entry point of the child process (does nothing unless
/// `FLOTILLA_CRASH_CHILD_DIR` is set).
#[test]
fn crash_child_process() {
    let Ok(dir) = std::env::var(CHILD_DIR) else { return };
    let round: u64 = std::env::var(CHILD_ROUND)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(child(dir, round));
}

fn run_round(dir: &std::path::Path, round: u64, rng: &mut SmallRng, acked: &mut BTreeMap<String, usize>) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Process::new(exe)
        .args([
            "--exact",
            "crash_child_process",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_ROUND, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Wait for the first acknowledgement, then let it run a random while and kill it.
    let first = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the child acknowledged nothing within 60 s");
    let mut lines = vec![first];
    let run_for = Duration::from_millis(rng.random_range(0..400));
    let deadline = std::time::Instant::now() + run_for;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => break,
        }
    }
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    lines.extend(rx.iter());
    let _ = reader.join();
    for line in lines {
        let mut parts = line.split_whitespace();
        if let (Some("ACK"), Some(key), Some(step)) = (parts.next(), parts.next(), parts.next()) {
            let step: usize = step.parse().unwrap();
            let e = acked.entry(key.to_owned()).or_default();
            *e = (*e).max(step);
        }
    }
}

fn check(dir: &std::path::Path, acked: &BTreeMap<String, usize>) {
    let opened = persistence::open(PersistenceConfig::new(dir)).expect("reopen after the crash");
    let hot = opened.store().hot();
    for (key, step) in acked {
        let id = hot
            .flow_run_by_key(key)
            .unwrap_or_else(|| panic!("acknowledged run {key} is missing"));
        let run = hot.flow_run(&id).unwrap();
        let reached = match run.lifecycle.state.kind {
            StateType::Scheduled => 0,
            StateType::Pending => 1,
            StateType::Running => 2,
            StateType::Completed => 3,
            other => panic!("{key} is {other}"),
        };
        assert!(
            reached >= *step,
            "{key}: acknowledged step {step} but the run is at {reached}"
        );
        // Applied once: each state exactly once, in order.
        assert_eq!(
            run.lifecycle.history_len(),
            reached + 1,
            "{key}: history of {} for step {reached}",
            run.lifecycle.history_len()
        );
        assert_eq!(run.lifecycle.run_count, u32::from(reached >= 2));
    }
}

#[test]
fn acknowledged_commands_survive_sigkill() {
    if std::env::var_os(CHILD_DIR).is_some() {
        return;
    }
    let seed: u64 = std::env::var("FLOTILLA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("crash test seed {seed} (replay with FLOTILLA_CRASH_SEED={seed})");
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut acked = BTreeMap::new();
    for round in 0..20 {
        run_round(dir.path(), round, &mut rng, &mut acked);
        check(dir.path(), &acked);
    }
    assert!(
        acked.len() > 20,
        "too few acknowledged commands to mean anything: {}",
        acked.len()
    );
    eprintln!("{} runs acknowledged over 20 kills", acked.len());
}
