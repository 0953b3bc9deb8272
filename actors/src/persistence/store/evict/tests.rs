//! Eviction changes nothing a user or `apply` can see: a store that keeps no terminal run in
//! memory answers every command and every read as one that keeps them all.

use super::*;
use flotilla_runtime::{
    Epoch, LogLevel, NewFlowRun, NewTaskRun, Proposal, RetryPolicy, RetryRequest, StateName, TaskRunKey,
    TransitionId,
};
use proptest::prelude::*;

use crate::persistence::kv::MemKv;

fn fid(n: u8) -> FlowRunId {
    FlowRunId::from_bytes([n + 1; 16])
}

fn task_id(run: u8, call: u8) -> TaskRunId {
    let mut b = [run + 1; 16];
    b[15] = call;
    TaskRunId::from_bytes(b)
}

fn deployment() -> DeploymentId {
    DeploymentId::from_bytes([9; 16])
}

/// One store over its own key-value store, applying commands at a growing index and time.
struct Side {
    kv: Arc<dyn KvStore>,
    store: Store,
    memory_runs: usize,
    index: u64,
    now: Timestamp,
}

impl Side {
    fn new(memory_runs: usize) -> Side {
        let kv: Arc<dyn KvStore> = Arc::new(MemKv::default());
        let mut store = Store::load(kv.clone(), "memory").unwrap();
        store.keep_in_memory(memory_runs);
        Side {
            kv,
            store,
            memory_runs,
            index: 0,
            now: Timestamp::from_millis(1_800_000_000_000),
        }
    }

    /// Applies a command at the next index, 10 ms later.
    fn apply(&mut self, c: Command) -> (Result<Reply, Refusal>, Vec<Event>) {
        self.index += 1;
        self.now = self.now + std::time::Duration::from_millis(10);
        let (reply, events) = self.store.apply(LogIndex::new(self.index), self.now, c);
        (reply, events.into_iter().map(Arc::unwrap_or_clone).collect())
    }

    /// Writes what was applied to the store (after which terminal runs may be evicted).
    fn flush(&mut self) {
        for job in self.store.take_jobs() {
            job.write(self.kv.as_ref()).unwrap();
        }
        let upto = self.store.applied();
        self.store.stored_through(upto);
    }

    /// A restart: the store loaded again from what it holds.
    fn reload(&mut self) {
        self.flush();
        self.store = Store::load(self.kv.clone(), "memory").unwrap();
        self.store.keep_in_memory(self.memory_runs);
    }

    fn read(&self, r: Read) -> ReadReply {
        self.store.read(r, StoreStats::default()).wait().unwrap()
    }

    fn epoch(&self, run: u8) -> Epoch {
        match self.read(Read::FlowRun(fid(run))) {
            ReadReply::FlowRun(Some(r)) => r.epoch,
            _ => Epoch::FIRST,
        }
    }

    /// Everything a user can read about the runs, as one value.
    fn everything(&self) -> Vec<ReadReply> {
        let mut reads = vec![
            Read::FlowRuns {
                filter: RunFilter::All,
                after: None,
                limit: 100,
            },
            Read::FlowRuns {
                filter: RunFilter::All,
                after: Some(fid(3)),
                limit: 2,
            },
            Read::FlowRuns {
                filter: RunFilter::Deployment(deployment()),
                after: None,
                limit: 100,
            },
            Read::Stats,
        ];
        for t in [
            StateType::Scheduled,
            StateType::Running,
            StateType::Completed,
            StateType::Failed,
            StateType::Crashed,
        ] {
            reads.push(Read::FlowRuns {
                filter: RunFilter::State(t),
                after: None,
                limit: 100,
            });
        }
        for run in 0..RUNS * 2 {
            reads.push(Read::FlowRun(fid(run)));
            reads.push(Read::FlowRunHistory {
                run: fid(run),
                offset: 0,
                limit: 100,
            });
            reads.push(Read::TaskRuns {
                flow_run: fid(run),
                after: None,
                limit: 100,
            });
            reads.push(Read::Logs {
                flow_run: fid(run),
                after: None,
                limit: 100,
            });
            for call in 0..CALLS {
                reads.push(Read::TaskRun(task_id(run, call)));
                reads.push(Read::TaskRunHistory {
                    run: task_id(run, call),
                    offset: 0,
                    limit: 100,
                });
            }
        }
        reads
            .into_iter()
            .map(|r| match self.read(r) {
                // Stats differ in what is held in memory, by design.
                ReadReply::Stats(s) => ReadReply::Stats(StoreStats {
                    flow_runs: s.flow_runs,
                    ..StoreStats::default()
                }),
                other => other,
            })
            .collect()
    }
}

