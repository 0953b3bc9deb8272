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
use std::time::Duration;

use flotilla_runtime::{
    ApplyContext, Command, Decision, Epoch, FlowRunId, LogIndex, MemState, NewTaskRun, NodeId, Outcome,
    Proposal, Refusal, Reply, ResultRef, RetryRequest, RunId, State, StateName, StateType, TaskRunId,
    TaskRunKey, TransitionId, apply_shadow,
};
use futures::FutureExt;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::oneshot;

use super::env::FlowEnv;
use super::limits::Slots;
use super::task_run::{AttemptOutcome, TaskRunArgs};
use super::worker::{EngineCtx, EngineHandle, RunOutcome, WorkerMsg, now};
use super::{Durability, FlowFn, TaskAttempt, TaskBody, TaskFailure, TaskSpec};
use crate::persistence::{PersistError, SubmitResult};

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
}

/// The flow run's actor.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlowRunActor;

/// The write-behind queue: commands in order, one batch in flight.
#[derive(Default)]
struct Outbox {
    queue: Vec<Command>,
    /// Where each task run's open record is in the queue (records after the last flow-level
    /// command only, so coalescing never reorders a task's transition past it).
    open: HashMap<TaskRunId, usize>,
    next_seq: u64,
    in_flight: bool,
    acked: u64,
}

impl Outbox {
    fn task(&mut self, run: TaskRunId, create: Option<NewTaskRun>, proposal: Option<Proposal>) {
        if let Some(&i) = self.open.get(&run)
            && let Some(Command::RecordTaskRun {
                create: c, proposals, ..
            }) = self.queue.get_mut(i)
        {
            if c.is_none() {
                *c = create;
            }
            proposals.extend(proposal);
            return;
        }
        self.open.insert(run, self.queue.len());
        self.queue.push(Command::RecordTaskRun {
            create,
            run,
            proposals: proposal.into_iter().collect(),
        });
    }

    fn push(&mut self, command: Command) {
        self.queue.push(command);
        self.open.clear();
    }

    /// The sequence number the queued commands will be written under.
    fn pending_seq(&self) -> u64 {
        self.next_seq
    }
}

/// Where a task run is.
struct TaskRec {
    spec: TaskSpec,
    body: TaskBody,
    waiters: Vec<Waiter>,
    attempt: u32,
    /// Whether an attempt is under way (it holds one of the run's attempt slots).
    active: bool,
    child: Option<ActorCell>,
    slots: Option<Slots>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
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
    id: FlowRunId,
    flow: Arc<dyn FlowFn>,
    ctx: Arc<EngineCtx>,
    engine: EngineHandle,
    worker: Option<ActorRef<WorkerMsg>>,
    on_done: Option<oneshot::Sender<RunOutcome>>,
    node: NodeId,
    epoch: Epoch,
    attempt: u32,
    phase: Phase,
    finishing: Option<Result<Vec<u8>, String>>,
    shadow: MemState,
    index: u64,
    tasks: HashMap<TaskRunId, TaskRec>,
    /// Attempts under way, and task runs waiting for one of those slots.
    active: usize,
    ready: std::collections::VecDeque<TaskRunId>,
    children: HashMap<ActorId, (TaskRunId, u32)>,
    /// Children that failed before the spawner said whose they are.
    orphans: HashMap<ActorId, String>,
    strict: Vec<(u64, Vec<Waiter>, Vec<u8>)>,
    outbox: Outbox,
    body: Option<tokio::task::JoinHandle<()>>,
    rng: SmallRng,
    last_task_id: Option<TaskRunId>,
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
enum End {
    Completed(Vec<u8>),
    Failed(String),
    TimedOut(Duration),
}

impl FlowRunState {
    /// A new task run id, after every earlier one of this run (ids sort in creation order).
    fn next_task_id(&mut self) -> TaskRunId {
        let mut id = TaskRunId::new(now(), &mut self.rng);
        if let Some(last) = self.last_task_id
            && id <= last
        {
            id = TaskRunId::from_uuid(uuid::Uuid::from_u128(last.as_uuid().as_u128().wrapping_add(1)));
        }
        self.last_task_id = Some(id);
        id
    }

    fn tid(&mut self) -> TransitionId {
        TransitionId::new(now(), &mut self.rng)
    }

