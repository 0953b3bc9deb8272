//! `apply`: the deterministic state machine of the control state. It validates a command
//! (orchestration rules), changes the state, and returns the reply, the records written and
//! the events produced. Given the same state, command, index and time it does the same thing,
//! so replaying the command log reproduces the state exactly.

use serde::{Deserialize, Serialize};

use crate::command::{Command, NewFlowRun, NewTaskRun, RetryRequest};
use crate::deployment::Deployment;
use crate::event::{Event, EventPayload, Resource};
use crate::flow_run::{FlowRun, NAME_LEN_MAX, TAGS_MAX};
use crate::ids::{DeploymentId, Epoch, EventId, FlowRunId, LogBatchId, LogIndex, NodeId, RunId, TaskRunId};
use crate::lifecycle::{Lifecycle, PastDecision};
use crate::log_line::LogLine;
use crate::rules::{self, Decision, Proposal, RetryRefusal, RuleContext, RunKind};
use crate::state::{State, StateType};
use crate::task_run::TaskRun;
use crate::time::Timestamp;
use crate::view::StateView;

#[cfg(test)]
mod tests;

/// Where and when a command is applied: its log index and the control plane's time, both
/// recorded in the log so that replay sees the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyContext {
    /// The command's position in the log.
    pub index: LogIndex,
    /// The control plane's time.
    pub now: Timestamp,
}

/// A record `apply` changed. Hot records are named by id (their value is in the hot state);
/// events and logs are new and carried whole.
#[derive(Clone, Debug, PartialEq)]
// Most writes are events: boxing them would cost an allocation each for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Write {
    /// A flow run changed.
    FlowRun(FlowRunId),
    /// A task run changed.
    TaskRun(TaskRunId),
    /// A deployment was put.
    Deployment(DeploymentId),
    /// A deployment was deleted.
    DeploymentDeleted(DeploymentId),
    /// A new event (also a state-history entry when it records a state change).
    Event(Event),
    /// A full window of a run's state history, archived (the run record keeps only the latest
    /// entries).
    HistoryBlock {
        /// The run.
        run: RunId,
        /// The block number (0 for the oldest).
        block: u32,
        /// The history entries (events), oldest first.
        events: Vec<EventId>,
    },
    /// A new batch of log lines.
    Logs {
        /// The flow run.
        flow_run: FlowRunId,
        /// The batch.
        batch: LogBatchId,
        /// The lines.
        lines: Vec<LogLine>,
    },
}

/// What a command did, for its sender.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// A flow run was created, or already existed under the key.
    FlowRunCreated {
        /// The run.
        run: Box<FlowRun>,
        /// False when it already existed.
        created: bool,
    },
    /// The decision on a flow run's proposal.
    FlowRunTransition {
        /// The decision (with the state now current when it wrote or returned one).
        decision: Decision,
        /// The run's epoch.
        epoch: Epoch,
        /// The run's run count.
        run_count: u32,
    },
    /// A task run was created, or already existed for the call.
    TaskRunCreated {
        /// The run.
        run: Box<TaskRun>,
        /// False when it already existed.
        created: bool,
    },
    /// The decision on a task run's proposal.
    TaskRunTransition {
        /// The decision.
        decision: Decision,
        /// The run count.
        run_count: u32,
    },
    /// Several transitions of a task run were recorded.
    TaskRunRecorded {
        /// Whether the command created the task run (None: it did not ask to).
        created: Option<bool>,
        /// The decision on each proposal, in order (a refusal where one was refused).
        decisions: Vec<Result<Decision, Refusal>>,
        /// The run count after them.
        run_count: u32,
    },
    /// A run was taken back to Scheduled.
    Retried {
        /// The new state.
        state: State,
        /// The run's (new) epoch.
        epoch: Epoch,
    },
    /// A node's runs were marked.
    NodeCrashed {
        /// Flow runs now Crashed.
        crashed: Vec<FlowRunId>,
        /// Flow runs now Cancelled (they were being cancelled).
        cancelled: Vec<FlowRunId>,
    },
    /// Log lines were stored (or had been).
    LogsAppended {
        /// How many lines the batch holds.
        count: usize,
    },
    /// A deployment was stored.
    DeploymentPut {
        /// False when it replaced one.
        created: bool,
    },
    /// A deployment was deleted.
    DeploymentDeleted {
        /// Whether it existed.
        existed: bool,
    },
    /// An event was stored (or had been).
    EventAppended {
        /// Its id.
        id: EventId,
    },
}

