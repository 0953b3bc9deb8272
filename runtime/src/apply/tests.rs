//! `apply` against the in-memory state.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::command::LOG_LINES_PER_COMMAND_MAX;
use crate::ids::{LogIndex, NodeId, TransitionId};
use crate::log_line::LogLevel;
use crate::retry::RetryPolicy;
use crate::rules::AbortReason;
use crate::state::{ResultRef, StateName};
use crate::task_run::TaskRunKey;
use crate::view::MemState;

struct World {
    state: MemState,
    index: u64,
    now: Timestamp,
}

fn fid(n: u8) -> FlowRunId {
    FlowRunId::from_bytes([n; 16])
}

fn tid(n: u64) -> TransitionId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_be_bytes());
    b[8..].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    TransitionId::from_bytes(b)
}

fn node(s: &str) -> NodeId {
    s.parse().unwrap()
}

fn new_run(id: FlowRunId) -> NewFlowRun {
    NewFlowRun {
        id,
        flow_name: "etl".into(),
        parameters: serde_json::json!({"n": 1}),
        deployment_id: None,
        deployment_name: None,
        parent_task_run: None,
        idempotency_key: None,
        tags: vec![],
        work_queue: None,
        retry_policy: RetryPolicy::none(),
        resume: true,
        scheduled_time: None,
        result_storage: None,
    }
}

impl World {
    fn new() -> Self {
        World {
            state: MemState::new(),
            index: 0,
            now: Timestamp::from_millis(1_800_000_000_000),
        }
    }

    fn apply(&mut self, c: Command) -> Outcome {
        self.index += 1;
        self.now = self.now + Duration::from_millis(10);
        let out = apply(
            &mut self.state,
            c,
            ApplyContext {
                index: LogIndex::new(self.index),
                now: self.now,
            },
        );
        self.state.store(out.writes.clone());
        out
    }

    fn run(&self, id: FlowRunId) -> &FlowRun {
        self.state.hot.flow_run(&id).unwrap()
    }

    fn propose(&mut self, id: FlowRunId, p: Proposal) -> Decision {
        match self
            .apply(Command::ProposeFlowRunState { run: id, proposal: p })
            .reply
        {
            Ok(Reply::FlowRunTransition { decision, .. }) => decision,
            other => panic!("{other:?}"),
        }
    }

    fn worker(&self, id: FlowRunId, name: StateName, n: u64, on: &str) -> Proposal {
        Proposal::from_worker(State::named(name, self.now), tid(n), self.run(id).epoch, node(on))
    }

    fn history(&self, id: FlowRunId) -> Vec<State> {
        self.state
            .history(crate::ids::RunId::Flow(id))
            .iter()
            .map(|e| self.state.events[e].state().unwrap().clone())
            .collect()
    }
}

#[test]
fn a_flow_run_goes_through_its_lifecycle_with_events_and_history() {
    let mut w = World::new();
    let out = w.apply(Command::CreateFlowRun(new_run(fid(1))));
    assert!(matches!(
        out.reply,
        Ok(Reply::FlowRunCreated { created: true, .. })
    ));
    assert_eq!(out.writes.len(), 2);
    let p = w.worker(fid(1), StateName::Pending, 1, "n1");
    assert!(w.propose(fid(1), p).is_accept());
    assert_eq!(w.run(fid(1)).owner, Some(node("n1")));
    let p = w.worker(fid(1), StateName::Running, 2, "n1");
    assert!(w.propose(fid(1), p).is_accept());
    let mut done = w.worker(fid(1), StateName::Completed, 3, "n1");
    done.state.result = Some(ResultRef::Inline(vec![42]));
    assert!(w.propose(fid(1), done).is_accept());
    let run = w.run(fid(1));
    assert_eq!(run.lifecycle.run_count, 1);
    assert!(run.lifecycle.end_time.is_some());
    assert_eq!(run.lifecycle.total_run_time, Duration::from_millis(10));
    let names: Vec<_> = w.history(fid(1)).iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        [
            StateName::Scheduled,
            StateName::Pending,
            StateName::Running,
            StateName::Completed
        ]
    );
    let evs: Vec<_> = w.state.events.values().map(|e| e.event.as_str()).collect();
    assert_eq!(
        evs,
        [
            "flotilla.flow-run.Scheduled",
            "flotilla.flow-run.Pending",
            "flotilla.flow-run.Running",
            "flotilla.flow-run.Completed"
        ]
    );
    assert!(w.state.hot.active_flow_runs_of(&node("n1")).is_empty());
}

