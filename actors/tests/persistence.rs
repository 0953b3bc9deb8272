//! The persistence actor: commands made durable, applied, answered, read back, recovered.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on what they set up

use std::sync::Arc;
use std::time::Duration;

use flotilla_actors::persistence::{
    self, LogCursor, MemKv, OpenError, PersistError, PersistenceConfig, PersistenceHandle, Read, ReadReply,
    RunFilter,
};
use flotilla_runtime::{
    Command, Decision, Epoch, Event, EventPayload, FlowRunId, LogBatchId, LogLevel, LogLine, NewFlowRun,
    NodeId, Proposal, Reply, Resource, RetryPolicy, State, StateName, StateType, Timestamp, TransitionId,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;

const WAIT: Duration = Duration::from_secs(20);

fn new_run(id: FlowRunId) -> Command {
    Command::CreateFlowRun(NewFlowRun {
        id,
        flow_name: "etl".into(),
        parameters: serde_json::json!({"day": "2026-11-25"}),
        deployment_id: None,
        deployment_name: None,
        parent_task_run: None,
        idempotency_key: None,
        tags: vec!["t".into()],
        work_queue: None,
        retry_policy: RetryPolicy::none(),
        resume: true,
        scheduled_time: None,
        result_storage: None,
    })
}

fn node() -> NodeId {
    "n1".parse().unwrap()
}

fn propose(id: FlowRunId, name: StateName, rng: &mut SmallRng) -> Command {
    Command::ProposeFlowRunState {
        run: id,
        proposal: Proposal::from_worker(
            State::named(name, Timestamp::EPOCH),
            TransitionId::new(Timestamp::EPOCH, rng),
            Epoch::FIRST,
            node(),
        ),
    }
}

async fn start(config: PersistenceConfig) -> (PersistenceHandle, ractor::concurrency::JoinHandle<()>) {
    tokio::time::timeout(WAIT, persistence::start(config))
        .await
        .expect("start timed out")
        .expect("start failed")
}

/// The times of the first 100 log lines of `run`.
async fn log_times(h: &PersistenceHandle, run: FlowRunId) -> Vec<Timestamp> {
    let ReadReply::Logs { lines, .. } = h
        .read(Read::Logs {
            flow_run: run,
            after: None,
            limit: 100,
        })
        .await
        .unwrap()
    else {
        panic!("not a page of logs")
    };
    lines.into_iter().map(|l| l.timestamp).collect()
}

/// A log batch of `run` with one line, written at `at`.
fn one_line_batch(run: FlowRunId, at: Timestamp, rng: &mut SmallRng) -> Command {
    Command::AppendLogs {
        batch: LogBatchId::new(at, rng),
        flow_run: run,
        lines: vec![LogLine {
            flow_run: run,
            task_run: None,
            timestamp: at,
            level: LogLevel::Info,
            target: "t".into(),
            message: format!("at {at}"),
        }],
    }
}

async fn submit(h: &PersistenceHandle, c: Command) -> Reply {
    tokio::time::timeout(WAIT, h.submit(c))
        .await
        .expect("submit timed out")
        .expect("fault")
        .expect("refused")
}

async fn run_through(h: &PersistenceHandle, id: FlowRunId, rng: &mut SmallRng) {
    submit(h, new_run(id)).await;
    for name in [StateName::Pending, StateName::Running, StateName::Completed] {
        match submit(h, propose(id, name, rng)).await {
            Reply::FlowRunTransition {
                decision: Decision::Accept(s),
                ..
            } => assert_eq!(s.name, name),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_survive_a_restart_with_history_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(1);
    let ids: Vec<FlowRunId> = (0..20)
        .map(|_| FlowRunId::new(Timestamp::from_millis(1), &mut rng))
        .collect();
    let (h, join) = start(PersistenceConfig::for_tests(dir.path())).await;
    for id in &ids {
        run_through(&h, *id, &mut rng).await;
    }
    let events_before = h.events(None, 1000).await.unwrap();
    assert_eq!(events_before.len(), 80);
    h.stop(join).await;

    let (h, join) = start(PersistenceConfig::for_tests(dir.path())).await;
    for id in &ids {
        let run = h.flow_run(*id).await.unwrap().expect("run lost");
        assert_eq!(run.lifecycle.state.kind, StateType::Completed);
        let names: Vec<StateName> = h
            .flow_run_history(*id, 0, 100)
            .await
            .unwrap()
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
    }
    let events_after = h.events(None, 1000).await.unwrap();
    assert_eq!(events_after, events_before);
    // Paging through events after an id.
    let page = h.events(Some(events_after[9].id), 5).await.unwrap();
    assert_eq!(page, events_after[10..15].to_vec());
    let completed = h
        .flow_runs(RunFilter::State(StateType::Completed), None, 7)
        .await
        .unwrap();
    assert_eq!(completed.len(), 7);
    let rest = h
        .flow_runs(RunFilter::State(StateType::Completed), Some(completed[6].id), 100)
        .await
        .unwrap();
    assert_eq!(rest.len(), 13);
    h.stop(join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_replayed_into_an_empty_store_rebuilds_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(2);
    let mut config = PersistenceConfig::for_tests(dir.path());
    // Never checkpoint, so the whole log stays.
    config.checkpoint_bytes = u64::MAX;
    config.checkpoint_interval = Duration::from_secs(3600);
    let kv = MemKv::new();
    let opened = persistence::open_with_store(config.clone(), Arc::new(kv.clone())).unwrap();
    let (h, join) = persistence::start_opened(opened).await.unwrap();
    let id = FlowRunId::new(Timestamp::from_millis(1), &mut rng);
    run_through(&h, id, &mut rng).await;
    let history = h.flow_run_history(id, 0, 10).await.unwrap();
    h.stop(join).await;
    // A brand-new, empty store: everything comes back from the command log alone.
    let opened = persistence::open_with_store(config, Arc::new(MemKv::new())).unwrap();
    assert_eq!(opened.replayed, 4);
    let (h, join) = persistence::start_opened(opened).await.unwrap();
    assert_eq!(h.flow_run_history(id, 0, 10).await.unwrap(), history);
    h.stop(join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_command_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(3);
    let (h, join) = start(PersistenceConfig::for_tests(dir.path())).await;
    let id = FlowRunId::new(Timestamp::from_millis(1), &mut rng);
    let first = submit(&h, new_run(id)).await;
    let again = submit(&h, new_run(id)).await;
    match (first, again) {
        (
            Reply::FlowRunCreated {
                run: a,
                created: true,
            },
            Reply::FlowRunCreated {
                run: b,
                created: false,
            },
        ) => assert_eq!(a, b),
        other => panic!("{other:?}"),
    }
    let claim = propose(id, StateName::Pending, &mut rng);
    let a = submit(&h, claim.clone()).await;
    let b = submit(&h, claim).await;
    assert_eq!(a, b);
    assert_eq!(
        h.events(None, 100).await.unwrap().len(),
        2,
        "the resend wrote an event"
    );
    h.stop(join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_published_in_order_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(4);
    let (h, join) = start(PersistenceConfig::for_tests(dir.path())).await;
    let mut sub = h.subscribe();
    let id = FlowRunId::new(Timestamp::from_millis(1), &mut rng);
    run_through(&h, id, &mut rng).await;
    let mut names = Vec::new();
    for _ in 0..4 {
        let e = tokio::time::timeout(WAIT, sub.recv()).await.unwrap().unwrap();
        names.push(e.event.clone());
    }
    assert_eq!(
        names,
        [
            "flotilla.flow-run.Scheduled",
            "flotilla.flow-run.Pending",
            "flotilla.flow-run.Running",
            "flotilla.flow-run.Completed"
        ]
    );
    h.stop(join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_lag_stays_bounded_and_the_log_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let config = PersistenceConfig::for_tests(dir.path());
    let (lag_max, checkpoint_bytes) = (config.store_lag_bytes_max, config.checkpoint_bytes);
    let (h, join) = start(config).await;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..32u64 {
        let h = h.clone();
        tasks.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(100 + t);
            let mut max_lag = 0;
            for _ in 0..40 {
                let id = FlowRunId::new(Timestamp::from_millis(1), &mut rng);
                run_through(&h, id, &mut rng).await;
                max_lag = max_lag.max(h.stats().await.unwrap().lag_bytes);
            }
            max_lag
        });
    }
    let mut max_lag = 0;
    while let Some(r) = tokio::time::timeout(WAIT * 3, tasks.join_next()).await.unwrap() {
        max_lag = max_lag.max(r.unwrap());
    }
    // The lag can pass the bound by at most one batch (the one being written when it was hit).
    assert!(
        max_lag <= lag_max + 256 * 1024,
        "lag {max_lag} over the bound {lag_max}"
    );
    let stats = h.stats().await.unwrap();
    assert_eq!(stats.flow_runs, 32 * 40);
    assert!(
        stats.log_syncs < 32 * 40 * 4,
        "no group commit: {} syncs",
        stats.log_syncs
    );
    // Checkpoints happened, and the log was cut behind them.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = h.stats().await.unwrap();
        if s.checkpointed == s.applied && s.log_segments <= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no checkpoint caught up: {s:?} (checkpoint every {checkpoint_bytes} bytes)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop(join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_over_the_size_limit_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = PersistenceConfig::for_tests(dir.path());
    let max = config.command_bytes_max;
    let (h, join) = start(config).await;
    let mut rng = SmallRng::seed_from_u64(5);
    let id = FlowRunId::new(Timestamp::from_millis(1), &mut rng);
    let Command::CreateFlowRun(mut big) = new_run(id) else {
        unreachable!()
    };
    big.parameters = serde_json::json!({"blob": "x".repeat(max + 10)});
    let small = FlowRunId::new(Timestamp::from_millis(1), &mut rng);
    let (a, b) = tokio::join!(h.submit(Command::CreateFlowRun(big)), h.submit(new_run(small)));
    assert!(matches!(a, Err(PersistError::TooLarge { .. })), "{a:?}");
    assert!(matches!(b, Ok(Ok(Reply::FlowRunCreated { .. }))), "{b:?}");
    assert!(h.flow_run(id).await.unwrap().is_none());
    h.stop(join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_paged_with_a_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let (h, join) = start(PersistenceConfig::for_tests(dir.path())).await;
    let mut rng = SmallRng::seed_from_u64(6);
    let id = FlowRunId::new(Timestamp::from_millis(1), &mut rng);
    submit(&h, new_run(id)).await;
    for b in 0..3 {
        let lines = (0..4)
            .map(|i| LogLine {
                flow_run: id,
                task_run: None,
                timestamp: Timestamp::from_millis(i),
                level: LogLevel::Info,
                target: "t".into(),
                message: format!("batch {b} line {i}"),
            })
            .collect();
        submit(
            &h,
            Command::AppendLogs {
                batch: LogBatchId::new(Timestamp::from_millis(b), &mut rng),
                flow_run: id,
                lines,
            },
        )
        .await;
    }
    let mut all = Vec::new();
    let mut cursor: Option<LogCursor> = None;
    loop {
        let ReadReply::Logs { lines, next } = h
            .read(Read::Logs {
                flow_run: id,
                after: cursor,
                limit: 5,
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        if lines.is_empty() {
            break;
        }
        assert!(lines.len() <= 5);
        all.extend(lines.into_iter().map(|l| l.message));
        cursor = next;
    }
    let want: Vec<String> = (0..3)
        .flat_map(|b| (0..4).map(move |i| format!("batch {b} line {i}")))
        .collect();
    assert_eq!(all, want);
    h.stop(join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_events_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let (h, join) = start(PersistenceConfig::for_tests(dir.path())).await;
    let mut rng = SmallRng::seed_from_u64(7);
    let e = Event {
        id: flotilla_runtime::EventId::new(Timestamp::from_millis(5), &mut rng),
        occurred: Timestamp::from_millis(5),
        event: "user.deployed".into(),
        resource: Resource::new("app.service.web", Some("web")),
        related: vec![],
        payload: EventPayload::Data(serde_json::json!({"version": 3})),
    };
    submit(&h, Command::AppendEvent(e.clone())).await;
    submit(&h, Command::AppendEvent(e.clone())).await;
    assert_eq!(h.events(None, 10).await.unwrap(), vec![e]);
    h.stop(join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_directory_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let (h, join) = start(PersistenceConfig::for_tests(dir.path())).await;
    let err = persistence::open(PersistenceConfig::for_tests(dir.path())).unwrap_err();
    assert!(matches!(err, OpenError::Locked { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&dir.path().join("LOCK").display().to_string()),
        "{err}"
    );
    h.stop(join).await;
    // Released when the actor stops.
    persistence::open(PersistenceConfig::for_tests(dir.path())).unwrap();
}

#[test]
fn a_newer_or_damaged_format_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("FORMAT"), "flotilla-data-format 99\n").unwrap();
    let err = persistence::open(PersistenceConfig::for_tests(dir.path())).unwrap_err();
    assert!(matches!(err, OpenError::NewerFormat { found: 99, .. }), "{err}");
    assert!(
        err.to_string().contains("FORMAT") && err.to_string().contains("upgrade"),
        "{err}"
    );
    std::fs::write(dir.path().join("FORMAT"), "garbage").unwrap();
    let err = persistence::open(PersistenceConfig::for_tests(dir.path())).unwrap_err();
    assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");
    // Data without a format file is not silently taken for a new directory.
    std::fs::remove_file(dir.path().join("FORMAT")).unwrap();
    std::fs::create_dir_all(dir.path().join("log")).unwrap();
    let err = persistence::open(PersistenceConfig::for_tests(dir.path())).unwrap_err();
    assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");
}

#[test]
fn an_unreadable_data_directory_is_an_error_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let err = persistence::open(PersistenceConfig::for_tests(&file)).unwrap_err();
    assert!(matches!(err, OpenError::Io { .. }), "{err}");
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_log_is_refused_with_the_segment_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = PersistenceConfig::for_tests(dir.path());
    config.checkpoint_bytes = u64::MAX;
    config.checkpoint_interval = Duration::from_secs(3600);
    config.segment_bytes_max = 512;
    let kv = MemKv::new();
    let (h, join) = persistence::start_opened(
        persistence::open_with_store(config.clone(), Arc::new(kv.clone())).unwrap(),
    )
    .await
    .unwrap();
    let mut rng = SmallRng::seed_from_u64(8);
    for _ in 0..10 {
        submit(&h, new_run(FlowRunId::new(Timestamp::from_millis(1), &mut rng))).await;
    }
    h.stop(join).await;
    let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    assert!(segments.len() >= 2);
    let mut bytes = std::fs::read(&segments[0]).unwrap();
    bytes[12] ^= 0xff;
    std::fs::write(&segments[0], bytes).unwrap();
    let err = persistence::open_with_store(config, Arc::new(MemKv::new())).unwrap_err();
    assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");
    assert!(
        err.to_string().contains(&segments[0].display().to_string()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_forgets_old_runs_events_and_logs_and_keeps_the_histories_of_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(8);
    let (h, join) = start(PersistenceConfig::for_tests(dir.path())).await;
    let user_event = |at: Timestamp, rng: &mut SmallRng| Event {
        id: flotilla_runtime::EventId::new(at, rng),
        occurred: at,
        event: "user.deployed".into(),
        resource: Resource::new("app.service.web", Some("web")),
        related: vec![],
        payload: EventPayload::Data(serde_json::json!({})),
    };
    // Events are stored in the order of their ids: an old one comes first.
    let old = user_event(Timestamp::from_millis(5), &mut rng);
    submit(&h, Command::AppendEvent(old)).await;
    let (done, live) = (
        FlowRunId::new(Timestamp::from_millis(1), &mut rng),
        FlowRunId::new(Timestamp::from_millis(2), &mut rng),
    );
    run_through(&h, done, &mut rng).await;
    submit(&h, new_run(live)).await;
    submit(&h, propose(live, StateName::Pending, &mut rng)).await;
    let now = Timestamp::from(chrono::Utc::now());
    // Log batches: an ancient one of each run, and a recent one of the live run.
    for (run, at) in [
        (done, Timestamp::from_millis(10)),
        (live, Timestamp::from_millis(10)),
        (live, now),
    ] {
        submit(&h, one_line_batch(run, at, &mut rng)).await;
    }
    let new = user_event(now, &mut rng);
    submit(&h, Command::AppendEvent(new.clone())).await;
    let hour = Duration::from_secs(3600);
    let prune = Command::Prune(flotilla_runtime::Prune {
        runs_before: now + hour,
        events_before: Timestamp::from_micros(now.as_micros() - hour.as_micros() as i64),
        logs_before: Timestamp::from_micros(now.as_micros() - hour.as_micros() as i64),
        runs_max: 100,
    });
    assert!(matches!(
        submit(&h, prune).await,
        Reply::Pruned {
            flow_runs: 1,
            task_runs: 0,
            more: false
        }
    ));
    assert!(h.flow_run(done).await.unwrap().is_none());
    h.stop(join).await;

    // What the store holds after a restart: only the live run, its history and recent log, the
    // recent user event.
    let (h, join) = start(PersistenceConfig::for_tests(dir.path())).await;
    assert!(h.flow_run(done).await.unwrap().is_none());
    assert!(h.flow_run_history(done, 0, 100).await.unwrap().is_none());
    let names: Vec<StateName> = h
        .flow_run_history(live, 0, 100)
        .await
        .unwrap()
        .expect("the live run's history")
        .iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, [StateName::Scheduled, StateName::Pending]);
    let events = h.events(None, 1000).await.unwrap();
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        [
            "flotilla.flow-run.Scheduled",
            "flotilla.flow-run.Pending",
            "user.deployed"
        ],
        "{events:?}"
    );
    assert_eq!(events[2], new);
    assert!(log_times(&h, done).await.is_empty());
    assert_eq!(log_times(&h, live).await, [now]);

    // The first pruning indexed the logs by time: the next ones walk that index, oldest first.
    let later = now + Duration::from_millis(1);
    for at in [Timestamp::from_millis(20), later] {
        submit(&h, one_line_batch(live, at, &mut rng)).await;
    }
    let again = Command::Prune(flotilla_runtime::Prune {
        runs_before: Timestamp::from_millis(1),
        events_before: Timestamp::from_millis(1),
        logs_before: Timestamp::from_micros(now.as_micros() - hour.as_micros() as i64),
        runs_max: 100,
    });
    assert!(matches!(
        submit(&h, again).await,
        Reply::Pruned { flow_runs: 0, .. }
    ));
    h.stop(join).await;
    let (h, join) = start(PersistenceConfig::for_tests(dir.path())).await;
    assert_eq!(
        log_times(&h, live).await,
        [now, later],
        "the ancient batch written after the first pruning stays"
    );
    h.stop(join).await;
}

/// A store whose first event scan says it started, then waits until the test lets it go.
struct SlowEvents {
    inner: MemKv,
    gate: std::sync::Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
}

impl persistence::KvStore for SlowEvents {
    fn apply(&self, ops: &[persistence::KvOp]) -> Result<(), persistence::KvError> {
        self.inner.apply(ops)
    }
    fn get(&self, tree: persistence::Tree, key: &[u8]) -> Result<Option<Vec<u8>>, persistence::KvError> {
        self.inner.get(tree, key)
    }
    fn scan(
        &self,
        tree: persistence::Tree,
        prefix: &[u8],
        start: std::ops::Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, persistence::KvError> {
        if tree == persistence::Tree::Events
            && let Some((entered, gate)) = self.gate.lock().unwrap().take()
        {
            let _ = entered.send(());
            let _ = gate.recv_timeout(WAIT);
        }
        self.inner.scan(tree, prefix, start, limit)
    }
    fn floor(
        &self,
        tree: persistence::Tree,
        key: &[u8],
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, persistence::KvError> {
        self.inner.floor(tree, key)
    }
    fn checkpoint(&self) -> Result<(), persistence::KvError> {
        self.inner.checkpoint()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_read_does_not_hold_up_commands() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(9);
    let (release, gate) = std::sync::mpsc::channel();
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let kv = Arc::new(SlowEvents {
        inner: MemKv::new(),
        gate: std::sync::Mutex::new(Some((entered_tx, gate))),
    });
    let opened = persistence::open_with_store(PersistenceConfig::for_tests(dir.path()), kv).unwrap();
    let (h, join) = persistence::start_opened(opened).await.unwrap();
    // The read waits inside the store...
    let reader = {
        let h = h.clone();
        tokio::spawn(async move { h.events(None, 10).await })
    };
    tokio::task::spawn_blocking(move || entered.recv_timeout(WAIT))
        .await
        .unwrap()
        .expect("the read reaches the store");
    // ...while commands are still written, applied and answered.
    let id = FlowRunId::new(Timestamp::from_millis(1), &mut rng);
    run_through(&h, id, &mut rng).await;
    assert!(!reader.is_finished());
    release.send(()).unwrap();
    let events = tokio::time::timeout(WAIT, reader)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(events.len() <= 4);
    h.stop(join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_holders_are_recorded_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(10);
    let (h, join) = start(PersistenceConfig::for_tests(dir.path())).await;
    // Not complete yet (as in a data directory from before the record): None.
    assert_eq!(h.slot_holds().await.unwrap(), None);
    submit(
        &h,
        Command::Slots(flotilla_runtime::SlotChange::Complete { holds: vec![] }),
    )
    .await;
    assert_eq!(h.slot_holds().await.unwrap(), Some(vec![]));
    let (a, b) = (
        flotilla_runtime::TaskRunId::new(Timestamp::from_millis(1), &mut rng),
        flotilla_runtime::TaskRunId::new(Timestamp::from_millis(2), &mut rng),
    );
    let hold = |holder, tags: &[&str]| {
        Command::Slots(flotilla_runtime::SlotChange::Hold {
            holder,
            node: node(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        })
    };
    submit(&h, hold(a, &["db", "web"])).await;
    submit(&h, hold(b, &["db"])).await;
    submit(
        &h,
        Command::Slots(flotilla_runtime::SlotChange::Free {
            holders: vec![a],
            tag: Some("web".into()),
        }),
    )
    .await;
    submit(
        &h,
        Command::Slots(flotilla_runtime::SlotChange::Free {
            holders: vec![b],
            tag: None,
        }),
    )
    .await;
    h.stop(join).await;
    let (h, join) = start(PersistenceConfig::for_tests(dir.path())).await;
    assert_eq!(
        h.slot_holds().await.unwrap(),
        Some(vec![("db".to_owned(), a, node())])
    );
    h.stop(join).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remembered_answers_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = PersistenceConfig::for_tests(dir.path());
    // Checkpoint at every chance: the answers come back from the store, not the log.
    config.checkpoint_bytes = 1;
    let (h, join) = start(config.clone()).await;
    let id = |n: u8| flotilla_runtime::control::RequestId::from_uuid(uuid::Uuid::from_bytes([n; 16]));
    for n in 1..=3u8 {
        let remember = Command::Remember(flotilla_runtime::RememberedOutcome {
            request_id: id(n),
            answer: vec![n; 8],
            max: 2,
            keep: Duration::from_secs(3600),
        });
        submit(&h, remember).await;
    }
    h.stop(join).await;
    let (h, join) = start(config).await;
    assert_eq!(h.answer_to(id(1)).await.unwrap(), None);
    assert_eq!(h.answer_to(id(2)).await.unwrap(), Some(vec![2; 8]));
    assert_eq!(h.answer_to(id(3)).await.unwrap(), Some(vec![3; 8]));
    h.stop(join).await;
}