/// Why a command was refused; nothing was written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// No such flow run.
    #[error("no flow run {0}")]
    FlowRunNotFound(FlowRunId),
    /// No such task run.
    #[error("no task run {0}")]
    TaskRunNotFound(TaskRunId),
    /// A deployment by that name exists already with another id.
    #[error("a deployment named {name:?} exists already ({id})")]
    DeploymentNameTaken {
        /// The name.
        name: String,
        /// The other deployment.
        id: DeploymentId,
    },
    /// The sender's epoch of the flow run is not the current one.
    #[error("stale epoch {proposed} for flow run {run} (now {current})")]
    StaleEpoch {
        /// The flow run.
        run: FlowRunId,
        /// The sender's.
        proposed: Epoch,
        /// The run's.
        current: Epoch,
    },
    /// Task runs are created only while their flow run is Running.
    #[error("flow run {run} is {state}, not Running")]
    FlowRunNotRunning {
        /// The flow run.
        run: FlowRunId,
        /// Its state.
        state: StateType,
    },
    /// The run cannot be retried.
    #[error("cannot retry: {0}")]
    NotRetriable(String),
    /// The command is malformed.
    #[error("invalid command: {0}")]
    Invalid(String),
}

impl From<RetryRefusal> for Refusal {
    fn from(r: RetryRefusal) -> Self {
        Refusal::NotRetriable(r.to_string())
    }
}

/// What applying a command did.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The reply to the sender.
    pub reply: Result<Reply, Refusal>,
    /// The records written, in order (empty when the command was a resend or refused).
    pub writes: Vec<Write>,
}

impl Outcome {
    fn refused(r: Refusal) -> Self {
        Outcome {
            reply: Err(r),
            writes: Vec::new(),
        }
    }

    fn replied(reply: Reply, writes: Vec<Write>) -> Self {
        Outcome {
            reply: Ok(reply),
            writes,
        }
    }

    /// The events this outcome produced, to publish once durable.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.writes.iter().filter_map(|w| match w {
            Write::Event(e) => Some(e),
            _ => None,
        })
    }
}

/// Applies one command.
pub fn apply(view: &mut impl StateView, command: Command, at: ApplyContext) -> Outcome {
    apply_with(view, command, at, true)
}

/// Applies one command to a worker's local shadow of the state: the same decisions and the same
/// changes to runs, but no events are built (a shadow only predicts the control plane's
/// answers; the control plane records the events).
pub fn apply_shadow(view: &mut impl StateView, command: Command, at: ApplyContext) -> Outcome {
    apply_with(view, command, at, false)
}

fn apply_with(view: &mut impl StateView, command: Command, at: ApplyContext, record: bool) -> Outcome {
    let tx = Tx {
        at,
        events: 0,
        writes: Vec::new(),
        record,
    };
    match command {
        Command::CreateFlowRun(new) => tx.create_flow_run(view, new),
        Command::ProposeFlowRunState { run, proposal } => tx.propose_flow(view, run, proposal),
        Command::CreateTaskRun(new) => tx.create_task_run(view, new),
        Command::ProposeTaskRunState { run, proposal } => tx.propose_task(view, run, proposal),
        Command::RecordTaskRun {
            create,
            run,
            proposals,
        } => record_task_run(view, at, record, create, run, proposals),
        Command::RetryFlowRun { run, request } => tx.retry_flow(view, run, request),
        Command::RetryTaskRun { run, request, epoch } => tx.retry_task(view, run, request, epoch),
        Command::MarkNodeCrashed { node, message, .. } => tx.node_crashed(view, &node, &message),
        Command::AppendLogs {
            batch,
            flow_run,
            lines,
        } => tx.append_logs(view, flow_run, batch, lines),
        Command::PutDeployment(d) => tx.put_deployment(view, d),
        Command::DeleteDeployment { id } => tx.delete_deployment(view, id),
        Command::AppendEvent(e) => tx.append_event(view, e),
    }
}

