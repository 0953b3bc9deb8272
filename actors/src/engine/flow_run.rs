//! The `FlowRun` actor: drives one flow run. It claims the run, runs the flow body (as a task
//! of its own), turns the body's task calls into task runs — each attempt a `TaskRun` actor it
//! supervises — and records every transition. Retries are supervision: a failed or panicked
//! attempt is reported here, the runtime's retry policy gives the delay, and a new attempt
//! starts after it.
//!
//! Transitions are decided at once on a local shadow of the run (the same rules the control
//! plane applies) and written behind: queued to the persistence actor in order, one batch in
//! flight at a time, the transitions of one task run queued meanwhile coalesced into one
//! record. Flow-level transitions that must not be guessed (the claim, failures, the end) wait
//! for the control plane's answer.

use std::collections::HashMap;
use std::sync::Arc;

use flotilla_runtime::{
    Command, Decision, Epoch, FlowRunId, MemState, Reply, State, StateName, StateType, TaskRunId, TaskRunKey,
};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::oneshot;

use super::limits::Slots;
use super::task_run::AttemptOutcome;
use super::worker::{EngineCtx, EngineHandle, RunOutcome, WorkerMsg, now};
use super::{FlowFn, TaskBody, TaskFailure, TaskSpec};
use crate::persistence::SubmitResult;

mod outbox;
mod state;
mod tasks;

use outbox::Outbox;
pub use state::FlowRunState;
use state::{End, Phase};

type Waiter = oneshot::Sender<Result<Vec<u8>, TaskFailure>>;

/// Messages of a flow run's actor.
pub enum FlowRunMsg {
    /// The body calls a task.
    Call {
        /// Flow run, task key, call index.
        key: TaskRunKey,
        /// How it runs.
        spec: TaskSpec,
        /// Its body.
        body: TaskBody,
        /// Where its result goes.
        reply: Waiter,
    },
    /// A task run got its tag slots.
    Slots(TaskRunId, Slots),
    /// A task run's retry delay is over.
    Attempt(TaskRunId),
    /// An attempt's actor started (sent by the spawner).
    Spawned {
        /// The task run.
        task: TaskRunId,
        /// Which attempt.
        attempt: u32,
        /// Its actor.
        child: ActorCell,
    },
    /// An attempt ended.
    TaskDone {
        /// The task run.
        task: TaskRunId,
        /// Which attempt.
        attempt: u32,
        /// How.
        outcome: AttemptOutcome,
    },
    /// The body returned (or panicked).
    BodyDone {
        /// Which run of the body.
        attempt: u32,
        /// Its result or error.
        result: Result<Vec<u8>, String>,
    },
    /// The flow's timeout passed.
    FlowTimeout(u32),
    /// The flow's retry delay is over.
    RetryFlow,
    /// Stop everything: the run is being cancelled.
    Cancel,
    /// The state of a task call, as this node sees it.
    TaskState(TaskRunKey, oneshot::Sender<Option<State>>),
    /// A batch of written-behind commands is durable.
    Written {
        /// Its sequence number.
        seq: u64,
        /// The answers.
        results: Vec<SubmitResult>,
    },
}

impl ractor::Message for FlowRunMsg {}

impl std::fmt::Debug for FlowRunMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlowRunMsg::Call { key, .. } => write!(f, "Call({key})"),
            FlowRunMsg::Slots(t, _) => write!(f, "Slots({t})"),
            FlowRunMsg::Attempt(t) => write!(f, "Attempt({t})"),
            FlowRunMsg::TaskDone { task, attempt, .. } => write!(f, "TaskDone({task}, {attempt})"),
            FlowRunMsg::Spawned { task, attempt, .. } => write!(f, "Spawned({task}, {attempt})"),
            FlowRunMsg::BodyDone { attempt, .. } => write!(f, "BodyDone({attempt})"),
            FlowRunMsg::FlowTimeout(a) => write!(f, "FlowTimeout({a})"),
            FlowRunMsg::RetryFlow => f.write_str("RetryFlow"),
            FlowRunMsg::Cancel => f.write_str("Cancel"),
            FlowRunMsg::TaskState(key, _) => write!(f, "TaskState({key})"),
            FlowRunMsg::Written { seq, .. } => write!(f, "Written({seq})"),
        }
    }
}