const RUNS: u8 = 4;
const CALLS: u8 = 2;

#[derive(Clone, Debug)]
enum Step {
    Create {
        run: u8,
        second_id: bool,
        keyed: bool,
        deployed: bool,
    },
    Flow {
        run: u8,
        name: StateName,
    },
    Task {
        run: u8,
        call: u8,
        name: StateName,
    },
    Retry {
        run: u8,
        force: bool,
    },
    Logs {
        run: u8,
    },
    Flush,
    Prune {
        max: u32,
    },
    Reload,
}

fn step() -> impl Strategy<Value = Step> {
    let flow_names = proptest::sample::select(vec![
        StateName::Pending,
        StateName::Running,
        StateName::Completed,
        StateName::Failed,
        StateName::Crashed,
    ]);
    let task_names =
        proptest::sample::select(vec![StateName::Running, StateName::Completed, StateName::Failed]);
    prop_oneof![
        3 => (0..RUNS, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(run, second_id, keyed, deployed)| Step::Create { run, second_id, keyed, deployed }),
        6 => (0..RUNS, flow_names).prop_map(|(run, name)| Step::Flow { run, name }),
        4 => (0..RUNS, 0..CALLS, task_names).prop_map(|(run, call, name)| Step::Task { run, call, name }),
        1 => (0..RUNS, any::<bool>()).prop_map(|(run, force)| Step::Retry { run, force }),
        1 => (0..RUNS).prop_map(|run| Step::Logs { run }),
        3 => Just(Step::Flush),
        1 => (0u32..3).prop_map(|max| Step::Prune { max }),
        1 => Just(Step::Reload),
    ]
}