/// Creation and transitions of one task run as one command: each step applied in turn, every
/// write kept, the events numbered across the steps.
fn record_task_run(
    view: &mut impl StateView,
    at: ApplyContext,
    record: bool,
    create: Option<NewTaskRun>,
    run: TaskRunId,
    proposals: Vec<Proposal>,
) -> Outcome {
    let mut writes = Vec::new();
    let mut events: u16 = 0;
    let mut created = None;
    let count_events = |w: &[Write]| w.iter().filter(|w| matches!(w, Write::Event(_))).count() as u16;
    if let Some(new) = create {
        if new.id != run {
            return Outcome::refused(Refusal::Invalid(format!(
                "the task run to create ({}) is not the one recorded ({run})",
                new.id
            )));
        }
        let out = Tx {
            at,
            events,
            writes: Vec::new(),
            record,
        }
        .create_task_run(view, new);
        events = events.saturating_add(count_events(&out.writes));
        writes.extend(out.writes);
        match out.reply {
            Ok(Reply::TaskRunCreated { created: c, .. }) => created = Some(c),
            Ok(_) => {}
            Err(r) => return Outcome::refused(r),
        }
    }
    let mut decisions = Vec::with_capacity(proposals.len());
    for p in proposals {
        let out = Tx {
            at,
            events,
            writes: Vec::new(),
            record,
        }
        .propose_task(view, run, p);
        events = events.saturating_add(count_events(&out.writes));
        writes.extend(out.writes);
        decisions.push(out.reply.map(|r| match r {
            Reply::TaskRunTransition { decision, .. } => decision,
            _ => Decision::Abort(crate::rules::AbortReason::Cancelling),
        }));
    }
    let run_count = view.hot().task_run(&run).map_or(0, |t| t.lifecycle.run_count);
    Outcome::replied(
        Reply::TaskRunRecorded {
            created,
            decisions,
            run_count,
        },
        writes,
    )
}

/// One command being applied: numbers its events and collects its writes.
struct Tx {
    at: ApplyContext,
    events: u16,
    writes: Vec<Write>,
    /// Whether events are built (not in a shadow).
    record: bool,
}

/// `prefix` followed by the hyphenated UUID, without the formatting machinery (this is on the
/// path of every state change).
fn resource_id(prefix: &str, id: &uuid::Uuid) -> String {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let mut s = String::with_capacity(prefix.len() + buf.len());
    s.push_str(prefix);
    s.push_str(id.hyphenated().encode_lower(&mut buf));
    s
}

fn flow_resource(run: &FlowRun) -> (Resource, Vec<Resource>) {
    let resource = Resource::new(
        resource_id("flotilla.flow-run.", run.id.as_uuid()),
        Some(&run.flow_name),
    );
    (resource, Vec::new())
}

fn flow_related(flow_run: &FlowRunId) -> Resource {
    Resource::new(resource_id("flotilla.flow-run.", flow_run.as_uuid()), None)
        .with(crate::event::RESOURCE_ROLE, "flow-run")
}

/// A task run's resource, with its flow run as a related resource.
fn task_resource(run: &TaskRun) -> (Resource, Vec<Resource>) {
    let resource = Resource::new(
        resource_id("flotilla.task-run.", run.id.as_uuid()),
        Some(&run.key.task_key),
    );
    (resource, vec![flow_related(&run.key.flow_run)])
}

fn state_event_name(kind: &str, state: StateType) -> String {
    let mut s = String::with_capacity(9 + kind.len() + 1 + 10);
    s.push_str("flotilla.");
    s.push_str(kind);
    s.push('.');
    s.push_str(state.as_str());
    s
}

fn check_name(what: &str, name: &str) -> Result<(), Refusal> {
    if name.is_empty() || name.len() > NAME_LEN_MAX {
        return Err(Refusal::Invalid(format!(
            "{what} must be 1 to {NAME_LEN_MAX} bytes long, not {}",
            name.len()
        )));
    }
    Ok(())
}

fn check_tags(tags: &[String]) -> Result<(), Refusal> {
    if tags.len() > TAGS_MAX {
        return Err(Refusal::Invalid(format!(
            "at most {TAGS_MAX} tags, not {}",
            tags.len()
        )));
    }
    tags.iter().try_for_each(|t| check_name("a tag", t))
}

fn check_state(state: &State) -> Result<(), Refusal> {
    if state.name.state_type() != state.kind {
        return Err(Refusal::Invalid(format!(
            "state name {} does not belong to state type {}",
            state.name, state.kind
        )));
    }
    Ok(())
}

