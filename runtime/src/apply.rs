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
use crate::work_queue::Setting;

mod automations;
mod records;
mod runs;
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
    /// A setting was put (by key).
    Setting(String),
    /// A setting was deleted (by key).
    SettingDeleted(String),
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
    /// A flow run was pruned: forget its records, its task runs', their histories and logs.
    Pruned(PrunedRun),
    /// The record of slot holders changed.
    SlotHolds,
    /// A request's answer was remembered, in this slot of the ring of remembered answers (a
    /// slot is reused when the oldest answer is forgotten).
    Remembered {
        /// The slot.
        slot: u32,
        /// The answer.
        answer: crate::hot_state::RememberedAnswer,
    },
    /// Forget events (but state changes) and log batches older than these.
    PrunedBefore {
        /// Events before this.
        events: Timestamp,
        /// Log batches before this.
        logs: Timestamp,
    },
}

/// A pruned flow run, with what the stores must forget besides its record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrunedRun {
    /// The flow run.
    pub flow_run: FlowRunId,
    /// Its task runs.
    pub task_runs: Vec<TaskRunId>,
    /// Per run (the flow run and each task run), how many history blocks it archived.
    pub archived: Vec<(RunId, u32)>,
    /// The state-change events of the recent history windows (those in archived blocks are
    /// read from the blocks).
    pub events: Vec<EventId>,
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
    /// A setting was stored.
    SettingPut {
        /// False when it replaced one.
        created: bool,
    },
    /// A work queue as it is after an edit.
    WorkQueueEdited {
        /// The queue.
        queue: crate::work_queue::WorkQueue,
    },
    /// A setting was deleted.
    SettingDeleted {
        /// Whether it existed.
        existed: bool,
    },
    /// An event was stored (or had been).
    EventAppended {
        /// Its id.
        id: EventId,
    },
    /// A record was kept (slot holders, a request's answer).
    Recorded,
    /// Settings were stored, all of them.
    SettingsPut {
        /// How many were new.
        created: u32,
        /// How many replaced one (and differed from it).
        updated: u32,
    },
    /// An automation was changed.
    AutomationEdited {
        /// False when the change was there already (a firing recorded before, an automation
        /// already paused).
        changed: bool,
    },
    /// Old records were forgotten.
    Pruned {
        /// Flow runs forgotten.
        flow_runs: u32,
        /// Task runs forgotten with them.
        task_runs: u32,
        /// Whether more flow runs are due to go (send the command again).
        more: bool,
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
    /// No such work queue.
    #[error("no work queue named {0:?}")]
    WorkQueueNotFound(String),
    /// A work queue by that name exists already.
    #[error("a work queue named {0:?} exists already")]
    WorkQueueExists(String),
    /// No such automation.
    #[error("no automation named {0:?}")]
    AutomationNotFound(String),
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
        Command::PutSetting { setting, .. } => tx.put_setting(view, setting),
        Command::DeleteSetting { key, .. } => tx.delete_setting(view, key),
        Command::EditWorkQueue { name, id, edit, .. } => tx.edit_work_queue(view, &name, id, edit),
        Command::PutSettings { settings, .. } => tx.put_settings(view, settings),
        Command::EditAutomation { name, edit, .. } => tx.edit_automation(view, &name, edit),
        Command::Prune(p) => tx.prune(view, p),
        Command::Remember(o) => {
            let writes = view
                .hot_mut()
                .remember(&o, at.now)
                .map(|a| Write::Remembered {
                    slot: u32::try_from(a.seq % u64::from(o.max.max(1))).unwrap_or(0),
                    answer: a.clone(),
                })
                .into_iter()
                .collect();
            Outcome::replied(Reply::Recorded, writes)
        }
        Command::Slots(change) => {
            let hot = view.hot_mut();
            match change {
                crate::command::SlotChange::Hold { holder, node, tags } => {
                    hot.hold_slots(holder, &node, &tags)
                }
                crate::command::SlotChange::Free { holders, tag } => hot.free_slots(&holders, tag.as_deref()),
                crate::command::SlotChange::Complete { holds } => {
                    hot.clear_slot_holds();
                    for (tag, holder, node) in holds {
                        hot.hold_slots(holder, &node, &[tag]);
                    }
                    hot.slot_holds_completed();
                }
            }
            Outcome::replied(Reply::Recorded, vec![Write::SlotHolds])
        }
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

/// A related resource of `role`: its id (`flotilla.ROLE.NAME`) and name.
fn related(role: &str, name: &str) -> Resource {
    let mut id = String::with_capacity(9 + role.len() + 1 + name.len());
    id.push_str("flotilla.");
    id.push_str(role);
    id.push('.');
    id.push_str(name);
    Resource::new(id, Some(name)).with(crate::event::RESOURCE_ROLE, role)
}

/// A flow run's resource, with its deployment and each tag as related resources. (Its flow,
/// work queue and node, which Prefect also relates, are left out for now: three more resources
/// on every state change cost a fifth of the throughput of empty flow runs.)
fn flow_resource(run: &FlowRun) -> (Resource, Vec<Resource>) {
    let resource = Resource::new(
        resource_id("flotilla.flow-run.", run.id.as_uuid()),
        Some(&run.flow_name),
    );
    let mut rel = Vec::with_capacity(usize::from(run.deployment_id.is_some()) + run.tags.len());
    if let Some(d) = run.deployment_id {
        let mut deployment = Resource::new(resource_id("flotilla.deployment.", d.as_uuid()), None)
            .with(crate::event::RESOURCE_ROLE, "deployment");
        if let Some(name) = &run.deployment_name {
            deployment = deployment.with(crate::event::RESOURCE_NAME, name.clone());
        }
        rel.push(deployment);
    }
    rel.extend(run.tags.iter().map(|t| related("tag", t)));
    (resource, rel)
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
    let mut rel = Vec::with_capacity(1 + run.tags.len());
    rel.push(flow_related(&run.key.flow_run));
    rel.extend(run.tags.iter().map(|t| related("tag", t)));
    (resource, rel)
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
}