/// The commands of a step (the same for both stores).
fn commands(step: &Step, n: u64, now: Timestamp, epoch: Epoch) -> Vec<Command> {
    let t = |k: u64| TransitionId::from_bytes([(n as u8).wrapping_mul(7).wrapping_add(k as u8); 16]);
    let worker = |name: StateName, k: u64| {
        let mut s = State::named(name, now);
        if name == StateName::Completed {
            s.result = Some(flotilla_runtime::ResultRef::Inline(vec![n as u8]));
        }
        Proposal::from_worker(s, t(k), epoch, "n1".parse().unwrap())
    };
    match *step {
        Step::Create {
            run,
            second_id,
            keyed,
            deployed,
        } => vec![Command::CreateFlowRun(NewFlowRun {
            id: fid(run + if second_id { RUNS } else { 0 }),
            flow_name: "etl".into(),
            parameters: serde_json::json!({}),
            deployment_id: deployed.then(deployment),
            deployment_name: None,
            parent_task_run: None,
            idempotency_key: keyed.then(|| format!("key-{run}")),
            tags: vec![],
            work_queue: None,
            retry_policy: RetryPolicy::none(),
            resume: true,
            scheduled_time: None,
            result_storage: None,
        })],
        Step::Flow { run, name } => vec![Command::ProposeFlowRunState {
            run: fid(run),
            proposal: worker(name, 1),
        }],
        Step::Task { run, call, name } => vec![
            Command::CreateTaskRun(NewTaskRun {
                id: task_id(run, call),
                key: TaskRunKey {
                    flow_run: fid(run),
                    task_key: "step".into(),
                    call_index: u32::from(call),
                },
                epoch,
                retry_policy: RetryPolicy::none(),
                cache_key: None,
                cache_expiration: None,
                refresh_cache: false,
                called: None,
                tags: vec![],
            }),
            Command::ProposeTaskRunState {
                run: task_id(run, call),
                proposal: worker(name, 2),
            },
        ],
        Step::Retry { run, force } => vec![Command::RetryFlowRun {
            run: fid(run),
            request: RetryRequest {
                transition_id: t(3),
                resume: true,
                force,
                message: None,
            },
        }],
        Step::Logs { run } => vec![Command::AppendLogs {
            batch: LogBatchId::from_bytes([n as u8; 16]),
            flow_run: fid(run),
            lines: vec![LogLine {
                flow_run: fid(run),
                task_run: None,
                timestamp: now,
                level: LogLevel::Info,
                target: "etl".into(),
                message: format!("line {n}"),
            }],
        }],
        Step::Prune { max } => vec![Command::Prune(flotilla_runtime::Prune {
            runs_before: now,
            events_before: Timestamp::EPOCH,
            logs_before: Timestamp::EPOCH,
            runs_max: max,
        })],
        Step::Flush | Step::Reload => Vec::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn a_store_that_evicts_every_terminal_run_answers_as_one_that_keeps_them(steps in proptest::collection::vec(step(), 1..80)) {
        let (mut lean, mut full) = (Side::new(0), Side::new(usize::MAX));
        for (n, s) in steps.iter().enumerate() {
            let run = match s {
                Step::Create { run, .. } | Step::Flow { run, .. } | Step::Task { run, .. } | Step::Retry { run, .. } | Step::Logs { run } => *run,
                _ => 0,
            };
            for c in commands(s, n as u64, full.now, full.epoch(run)) {
                let (a, b) = (lean.apply(c.clone()), full.apply(c));
                prop_assert_eq!(a, b, "step {} {:?}", n, s);
            }
            match s {
                Step::Flush => {
                    lean.flush();
                    full.flush();
                }
                Step::Reload => {
                    lean.reload();
                    full.reload();
                }
                _ => {}
            }
            prop_assert!(full.store.evicted() == 0);
            prop_assert_eq!(lean.everything(), full.everything(), "after step {} {:?}", n, s);
        }
    }
}

/// Terminal runs beyond the budget leave memory once stored, stay readable, come back when a
/// command needs them, are pruned from the store, and stay out of memory across a restart.
#[test]
fn terminal_runs_leave_memory_and_come_back_when_needed() {
    let mut side = Side::new(0);
    for run in 0..3 {
        for (n, step) in [
            Step::Create {
                run,
                second_id: false,
                keyed: true,
                deployed: true,
            },
            Step::Flow {
                run,
                name: StateName::Pending,
            },
            Step::Flow {
                run,
                name: StateName::Running,
            },
            Step::Task {
                run,
                call: 0,
                name: StateName::Completed,
            },
            Step::Flow {
                run,
                name: StateName::Failed,
            },
        ]
        .iter()
        .enumerate()
        {
            for c in commands(step, u64::from(run) * 10 + n as u64, side.now, Epoch::FIRST) {
                let _ = side.apply(c);
            }
        }
    }
    assert_eq!(
        side.store.hot().resident(),
        6,
        "3 flow runs and 3 task runs before the store holds them"
    );
    side.flush();
    assert_eq!((side.store.evicted(), side.store.hot().resident()), (3, 0));
    // Readable: the run, its task runs, listings by state and by deployment.
    assert!(
        matches!(side.read(Read::FlowRun(fid(1))), ReadReply::FlowRun(Some(r)) if r.lifecycle.state.kind == StateType::Failed)
    );
    assert!(
        matches!(side.read(Read::TaskRuns { flow_run: fid(1), after: None, limit: 10 }), ReadReply::TaskRuns(t) if t.len() == 1)
    );
    assert!(
        matches!(side.read(Read::FlowRuns { filter: RunFilter::State(StateType::Failed), after: None, limit: 10 }), ReadReply::FlowRuns(r) if r.len() == 3)
    );
    // The same idempotency key gives the run kept in the store, which comes back into memory.
    let again = commands(
        &Step::Create {
            run: 1,
            second_id: true,
            keyed: true,
            deployed: false,
        },
        90,
        side.now,
        Epoch::FIRST,
    );
    let (reply, _) = side.apply(again.into_iter().next().unwrap());
    assert!(matches!(reply, Ok(Reply::FlowRunCreated { run, created: false }) if run.id == fid(1)));
    assert_eq!((side.store.evicted(), side.store.hot().resident()), (2, 2));
    // A restart keeps the evicted ones out of memory.
    side.reload();
    assert_eq!((side.store.evicted(), side.store.hot().resident()), (3, 0));
    // Pruning forgets them from the store.
    let (reply, _) = side.apply(Command::Prune(flotilla_runtime::Prune {
        runs_before: side.now,
        events_before: Timestamp::EPOCH,
        logs_before: Timestamp::EPOCH,
        runs_max: 2,
    }));
    assert_eq!(
        reply,
        Ok(Reply::Pruned {
            flow_runs: 2,
            task_runs: 2,
            more: true
        })
    );
    side.flush();
    assert_eq!(side.store.evicted(), 1);
    assert!(
        matches!(side.read(Read::FlowRuns { filter: RunFilter::All, after: None, limit: 10 }), ReadReply::FlowRuns(r) if r.len() == 1)
    );
}