fn jitter_seed(p: &Proposal) -> u64 {
    let b = p.transition_id.as_bytes();
    u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]])
}

impl Tx {
    fn now(&self) -> Timestamp {
        self.at.now
    }

    fn next_event_id(&mut self) -> EventId {
        let id = EventId::at(self.at.now, self.at.index, self.events);
        self.events = self.events.saturating_add(1);
        id
    }

    /// Records a state change as an event (the history entry) and moves the lifecycle.
    fn enter(
        &mut self,
        run: RunId,
        lifecycle: &mut Lifecycle,
        (resource, related): (Resource, Vec<Resource>),
        next: State,
        epoch: Epoch,
    ) {
        let kind = match run {
            RunId::Flow(_) => "flow-run",
            RunId::Task(_) => "task-run",
        };
        let id = self.next_event_id();
        if !self.record {
            let _ = lifecycle.enter(next, id);
            return;
        }
        let from = &lifecycle.state;
        let event = Event {
            id,
            occurred: self.at.now,
            event: state_event_name(kind, next.kind),
            resource,
            related,
            payload: EventPayload::StateChange {
                from_type: Some(from.kind),
                from_name: Some(from.name),
                state: next.clone(),
                epoch,
            },
        };
        let archived = lifecycle.enter(next, id);
        self.writes.push(Write::Event(event));
        if let Some((block, events)) = archived {
            self.writes.push(Write::HistoryBlock { run, block, events });
        }
    }

    /// A flow run's resource for its events (nothing in a shadow, which builds no events).
    fn flow_subject(&self, run: &FlowRun) -> (Resource, Vec<Resource>) {
        if self.record {
            flow_resource(run)
        } else {
            (Resource::default(), Vec::new())
        }
    }

    /// A task run's resource for its events (nothing in a shadow).
    fn task_subject(&self, run: &TaskRun) -> (Resource, Vec<Resource>) {
        if self.record {
            task_resource(run)
        } else {
            (Resource::default(), Vec::new())
        }
    }

    fn first_state_event(
        &mut self,
        (resource, related): (Resource, Vec<Resource>),
        kind: &str,
        state: &State,
        epoch: Epoch,
    ) -> EventId {
        let id = self.next_event_id();
        if !self.record {
            return id;
        }
        self.writes.push(Write::Event(Event {
            id,
            occurred: self.at.now,
            event: state_event_name(kind, state.kind),
            resource,
            related,
            payload: EventPayload::StateChange {
                from_type: None,
                from_name: None,
                state: state.clone(),
                epoch,
            },
        }));
        id
    }

    fn done(self, reply: Reply) -> Outcome {
        Outcome::replied(reply, self.writes)
    }

    fn create_flow_run(mut self, view: &mut impl StateView, new: NewFlowRun) -> Outcome {
        let key = new.idempotency_key.clone().unwrap_or_else(|| new.id.to_string());
        let existing = view
            .hot()
            .flow_run_by_key(&key)
            .or_else(|| view.hot().flow_run(&new.id).map(|r| r.id));
        if let Some(run) = existing.and_then(|id| view.hot().flow_run(&id)) {
            return Outcome::replied(
                Reply::FlowRunCreated {
                    run: Box::new(run.clone()),
                    created: false,
                },
                Vec::new(),
            );
        }
        if let Err(r) = check_name("a flow name", &new.flow_name)
            .and_then(|()| check_tags(&new.tags))
            .and_then(|()| {
                new.retry_policy
                    .validate()
                    .map_err(|e| Refusal::Invalid(e.to_string()))
            })
        {
            return Outcome::refused(r);
        }
        let due = new.scheduled_time.unwrap_or(self.now());
        let state = State::scheduled(due, self.now());
        let mut run = FlowRun {
            id: new.id,
            flow_name: new.flow_name,
            parameters: new.parameters,
            deployment_id: new.deployment_id,
            parent_task_run: new.parent_task_run,
            idempotency_key: new.idempotency_key,
            tags: new.tags,
            work_queue: new.work_queue,
            retry_policy: new.retry_policy,
            resume: new.resume,
            created: self.now(),
            expected_start_time: due,
            epoch: Epoch::FIRST,
            owner: None,
            lifecycle: Lifecycle::new(state.clone()),
        };
        let ev = self.first_state_event(self.flow_subject(&run), "flow-run", &state, run.epoch);
        let _ = run.lifecycle.record(ev);
        self.writes.insert(0, Write::FlowRun(run.id));
        view.hot_mut().put_flow_run(run.clone());
        self.done(Reply::FlowRunCreated {
            run: Box::new(run),
            created: true,
        })
    }

