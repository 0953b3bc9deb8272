//! The state of a flow run's actor: its phase, its shadow of the run, the task runs it drives,
//! and the flow-level steps (claim, body, end).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_runtime::{
    AbortReason, ApplyContext, Command, Decision, Epoch, FlowRunId, LogIndex, MemState, NodeId, Outcome,
    Proposal, Refusal, Reply, ResultRef, RunId, State, StateName, StateType, TaskRunId, TransitionId,
    apply_shadow,
};
use futures::FutureExt;
use ractor::{ActorCell, ActorId, ActorProcessingErr, ActorRef};
use rand::rngs::SmallRng;
use tokio::sync::oneshot;

use super::outbox::Outbox;
use super::{FlowRunMsg, Waiter};
use crate::engine::env::FlowEnv;
use crate::engine::limits::Slots;
use crate::engine::worker::{EngineCtx, EngineHandle, RunOutcome, WorkerMsg, now};
use crate::engine::{Durability, FlowFn, TaskBody, TaskFailure, TaskSpec};
use crate::persistence::{PersistError, SubmitResult};

/// Where a task run is.
pub(super) struct TaskRec {
    pub(super) spec: TaskSpec,
    pub(super) body: TaskBody,
    pub(super) waiters: Vec<Waiter>,
    pub(super) attempt: u32,
    /// Whether an attempt is under way (it holds one of the run's attempt slots).
    pub(super) active: bool,
    pub(super) child: Option<ActorCell>,
    pub(super) slots: Option<Slots>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Starting,
    Running,
    /// The body returned; outstanding task calls finish first.
    Finishing,
    /// Waiting for a flow-level retry.
    Retrying,
    Cancelling,
    Done,
}

/// The actor's state.
pub struct FlowRunState {
    pub(super) id: FlowRunId,
    pub(super) flow: Arc<dyn FlowFn>,
    pub(super) ctx: Arc<EngineCtx>,
    /// Where its large results go: the node's store, or the object store its flow or
    /// deployment names.
    pub(super) results: super::super::results::ResultStore,
    pub(super) engine: EngineHandle,
    pub(super) worker: Option<ActorRef<WorkerMsg>>,
    pub(super) on_done: Option<oneshot::Sender<RunOutcome>>,
    pub(super) node: NodeId,
    pub(super) epoch: Epoch,
    pub(super) attempt: u32,
    pub(super) phase: Phase,
    pub(super) finishing: Option<Result<Vec<u8>, String>>,
    pub(super) shadow: MemState,
    pub(super) index: u64,
    pub(super) tasks: HashMap<TaskRunId, TaskRec>,
    /// Attempts under way, and task runs waiting for one of those slots.
    pub(super) active: usize,
    pub(super) ready: std::collections::VecDeque<TaskRunId>,
    pub(super) children: HashMap<ActorId, (TaskRunId, u32)>,
    /// Children that failed before the spawner said whose they are.
    pub(super) orphans: HashMap<ActorId, String>,
    pub(super) strict: Vec<(u64, Vec<Waiter>, Vec<u8>)>,
    pub(super) outbox: Outbox,
    pub(super) body: Option<tokio::task::JoinHandle<()>>,
    pub(super) rng: SmallRng,
    pub(super) last_task_id: Option<TaskRunId>,
    /// The run as the control node placed it, until it is claimed.
    pub(super) known: Option<Box<flotilla_runtime::FlowRun>>,
}

impl std::fmt::Debug for FlowRunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowRunState")
            .field("id", &self.id)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

/// How the flow run ends.
pub(super) enum End {
    Completed(Vec<u8>),
    Failed(String),
    TimedOut(Duration),
}

impl FlowRunState {
    /// A new task run id, after every earlier one of this run (ids sort in creation order).
    pub(super) fn next_task_id(&mut self) -> TaskRunId {
        let mut id = TaskRunId::new(now(), &mut self.rng);
        if let Some(last) = self.last_task_id
            && id <= last
        {
            id = TaskRunId::from_uuid(uuid::Uuid::from_u128(last.as_uuid().as_u128().wrapping_add(1)));
        }
        self.last_task_id = Some(id);
        id
    }

    pub(super) fn tid(&mut self) -> TransitionId {
        TransitionId::new(now(), &mut self.rng)
    }

