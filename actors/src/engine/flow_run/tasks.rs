//! The task calls of a flow run: task runs created or retried, their attempts started, queued,
//! failed and finished.

use std::time::Duration;

use flotilla_runtime::{
    Command, Decision, NewTaskRun, RetryRequest, State, StateName, StateType, TaskRunId, TaskRunKey,
};
use ractor::ActorRef;

use super::state::{FlowRunState, Phase, TaskRec};
use super::{FlowRunMsg, Waiter};
use crate::engine::limits::Slots;
use crate::engine::task_run::TaskRunArgs;
use crate::engine::worker::now;
use crate::engine::{TaskAttempt, TaskBody, TaskFailure, TaskSpec};

impl FlowRunState {
    /// A task call: its recorded result, or a (new or retried) task run.
    pub(super) async fn call(
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
                let mut lost = false;
                if state.kind == StateType::Completed {
                    // Recorded: return the result without running the task again. A result
                    // that cannot be read (lost with its node and its copy, or damaged) is
                    // never taken as done: the task runs again.
                    let loaded = match state.result.as_ref() {
                        Some(r) => self.results.load_async(r).await.map_err(|e| e.to_string()),
                        None => Err("no result was recorded".into()),
                    };
                    match loaded {
                        Ok(bytes) => {
                            let _ = reply.send(Ok(bytes));
                            return;
                        }
                        Err(reason) => {
                            tracing::warn!(task_run = %id, %reason, "a recorded result cannot be read; the task runs again");
                            lost = true;
                        }
                    }
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
                    force: lost,
                    message: lost.then(|| "its recorded result cannot be read".to_owned()),
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
    pub(super) async fn start_attempt(&mut self, myself: &ActorRef<FlowRunMsg>, id: TaskRunId) {
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
            let acquire = self.ctx.limits.acquire(id, &rec.spec.tags);
            let me = myself.clone();
            tokio::spawn(async move {
                let slots = acquire.await;
                let _ = me.cast(FlowRunMsg::Slots(id, slots));
            });
            return;
        }
        self.run_attempt(myself, id, None).await;
    }

    pub(super) async fn run_attempt(
        &mut self,
        myself: &ActorRef<FlowRunMsg>,
        id: TaskRunId,
        slots: Option<Slots>,
    ) {
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
                    results: self.results.clone(),
                    logs: self.ctx.logs.clone(),
                    lease_lost: slots.as_ref().and_then(Slots::lost),
                };
                rec.slots = slots;
                self.ctx.spawner.spawn(args, myself.get_cell());
            }
            Decision::Reject(s) if s.name == StateName::Cached => {
                let loaded = match s.result.as_ref() {
                    Some(r) => Some(self.results.load_async(r).await),
                    None => None,
                };
                let result = match loaded {
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
    pub(super) fn attempt_failed(
        &mut self,
        myself: &ActorRef<FlowRunMsg>,
        id: TaskRunId,
        attempt: u32,
        state: State,
    ) {
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
    pub(super) async fn start_ready(&mut self, myself: &ActorRef<FlowRunMsg>) {
        while self.active < self.ctx.config.task_attempts_in_flight_max.max(1) {
            let Some(id) = self.ready.pop_front() else { break };
            if self.tasks.contains_key(&id) {
                self.start_attempt(myself, id).await;
            }
        }
    }

    pub(super) fn finish_task(&mut self, id: TaskRunId, result: Result<Vec<u8>, TaskFailure>) {
        self.end_attempt(id);
        if let Some(rec) = self.tasks.remove(&id) {
            if let Some(child) = &rec.child {
                self.children.remove(&child.get_id());
            }
            self.reply(rec.waiters, result);
        }
    }
}