    fn propose_flow(mut self, view: &mut impl StateView, id: FlowRunId, proposal: Proposal) -> Outcome {
        let Some(run) = view.hot().flow_run(&id) else {
            return Outcome::refused(Refusal::FlowRunNotFound(id));
        };
        if let Err(r) = check_state(&proposal.state) {
            return Outcome::refused(r);
        }
        let ctx = RuleContext {
            kind: RunKind::Flow,
            now: self.now(),
            epoch: run.epoch,
            owner: run.owner.as_ref(),
            retry_policy: &run.retry_policy,
            flow_run_state: None,
            cached: None,
            jitter_seed: jitter_seed(&proposal),
        };
        let decision = rules::propose(&run.lifecycle, &proposal, &ctx);
        let Some(next) = decision.state().filter(|s| **s != run.lifecycle.state).cloned() else {
            return self.done(Reply::FlowRunTransition {
                decision,
                epoch: run.epoch,
                run_count: run.lifecycle.run_count,
            });
        };
        let past = if decision.is_accept() {
            PastDecision::Accepted
        } else {
            PastDecision::Rejected
        };
        self.writes.push(Write::FlowRun(id));
        let reply = view.hot_mut().update_flow_run(&id, |run| {
            let from = run.lifecycle.state.kind;
            if next.kind == StateType::Pending && from == StateType::Scheduled {
                run.owner = proposal.node.clone();
            } else if next.kind == StateType::Scheduled && from == StateType::Pending {
                // Given back: the next claim is a new assignment, under a new epoch.
                run.owner = None;
                run.epoch = run.epoch.next();
            }
            let resource = self.flow_subject(run);
            let epoch = run.epoch;
            self.enter(RunId::Flow(run.id), &mut run.lifecycle, resource, next, epoch);
            run.lifecycle.remember(proposal.transition_id, past);
            Reply::FlowRunTransition {
                decision,
                epoch: run.epoch,
                run_count: run.lifecycle.run_count,
            }
        });
        match reply {
            Some(r) => self.done(r),
            None => Outcome::refused(Refusal::FlowRunNotFound(id)),
        }
    }

    fn create_task_run(mut self, view: &mut impl StateView, new: NewTaskRun) -> Outcome {
        if let Some(run) = view
            .hot()
            .task_run_by_key(&new.key)
            .and_then(|id| view.hot().task_run(&id))
        {
            return Outcome::replied(
                Reply::TaskRunCreated {
                    run: Box::new(run.clone()),
                    created: false,
                },
                Vec::new(),
            );
        }
        let flow_id = new.key.flow_run;
        let Some(flow) = view.hot().flow_run(&flow_id) else {
            return Outcome::refused(Refusal::FlowRunNotFound(flow_id));
        };
        if new.epoch != flow.epoch {
            return Outcome::refused(Refusal::StaleEpoch {
                run: flow_id,
                proposed: new.epoch,
                current: flow.epoch,
            });
        }
        if flow.lifecycle.state.kind != StateType::Running {
            return Outcome::refused(Refusal::FlowRunNotRunning {
                run: flow_id,
                state: flow.lifecycle.state.kind,
            });
        }
        if let Err(r) = check_name("a task key", &new.key.task_key)
            .and_then(|()| check_tags(&new.tags))
            .and_then(|()| {
                new.retry_policy
                    .validate()
                    .map_err(|e| Refusal::Invalid(e.to_string()))
            })
        {
            return Outcome::refused(r);
        }
        if view.hot().task_run(&new.id).is_some() {
            return Outcome::refused(Refusal::Invalid(format!("task run id {} is taken", new.id)));
        }
        let at = new.called.map_or(self.now(), |c| c.min(self.now()));
        let state = State::of(StateType::Pending, at);
        let mut run = TaskRun {
            id: new.id,
            key: new.key,
            retry_policy: new.retry_policy,
            cache_key: new.cache_key,
            cache_expiration: new.cache_expiration,
            refresh_cache: new.refresh_cache,
            tags: new.tags,
            created: self.now(),
            flow_epoch: new.epoch,
            lifecycle: Lifecycle::new(state.clone()),
        };
        let ev = self.first_state_event(self.task_subject(&run), "task-run", &state, new.epoch);
        let _ = run.lifecycle.record(ev);
        self.writes.insert(0, Write::TaskRun(run.id));
        view.hot_mut().put_task_run(run.clone());
        self.done(Reply::TaskRunCreated {
            run: Box::new(run),
            created: true,
        })
    }

