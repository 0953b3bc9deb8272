//! The flow engine driven through the SDK on an embedded node: retries by supervision, panics,
//! timeouts, cancellation, flow retries as resumes, caching, results, logs, tag limits,
//! subflows, `submit`/`map`/`wait_for`, and the client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on what they set up

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use flotilla::{Durability, StateName, StateType, TaskError, flow, task};

use flotilla_tests::{WAIT, node, run};

// --- retries, panics, timeouts

static FLAKY: AtomicU32 = AtomicU32::new(0);

#[task(retries = 3, retry_delay = "10ms")]
async fn flaky_twice() -> Result<u32, String> {
    let n = FLAKY.fetch_add(1, Ordering::SeqCst) + 1;
    if n <= 2 {
        Err(format!("attempt {n} failed"))
    } else {
        Ok(n)
    }
}

static PANICKY: AtomicU32 = AtomicU32::new(0);

#[task(retries = 1)]
async fn panics_once() -> Result<u32, String> {
    if PANICKY.fetch_add(1, Ordering::SeqCst) == 0 {
        panic!("boom");
    }
    Ok(7)
}

#[task(retries = 1)]
async fn always_fails() -> Result<u32, String> {
    Err("nope".into())
}

#[task(timeout = "50ms")]
async fn too_slow() -> Result<u32, String> {
    tokio::time::sleep(Duration::from_secs(10)).await;
    Ok(1)
}

#[flow]
async fn supervised() -> Result<(u32, u32), TaskError> {
    Ok((flaky_twice().await?, panics_once().await?))
}

#[flow]
async fn failing() -> Result<u32, TaskError> {
    always_fails().await
}

#[flow]
async fn timing_out() -> Result<u32, TaskError> {
    too_slow().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_panics_are_retried_by_supervision() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |b| b.flow(supervised).flow(failing).flow(timing_out)).await;
    let client = node.client();
    let r = run(&node, "supervised", serde_json::json!({})).await;
    assert_eq!(
        r.lifecycle.state.kind,
        StateType::Completed,
        "{}",
        r.lifecycle.state
    );
    assert_eq!(client.result::<(u32, u32)>(r.id).await.unwrap(), (3, 7));
    let tasks = client.task_runs(r.id).await.unwrap();
    let flaky = tasks.iter().find(|t| t.key.task_key == "flaky_twice").unwrap();
    assert_eq!(flaky.lifecycle.run_count, 3);
    let names: Vec<StateName> = client
        .task_history(flaky.id)
        .await
        .unwrap()
        .iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        names,
        [
            StateName::Pending,
            StateName::Running,
            StateName::AwaitingRetry,
            StateName::Retrying,
            StateName::AwaitingRetry,
            StateName::Retrying,
            StateName::Completed
        ]
    );
    let panicky = tasks.iter().find(|t| t.key.task_key == "panics_once").unwrap();
    assert_eq!(panicky.lifecycle.run_count, 2);
    let h = client.task_history(panicky.id).await.unwrap();
    assert!(
        h.iter().any(|s| s
            .message
            .as_deref()
            .is_some_and(|m| m.contains("panicked") && m.contains("boom"))),
        "{h:?}"
    );

    // Out of retries: the task fails for good, and so does its flow.
    let r = run(&node, "failing", serde_json::json!({})).await;
    assert_eq!(r.lifecycle.state.kind, StateType::Failed);
    assert!(r.lifecycle.state.message.as_deref().unwrap().contains("nope"));
    let t = &client.task_runs(r.id).await.unwrap()[0];
    assert_eq!(
        (t.lifecycle.state.kind, t.lifecycle.run_count),
        (StateType::Failed, 2)
    );

    // A timeout ends as Failed named TimedOut.
    let r = run(&node, "timing_out", serde_json::json!({})).await;
    assert_eq!(r.lifecycle.state.kind, StateType::Failed);
    let t = &client.task_runs(r.id).await.unwrap()[0];
    assert_eq!(t.lifecycle.state.name, StateName::TimedOut);
    node.shutdown().await;
}

// --- flow retries re-run the flow as a resume

static STEP_A: AtomicU32 = AtomicU32::new(0);
static STEP_B: AtomicU32 = AtomicU32::new(0);

#[task]
async fn step_a() -> Result<u32, String> {
    Ok(STEP_A.fetch_add(1, Ordering::SeqCst) + 1)
}

#[task]
async fn step_b() -> Result<u32, String> {
    let n = STEP_B.fetch_add(1, Ordering::SeqCst) + 1;
    if n == 1 { Err("first time".into()) } else { Ok(n) }
}