#[test]
fn a_resent_command_returns_the_original_outcome_and_writes_nothing() {
    let mut w = World::new();
    let first = w.apply(Command::CreateFlowRun(new_run(fid(1))));
    let again = w.apply(Command::CreateFlowRun(new_run(fid(1))));
    assert!(again.writes.is_empty());
    match (first.reply, again.reply) {
        (
            Ok(Reply::FlowRunCreated { run: a, .. }),
            Ok(Reply::FlowRunCreated {
                run: b,
                created: false,
            }),
        ) => assert_eq!(a, b),
        other => panic!("{other:?}"),
    }
    let p = w.worker(fid(1), StateName::Pending, 1, "n1");
    let first = w.apply(Command::ProposeFlowRunState {
        run: fid(1),
        proposal: p.clone(),
    });
    let again = w.apply(Command::ProposeFlowRunState {
        run: fid(1),
        proposal: p.clone(),
    });
    assert!(!first.writes.is_empty());
    assert!(again.writes.is_empty());
    assert_eq!(first.reply, again.reply);
    // Still recognised after the run moved on.
    let r = w.worker(fid(1), StateName::Running, 2, "n1");
    w.apply(Command::ProposeFlowRunState {
        run: fid(1),
        proposal: r,
    });
    let late = w.apply(Command::ProposeFlowRunState {
        run: fid(1),
        proposal: p,
    });
    assert!(late.writes.is_empty());
    assert!(matches!(
        late.reply,
        Ok(Reply::FlowRunTransition {
            decision: Decision::Accept(_),
            ..
        })
    ));
    // With a creator's key: the same run whatever the id.
    let mut a = new_run(fid(7));
    a.idempotency_key = Some("scheduled/d/0/2026-01-01T00:00:00Z".into());
    let mut b = new_run(fid(8));
    b.idempotency_key = a.idempotency_key.clone();
    w.apply(Command::CreateFlowRun(a));
    let out = w.apply(Command::CreateFlowRun(b));
    assert!(out.writes.is_empty());
    assert!(matches!(out.reply, Ok(Reply::FlowRunCreated { run, created: false }) if run.id == fid(7)));
}