    fn propose_task(mut self, view: &mut impl StateView, id: TaskRunId, proposal: Proposal) -> Outcome {
        let Some(run) = view.hot().task_run(&id) else {
            return Outcome::refused(Refusal::TaskRunNotFound(id));
        };
        if let Err(r) = check_state(&proposal.state) {
            return Outcome::refused(r);
        }
        let Some(flow) = view.hot().flow_run(&run.key.flow_run) else {
            return Outcome::refused(Refusal::FlowRunNotFound(run.key.flow_run));
        };
        let now = self.now();
        let cached = match (&run.cache_key, proposal.state.kind) {
            (Some(k), StateType::Running) if !run.refresh_cache => view.hot().cached(k, now),
            _ => None,
        };
        let ctx = RuleContext {
            kind: RunKind::Task,
            now,
            epoch: flow.epoch,
            owner: flow.owner.as_ref(),
            retry_policy: &run.retry_policy,
            flow_run_state: Some(flow.lifecycle.state.kind),
            cached,
            jitter_seed: jitter_seed(&proposal),
        };
        let decision = rules::propose(&run.lifecycle, &proposal, &ctx);
        let epoch = flow.epoch;
        let Some(mut next) = decision.state().filter(|s| **s != run.lifecycle.state).cloned() else {
            return self.done(Reply::TaskRunTransition {
                decision,
                run_count: run.lifecycle.run_count,
            });
        };
        if next.name == crate::state::StateName::Completed
            && let Some(k) = &run.cache_key
        {
            next.details.cache_key = Some(k.clone());
            next.details.cache_expiration = run.cache_expiration.map(|d| now + d);
        }
        let past = if decision.is_accept() {
            PastDecision::Accepted
        } else {
            PastDecision::Rejected
        };
        self.writes.push(Write::TaskRun(id));
        let reply = view.hot_mut().update_task_run(&id, |run| {
            let resource = self.task_subject(run);
            self.enter(RunId::Task(run.id), &mut run.lifecycle, resource, next, epoch);
            run.lifecycle.remember(proposal.transition_id, past);
            let decision = match decision {
                Decision::Accept(_) => Decision::Accept(run.lifecycle.state.clone()),
                Decision::Reject(_) => Decision::Reject(run.lifecycle.state.clone()),
                other => other,
            };
            Reply::TaskRunTransition {
                decision,
                run_count: run.lifecycle.run_count,
            }
        });
        match reply {
            Some(r) => self.done(r),
            None => Outcome::refused(Refusal::TaskRunNotFound(id)),
        }
    }

    fn retry_flow(mut self, view: &mut impl StateView, id: FlowRunId, request: RetryRequest) -> Outcome {
        let Some(run) = view.hot().flow_run(&id) else {
            return Outcome::refused(Refusal::FlowRunNotFound(id));
        };
        let l = &run.lifecycle;
        if l.state.transition_id() == Some(request.transition_id) || l.past(request.transition_id).is_some() {
            return self.done(Reply::Retried {
                state: l.state.clone(),
                epoch: run.epoch,
            });
        }
        let next = match rules::retry(l, request.resume, request.force, self.now()) {
            Ok(s) => s,
            Err(r) => return Outcome::refused(r.into()),
        };
        let mut next = next.with_transition(request.transition_id);
        next.message = request.message;
        self.writes.push(Write::FlowRun(id));
        let reply = view.hot_mut().update_flow_run(&id, |run| {
            run.epoch = run.epoch.next();
            run.owner = None;
            let resource = self.flow_subject(run);
            let epoch = run.epoch;
            self.enter(RunId::Flow(run.id), &mut run.lifecycle, resource, next, epoch);
            run.lifecycle
                .remember(request.transition_id, PastDecision::Accepted);
            Reply::Retried {
                state: run.lifecycle.state.clone(),
                epoch,
            }
        });
        match reply {
            Some(r) => self.done(r),
            None => Outcome::refused(Refusal::FlowRunNotFound(id)),
        }
    }

