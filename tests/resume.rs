//! Durable resume across process crashes: a child process runs a flow and is killed with
//! SIGKILL once some task completions are durable (it learns that from the run's events, which
//! are published only once durable); a second process opens the same data directory, resumes
//! the crashed run, and must not run again what had completed.
//!
//! The children are this test binary run again with `FLOTILLA_RESUME_CHILD` set (see
//! `resume_child_process`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on what they set up

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flotilla::{Durability, Node, StateType, TaskError, flow, task};

const CHILD: &str = "FLOTILLA_RESUME_CHILD";
const BOUND: Duration = Duration::from_secs(90);

static STARTED: AtomicU32 = AtomicU32::new(0);

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A step: says it ran; in the first process, steps after the first `SLOW_AFTER` hang.
#[task]
async fn step(i: u32) -> Result<u32, String> {
    say(format!("RAN {i}"));
    let n = STARTED.fetch_add(1, Ordering::SeqCst);
    let slow_after: u32 = std::env::var("FLOTILLA_RESUME_SLOW_AFTER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX);
    if n >= slow_after {
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
    Ok(i + 1)
}

#[flow]
async fn six_steps() -> Result<u32, TaskError> {
    let mut sum = 0;
    for i in 0..6 {
        sum += step(i).await?;
    }
    Ok(sum)
}

#[flow]
async fn twenty_submitted() -> Result<u32, TaskError> {
    let handles: Vec<_> = (0..20).map(|i| step.submit(i)).collect();
    let mut sum = 0;
    for h in handles {
        sum += h.await?;
    }
    Ok(sum)
}

#[flow]
async fn fifty_mapped() -> Result<u32, TaskError> {
    let mut sum = 0;
    for h in step.map(0..50) {
        sum += h.await?;
    }
    Ok(sum)
}

async fn start(dir: &str, durability: Durability) -> Node {
    Node::builder()
        .data_dir(dir)
        .name("resume-test")
        .durability(durability)
        .log_to_stderr(false)
        .flow(six_steps)
        .flow(twenty_submitted)
        .flow(fifty_mapped)
        .start()
        .await
        .expect("child: node start")
}

async fn first(dir: String, flow: String, durability: Durability) {
    let node = start(&dir, durability).await;
    let client = node.client();
    let id = client
        .run(&flow, serde_json::json!({}))
        .await
        .expect("child: run");
    let mut events = client.events(id);
    while let Some(e) = events.next().await {
        if e.event == "flotilla.task-run.Completed" {
            // Durable: events are published only after their write is.
            let task = e
                .resource
                .id()
                .and_then(|r| r.strip_prefix("flotilla.task-run."))
                .map(str::to_owned)
                .unwrap_or_default();
            let tasks = client.task_runs(id).await.expect("child: task runs");
            if let Some(t) = tasks.iter().find(|t| t.id.to_string() == task) {
                say(format!("DURABLE {}", t.key.call_index));
            }
        }
    }
}

async fn second(dir: String, durability: Durability) {
    // What the reopened store holds, before anything runs again.
    {
        let opened =
            flotilla_actors::persistence::open(flotilla_actors::persistence::PersistenceConfig::new(&dir))
                .expect("child: open");
        for t in opened.store().hot().task_runs() {
            if t.lifecycle.state.kind == StateType::Completed {
                say(format!("STORED {}", t.key.call_index));
            }
        }
    }
    let node = start(&dir, durability).await;
    let resumed = node.resumed().to_vec();
    assert_eq!(resumed.len(), 1, "child: resumed {resumed:?}");
    let run = node.client().wait(resumed[0]).await.expect("child: wait");
    let result: u32 = node.client().result(run.id).await.expect("child: result");
    say(format!("RESULT {} {result}", run.lifecycle.state));
    node.shutdown().await;
}

/// Not a test of its own: the entry point of the child processes (does nothing unless
/// `FLOTILLA_RESUME_CHILD` is set).
#[test]
fn resume_child_process() {
    let Ok(spec) = std::env::var(CHILD) else { return };
    let parts: Vec<String> = spec.split('|').map(str::to_owned).collect();
    let [phase, dir, flow, durability] = &parts[..] else {
        panic!("bad child spec {spec}")
    };
    let durability = if durability == "strict" {
        Durability::Strict
    } else {
        Durability::Default
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match phase.as_str() {
        "first" => rt.block_on(first(dir.clone(), flow.clone(), durability)),
        _ => rt.block_on(second(dir.clone(), durability)),
    }
}

struct Child {
    proc: std::process::Child,
    lines: mpsc::Receiver<String>,
}

fn spawn(spec: String, slow_after: Option<u32>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "resume_child_process",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(CHILD, spec)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some(n) = slow_after {
        cmd.env("FLOTILLA_RESUME_SLOW_AFTER", n.to_string());
    }
    let mut proc = cmd.spawn().unwrap();
    let stdout = proc.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Child { proc, lines: rx }
}

/// The numbers after `tag` in the lines (a line may start with the test harness's own text).
fn numbers(lines: &[String], tag: &str) -> Vec<u32> {
    lines
        .iter()
        .filter_map(|l| l.find(tag).map(|at| &l[at + tag.len()..]))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Runs `flow` in a first process until `durable` completions are durable, kills it, resumes
/// in a second process; returns (ran first, durable seen, stored at reopen, ran second, result).
fn crash_and_resume(
    flow: &str,
    durability: &str,
    slow_after: u32,
    durable: usize,
) -> (Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let mut c = spawn(format!("first|{d}|{flow}|{durability}"), Some(slow_after));
    let deadline = Instant::now() + BOUND;
    let mut first_lines = Vec::new();
    while numbers(&first_lines, "DURABLE ").len() < durable {
        let left = deadline
            .checked_duration_since(Instant::now())
            .expect("the first process made too little progress");
        match c.lines.recv_timeout(left) {
            Ok(l) => first_lines.push(l),
            Err(_) => panic!("the first process stopped early: {first_lines:?}"),
        }
    }
    c.proc.kill().unwrap(); // SIGKILL
    let _ = c.proc.wait();
    first_lines.extend(c.lines.try_iter());
    let mut c = spawn(format!("second|{d}|{flow}|{durability}"), None);
    let mut second_lines = Vec::new();
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .expect("the second process did not finish");
        match c.lines.recv_timeout(left) {
            Ok(l) => second_lines.push(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the second process did not finish: {second_lines:?}")
            }
        }
    }
    let status = c.proc.wait().unwrap();
    assert!(status.success(), "the second process failed: {second_lines:?}");
    let result = second_lines
        .iter()
        .find_map(|l| l.find("RESULT ").map(|at| l[at + 7..].to_owned()))
        .unwrap_or_default();
    (
        numbers(&first_lines, "RAN "),
        numbers(&first_lines, "DURABLE "),
        numbers(&second_lines, "STORED "),
        numbers(&second_lines, "RAN "),
        result,
    )
}

fn set(v: &[u32]) -> BTreeSet<u32> {
    v.iter().copied().collect()
}

fn check(flow: &str, n: u32, slow_after: u32, durable: usize) {
    let want_result: u32 = (1..=n).sum();
    for durability in ["strict", "default"] {
        let (ran1, durable_seen, stored, ran2, result) =
            crash_and_resume(flow, durability, slow_after, durable);
        let (durable_seen, stored, ran2) = (set(&durable_seen), set(&stored), set(&ran2));
        assert_eq!(
            result,
            format!("Completed {want_result}"),
            "{flow} {durability}: wrong result"
        );
        // Nothing seen durable runs again; nothing the reopened store holds Completed runs again.
        assert!(
            durable_seen.is_disjoint(&ran2),
            "{flow} {durability}: ran again {:?}",
            durable_seen.intersection(&ran2).collect::<Vec<_>>()
        );
        assert!(
            durable_seen.is_subset(&stored),
            "{flow} {durability}: durable {durable_seen:?} but stored {stored:?}; first {ran1:?}"
        );
        assert!(
            stored.is_disjoint(&ran2),
            "{flow} {durability}: stored completed yet ran again {:?}",
            stored.intersection(&ran2).collect::<Vec<_>>()
        );
        // Everything else runs in the second process.
        let all: BTreeSet<u32> = (0..n).collect();
        assert_eq!(
            &stored | &ran2,
            all,
            "{flow} {durability}: stored {stored:?} ran {ran2:?}"
        );
        if durability == "strict" {
            // Strict: every completion is durable before the flow goes on, so exactly the tasks
            // the first process had not completed run again.
            let ran1 = set(&ran1);
            assert!(stored.is_subset(&ran1));
            if flow == "six_steps" {
                assert_eq!(
                    ran2,
                    (durable as u32..n).collect(),
                    "strict six_steps: the second process ran {ran2:?}"
                );
            }
        }
    }
}

#[test]
fn six_sequential_tasks_resume_after_the_third() {
    check("six_steps", 6, 3, 3);
}

#[test]
fn twenty_submitted_tasks_resume() {
    check("twenty_submitted", 20, 5, 5);
}

#[test]
fn fifty_mapped_tasks_resume() {
    check("fifty_mapped", 50, 10, 10);
}