    /// Applies a command to the shadow: the decision the control plane will make.
    pub(super) fn local(&mut self, command: Command) -> Outcome {
        self.index += 1;
        apply_shadow(
            &mut self.shadow,
            command,
            ApplyContext {
                index: LogIndex::new(self.index),
                now: now(),
            },
        )
    }

    pub(super) fn proposal(&mut self, state: State) -> Proposal {
        let tid = self.tid();
        Proposal::from_worker(state, tid, self.epoch, self.node.clone())
    }

    /// Proposes a task run's transition: decided on the shadow, written behind.
    pub(super) fn propose_task(&mut self, task: TaskRunId, state: State) -> Decision {
        let p = self.proposal(state);
        let decision = match self
            .local(Command::ProposeTaskRunState {
                run: task,
                proposal: p.clone(),
            })
            .reply
        {
            Ok(Reply::TaskRunTransition { decision, .. }) => decision,
            Ok(other) => Decision::Abort(flotilla_runtime::AbortReason::Invalid {
                from: StateName::Pending,
                to: other_name(&other),
            }),
            Err(r) => return refused(r),
        };
        if matches!(decision, Decision::Accept(_) | Decision::Reject(_)) {
            self.outbox.task(task, None, Some(p));
        }
        decision
    }

    /// Proposes a flow-level transition and waits for the control plane's answer, after
    /// everything queued before it; the shadow takes the control plane's copy of the run.
    pub(super) async fn propose_flow(
        &mut self,
        myself: &ActorRef<FlowRunMsg>,
        state: State,
    ) -> Result<Decision, String> {
        let p = self.proposal(state);
        self.flush(myself, true);
        let answer = self
            .ctx
            .persistence
            .submit(Command::ProposeFlowRunState {
                run: self.id,
                proposal: p.clone(),
            })
            .await;
        self.mirror_flow(&answer, p).await;
        match answer {
            Ok(Ok(Reply::FlowRunTransition { decision, .. })) => Ok(decision),
            Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
            Ok(Err(r)) => Err(r.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Brings the shadow's run in line with the control plane's after a flow-level proposal:
    /// an accepted one is applied to the shadow too (the same rules on the same run give the
    /// same state, with no read); anything else, or a shadow that disagrees, is read back.
    async fn mirror_flow(&mut self, answer: &SubmitResult, p: Proposal) {
        if let Ok(Ok(Reply::FlowRunTransition {
            decision: Decision::Accept(accepted),
            epoch,
            ..
        })) = answer
            && self.shadow.hot.flow_run(&self.id).is_some()
        {
            let mirrored = self.local(Command::ProposeFlowRunState {
                run: self.id,
                proposal: p,
            });
            if let Ok(Reply::FlowRunTransition {
                decision: Decision::Accept(m),
                epoch: e,
                ..
            }) = &mirrored.reply
                && m.name == accepted.name
                && e == epoch
            {
                self.epoch = *epoch;
                return;
            }
        }
        self.refresh_flow().await;
    }

    pub(super) async fn refresh_flow(&mut self) {
        if let Ok(Some(run)) = self.ctx.persistence.flow_run(self.id).await {
            self.epoch = run.epoch;
            self.shadow.hot.put_flow_run(run);
        }
    }

    /// Sends the queued commands (when no batch is in flight, or at once when `force`).
    pub(super) fn flush(&mut self, myself: &ActorRef<FlowRunMsg>, force: bool) {
        if self.outbox.queue.is_empty() || (self.outbox.in_flight && !force) {
            return;
        }
        if !force && self.ctx.config.durability == Durability::Strict {
            // Strict: a task run's earlier transitions ride with its final state, in the batch
            // whose durability someone waits for (or with a flow-level command).
            let waited = !self.strict.is_empty()
                || self
                    .outbox
                    .queue
                    .iter()
                    .any(|c| !matches!(c, Command::RecordTaskRun { .. }));
            if !waited {
                return;
            }
        }
        let seq = self.outbox.next_seq;
        self.outbox.next_seq += 1;
        self.outbox.in_flight = true;
        self.outbox.open.clear();
        let answers: Vec<_> = self
            .outbox
            .queue
            .drain(..)
            .map(|c| self.ctx.persistence.enqueue(c))
            .collect();
        let me = myself.clone();
        tokio::spawn(async move {
            let mut results = Vec::with_capacity(answers.len());
            for a in answers {
                results.push(a.await.unwrap_or(Err(PersistError::Stopped)));
            }
            let _ = me.cast(FlowRunMsg::Written { seq, results });
        });
    }

    pub(super) fn reply(&mut self, waiters: Vec<Waiter>, result: Result<Vec<u8>, TaskFailure>) {
        match (&result, self.ctx.config.durability) {
            (Ok(bytes), Durability::Strict) => {
                let seq = self.outbox.pending_seq();
                self.strict.push((seq, waiters, bytes.clone()));
            }
            _ => {
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
        }
    }

    pub(super) fn start_body(&mut self, myself: &ActorRef<FlowRunMsg>) {
        self.attempt += 1;
        let attempt = self.attempt;
        let (params, storage) = self
            .shadow
            .hot
            .flow_run(&self.id)
            .map(|r| (r.parameters.clone(), r.result_storage.clone()))
            .unwrap_or_default();
        // The deployment's result storage, else the flow's, else the node's store.
        self.results = self
            .ctx
            .results
            .routed(storage.or_else(|| self.flow.options().result_storage));
        let env = FlowEnv::new(
            self.id,
            self.flow.name().to_owned(),
            self.epoch,
            myself.clone(),
            params.clone(),
            self.engine.clone(),
        );
        // Blocks named in the parameters (`{{ flotilla.blocks.secret.NAME }}`) are resolved
        // here, for this attempt, never stored resolved.
        let blocks = flotilla_runtime::block::referenced(&params);
        let body = if blocks.is_empty() {
            self.flow.run(env, params)
        } else {
            let flow = self.flow.clone();
            Box::pin(async move {
                let given = env.resolve_blocks(blocks).await?;
                let params = flotilla_runtime::block::substitute(&params, &given.into_iter().collect())?;
                flow.run(env, params).await
            })
        };
        let body = self.ctx.logs.instrument(body, self.id, None, self.flow.name());
        let me = myself.clone();
        self.body = Some(tokio::spawn(async move {
            let result = match std::panic::AssertUnwindSafe(body).catch_unwind().await {
                Ok(r) => r,
                Err(panic) => Err(format!("the flow panicked: {}", panic_message(&panic))),
            };
            let _ = me.cast(FlowRunMsg::BodyDone { attempt, result });
        }));
        if let Some(t) = self.flow.options().timeout {
            myself.send_after(t, move || FlowRunMsg::FlowTimeout(attempt));
        }
        self.phase = Phase::Running;
    }

    /// Stops every attempt in progress: their task runs end in `state`.
    pub(super) fn stop_tasks(&mut self, state: &State, failure: impl Fn(&str) -> TaskFailure) {
        if let Some(b) = self.body.take() {
            b.abort();
        }
        let ids: Vec<TaskRunId> = self.tasks.keys().copied().collect();
        for id in ids {
            if let Some(child) = self.tasks.get(&id).and_then(|r| r.child.clone()) {
                child.kill();
            }
            let name = self
                .tasks
                .get(&id)
                .map(|r| r.spec.name.clone())
                .unwrap_or_default();
            let mut s = state.clone();
            s.timestamp = now();
            self.propose_task(id, s);
            self.finish_task(id, Err(failure(&name)));
        }
    }

    /// Ends the run: records the final state (after everything before it is durable) and
    /// tells whoever waits.
    pub(super) async fn end(&mut self, myself: &ActorRef<FlowRunMsg>, end: End) {
        self.ctx.logs.flush(self.id).await;
        let (state, result) = match end {
            End::Completed(bytes) => {
                let store = self.results.clone();
                let owner = RunId::Flow(self.id);
                let attempt = self.attempt;
                let copy = bytes.clone();
                let stored = if store.goes_to_file(bytes.len()) {
                    tokio::task::spawn_blocking(move || store.store(owner, attempt, copy))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()))
                } else {
                    Ok(ResultRef::Inline(copy))
                };
                match stored {
                    Ok(r) => (
                        State::named(StateName::Completed, now()).with_result(r),
                        Some(bytes),
                    ),
                    Err(e) => (
                        State::named(StateName::Failed, now())
                            .with_message(format!("the result could not be stored: {e}")),
                        None,
                    ),
                }
            }
            End::Failed(message) => (State::named(StateName::Failed, now()).with_message(message), None),
            End::TimedOut(after) => (
                State::named(StateName::TimedOut, now())
                    .with_message(format!("the flow run timed out after {after:?}")),
                None,
            ),
        };
        match self.propose_flow(myself, state).await {
            Ok(Decision::Reject(s)) if s.name == StateName::AwaitingRetry => {
                self.phase = Phase::Retrying;
                let delay = s
                    .details
                    .scheduled_time
                    .map_or(Duration::ZERO, |at| at.saturating_since(now()));
                myself.send_after(delay, || FlowRunMsg::RetryFlow);
            }
            Ok(Decision::Accept(s)) | Ok(Decision::Reject(s)) => self.done(myself, s, result),
            Ok(other) => {
                let current = self.current_state();
                tracing::warn!(flow_run = %self.id, decision = ?other, "the final state was not recorded");
                self.done(myself, current, None);
            }
            Err(e) => {
                tracing::error!(flow_run = %self.id, error = %e, "the final state could not be recorded");
                let current = self.current_state();
                self.done(myself, current, None);
            }
        }
    }

    pub(super) fn current_state(&self) -> State {
        self.shadow
            .hot
            .flow_run(&self.id)
            .map(|r| r.lifecycle.state.clone())
            .unwrap_or_else(|| State::named(StateName::Crashed, now()))
    }

    pub(super) fn done(&mut self, myself: &ActorRef<FlowRunMsg>, state: State, result: Option<Vec<u8>>) {
        self.phase = Phase::Done;
        let result = if state.kind == StateType::Completed {
            result
        } else {
            None
        };
        if let Some(tx) = self.on_done.take() {
            let _ = tx.send(RunOutcome { state, result });
        }
        if let Some(w) = &self.worker {
            let _ = w.cast(WorkerMsg::Ended(self.id, myself.get_id()));
        }
        myself.stop(None);
    }

    /// The control plane refused written-behind work: the run is no longer ours to drive.
    fn lost(&mut self, myself: &ActorRef<FlowRunMsg>, why: String) {
        if matches!(self.phase, Phase::Done | Phase::Cancelling) {
            return;
        }
        tracing::warn!(flow_run = %self.id, reason = %why, "the flow run stopped here");
        let state = State::named(StateName::Crashed, now()).with_message(why.clone());
        self.stop_tasks(&state, |_| TaskFailure::Aborted(why.clone()));
        self.outbox.queue.clear();
        let current = self.current_state();
        self.done(myself, current, None);
    }

    pub(super) fn check_written(&mut self, myself: &ActorRef<FlowRunMsg>, results: &[SubmitResult]) {
        for r in results {
            // Cancelled meanwhile (before this node heard of it): it ends Cancelled, here.
            let cancelling = match r {
                Ok(Ok(Reply::FlowRunTransition {
                    decision: Decision::Abort(AbortReason::Cancelling),
                    ..
                })) => true,
                Ok(Ok(Reply::TaskRunRecorded { decisions, .. })) => decisions.iter().any(|d| {
                    matches!(
                        d,
                        Ok(Decision::Abort(AbortReason::FlowRunNotRunning(Some(
                            StateType::Cancelling
                        ))))
                    )
                }),
                _ => false,
            };
            if cancelling {
                let _ = myself.cast(FlowRunMsg::Cancel);
                return;
            }
            let problem = match r {
                Err(e) => Some(e.to_string()),
                Ok(Err(refusal)) => Some(refusal.to_string()),
                Ok(Ok(Reply::FlowRunTransition {
                    decision: Decision::Abort(reason),
                    ..
                })) => Some(reason.to_string()),
                Ok(Ok(Reply::TaskRunRecorded { decisions, .. })) => decisions.iter().find_map(|d| match d {
                    Err(refusal) => Some(refusal.to_string()),
                    Ok(Decision::Abort(reason)) => Some(reason.to_string()),
                    _ => None,
                }),
                _ => None,
            };
            if let Some(why) = problem {
                self.lost(myself, why);
                return;
            }
        }
    }

    /// Claims the run: as the control node placed it when it sent it (saving a read), and as
    /// it is now when that claim is refused (the run changed since) or there was none.
    pub(super) async fn claim(&mut self, myself: &ActorRef<FlowRunMsg>) -> Result<Claim, ActorProcessingErr> {
        if let Some(run) = self.known.take() {
            match self.claim_as(myself, *run).await? {
                Claim::Refused => {
                    tracing::debug!(flow_run = %self.id, "the run as placed was refused; reading it")
                }
                claim => return Ok(claim),
            }
        }
        let Some(run) = self.ctx.persistence.flow_run(self.id).await? else {
            return Ok(Claim::Refused);
        };
        self.claim_as(myself, run).await
    }

    async fn claim_as(
        &mut self,
        myself: &ActorRef<FlowRunMsg>,
        run: flotilla_runtime::FlowRun,
    ) -> Result<Claim, ActorProcessingErr> {
        let p = self.ctx.persistence.clone();
        self.epoch = run.epoch;
        // A run that never ran has no task runs to read back.
        let fresh = run.lifecycle.run_count == 0;
        self.shadow.hot.put_flow_run(run);
        let claim = Proposal::from_worker(
            State::named(StateName::Pending, now()),
            self.tid(),
            self.epoch,
            self.node.clone(),
        );
        let claimed = p.enqueue(Command::ProposeFlowRunState {
            run: self.id,
            proposal: claim.clone(),
        });
        // A run that never ran starts at once: Running goes right behind its claim (one round
        // trip, one commit). The rules accept it only once the claim is: from Pending, from
        // this node, under this epoch.
        let started = fresh.then(|| {
            let running = Command::ProposeFlowRunState {
                run: self.id,
                proposal: self.proposal(State::named(StateName::Running, now())),
            };
            let answer = p.enqueue(running.clone());
            Box::new(Started { running, answer })
        });
        let answer = claimed
            .await
            .unwrap_or(Err(crate::persistence::PersistError::Stopped));
        if matches!(
            answer,
            Ok(Ok(Reply::FlowRunTransition {
                decision: Decision::Accept(_),
                ..
            }))
        ) {
            self.mirror_flow(&answer, claim).await;
        }
        match answer? {
            Ok(Reply::FlowRunTransition {
                decision: Decision::Accept(_),
                ..
            }) => {}
            Ok(Reply::FlowRunTransition {
                decision: Decision::Wait { delay, .. },
                ..
            }) => {
                // Not due yet: claim it when it is.
                let me = myself.clone();
                myself.send_after(delay, move || {
                    let _ = me;
                    FlowRunMsg::RetryFlow
                });
                return Ok(Claim::Later);
            }
            other => {
                tracing::debug!(flow_run = %self.id, answer = ?other, "not claimed");
                return Ok(Claim::Refused);
            }
        }
        // The shadow: the run and every task run it has (a resumed run finds its results).
        if fresh {
            return Ok(Claim::Claimed(started));
        }
        let mut after = None;
        loop {
            let page = p.task_runs(self.id, after, crate::persistence::PAGE_MAX).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for t in page {
                self.shadow.hot.put_task_run(t);
            }
        }
        Ok(Claim::Claimed(None))
    }
}

/// Running, proposed right behind a claim, and its answer to come.
#[allow(missing_debug_implementations)]
pub(super) struct Started {
    /// The proposal.
    pub(super) running: Command,
    /// Its answer.
    pub(super) answer: tokio::sync::oneshot::Receiver<crate::persistence::SubmitResult>,
}

/// How a claim went.
#[allow(missing_debug_implementations)]
pub(super) enum Claim {
    /// This node owns the run now (and proposed Running with the claim, for a run that never
    /// ran).
    Claimed(Option<Box<Started>>),
    /// Not due yet: the claim is made again when it is.
    Later,
    /// Refused (another node has it, it ended, it is gone): the actor stops and gives its
    /// slot back.
    Refused,
}

fn other_name(_: &Reply) -> StateName {
    StateName::Crashed
}

fn refused(r: Refusal) -> Decision {
    Decision::Abort(flotilla_runtime::AbortReason::FlowRunNotRunning(match r {
        Refusal::FlowRunNotRunning { state, .. } => Some(state),
        _ => None,
    }))
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}