    /// Applies a command to the shadow: the decision the control plane will make.
    fn local(&mut self, command: Command) -> Outcome {
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

    fn proposal(&mut self, state: State) -> Proposal {
        let tid = self.tid();
        Proposal::from_worker(state, tid, self.epoch, self.node.clone())
    }

    /// Proposes a task run's transition: decided on the shadow, written behind.
    fn propose_task(&mut self, task: TaskRunId, state: State) -> Decision {
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
    async fn propose_flow(
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
                proposal: p,
            })
            .await;
        self.refresh_flow().await;
        match answer {
            Ok(Ok(Reply::FlowRunTransition { decision, .. })) => Ok(decision),
            Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
            Ok(Err(r)) => Err(r.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn refresh_flow(&mut self) {
        if let Ok(Some(run)) = self.ctx.persistence.flow_run(self.id).await {
            self.epoch = run.epoch;
            self.shadow.hot.put_flow_run(run);
        }
    }

    /// Sends the queued commands (when no batch is in flight, or at once when `force`).
    fn flush(&mut self, myself: &ActorRef<FlowRunMsg>, force: bool) {
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

    fn reply(&mut self, waiters: Vec<Waiter>, result: Result<Vec<u8>, TaskFailure>) {
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

    /// A task call: its recorded result, or a (new or retried) task run.
    async fn call(
        &mut self,
        myself: &ActorRef<FlowRunMsg>,
        key: TaskRunKey,
        spec: TaskSpec,
        body: TaskBody,
        reply: Waiter,
    ) {
        if self.phase != Phase::Running {
            let _ = reply.send(Err(TaskFailure::Aborted(
                format!("the flow run is {:?}", self.phase).to_lowercase(),
            )));
            return;
        }
        let id = match self.shadow.hot.task_run_by_key(&key) {
            Some(id) => {
                if let Some(rec) = self.tasks.get_mut(&id) {
                    rec.waiters.push(reply);
                    return;
                }
                let Some(run) = self.shadow.hot.task_run(&id) else {
                    return;
                };
                let state = run.lifecycle.state.clone();
                if state.kind == StateType::Completed {
                    // Recorded: return the result without running the task again.
                    let loaded = state.result.as_ref().map(|r| self.ctx.results.load(r));
                    let result = match loaded {
                        Some(Ok(bytes)) => Ok(bytes),
                        Some(Err(e)) => Err(TaskFailure::ResultUnreadable {
                            run: id,
                            reason: e.to_string(),
                        }),
                        None => Err(TaskFailure::ResultUnreadable {
                            run: id,
                            reason: "no result was recorded".into(),
                        }),
                    };
                    let _ = reply.send(result);
                    return;
                }
                if !state.is_terminal() {
                    // Left running by an earlier attempt of the flow: that attempt is gone.
                    let crashed =
                        State::named(StateName::Crashed, now()).with_message("its flow run was run again");
                    self.propose_task(id, crashed);
                }
                let request = RetryRequest {
                    transition_id: self.tid(),
                    resume: false,
                    force: false,
                    message: None,
                };
                let retry = Command::RetryTaskRun {
                    run: id,
                    request,
                    epoch: self.epoch,
                };
                if let Err(r) = self.local(retry.clone()).reply {
                    let _ = reply.send(Err(TaskFailure::Aborted(r.to_string())));
                    return;
                }
                self.outbox.push(retry);
                id
            }
            None => {
                let id = self.next_task_id();
                let new = NewTaskRun {
                    id,
                    key,
                    epoch: self.epoch,
                    retry_policy: spec.retry.clone(),
                    cache_key: spec.cache_key.clone(),
                    cache_expiration: spec.cache_expiration,
                    refresh_cache: spec.refresh_cache,
                    called: Some(now()),
                    tags: spec.tags.clone(),
                };
                if let Err(r) = self.local(Command::CreateTaskRun(new.clone())).reply {
                    let _ = reply.send(Err(TaskFailure::Aborted(r.to_string())));
                    return;
                }
                self.outbox.task(id, Some(new), None);
                id
            }
        };
        self.tasks.insert(
            id,
            TaskRec {
                spec,
                body,
                waiters: vec![reply],
                attempt: 0,
                active: false,
                child: None,
                slots: None,
            },
        );
        self.start_attempt(myself, id).await;
    }

    /// Starts an attempt, or queues it while the run has as many attempts under way as it may.
    async fn start_attempt(&mut self, myself: &ActorRef<FlowRunMsg>, id: TaskRunId) {
        if self.active >= self.ctx.config.task_attempts_in_flight_max.max(1) {
            self.ready.push_back(id);
            return;
        }
        let Some(rec) = self.tasks.get_mut(&id) else {
            return;
        };
        rec.attempt += 1;
        rec.active = true;
        self.active += 1;
        if self.ctx.limits.limits_any(&rec.spec.tags) {
            let acquire = self.ctx.limits.acquire(&rec.spec.tags);
            let me = myself.clone();
            tokio::spawn(async move {
                let slots = acquire.await;
                let _ = me.cast(FlowRunMsg::Slots(id, slots));
            });
            return;
        }
        self.run_attempt(myself, id, None).await;
    }

    async fn run_attempt(&mut self, myself: &ActorRef<FlowRunMsg>, id: TaskRunId, slots: Option<Slots>) {
        let Some(rec) = self.tasks.get(&id) else { return };
        if let (Some(k), false) = (rec.spec.cache_key.clone(), rec.spec.refresh_cache)
            && let Ok(Some(cached)) = self.ctx.persistence.cached(k.clone(), now()).await
        {
            self.shadow.hot.put_cached(k, cached);
        }
        let decision = self.propose_task(id, State::named(StateName::Running, now()));
        match decision {
            Decision::Accept(_) => {
                let Some(rec) = self.tasks.get_mut(&id) else {
                    return;
                };
                let attempt = TaskAttempt {
                    flow_run: self.id,
                    task_run: id,
                    attempt: rec.attempt,
                };
                let args = TaskRunArgs {
                    parent: myself.clone(),
                    attempt,
                    name: rec.spec.name.clone(),
                    body: rec.body.clone(),
                    timeout: rec.spec.timeout,
                    results: self.ctx.results.clone(),
                    logs: self.ctx.logs.clone(),
                };
                rec.slots = slots;
                self.ctx.spawner.spawn(args, myself.get_cell());
            }
            Decision::Reject(s) if s.name == StateName::Cached => {
                let result = match s.result.as_ref().map(|r| self.ctx.results.load(r)) {
                    Some(Ok(bytes)) => Ok(bytes),
                    Some(Err(e)) => Err(TaskFailure::ResultUnreadable {
                        run: id,
                        reason: e.to_string(),
                    }),
                    None => Err(TaskFailure::ResultUnreadable {
                        run: id,
                        reason: "the cache entry has no result".into(),
                    }),
                };
                self.finish_task(id, result);
            }
            Decision::Reject(s) => {
                self.finish_task(id, Err(TaskFailure::Aborted(format!("the task run is {s}"))))
            }
            Decision::Wait { delay, .. } => {
                self.end_attempt(id);
                myself.send_after(delay, move || FlowRunMsg::Attempt(id));
            }
            Decision::Abort(reason) => self.finish_task(id, Err(TaskFailure::Aborted(reason.to_string()))),
        }
    }

    /// An attempt failed: the retry policy (on the shadow) says when to try again, or the task
    /// run fails for good.
    fn attempt_failed(&mut self, myself: &ActorRef<FlowRunMsg>, id: TaskRunId, attempt: u32, state: State) {
        match self.tasks.get(&id) {
            Some(rec) if rec.attempt == attempt => {}
            _ => return,
        }
        self.end_attempt(id);
        let Some(rec) = self.tasks.get_mut(&id) else {
            return;
        };
        rec.slots = None;
        rec.child = None;
        let name = rec.spec.name.clone();
        let timeout = rec.spec.timeout;
        let failure = match state.name {
            StateName::TimedOut => TaskFailure::TimedOut {
                task: name,
                after: timeout.unwrap_or_default(),
            },
            _ => TaskFailure::Failed {
                task: name,
                message: state.message.clone().unwrap_or_default(),
            },
        };
        match self.propose_task(id, state) {
            Decision::Reject(s) if s.name == StateName::AwaitingRetry => {
                let delay = s
                    .details
                    .scheduled_time
                    .map_or(Duration::ZERO, |at| at.saturating_since(now()));
                if delay.is_zero() {
                    let _ = myself.cast(FlowRunMsg::Attempt(id));
                } else {
                    myself.send_after(delay, move || FlowRunMsg::Attempt(id));
                }
            }
            Decision::Reject(s) if s.kind == StateType::Cancelled => {
                let task = self
                    .tasks
                    .get(&id)
                    .map(|r| r.spec.name.clone())
                    .unwrap_or_default();
                self.finish_task(id, Err(TaskFailure::Cancelled { task }));
            }
            _ => self.finish_task(id, Err(failure)),
        }
    }

    /// An attempt is over: its slot goes to the next queued one.
    fn end_attempt(&mut self, id: TaskRunId) {
        if let Some(rec) = self.tasks.get_mut(&id)
            && rec.active
        {
            rec.active = false;
            self.active = self.active.saturating_sub(1);
        }
    }

    /// Starts queued attempts while there are free slots.
    async fn start_ready(&mut self, myself: &ActorRef<FlowRunMsg>) {
        while self.active < self.ctx.config.task_attempts_in_flight_max.max(1) {
            let Some(id) = self.ready.pop_front() else { break };
            if self.tasks.contains_key(&id) {
                self.start_attempt(myself, id).await;
            }
        }
    }

    fn finish_task(&mut self, id: TaskRunId, result: Result<Vec<u8>, TaskFailure>) {
        self.end_attempt(id);
        if let Some(rec) = self.tasks.remove(&id) {
            if let Some(child) = &rec.child {
                self.children.remove(&child.get_id());
            }
            self.reply(rec.waiters, result);
        }
    }

    fn start_body(&mut self, myself: &ActorRef<FlowRunMsg>) {
        self.attempt += 1;
        let attempt = self.attempt;
        let params = self
            .shadow
            .hot
            .flow_run(&self.id)
            .map(|r| r.parameters.clone())
            .unwrap_or_default();
        let env = FlowEnv::new(
            self.id,
            self.flow.name().to_owned(),
            self.epoch,
            myself.clone(),
            params.clone(),
            self.engine.clone(),
        );
        let body = self.flow.run(env, params);
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
    fn stop_tasks(&mut self, state: &State, failure: impl Fn(&str) -> TaskFailure) {
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
    async fn end(&mut self, myself: &ActorRef<FlowRunMsg>, end: End) {
        self.ctx.logs.flush(self.id).await;
        let (state, result) = match end {
            End::Completed(bytes) => {
                let store = self.ctx.results.clone();
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

    fn current_state(&self) -> State {
        self.shadow
            .hot
            .flow_run(&self.id)
            .map(|r| r.lifecycle.state.clone())
            .unwrap_or_else(|| State::named(StateName::Crashed, now()))
    }

    fn done(&mut self, myself: &ActorRef<FlowRunMsg>, state: State, result: Option<Vec<u8>>) {
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
            let _ = w.cast(WorkerMsg::Ended(self.id));
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

    fn check_written(&mut self, myself: &ActorRef<FlowRunMsg>, results: &[SubmitResult]) {
        for r in results {
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

    async fn claim(&mut self, myself: &ActorRef<FlowRunMsg>) -> Result<bool, ActorProcessingErr> {
        let p = self.ctx.persistence.clone();
        let Some(run) = p.flow_run(self.id).await? else {
            return Ok(false);
        };
        self.epoch = run.epoch;
        let claim = Proposal::from_worker(
            State::named(StateName::Pending, now()),
            self.tid(),
            run.epoch,
            self.node.clone(),
        );
        match p
            .submit(Command::ProposeFlowRunState {
                run: self.id,
                proposal: claim,
            })
            .await?
        {
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
                return Ok(false);
            }
            other => {
                tracing::debug!(flow_run = %self.id, answer = ?other, "not claimed");
                return Ok(false);
            }
        }
        // The shadow: the run and every task run it has (a resumed run finds its results).
        self.refresh_flow().await;
        let mut after = None;
        loop {
            let page = p.task_runs(self.id, after, crate::persistence::PAGE_MAX).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for t in page {
                self.shadow.hot.put_task_run(t);
            }
        }
        Ok(true)
    }
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
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if !s.claim(&myself).await? {
            if s.phase == Phase::Starting && s.outbox.queue.is_empty() {
                // Either another worker has it, or it is not due yet (a RetryFlow is on its way).
            }
            return Ok(());
        }
        let running = s.proposal(State::named(StateName::Running, now()));
        let cmd = Command::ProposeFlowRunState {
            run: s.id,
            proposal: running,
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
        s.outbox.push(cmd);
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
                            if let Some(rec) = s.tasks.get_mut(&task) {
                                rec.slots = None;
                            }
                            let done = State::named(StateName::Completed, now()).with_result(result);
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