#[test]
fn a_retry_gives_a_new_epoch_and_the_zombie_is_refused() {
    let mut w = World::new();
    w.apply(Command::CreateFlowRun(new_run(fid(1))));
    let p = w.worker(fid(1), StateName::Pending, 1, "n1");
    w.propose(fid(1), p);
    let zombie = w.worker(fid(1), StateName::Running, 2, "n1");
    let out = w.apply(Command::MarkNodeCrashed {
        node: node("n1"),
        message: "node n1 died".into(),
        key: "crash/n1/1".into(),
    });
    assert_eq!(
        out.reply,
        Ok(Reply::NodeCrashed {
            crashed: vec![fid(1)],
            cancelled: vec![]
        })
    );
    assert_eq!(w.run(fid(1)).lifecycle.state.kind, StateType::Crashed);
    let out = w.apply(Command::RetryFlowRun {
        run: fid(1),
        request: RetryRequest {
            transition_id: tid(3),
            resume: true,
            force: false,
            message: None,
        },
    });
    match out.reply {
        Ok(Reply::Retried { state, epoch }) => {
            assert_eq!(state.name, StateName::Resuming);
            assert_eq!(epoch, Epoch::new(2));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.run(fid(1)).owner, None);
    // The old owner, still at epoch 1, is refused.
    assert_eq!(
        w.propose(fid(1), zombie),
        Decision::Abort(AbortReason::StaleEpoch {
            proposed: Epoch::new(1),
            current: Epoch::new(2)
        })
    );
    // A new owner claims it with the new epoch.
    let p = w.worker(fid(1), StateName::Pending, 4, "n2");
    assert!(w.propose(fid(1), p).is_accept());
    assert_eq!(w.run(fid(1)).owner, Some(node("n2")));
}

#[test]
fn a_completed_run_is_retried_only_with_force_and_keeps_its_result() {
    let mut w = World::new();
    w.apply(Command::CreateFlowRun(new_run(fid(1))));
    for (n, name) in [(1, StateName::Pending), (2, StateName::Running)] {
        let p = w.worker(fid(1), name, n, "n1");
        w.propose(fid(1), p);
    }
    let mut done = w.worker(fid(1), StateName::Completed, 3, "n1");
    done.state.result = Some(ResultRef::Inline(vec![42]));
    w.propose(fid(1), done);
    let req = |n, force| Command::RetryFlowRun {
        run: fid(1),
        request: RetryRequest {
            transition_id: tid(n),
            resume: false,
            force,
            message: None,
        },
    };
    assert!(matches!(
        w.apply(req(4, false)).reply,
        Err(Refusal::NotRetriable(_))
    ));
    assert!(matches!(w.apply(req(5, true)).reply, Ok(Reply::Retried { .. })));
    let results: Vec<_> = w.history(fid(1)).into_iter().filter_map(|s| s.result).collect();
    assert_eq!(results, [ResultRef::Inline(vec![42])]);
}

#[test]
fn crashing_a_node_cancels_what_it_was_cancelling_and_leaves_terminal_runs() {
    let mut w = World::new();
    for n in 1..=3 {
        w.apply(Command::CreateFlowRun(new_run(fid(n))));
        let p = w.worker(fid(n), StateName::Pending, u64::from(n) * 10, "n1");
        w.propose(fid(n), p);
        let p = w.worker(fid(n), StateName::Running, u64::from(n) * 10 + 1, "n1");
        w.propose(fid(n), p);
    }
    w.propose(
        fid(2),
        Proposal::new(State::named(StateName::Cancelling, w.now), tid(99)),
    );
    let p = w.worker(fid(3), StateName::Completed, 98, "n1");
    w.propose(fid(3), p);
    let out = w.apply(Command::MarkNodeCrashed {
        node: node("n1"),
        message: "gone".into(),
        key: "k".into(),
    });
    assert_eq!(
        out.reply,
        Ok(Reply::NodeCrashed {
            crashed: vec![fid(1)],
            cancelled: vec![fid(2)]
        })
    );
    assert_eq!(w.run(fid(3)).lifecycle.state.kind, StateType::Completed);
    let again = w.apply(Command::MarkNodeCrashed {
        node: node("n1"),
        message: "gone".into(),
        key: "k".into(),
    });
    assert!(again.writes.is_empty());
}

#[test]
fn task_runs_are_keyed_by_call_and_need_a_running_flow() {
    let mut w = World::new();
    w.apply(Command::CreateFlowRun(new_run(fid(1))));
    let key = TaskRunKey {
        flow_run: fid(1),
        task_key: "extract".into(),
        call_index: 0,
    };
    let new_task = |id: u8| NewTaskRun {
        id: TaskRunId::from_bytes([id; 16]),
        key: key.clone(),
        epoch: Epoch::FIRST,
        retry_policy: RetryPolicy::fixed(1, Duration::ZERO),
        cache_key: Some("extract-abc".into()),
        cache_expiration: Some(Duration::from_secs(3600)),
        refresh_cache: false,
        called: None,
        tags: vec![],
    };
    assert!(matches!(
        w.apply(Command::CreateTaskRun(new_task(1))).reply,
        Err(Refusal::FlowRunNotRunning { .. })
    ));
    for (n, name) in [(1, StateName::Pending), (2, StateName::Running)] {
        let p = w.worker(fid(1), name, n, "n1");
        w.propose(fid(1), p);
    }
    assert!(matches!(
        w.apply(Command::CreateTaskRun(new_task(1))).reply,
        Ok(Reply::TaskRunCreated { created: true, .. })
    ));
    let again = w.apply(Command::CreateTaskRun(new_task(2)));
    assert!(again.writes.is_empty());
    assert!(
        matches!(again.reply, Ok(Reply::TaskRunCreated { run, created: false }) if run.id == TaskRunId::from_bytes([1; 16]))
    );
    let tp = |name, n| Command::ProposeTaskRunState {
        run: TaskRunId::from_bytes([1; 16]),
        proposal: Proposal::from_worker(
            State::named(name, Timestamp::EPOCH),
            tid(n),
            Epoch::FIRST,
            node("n1"),
        ),
    };
    w.apply(tp(StateName::Running, 10));
    // A failure with a retry left: AwaitingRetry, then Retrying, then Completed with the cache key.
    let out = w.apply(tp(StateName::Failed, 11));
    assert!(
        matches!(out.reply, Ok(Reply::TaskRunTransition { decision: Decision::Reject(ref s), .. }) if s.name == StateName::AwaitingRetry)
    );
    let out = w.apply(tp(StateName::Running, 12));
    assert!(
        matches!(out.reply, Ok(Reply::TaskRunTransition { decision: Decision::Accept(ref s), .. }) if s.name == StateName::Retrying)
    );
    let mut done = tp(StateName::Completed, 13);
    if let Command::ProposeTaskRunState { proposal, .. } = &mut done {
        proposal.state.result = Some(ResultRef::Inline(vec![7]));
    }
    w.apply(done);
    let t = w.state.hot.task_run(&TaskRunId::from_bytes([1; 16])).unwrap();
    assert_eq!(t.lifecycle.run_count, 2);
    assert_eq!(
        t.lifecycle.state.details.cache_key.as_deref(),
        Some("extract-abc")
    );
    // Another call with the same cache key is Cached.
    let mut other = new_task(3);
    other.key.call_index = 1;
    w.apply(Command::CreateTaskRun(other));
    let out = w.apply(Command::ProposeTaskRunState {
        run: TaskRunId::from_bytes([3; 16]),
        proposal: Proposal::from_worker(
            State::named(StateName::Running, Timestamp::EPOCH),
            tid(14),
            Epoch::FIRST,
            node("n1"),
        ),
    });
    match out.reply {
        Ok(Reply::TaskRunTransition {
            decision: Decision::Reject(s),
            ..
        }) => {
            assert_eq!(s.name, StateName::Cached);
            assert_eq!(s.result, Some(ResultRef::Inline(vec![7])));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn logs_and_events_are_stored_once_and_bounded() {
    let mut w = World::new();
    w.apply(Command::CreateFlowRun(new_run(fid(1))));
    let line = LogLine {
        flow_run: fid(1),
        task_run: None,
        timestamp: w.now,
        level: LogLevel::Info,
        target: "t".into(),
        message: "x".repeat(100_000),
    };
    let batch = crate::ids::LogBatchId::from_bytes([5; 16]);
    let out = w.apply(Command::AppendLogs {
        batch,
        flow_run: fid(1),
        lines: vec![line.clone()],
    });
    assert_eq!(out.reply, Ok(Reply::LogsAppended { count: 1 }));
    let stored = &w.state.logs[&(fid(1), batch)][0];
    assert!(stored.message.len() < 20_000 && stored.message.ends_with("[truncated]"));
    let again = w.apply(Command::AppendLogs {
        batch,
        flow_run: fid(1),
        lines: vec![line.clone()],
    });
    assert!(again.writes.is_empty());
    let too_many = vec![line.clone(); LOG_LINES_PER_COMMAND_MAX + 1];
    let out = w.apply(Command::AppendLogs {
        batch: crate::ids::LogBatchId::from_bytes([6; 16]),
        flow_run: fid(1),
        lines: too_many,
    });
    assert!(matches!(out.reply, Err(Refusal::Invalid(_))));
    let out = w.apply(Command::AppendLogs {
        batch: crate::ids::LogBatchId::from_bytes([7; 16]),
        flow_run: fid(9),
        lines: vec![],
    });
    assert_eq!(out.reply, Err(Refusal::FlowRunNotFound(fid(9))));
}

#[test]
fn an_event_with_an_id_of_its_own_is_recorded_once_and_one_without_is_given_a_new_one() {
    let mut w = World::new();
    let now = w.now;
    let user = |id: [u8; 16]| {
        let mut e = Event::user(
            "app.deployed",
            now,
            crate::event::Resource::new("app", None),
            Vec::new(),
            serde_json::Value::Null,
        );
        e.id = EventId::from_bytes(id);
        e
    };
    let own = user([7; 16]);
    let first = w.apply(Command::AppendEvent(own.clone()));
    assert_eq!(first.reply, Ok(Reply::EventAppended { id: own.id }));
    assert_eq!(first.writes.len(), 1);
    let again = w.apply(Command::AppendEvent(own.clone()));
    assert_eq!(again.reply, Ok(Reply::EventAppended { id: own.id }));
    assert!(again.writes.is_empty(), "sent again, it is not recorded twice");
    let (a, b) = (
        w.apply(Command::AppendEvent(user([0; 16]))),
        w.apply(Command::AppendEvent(user([0; 16]))),
    );
    let (Ok(Reply::EventAppended { id: a_id }), Ok(Reply::EventAppended { id: b_id })) = (a.reply, b.reply)
    else {
        panic!("both are recorded");
    };
    assert!(a_id != b_id && !a_id.as_uuid().is_nil() && a_id < b_id);
    assert_eq!((a.writes.len(), b.writes.len()), (1, 1));
}

#[test]
fn deployments_are_put_and_deleted_with_events() {
    let mut w = World::new();
    let d = Deployment {
        id: DeploymentId::from_bytes([1; 16]),
        name: "nightly".into(),
        flow_name: "etl".into(),
        parameters: serde_json::Value::Null,
        schedules: vec![],
        work_queue: None,
        tags: vec![],
        concurrency_limit: None,
        collision: Default::default(),
        paused: false,
        result_storage: None,
        created: w.now,
        updated: w.now,
    };
    assert_eq!(
        w.apply(Command::PutDeployment(d.clone())).reply,
        Ok(Reply::DeploymentPut { created: true })
    );
    assert!(w.apply(Command::PutDeployment(d.clone())).writes.is_empty());
    let mut other = d.clone();
    other.id = DeploymentId::from_bytes([2; 16]);
    assert!(matches!(
        w.apply(Command::PutDeployment(other)).reply,
        Err(Refusal::DeploymentNameTaken { .. })
    ));
    assert_eq!(
        w.apply(Command::DeleteDeployment { id: d.id }).reply,
        Ok(Reply::DeploymentDeleted { existed: true })
    );
    assert_eq!(
        w.apply(Command::DeleteDeployment { id: d.id }).reply,
        Ok(Reply::DeploymentDeleted { existed: false })
    );
    let names: Vec<_> = w.state.events.values().map(|e| e.event.clone()).collect();
    assert_eq!(
        names,
        ["flotilla.deployment.created", "flotilla.deployment.deleted"]
    );
}

#[test]
fn apply_is_deterministic() {
    let script = |w: &mut World| {
        w.apply(Command::CreateFlowRun(new_run(fid(1))));
        let p = w.worker(fid(1), StateName::Pending, 1, "n1");
        w.propose(fid(1), p);
        let p = w.worker(fid(1), StateName::Running, 2, "n1");
        w.propose(fid(1), p);
    };
    let (mut a, mut b) = (World::new(), World::new());
    script(&mut a);
    script(&mut b);
    assert_eq!(a.state.events, b.state.events);
    assert_eq!(a.run(fid(1)), b.run(fid(1)));
}

// --- The property: no sequence of proposals leaves a terminal state without a retry, gives a
// run two owners, or loses a result.

#[derive(Clone, Debug)]
enum Step {
    Propose {
        name: StateName,
        from_node: u8,
        epoch_delta: i8,
        resend: bool,
        with_result: bool,
    },
    Retry {
        force: bool,
        resume: bool,
    },
    Crash {
        node: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let names = proptest::sample::select(vec![
        StateName::Scheduled,
        StateName::Late,
        StateName::Pending,
        StateName::Running,
        StateName::Paused,
        StateName::Cancelling,
        StateName::Cancelled,
        StateName::Completed,
        StateName::Failed,
        StateName::TimedOut,
        StateName::Crashed,
    ]);
    prop_oneof![
        6 => (names, 0u8..3, -1i8..=1, any::<bool>(), any::<bool>()).prop_map(|(name, from_node, epoch_delta, resend, with_result)| Step::Propose { name, from_node, epoch_delta, resend, with_result }),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(force, resume)| Step::Retry { force, resume }),
        1 => (0u8..3).prop_map(|node| Step::Crash { node }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn no_sequence_breaks_the_invariants(steps in proptest::collection::vec(step(), 1..60), retries in 0u32..3) {
        let mut w = World::new();
        let mut new = new_run(fid(1));
        new.retry_policy = RetryPolicy::fixed(retries, Duration::ZERO);
        w.apply(Command::CreateFlowRun(new));
        let mut n = 0u64;
        let mut last_tid = tid(0);
        let mut claims_this_epoch: Vec<(Epoch, NodeId)> = Vec::new();
        let mut results_written: Vec<ResultRef> = Vec::new();
        for s in steps {
            n += 1;
            let before = w.run(fid(1)).clone();
            let mut retried = false;
            match s {
                Step::Propose { name, from_node, epoch_delta, resend, with_result } => {
                    let epoch = Epoch::new((before.epoch.get() as i64 + epoch_delta as i64).max(0) as u64);
                    let t = if resend { last_tid } else { tid(n) };
                    last_tid = t;
                    let mut st = State::named(name, w.now);
                    if with_result {
                        st.result = Some(ResultRef::Inline(n.to_le_bytes().to_vec()));
                    }
                    let p = Proposal::from_worker(st, t, epoch, node(&format!("n{from_node}")));
                    let d = w.propose(fid(1), p);
                    if let Decision::Accept(s) = &d
                        && s.kind == StateType::Pending && before.lifecycle.state.kind != StateType::Pending {
                        claims_this_epoch.push((w.run(fid(1)).epoch, w.run(fid(1)).owner.clone().unwrap()));
                    }
                }
                Step::Retry { force, resume } => {
                    let out = w.apply(Command::RetryFlowRun { run: fid(1), request: RetryRequest { transition_id: tid(n), resume, force, message: None } });
                    retried = out.reply.is_ok() && !out.writes.is_empty();
                }
                Step::Crash { node: k } => {
                    w.apply(Command::MarkNodeCrashed { node: node(&format!("n{k}")), message: "died".into(), key: format!("c{n}") });
                }
            }
            let after = w.run(fid(1));
            // A terminal state is left only through a retry.
            if before.lifecycle.state.is_terminal() && after.lifecycle.state != before.lifecycle.state {
                prop_assert!(retried, "left {:?} for {:?} without a retry", before.lifecycle.state, after.lifecycle.state);
            }
            // The epoch only grows, and only with a retry or when a claim is given back.
            let given_back = before.lifecycle.state.kind == StateType::Pending && after.lifecycle.state.kind == StateType::Scheduled;
            prop_assert!(after.epoch >= before.epoch);
            prop_assert_eq!(after.epoch > before.epoch, retried || given_back);
            if after.lifecycle.state.kind == StateType::Completed
                && let Some(r) = &after.lifecycle.state.result
                && before.lifecycle.state.kind != StateType::Completed {
                results_written.push(r.clone());
            }
        }
        // Two owners: at most one accepted claim per epoch.
        let mut epochs: Vec<_> = claims_this_epoch.iter().map(|(e, _)| *e).collect();
        let total = epochs.len();
        epochs.dedup();
        prop_assert_eq!(epochs.len(), total, "two claims in one epoch: {:?}", claims_this_epoch);
        // No result lost: every Completed result is still in the history.
        let kept: Vec<ResultRef> = w.history(fid(1)).into_iter().filter(|s| s.kind == StateType::Completed).filter_map(|s| s.result).collect();
        for r in &results_written {
            prop_assert!(kept.contains(r), "lost {r:?}");
        }
    }
}

/// Regression: a work-queue change read the whole queue, changed one field and wrote it back,
/// so two changes to one queue sent at once could undo each other. Each change is now one
/// command on one field, applied to the queue as it is then.
#[test]
fn work_queue_edits_change_one_field_each_in_order() {
    use crate::work_queue::QueueEdit;
    let mut w = World::new();
    let qid = crate::ids::WorkQueueId::from_bytes([7; 16]);
    let edit = |w: &mut World, edit: QueueEdit| {
        let at = w.now;
        w.apply(Command::EditWorkQueue {
            name: "q".into(),
            id: qid,
            edit,
            at,
        })
        .reply
    };
    assert!(matches!(
        edit(&mut w, QueueEdit::Pause),
        Err(Refusal::WorkQueueNotFound(_))
    ));
    edit(
        &mut w,
        QueueEdit::Create {
            priority: 1,
            concurrency_limit: None,
            paused: false,
        },
    )
    .unwrap();
    assert!(matches!(
        edit(
            &mut w,
            QueueEdit::Create {
                priority: 2,
                concurrency_limit: None,
                paused: false
            }
        ),
        Err(Refusal::WorkQueueExists(_))
    ));
    // Three changes of three fields, as three clients sent them at once.
    edit(&mut w, QueueEdit::SetPriority(5)).unwrap();
    edit(&mut w, QueueEdit::SetConcurrencyLimit(Some(3))).unwrap();
    let last = edit(&mut w, QueueEdit::Pause).unwrap();
    let want = crate::work_queue::WorkQueue {
        id: qid,
        name: "q".into(),
        priority: 5,
        concurrency_limit: Some(3),
        paused: true,
    };
    assert_eq!(last, Reply::WorkQueueEdited { queue: want.clone() });
    assert_eq!(
        w.state.hot.setting("work-queue/q"),
        Some(&crate::work_queue::Setting::WorkQueue(want))
    );
    assert!(matches!(
        edit(&mut w, QueueEdit::SetPriority(0)),
        Err(Refusal::Invalid(_))
    ));
    // The default queue can be changed before anyone creates it.
    let out = w.apply(Command::EditWorkQueue {
        name: crate::work_queue::DEFAULT_QUEUE.into(),
        id: qid,
        edit: QueueEdit::SetPriority(9),
        at: w.now,
    });
    assert!(matches!(out.reply, Ok(Reply::WorkQueueEdited { queue }) if queue.priority == 9));
}

#[test]
fn the_one_constructor_takes_a_deployments_parameters_tags_and_queue() {
    let d = crate::deployment::DeploymentSpec {
        name: "nightly".into(),
        flow_name: "etl".into(),
        parameters: serde_json::json!({"a": 1, "b": 2}),
        schedules: vec![],
        work_queue: Some("gpu".into()),
        tags: vec!["t".into()],
        concurrency_limit: None,
        collision: Default::default(),
        paused: false,
        result_storage: None,
    }
    .into_deployment(
        crate::ids::DeploymentId::from_bytes([3; 16]),
        None,
        Timestamp::from_millis(1),
    );
    let n = NewFlowRun::of_deployment(fid(9), &d, &serde_json::json!({"b": 3}))
        .with_options(RetryPolicy::none(), true)
        .with_key(Some("k".into()));
    assert_eq!(n.parameters, serde_json::json!({"a": 1, "b": 3}));
    assert_eq!(n.deployment_id, Some(d.id));
    assert_eq!(n.work_queue.as_deref(), Some("gpu"));
    assert_eq!(n.tags, vec!["t".to_string()]);
    assert_eq!(n.idempotency_key.as_deref(), Some("k"));
    assert!(n.resume);
}

mod records;

mod automations;