/// What a flow run's actor starts from.
#[allow(missing_debug_implementations)]
pub struct FlowRunArgs {
    /// The flow run.
    pub id: FlowRunId,
    /// Its flow.
    pub flow: Arc<dyn FlowFn>,
    /// The engine's shared context.
    pub ctx: Arc<EngineCtx>,
    /// The engine (for subflows).
    pub engine: EngineHandle,
    /// The worker to tell when done (None for a subflow).
    pub worker: Option<ActorRef<WorkerMsg>>,
    /// Who waits for the outcome in-process.
    pub on_done: Option<oneshot::Sender<RunOutcome>>,
    /// The run as the control node placed it, when it sent it.
    pub known: Option<Box<flotilla_runtime::FlowRun>>,
}

/// The flow run's actor.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlowRunActor;

impl Actor for FlowRunActor {
    type Msg = FlowRunMsg;
    type State = FlowRunState;
    type Arguments = FlowRunArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        a: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let seed = now().as_micros() as u64
            ^ u64::from_le_bytes(a.id.as_bytes()[8..16].try_into().unwrap_or([7; 8]));
        Ok(FlowRunState {
            id: a.id,
            flow: a.flow,
            node: a.ctx.config.node.clone(),
            results: a.ctx.results.clone(),
            ctx: a.ctx,
            engine: a.engine,
            worker: a.worker,
            on_done: a.on_done,
            epoch: Epoch::FIRST,
            attempt: 0,
            phase: Phase::Starting,
            finishing: None,
            shadow: MemState::new(),
            index: 0,
            tasks: HashMap::new(),
            active: 0,
            ready: std::collections::VecDeque::new(),
            children: HashMap::new(),
            orphans: HashMap::new(),
            strict: Vec::new(),
            outbox: Outbox::default(),
            body: None,
            rng: SmallRng::seed_from_u64(seed),
            last_task_id: None,
            known: a.known,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let started = match s.claim(&myself).await? {
            state::Claim::Claimed(started) => started,
            // Not due yet: a RetryFlow is on its way.
            state::Claim::Later => return Ok(()),
            // Another node has it, or it ended: this actor leaves, and with it its slot (fix 2:
            // it stayed, holding the slot, and a later start of the run was ignored).
            state::Claim::Refused => {
                myself.stop(Some("the claim was refused".into()));
                return Ok(());
            }
        };
        let (cmd, answer) = match started {
            Some(started) => {
                let state::Started { running, answer } = *started;
                (running, Some(answer))
            }
            None => {
                let running = s.proposal(State::named(StateName::Running, now()));
                let cmd = Command::ProposeFlowRunState {
                    run: s.id,
                    proposal: running,
                };
                (cmd, None)
            }
        };
        match s.local(cmd.clone()).reply {
            Ok(Reply::FlowRunTransition {
                decision: Decision::Accept(_),
                ..
            }) => {}
            other => {
                tracing::warn!(flow_run = %s.id, answer = ?other, "the claimed run cannot start");
                let current = s.current_state();
                s.done(&myself, current, None);
                return Ok(());
            }
        }
        match answer {
            // Sent with the claim: its answer came with the claim's.
            Some(answer) => match answer.await {
                Ok(Ok(Ok(Reply::FlowRunTransition {
                    decision: Decision::Accept(_),
                    ..
                }))) => {}
                other => {
                    tracing::warn!(flow_run = %s.id, answer = ?other, "the claimed run cannot start");
                    s.refresh_flow().await;
                    let current = s.current_state();
                    s.done(&myself, current, None);
                    return Ok(());
                }
            },
            None => s.outbox.push(cmd),
        }
        s.start_body(&myself);
        s.flush(&myself, false);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FlowRunMsg::Call {
                key,
                spec,
                body,
                reply,
            } => s.call(&myself, key, spec, body, reply).await,
            FlowRunMsg::Slots(id, slots) => {
                if s.tasks.contains_key(&id) && matches!(s.phase, Phase::Running | Phase::Finishing) {
                    s.run_attempt(&myself, id, Some(slots)).await;
                }
            }
            FlowRunMsg::Attempt(id) => {
                if s.tasks.contains_key(&id) && matches!(s.phase, Phase::Running | Phase::Finishing) {
                    s.start_attempt(&myself, id).await;
                }
            }
            FlowRunMsg::Spawned { task, attempt, child } => {
                let current = s.tasks.get(&task).is_some_and(|r| r.attempt == attempt)
                    && matches!(s.phase, Phase::Running | Phase::Finishing);
                if !current {
                    // Its task run finished or was stopped meanwhile.
                    child.kill();
                } else if let Some(err) = s.orphans.remove(&child.get_id()) {
                    let st = State::named(StateName::Failed, now()).with_message(format!("panicked: {err}"));
                    s.attempt_failed(&myself, task, attempt, st);
                } else {
                    s.children.insert(child.get_id(), (task, attempt));
                    if let Some(rec) = s.tasks.get_mut(&task) {
                        rec.child = Some(child);
                    }
                }
            }
            FlowRunMsg::TaskDone {
                task,
                attempt,
                outcome,
            } => {
                let current = s.tasks.get(&task).is_some_and(|r| r.attempt == attempt);
                if current {
                    match outcome {
                        AttemptOutcome::Done(result, bytes) => {
                            // Stamped before its slots go back: the next holder starts after.
                            let done = State::named(StateName::Completed, now()).with_result(result);
                            if let Some(rec) = s.tasks.get_mut(&task) {
                                rec.slots = None;
                            }
                            match s.propose_task(task, done) {
                                Decision::Accept(_) => s.finish_task(task, Ok(bytes)),
                                Decision::Reject(st) if st.kind == StateType::Cancelled => {
                                    let name = s
                                        .tasks
                                        .get(&task)
                                        .map(|r| r.spec.name.clone())
                                        .unwrap_or_default();
                                    s.finish_task(task, Err(TaskFailure::Cancelled { task: name }));
                                }
                                other => s.finish_task(task, Err(TaskFailure::Aborted(format!("{other:?}")))),
                            }
                        }
                        AttemptOutcome::Failed(message) => {
                            let st = State::named(StateName::Failed, now()).with_message(message);
                            s.attempt_failed(&myself, task, attempt, st);
                        }
                        AttemptOutcome::TimedOut(after) => {
                            let st = State::named(StateName::TimedOut, now())
                                .with_message(format!("timed out after {after:?}"));
                            s.attempt_failed(&myself, task, attempt, st);
                        }
                        AttemptOutcome::LeaseLost => {
                            let st = State::named(StateName::LeaseLost, now())
                                .with_message("its concurrency slot's lease was not renewed in time");
                            s.attempt_failed(&myself, task, attempt, st);
                        }
                        AttemptOutcome::ResultNotStored(e) => {
                            let st = State::named(StateName::Failed, now())
                                .with_message(format!("the result could not be stored: {e}"));
                            s.attempt_failed(&myself, task, attempt, st);
                        }
                    }
                }
            }
            FlowRunMsg::BodyDone { attempt, result } => {
                if attempt == s.attempt && s.phase == Phase::Running {
                    s.body = None;
                    s.phase = Phase::Finishing;
                    s.finishing = Some(result);
                }
            }
            FlowRunMsg::FlowTimeout(attempt) => {
                if attempt == s.attempt && matches!(s.phase, Phase::Running | Phase::Finishing) {
                    let after = s.flow.options().timeout.unwrap_or_default();
                    let state =
                        State::named(StateName::Crashed, now()).with_message("its flow run timed out");
                    s.stop_tasks(&state, |task| {
                        TaskFailure::Aborted(format!("task {task}: the flow run timed out"))
                    });
                    s.finishing = None;
                    s.phase = Phase::Finishing;
                    s.end(&myself, End::TimedOut(after)).await;
                }
            }
            FlowRunMsg::RetryFlow => match s.phase {
                Phase::Starting => {
                    // A claim that had to wait for the run's scheduled time.
                    self.post_start(myself.clone(), s).await?;
                }
                Phase::Retrying => {
                    let running = State::named(StateName::Running, now());
                    match s.propose_flow(&myself, running).await {
                        Ok(Decision::Accept(_)) => s.start_body(&myself),
                        Ok(Decision::Wait { delay, .. }) => {
                            myself.send_after(delay, || FlowRunMsg::RetryFlow);
                        }
                        other => {
                            tracing::warn!(flow_run = %s.id, answer = ?other, "the retry cannot start");
                            let current = s.current_state();
                            s.done(&myself, current, None);
                        }
                    }
                }
                _ => {}
            },
            FlowRunMsg::TaskState(key, reply) => {
                let hot = &s.shadow.hot;
                let state = hot
                    .task_run_by_key(&key)
                    .and_then(|id| hot.task_run(&id))
                    .map(|t| t.lifecycle.state.clone());
                let _ = reply.send(state);
            }
            FlowRunMsg::Cancel => {
                if !matches!(s.phase, Phase::Done | Phase::Cancelling) {
                    s.phase = Phase::Cancelling;
                    s.refresh_flow().await;
                    let state =
                        State::named(StateName::Cancelled, now()).with_message("its flow run was cancelled");
                    s.stop_tasks(&state, |task| TaskFailure::Cancelled {
                        task: task.to_owned(),
                    });
                    s.ctx.logs.flush(s.id).await;
                    let cancelled = State::named(StateName::Cancelled, now());
                    match s.propose_flow(&myself, cancelled).await {
                        Ok(Decision::Accept(st)) | Ok(Decision::Reject(st)) => s.done(&myself, st, None),
                        _ => {
                            let current = s.current_state();
                            s.done(&myself, current, None);
                        }
                    }
                }
            }
            FlowRunMsg::Written { seq, results } => {
                s.outbox.acked = s.outbox.acked.max(seq + 1);
                if seq + 1 >= s.outbox.next_seq {
                    s.outbox.in_flight = false;
                }
                let acked = s.outbox.acked;
                let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut s.strict)
                    .into_iter()
                    .partition(|(q, _, _)| *q < acked);
                s.strict = waiting;
                for (_, waiters, bytes) in ready {
                    for w in waiters {
                        let _ = w.send(Ok(bytes.clone()));
                    }
                }
                s.check_written(&myself, &results);
            }
        }
        if matches!(s.phase, Phase::Running | Phase::Finishing) {
            s.start_ready(&myself).await;
        }
        if s.phase == Phase::Finishing
            && s.tasks.is_empty()
            && s.strict.is_empty()
            && let Some(result) = s.finishing.take()
        {
            {
                let end = match result {
                    Ok(bytes) => End::Completed(bytes),
                    Err(message) => End::Failed(message),
                };
                s.end(&myself, end).await;
            }
        }
        if s.phase != Phase::Done {
            s.flush(&myself, false);
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => match s.children.remove(&cell.get_id()) {
                Some((task, attempt)) => {
                    // A panic in the task's body: a failure like any other, retried by the policy.
                    let st = State::named(StateName::Failed, now()).with_message(format!("panicked: {err}"));
                    s.attempt_failed(&myself, task, attempt, st);
                    s.flush(&myself, false);
                }
                None => {
                    s.orphans.insert(cell.get_id(), err.to_string());
                }
            },
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                s.children.remove(&cell.get_id());
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(b) = s.body.take() {
            b.abort();
        }
        for rec in s.tasks.values() {
            if let Some(c) = &rec.child {
                c.kill();
            }
        }
        Ok(())
    }
}