    fn retry_task(
        mut self,
        view: &mut impl StateView,
        id: TaskRunId,
        request: RetryRequest,
        epoch: Epoch,
    ) -> Outcome {
        let Some(run) = view.hot().task_run(&id) else {
            return Outcome::refused(Refusal::TaskRunNotFound(id));
        };
        let flow_id = run.key.flow_run;
        let Some(flow) = view.hot().flow_run(&flow_id) else {
            return Outcome::refused(Refusal::FlowRunNotFound(flow_id));
        };
        let l = &run.lifecycle;
        if l.state.transition_id() == Some(request.transition_id) || l.past(request.transition_id).is_some() {
            return self.done(Reply::Retried {
                state: l.state.clone(),
                epoch: flow.epoch,
            });
        }
        if epoch != flow.epoch {
            return Outcome::refused(Refusal::StaleEpoch {
                run: flow_id,
                proposed: epoch,
                current: flow.epoch,
            });
        }
        if flow.lifecycle.state.kind != StateType::Running {
            return Outcome::refused(Refusal::FlowRunNotRunning {
                run: flow_id,
                state: flow.lifecycle.state.kind,
            });
        }
        let next = match rules::retry(l, request.resume, request.force, self.now()) {
            Ok(s) => s,
            Err(r) => return Outcome::refused(r.into()),
        };
        let mut next = next.with_transition(request.transition_id);
        next.message = request.message;
        self.writes.push(Write::TaskRun(id));
        let reply = view.hot_mut().update_task_run(&id, |run| {
            run.flow_epoch = epoch;
            let resource = self.task_subject(run);
            self.enter(RunId::Task(run.id), &mut run.lifecycle, resource, next, epoch);
            run.lifecycle
                .remember(request.transition_id, PastDecision::Accepted);
            Reply::Retried {
                state: run.lifecycle.state.clone(),
                epoch,
            }
        });
        match reply {
            Some(r) => self.done(r),
            None => Outcome::refused(Refusal::TaskRunNotFound(id)),
        }
    }

    fn node_crashed(mut self, view: &mut impl StateView, node: &NodeId, message: &str) -> Outcome {
        let mut crashed = Vec::new();
        let mut cancelled = Vec::new();
        let now = self.now();
        for id in view.hot().active_flow_runs_of(node) {
            let Some(run) = view.hot().flow_run(&id) else {
                continue;
            };
            let Some(next) = rules::owner_died(&run.lifecycle.state, now, message) else {
                continue;
            };
            if next.kind == StateType::Cancelled {
                cancelled.push(id);
            } else {
                crashed.push(id);
            }
            let epoch = run.epoch;
            let tasks: Vec<TaskRunId> = view
                .hot()
                .task_runs_of(id, None, usize::MAX)
                .into_iter()
                .filter(|t| !t.lifecycle.state.is_terminal())
                .map(|t| t.id)
                .collect();
            for task in tasks {
                self.writes.push(Write::TaskRun(task));
                view.hot_mut().update_task_run(&task, |t| {
                    if let Some(tnext) = rules::owner_died(&t.lifecycle.state, now, message) {
                        let resource = self.task_subject(t);
                        self.enter(RunId::Task(t.id), &mut t.lifecycle, resource, tnext, epoch);
                    }
                });
            }
            self.writes.push(Write::FlowRun(id));
            view.hot_mut().update_flow_run(&id, |run| {
                let resource = self.flow_subject(run);
                self.enter(RunId::Flow(run.id), &mut run.lifecycle, resource, next, epoch);
            });
        }
        self.done(Reply::NodeCrashed { crashed, cancelled })
    }