#[flow(retries = 1, retry_delay = "10ms")]
async fn resumable() -> Result<(u32, u32), TaskError> {
    Ok((step_a().await?, step_b().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_retry_resumes_completed_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |b| b.flow(resumable)).await;
    let r = run(&node, "resumable", serde_json::json!({})).await;
    assert_eq!(
        r.lifecycle.state.kind,
        StateType::Completed,
        "{}",
        r.lifecycle.state
    );
    assert_eq!(r.lifecycle.run_count, 2);
    // step_a ran once (its recorded result came back on the retry); step_b twice.
    assert_eq!(node.client().result::<(u32, u32)>(r.id).await.unwrap(), (1, 2));
    assert_eq!(STEP_A.load(Ordering::SeqCst), 1);
    node.shutdown().await;
}

// --- manual retry

static MANUAL: AtomicU32 = AtomicU32::new(0);

#[task]
async fn fails_first_run() -> Result<u32, String> {
    if MANUAL.fetch_add(1, Ordering::SeqCst) == 0 {
        Err("not yet".into())
    } else {
        Ok(5)
    }
}

#[flow]
async fn manual() -> Result<u32, TaskError> {
    fails_first_run().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_retry_runs_the_failed_flow_again() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |b| b.flow(manual)).await;
    let client = node.client();
    let r = run(&node, "manual", serde_json::json!({})).await;
    assert_eq!(r.lifecycle.state.kind, StateType::Failed);
    let s = client.retry(r.id).await.unwrap();
    assert_eq!(s.name, StateName::AwaitingRetry);
    let r = tokio::time::timeout(WAIT, client.wait(r.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.lifecycle.state.kind, StateType::Completed);
    assert_eq!(r.epoch.get(), 2);
    assert_eq!(client.result::<u32>(r.id).await.unwrap(), 5);
    // A completed run needs the forced retry.
    assert!(client.retry(r.id).await.is_err());
    node.shutdown().await;
}

// --- cancellation

#[task]
async fn sleeps_long() -> Result<u32, String> {
    tokio::time::sleep(Duration::from_secs(60)).await;
    Ok(1)
}

#[flow]
async fn long_running() -> Result<u32, TaskError> {
    let a = sleeps_long.submit();
    let b = sleeps_long.submit();
    Ok(a.await? + b.await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_the_tasks_and_ends_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |b| b.flow(long_running)).await;
    let client = node.client();
    let id = client.run("long_running", serde_json::json!({})).await.unwrap();
    // Wait until both tasks are running.
    let mut events = client.events(id);
    let mut running = 0;
    while running < 2 {
        let e = tokio::time::timeout(WAIT, events.next()).await.unwrap().unwrap();
        if e.event == "flotilla.task-run.Running" {
            running += 1;
        }
    }
    let s = tokio::time::timeout(WAIT, client.cancel(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.kind, StateType::Cancelled);
    let tasks = client.task_runs(id).await.unwrap();
    assert_eq!(tasks.len(), 2);
    assert!(
        tasks
            .iter()
            .all(|t| t.lifecycle.state.kind == StateType::Cancelled),
        "{tasks:?}"
    );
    let names: Vec<StateName> = client.history(id).await.unwrap().iter().map(|s| s.name).collect();
    assert_eq!(
        &names[names.len() - 2..],
        [StateName::Cancelling, StateName::Cancelled]
    );
    // A run not yet started is cancelled at once.
    node.shutdown().await;
}

// --- caching

static COMPUTED: AtomicU32 = AtomicU32::new(0);

#[task(cache_expiration = "1h")]
async fn expensive(x: u32) -> Result<u32, String> {
    COMPUTED.fetch_add(1, Ordering::SeqCst);
    Ok(x * 2)
}

#[task(cache_expiration = "1h", refresh_cache = true)]
async fn always_fresh(x: u32) -> Result<u32, String> {
    COMPUTED.fetch_add(100, Ordering::SeqCst);
    Ok(x * 3)
}

fn by_parity(x: &u32) -> String {
    (x % 2).to_string()
}

static KEYED: AtomicU32 = AtomicU32::new(0);

#[task(cache_key = by_parity)]
async fn keyed(x: u32) -> Result<u32, String> {
    KEYED.fetch_add(1, Ordering::SeqCst);
    Ok(x)
}

#[flow]
async fn caching(x: u32) -> Result<(u32, u32, u32, u32), TaskError> {
    Ok((
        expensive(x).await?,
        always_fresh(x).await?,
        keyed(x).await?,
        keyed(x + 2).await?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_results_are_reused_unless_refreshed() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |b| b.flow(caching)).await;
    let client = node.client();
    let first = run(&node, "caching", serde_json::json!({"x": 5})).await;
    assert_eq!(
        client.result::<(u32, u32, u32, u32)>(first.id).await.unwrap(),
        (10, 15, 5, 5)
    );
    assert_eq!(COMPUTED.load(Ordering::SeqCst), 101);
    // The user's key (parity) made the second keyed call a cache hit already.
    assert_eq!(KEYED.load(Ordering::SeqCst), 1);
    let second = run(&node, "caching", serde_json::json!({"x": 5})).await;
    assert_eq!(
        client.result::<(u32, u32, u32, u32)>(second.id).await.unwrap(),
        (10, 15, 5, 5)
    );
    assert_eq!(
        COMPUTED.load(Ordering::SeqCst),
        201,
        "expensive ran again, or always_fresh did not"
    );
    let tasks = client.task_runs(second.id).await.unwrap();
    let e = tasks.iter().find(|t| t.key.task_key == "expensive").unwrap();
    assert_eq!(e.lifecycle.state.name, StateName::Cached);
    let f = tasks.iter().find(|t| t.key.task_key == "always_fresh").unwrap();
    assert_eq!(f.lifecycle.state.name, StateName::Completed);
    // Different inputs: no hit.
    let third = run(&node, "caching", serde_json::json!({"x": 6})).await;
    assert_eq!(
        client.result::<(u32, u32, u32, u32)>(third.id).await.unwrap(),
        (12, 18, 6, 6)
    );
    node.shutdown().await;
}

// --- logs

#[task]
async fn chatty(n: u32) -> Result<u32, String> {
    tracing::info!(n, "working on it");
    tracing::warn!("almost done");
    Ok(n)
}

#[flow]
async fn logging() -> Result<u32, TaskError> {
    tracing::info!("flow starts");
    let a = chatty(1).await?;
    Ok(a + chatty(2).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_captured_with_their_runs() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |b| b.flow(logging)).await;
    let client = node.client();
    let r = run(&node, "logging", serde_json::json!({})).await;
    let logs = client.logs(r.id).await.unwrap();
    let messages: Vec<&str> = logs.iter().map(|l| l.message.as_str()).collect();
    assert!(messages.contains(&"flow starts"), "{messages:?}");
    assert_eq!(
        messages.iter().filter(|m| m.starts_with("working on it")).count(),
        2,
        "{messages:?}"
    );
    let tasks = client.task_runs(r.id).await.unwrap();
    let task_lines = logs.iter().filter(|l| l.task_run.is_some()).count();
    assert_eq!(task_lines, 4);
    assert!(
        logs.iter()
            .filter(|l| l.task_run.is_some())
            .all(|l| tasks.iter().any(|t| Some(t.id) == l.task_run))
    );
    assert!(logs.iter().any(|l| l.level == flotilla::LogLevel::Warn));
    node.shutdown().await;
}

// --- tag concurrency limits, released on every exit path

static RUNNING: AtomicU32 = AtomicU32::new(0);
static MAX_RUNNING: AtomicU32 = AtomicU32::new(0);

#[task(tags = ["db"], retries = 1)]
async fn uses_db(mode: String) -> Result<u32, String> {
    let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    MAX_RUNNING.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    match mode.as_str() {
        "fail" => Err("failed".into()),
        "panic" => panic!("panicked"),
        _ => Ok(1),
    }
}

#[task(tags = ["db"], timeout = "20ms")]
async fn db_timeout() -> Result<u32, String> {
    tokio::time::sleep(Duration::from_secs(5)).await;
    Ok(1)
}

#[flow]
async fn limited(mode: String, n: u32) -> Result<u32, TaskError> {
    let handles = uses_db.map((0..n).map(|_| mode.clone()));
    let mut ok = 0;
    for h in handles {
        if h.await.is_ok() {
            ok += 1;
        }
    }
    Ok(ok)
}

#[flow]
async fn limited_timeout(n: u32) -> Result<u32, TaskError> {
    let handles: Vec<_> = (0..n).map(|_| db_timeout.submit()).collect();
    let mut failed = 0;
    for h in handles {
        if h.await.is_err() {
            failed += 1;
        }
    }
    Ok(failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_limit_holds_and_every_exit_releases_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |b| {
        b.flow(limited).flow(limited_timeout).concurrency_limit("db", 2)
    })
    .await;
    let client = node.client();
    for (mode, ok) in [("ok", 6), ("fail", 0), ("panic", 0)] {
        let r = run(&node, "limited", serde_json::json!({"mode": mode, "n": 6})).await;
        assert_eq!(client.result::<u32>(r.id).await.unwrap(), ok, "{mode}");
    }
    assert!(
        MAX_RUNNING.load(Ordering::SeqCst) <= 2,
        "the limit was passed: {}",
        MAX_RUNNING.load(Ordering::SeqCst)
    );
    // Timeouts release their slots too: 4 tasks that time out with 2 slots all get to run.
    let r = run(&node, "limited_timeout", serde_json::json!({"n": 4})).await;
    assert_eq!(client.result::<u32>(r.id).await.unwrap(), 4);
    // Cancellation releases them: the limit's slots are all free afterwards, so a last run
    // of 2 at once completes.
    let id = client
        .run("limited_timeout", serde_json::json!({"n": 2}))
        .await
        .unwrap();
    let _ = client.cancel(id).await;
    let r = run(&node, "limited", serde_json::json!({"mode": "ok", "n": 2})).await;
    assert_eq!(client.result::<u32>(r.id).await.unwrap(), 2);
    node.shutdown().await;
}

// --- subflows, wait_for, map

#[task]
async fn double(x: u32) -> Result<u32, String> {
    Ok(x * 2)
}

#[flow]
async fn child(x: u32) -> Result<u32, TaskError> {
    double(x).await
}

#[flow]
async fn parent(n: u32) -> Result<u32, TaskError> {
    let mapped = double.map(0..n);
    let first = double.submit(100);
    // A handle reads its task run's state: Completed once it is done.
    let _ = first.completion().await;
    if first.state().await.map(|s| s.kind) != Some(StateType::Completed) {
        return Err(TaskError::Aborted("the handle's state is not Completed".into()));
    }
    let after = double.wait_for([first.completion()]).submit(1);
    let mut sum = first.await? + after.await?;
    for h in mapped {
        sum += h.await?;
    }
    sum += child(10).await?;
    Ok(sum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subflows_map_and_wait_for() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |b| b.flow(parent).flow(child)).await;
    let client = node.client();
    let r = run(&node, "parent", serde_json::json!({"n": 5})).await;
    assert_eq!(
        r.lifecycle.state.kind,
        StateType::Completed,
        "{}",
        r.lifecycle.state
    );
    assert_eq!(
        client.result::<u32>(r.id).await.unwrap(),
        200 + 2 + (0..5).map(|x| x * 2).sum::<u32>() + 20
    );
    let tasks = client.task_runs(r.id).await.unwrap();
    let sub = tasks.iter().find(|t| t.key.task_key == "subflow:child").unwrap();
    assert_eq!(sub.lifecycle.state.kind, StateType::Completed);
    // The child is a flow run of its own, linked to the parent's task run.
    let children = client
        .flow_runs(flotilla::RunFilter::All, None, 100)
        .await
        .unwrap();
    let c = children.iter().find(|f| f.flow_name == "child").unwrap();
    assert_eq!(c.parent_task_run, Some(sub.id));
    assert_eq!(c.lifecycle.state.kind, StateType::Completed);
    // Call indexes count per task in call order.
    let mut idx: Vec<u32> = tasks
        .iter()
        .filter(|t| t.key.task_key == "double")
        .map(|t| t.key.call_index)
        .collect();
    idx.sort();
    assert_eq!(idx, (0..7).collect::<Vec<_>>());
    node.shutdown().await;
}

// --- the client

#[flow]
async fn echo(text: String, times: Option<u32>) -> Result<String, TaskError> {
    Ok(text.repeat(times.unwrap_or(1) as usize))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_checks_its_input_and_reads_runs() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |b| b.flow(echo).durability(Durability::Strict)).await;
    let client = node.client();
    assert!(matches!(
        client.run("nope", serde_json::json!({})).await,
        Err(flotilla::Error::UnknownFlow { .. })
    ));
    let err = client
        .run("echo", serde_json::json!({"txt": "a"}))
        .await
        .unwrap_err();
    assert!(matches!(err, flotilla::Error::Parameters(_)), "{err}");
    assert!(err.to_string().contains("txt"), "{err}");
    let r = run(&node, "echo", serde_json::json!({"text": "ab", "times": 3})).await;
    assert_eq!(client.result::<String>(r.id).await.unwrap(), "ababab");
    let names: Vec<StateName> = client
        .history(r.id)
        .await
        .unwrap()
        .iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        names,
        [
            StateName::Scheduled,
            StateName::Pending,
            StateName::Running,
            StateName::Completed
        ]
    );
    let listed = client
        .flow_runs(flotilla::RunFilter::State(StateType::Completed), None, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(matches!(
        client.flow_run(flotilla::FlowRunId::from_bytes([9; 16])).await,
        Err(flotilla::Error::NotFound(_))
    ));
    node.shutdown().await;
}

// --- what a previous process of the node left

#[flow(resume = false)]
async fn not_resumed() -> Result<u32, TaskError> {
    Ok(1)
}

#[flow]
async fn resumed() -> Result<u32, TaskError> {
    Ok(2)
}

/// Leaves runs as a crashed process of node `n1` would: one Running, one Running of a flow
/// that is not resumed, one Cancelling, one Completed.
async fn leave_runs(dir: &std::path::Path) -> Vec<flotilla::FlowRunId> {
    use flotilla_actors::persistence::{self, PersistenceConfig};
    use flotilla_runtime::{Command, Epoch, NewFlowRun, NodeId, Proposal, State, TransitionId};
    let (p, join) = persistence::start(PersistenceConfig::new(dir)).await.unwrap();
    let node: NodeId = "n1".parse().unwrap();
    let mut ids = Vec::new();
    for (i, (flow, last)) in [
        ("resumed", StateName::Running),
        ("not_resumed", StateName::Running),
        ("resumed", StateName::Cancelling),
        ("resumed", StateName::Completed),
    ]
    .into_iter()
    .enumerate()
    {
        let id = flotilla::FlowRunId::from_bytes([i as u8 + 1; 16]);
        let resume = flow == "resumed";
        p.submit(Command::CreateFlowRun(
            NewFlowRun::new(id, flow, serde_json::json!({})).with_options(Default::default(), resume),
        ))
        .await
        .unwrap()
        .unwrap();
        let mut n = 0u8;
        let mut propose = |name: StateName, worker: bool| {
            n += 1;
            let tid = TransitionId::from_bytes([i as u8 * 16 + n; 16]);
            let state = State::named(name, flotilla::runtime::Timestamp::EPOCH);
            let proposal = if worker {
                Proposal::from_worker(state, tid, Epoch::FIRST, node.clone())
            } else {
                Proposal::new(state, tid)
            };
            Command::ProposeFlowRunState { run: id, proposal }
        };
        let steps: Vec<(StateName, bool)> = match last {
            StateName::Cancelling => vec![
                (StateName::Pending, true),
                (StateName::Running, true),
                (StateName::Cancelling, false),
            ],
            StateName::Completed => vec![
                (StateName::Pending, true),
                (StateName::Running, true),
                (StateName::Completed, true),
            ],
            _ => vec![(StateName::Pending, true), (StateName::Running, true)],
        };
        for (name, worker) in steps {
            p.submit(propose(name, worker)).await.unwrap().unwrap();
        }
        ids.push(id);
    }
    p.stop(join).await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resumes_what_it_left() {
    let dir = tempfile::tempdir().unwrap();
    let ids = leave_runs(dir.path()).await;
    let node = node(dir.path(), |b| b.name("n1").flow(resumed).flow(not_resumed)).await;
    assert_eq!(node.resumed(), &ids[..1]);
    let client = node.client();
    let r = tokio::time::timeout(WAIT, client.wait(ids[0]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.lifecycle.state.kind, StateType::Completed);
    let names: Vec<StateName> = client
        .history(ids[0])
        .await
        .unwrap()
        .iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(
        names,
        [
            StateName::Scheduled,
            StateName::Pending,
            StateName::Running,
            StateName::Crashed,
            StateName::Resuming,
            StateName::Pending,
            StateName::Running,
            StateName::Completed
        ]
    );
    assert_eq!(r.epoch.get(), 2);
    // resume = false: it stays Crashed.
    assert_eq!(
        client.flow_run(ids[1]).await.unwrap().lifecycle.state.kind,
        StateType::Crashed
    );
    // Cancelling ends Cancelled; a terminal run is left alone.
    assert_eq!(
        client.flow_run(ids[2]).await.unwrap().lifecycle.state.kind,
        StateType::Cancelled
    );
    assert_eq!(
        client.flow_run(ids[3]).await.unwrap().lifecycle.state.kind,
        StateType::Completed
    );
    node.shutdown().await;
}