    fn append_logs(
        self,
        view: &mut impl StateView,
        flow_run: FlowRunId,
        batch: LogBatchId,
        lines: Vec<LogLine>,
    ) -> Outcome {
        let count = lines.len();
        if view.hot().flow_run(&flow_run).is_none() {
            return Outcome::refused(Refusal::FlowRunNotFound(flow_run));
        }
        if view.log_batch_exists(&flow_run, &batch) {
            return self.done(Reply::LogsAppended { count });
        }
        if count > crate::command::LOG_LINES_PER_COMMAND_MAX {
            return Outcome::refused(Refusal::Invalid(format!(
                "at most {} log lines per batch, not {count}",
                crate::command::LOG_LINES_PER_COMMAND_MAX
            )));
        }
        if let Some(l) = lines.iter().find(|l| l.flow_run != flow_run) {
            return Outcome::refused(Refusal::Invalid(format!(
                "a log line of flow run {} in a batch of flow run {flow_run}",
                l.flow_run
            )));
        }
        let lines = lines.into_iter().map(LogLine::bounded).collect();
        Outcome::replied(
            Reply::LogsAppended { count },
            vec![Write::Logs {
                flow_run,
                batch,
                lines,
            }],
        )
    }

    fn put_deployment(mut self, view: &mut impl StateView, d: Deployment) -> Outcome {
        if let Err(r) = check_name("a deployment name", &d.name)
            .and_then(|()| check_name("a flow name", &d.flow_name))
            .and_then(|()| check_tags(&d.tags))
        {
            return Outcome::refused(r);
        }
        if let Some(other) = view.hot().deployment_by_name(&d.name)
            && other.id != d.id
        {
            return Outcome::refused(Refusal::DeploymentNameTaken {
                name: d.name,
                id: other.id,
            });
        }
        let old = view.hot().deployment(&d.id);
        if old == Some(&d) {
            return self.done(Reply::DeploymentPut { created: false });
        }
        let created = old.is_none();
        let id = self.next_event_id();
        self.writes.push(Write::Deployment(d.id));
        self.writes.push(Write::Event(Event {
            id,
            occurred: self.now(),
            event: format!(
                "flotilla.deployment.{}",
                if created { "created" } else { "updated" }
            ),
            resource: Resource::new(format!("flotilla.deployment.{}", d.id), Some(&d.name)),
            related: Vec::new(),
            payload: EventPayload::Data(serde_json::json!({ "paused": d.paused, "flow": d.flow_name })),
        }));
        view.hot_mut().put_deployment(d);
        self.done(Reply::DeploymentPut { created })
    }

    fn delete_deployment(mut self, view: &mut impl StateView, id: DeploymentId) -> Outcome {
        let Some(d) = view.hot().deployment(&id) else {
            return self.done(Reply::DeploymentDeleted { existed: false });
        };
        let resource = Resource::new(format!("flotilla.deployment.{id}"), Some(&d.name));
        let eid = self.next_event_id();
        self.writes.push(Write::DeploymentDeleted(id));
        self.writes.push(Write::Event(Event {
            id: eid,
            occurred: self.now(),
            event: "flotilla.deployment.deleted".to_owned(),
            resource,
            related: Vec::new(),
            payload: EventPayload::Data(serde_json::Value::Null),
        }));
        view.hot_mut().delete_deployment(&id);
        self.done(Reply::DeploymentDeleted { existed: true })
    }

    fn append_event(self, view: &mut impl StateView, e: Event) -> Outcome {
        let id = e.id;
        if view.event_exists(&id) {
            return self.done(Reply::EventAppended { id });
        }
        if e.event.is_empty() || e.event.len() > crate::event::EVENT_NAME_LEN_MAX {
            return Outcome::refused(Refusal::Invalid(format!(
                "an event name must be 1 to {} bytes long",
                crate::event::EVENT_NAME_LEN_MAX
            )));
        }
        if e.resource.id().is_none() {
            return Outcome::refused(Refusal::Invalid(format!(
                "an event's resource needs a {:?} label",
                crate::event::RESOURCE_ID
            )));
        }
        if e.related.len() > crate::event::RELATED_MAX
            || std::iter::once(&e.resource)
                .chain(&e.related)
                .any(|r| r.0.len() > crate::event::RESOURCE_LABELS_MAX)
        {
            return Outcome::refused(Refusal::Invalid(format!(
                "at most {} related resources of at most {} labels each",
                crate::event::RELATED_MAX,
                crate::event::RESOURCE_LABELS_MAX
            )));
        }
        Outcome::replied(Reply::EventAppended { id }, vec![Write::Event(e)])
    }
}
