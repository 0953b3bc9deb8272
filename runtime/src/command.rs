//! Commands: every change to control state, as a serializable value with an idempotency key.
//!
//! Commands go through the command log in order and are applied by [`crate::apply::apply`];
//! this is the only path by which control state changes, so that a consensus log can replicate
//! it unchanged.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::deployment::Deployment;
use crate::event::Event;
use crate::ids::{DeploymentId, Epoch, FlowRunId, LogBatchId, NodeId, TaskRunId, TransitionId};
use crate::log_line::LogLine;
use crate::retry::RetryPolicy;
use crate::rules::Proposal;
use crate::task_run::TaskRunKey;
use crate::time::Timestamp;

/// The most log lines in one command.
pub const LOG_LINES_PER_COMMAND_MAX: usize = 10_000;

/// A new flow run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewFlowRun {
    /// Its id (chosen by the creator).
    pub id: FlowRunId,
    /// The flow's registered name.
    pub flow_name: String,
    /// Parameters, as JSON.
    #[serde(default)]
    pub parameters: serde_json::Value,
    /// The deployment creating it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<DeploymentId>,
    /// That deployment's name (for the run's events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_name: Option<String>,
    /// For a subflow: the calling task run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_task_run: Option<TaskRunId>,
    /// Creating again with this key returns the existing run
    /// (e.g. `scheduled/{deployment}/{schedule}/{time}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The work queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_queue: Option<String>,
    /// Flow-level retries.
    #[serde(default)]
    pub retry_policy: RetryPolicy,
    /// Whether a crash of its owner resumes it automatically.
    #[serde(default = "yes")]
    pub resume: bool,
    /// When it is due (now when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<Timestamp>,
    /// Where its large results go (`s3/NAME`): its deployment's choice, over its flow's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_storage: Option<String>,
}

fn yes() -> bool {
    true
}

impl NewFlowRun {
    /// A new run of `flow_name`, due now, with the default options: the one constructor of a
    /// new flow run, used by the SDK, `flow-run create`, deployments and the scheduler alike.
    pub fn new(id: FlowRunId, flow_name: impl Into<String>, parameters: serde_json::Value) -> Self {
        NewFlowRun {
            id,
            flow_name: flow_name.into(),
            parameters,
            deployment_id: None,
            deployment_name: None,
            parent_task_run: None,
            idempotency_key: None,
            tags: Vec::new(),
            work_queue: None,
            retry_policy: RetryPolicy::default(),
            resume: true,
            scheduled_time: None,
            result_storage: None,
        }
    }

    /// A run of a deployment: its flow, its parameters under `overrides` (a JSON object's keys
    /// replace the deployment's), its tags and its work queue.
    pub fn of_deployment(id: FlowRunId, d: &Deployment, overrides: &serde_json::Value) -> Self {
        NewFlowRun {
            deployment_id: Some(d.id),
            deployment_name: Some(d.name.clone()),
            tags: d.tags.clone(),
            work_queue: d.work_queue.clone(),
            result_storage: d.result_storage.clone(),
            ..NewFlowRun::new(id, d.flow_name.clone(), merge_params(&d.parameters, overrides))
        }
    }

    /// With the flow's own options: its retry policy and whether a crash resumes it.
    pub fn with_options(self, retry_policy: RetryPolicy, resume: bool) -> Self {
        NewFlowRun {
            retry_policy,
            resume,
            ..self
        }
    }

    /// With a key: creating again with it returns the existing run.
    pub fn with_key(self, key: Option<String>) -> Self {
        NewFlowRun {
            idempotency_key: key,
            ..self
        }
    }

    /// Due at `t`.
    pub fn due_at(self, t: Timestamp) -> Self {
        NewFlowRun {
            scheduled_time: Some(t),
            ..self
        }
    }
}

/// About how many bytes a JSON value takes encoded (never less than MessagePack's size).
pub fn json_size(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(_) => 1,
        serde_json::Value::Number(_) => 9,
        serde_json::Value::String(s) => s.len() + 5,
        serde_json::Value::Array(a) => 5 + a.iter().map(json_size).sum::<usize>(),
        serde_json::Value::Object(o) => 5 + o.iter().map(|(k, v)| k.len() + 5 + json_size(v)).sum::<usize>(),
    }
}

/// Parameters over a base: the keys of `over` (a JSON object) replace those of `base`; the
/// result is always an object.
pub fn merge_params(base: &serde_json::Value, over: &serde_json::Value) -> serde_json::Value {
    let mut m = base.as_object().cloned().unwrap_or_default();
    if let Some(o) = over.as_object() {
        for (k, v) in o {
            m.insert(k.clone(), v.clone());
        }
    }
    serde_json::Value::Object(m)
}

/// A new task run (one call of a task in a flow run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewTaskRun {
    /// Its id (chosen by the caller).
    pub id: TaskRunId,
    /// Flow run, task key and call index: creating the same key again returns the existing run.
    pub key: TaskRunKey,
    /// The flow run's epoch the caller holds.
    pub epoch: Epoch,
    /// Retries.
    #[serde(default)]
    pub retry_policy: RetryPolicy,
    /// The cache key of this call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    /// How long a cached result stays valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_expiration: Option<Duration>,
    /// Run even when a cached result exists (and store the new one).
    #[serde(default)]
    pub refresh_cache: bool,
    /// When the caller made the call (the Pending state's time; never after the control
    /// plane's now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub called: Option<Timestamp>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A request to leave a terminal state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryRequest {
    /// The requester's id for this retry (its idempotency key).
    pub transition_id: TransitionId,
    /// An automatic resume after a crash (the state is named Resuming).
    #[serde(default)]
    pub resume: bool,
    /// Also retry a Completed run (its old result stays in the history).
    #[serde(default)]
    pub force: bool,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Every change to control state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Create a flow run (Scheduled).
    CreateFlowRun(NewFlowRun),
    /// Propose a flow run's next state.
    ProposeFlowRunState {
        /// The run.
        run: FlowRunId,
        /// The proposal.
        proposal: Proposal,
    },
    /// Create a task run (Pending).
    CreateTaskRun(NewTaskRun),
    /// Propose a task run's next state.
    ProposeTaskRunState {
        /// The run.
        run: TaskRunId,
        /// The proposal.
        proposal: Proposal,
    },
    /// Several transitions of one task run at once (and its creation, when `create` is given):
    /// a worker's write-behind of a task run's progress within one flush window, recorded as
    /// one command that keeps the whole history.
    RecordTaskRun {
        /// Create the task run first (idempotent by its key).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        create: Option<NewTaskRun>,
        /// The task run.
        run: TaskRunId,
        /// The transitions, in order.
        proposals: Vec<Proposal>,
    },
    /// Take a finished flow run back to Scheduled under a new epoch.
    RetryFlowRun {
        /// The run.
        run: FlowRunId,
        /// How.
        request: RetryRequest,
    },
    /// Take a finished task run back to Scheduled (when its flow run is re-run).
    RetryTaskRun {
        /// The run.
        run: TaskRunId,
        /// How.
        request: RetryRequest,
        /// The flow run's epoch the caller holds.
        epoch: Epoch,
    },
    /// A node died: its non-terminal flow runs (and their task runs) crash, those being
    /// cancelled end Cancelled, terminal ones are untouched.
    MarkNodeCrashed {
        /// The node.
        node: NodeId,
        /// Why (shown in the Crashed states).
        message: String,
        /// The idempotency key (e.g. `crash/{node}/{incarnation}`).
        key: String,
    },
    /// Append log lines of one run.
    AppendLogs {
        /// The sender's id for the batch.
        batch: LogBatchId,
        /// The flow run they belong to.
        flow_run: FlowRunId,
        /// The lines.
        lines: Vec<LogLine>,
    },
    /// Create or replace a deployment.
    PutDeployment(Deployment),
    /// Delete a deployment.
    DeleteDeployment {
        /// The deployment.
        id: DeploymentId,
    },
    /// Append a user event (its id is the idempotency key).
    AppendEvent(Event),
    /// Create or replace a work queue or a tag limit.
    PutSetting {
        /// The setting.
        setting: crate::work_queue::Setting,
        /// When the requester made the change (with the key, what makes it idempotent).
        at: Timestamp,
    },
    /// Change one field of a work queue (or create it), applied to the queue as it is then.
    EditWorkQueue {
        /// The queue's name.
        name: String,
        /// Its id if this creates it.
        id: crate::ids::WorkQueueId,
        /// The change.
        edit: crate::work_queue::QueueEdit,
        /// When the requester asked (with the name and field, what makes it idempotent).
        at: Timestamp,
    },
    /// Delete a work queue or a tag limit.
    DeleteSetting {
        /// Its key (`work-queue/NAME`, `concurrency-limit/TAG`).
        key: String,
        /// When the requester asked.
        at: Timestamp,
    },
    /// Create or replace several settings at once, all or none (a file of automations).
    PutSettings {
        /// The settings.
        settings: Vec<crate::work_queue::Setting>,
        /// When the requester made the change.
        at: Timestamp,
    },
    /// Change an automation as it is then: pause, resume, record a firing or its actions'
    /// outcomes.
    EditAutomation {
        /// The automation.
        name: String,
        /// The change.
        edit: crate::automation::AutomationEdit,
        /// When.
        at: Timestamp,
    },
    /// Forget what is older than the retention windows (see [`Prune`]).
    Prune(Prune),
    /// Record who holds the slots of tag limits (see [`SlotChange`]).
    Slots(SlotChange),
    /// Remember the answer given to a client's request, so that the request sent again gets it
    /// instead of acting twice (see [`RememberedOutcome`]).
    Remember(RememberedOutcome),
}

/// A client request's answer, remembered by its request id. The bounds travel with it (the
/// sender's configuration), so that replaying the log forgets exactly what was forgotten.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RememberedOutcome {
    /// The client's id of the request.
    pub request_id: crate::control::RequestId,
    /// The answer, encoded as it was sent.
    #[serde(with = "serde_bytes")]
    pub answer: Vec<u8>,
    /// Remember at most this many answers (the oldest are forgotten first)...
    pub max: u32,
    /// ...each at most this long.
    pub keep: std::time::Duration,
}

/// A change to the record of who holds the slots of tag limits. The control node decides who
/// gets a slot; it records the holding before it tells the holder, so that after a restart it
/// knows every holder that may be running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotChange {
    /// `holder`, on `node`, holds a slot of each of `tags`.
    Hold {
        /// The task run.
        holder: TaskRunId,
        /// Its node.
        node: NodeId,
        /// The limited tags it holds a slot of.
        tags: Vec<String>,
    },
    /// These holders hold no slot any more (of `tag` only, when given).
    Free {
        /// The task runs.
        holders: Vec<TaskRunId>,
        /// Only this tag's slots.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
    },
    /// The record is these holdings, and from now on names every holder that may run. A control
    /// node that starts with no complete record (a data directory from before it, or a restart
    /// soon after) makes new holders wait one lease TTL, in which every holder of before renews
    /// (and is taken again) or stops; then it records what it holds, replacing what the record
    /// said before (holdings of before that lapsed unseen).
    Complete {
        /// Every holding: (tag, holder, node).
        holds: Vec<(String, TaskRunId, NodeId)>,
    },
}

/// What a [`Command::Prune`] forgets. The cut-offs are absolute times chosen by the sender, so
/// applying the command again (a replay) forgets nothing more.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prune {
    /// Terminal flow runs that ended before this go, with their task runs, state histories
    /// and logs.
    pub runs_before: Timestamp,
    /// Events before this go, except the state changes that make up the histories of runs
    /// still kept (they go with their runs).
    pub events_before: Timestamp,
    /// Log batches written before this go.
    pub logs_before: Timestamp,
    /// At most this many flow runs per command (the reply says whether more remain).
    pub runs_max: u32,
}

/// What makes a command idempotent: a resent command with the same key applies once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IdempotencyKey {
    /// The creator's key, or the run id when there is none.
    CreateFlowRun(String),
    /// The task call.
    CreateTaskRun(TaskRunKey),
    /// A proposer's or requester's transition id.
    Transition(TransitionId),
    /// A node crash.
    NodeCrash(String),
    /// A log batch.
    LogBatch(LogBatchId),
    /// A deployment's content (putting the same deployment twice changes nothing).
    Deployment(DeploymentId, Timestamp),
    /// A deployment deletion.
    DeleteDeployment(DeploymentId),
    /// An event id.
    Event(crate::ids::EventId),
    /// A setting's key and the time of the change.
    Setting(String, Timestamp),
    /// A setting deletion.
    DeleteSetting(String, Timestamp),
    /// A pruning up to these run, event and log cut-offs.
    Prune(Timestamp, Timestamp, Timestamp),
    /// A change of slot holders (applying it twice changes nothing more).
    Slots(String),
    /// A remembered answer, by request id.
    Remember(crate::control::RequestId),
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdempotencyKey::CreateFlowRun(k) => write!(f, "create-flow-run/{k}"),
            IdempotencyKey::CreateTaskRun(k) => write!(f, "create-task-run/{k}"),
            IdempotencyKey::Transition(t) => write!(f, "transition/{t}"),
            IdempotencyKey::NodeCrash(k) => write!(f, "node-crash/{k}"),
            IdempotencyKey::LogBatch(b) => write!(f, "logs/{b}"),
            IdempotencyKey::Deployment(d, at) => write!(f, "deployment/{d}/{at}"),
            IdempotencyKey::DeleteDeployment(d) => write!(f, "delete-deployment/{d}"),
            IdempotencyKey::Setting(k, at) => write!(f, "setting/{k}/{at}"),
            IdempotencyKey::DeleteSetting(k, at) => write!(f, "delete-setting/{k}/{at}"),
            IdempotencyKey::Event(e) => write!(f, "event/{e}"),
            IdempotencyKey::Prune(r, e, l) => write!(f, "prune/{r}/{e}/{l}"),
            IdempotencyKey::Slots(k) => write!(f, "slots/{k}"),
            IdempotencyKey::Remember(id) => write!(f, "remember/{id}"),
        }
    }
}

impl Command {
    /// The command's idempotency key.
    pub fn idempotency_key(&self) -> IdempotencyKey {
        match self {
            Command::CreateFlowRun(n) => {
                IdempotencyKey::CreateFlowRun(n.idempotency_key.clone().unwrap_or_else(|| n.id.to_string()))
            }
            Command::CreateTaskRun(n) => IdempotencyKey::CreateTaskRun(n.key.clone()),
            Command::ProposeFlowRunState { proposal, .. } | Command::ProposeTaskRunState { proposal, .. } => {
                IdempotencyKey::Transition(proposal.transition_id)
            }
            Command::RetryFlowRun { request, .. } | Command::RetryTaskRun { request, .. } => {
                IdempotencyKey::Transition(request.transition_id)
            }
            Command::MarkNodeCrashed { key, .. } => IdempotencyKey::NodeCrash(key.clone()),
            Command::RecordTaskRun { run, proposals, .. } => match proposals.last() {
                Some(p) => IdempotencyKey::Transition(p.transition_id),
                None => IdempotencyKey::CreateTaskRun(TaskRunKey {
                    flow_run: FlowRunId::from_uuid(*run.as_uuid()),
                    task_key: String::new(),
                    call_index: 0,
                }),
            },
            Command::AppendLogs { batch, .. } => IdempotencyKey::LogBatch(*batch),
            Command::PutDeployment(d) => IdempotencyKey::Deployment(d.id, d.updated),
            Command::DeleteDeployment { id } => IdempotencyKey::DeleteDeployment(*id),
            Command::AppendEvent(e) => IdempotencyKey::Event(e.id),
            Command::PutSetting { setting, at } => IdempotencyKey::Setting(setting.key(), *at),
            Command::DeleteSetting { key, at } => IdempotencyKey::DeleteSetting(key.clone(), *at),
            Command::EditWorkQueue { name, edit, at, .. } => IdempotencyKey::Setting(
                format!("{}/{}", crate::work_queue::queue_key(name), edit.field()),
                *at,
            ),
            Command::PutSettings { settings, at } => IdempotencyKey::Setting(
                format!(
                    "{}+{}",
                    settings
                        .first()
                        .map(crate::work_queue::Setting::key)
                        .unwrap_or_default(),
                    settings.len()
                ),
                *at,
            ),
            Command::EditAutomation { name, edit, at } => IdempotencyKey::Setting(
                format!(
                    "{}/{}",
                    crate::work_queue::automation_key(name),
                    match edit {
                        crate::automation::AutomationEdit::Pause => "pause".to_owned(),
                        crate::automation::AutomationEdit::Resume => "resume".to_owned(),
                        crate::automation::AutomationEdit::Fired(f) => format!("fired/{}", f.key),
                        crate::automation::AutomationEdit::Ran { key, .. } => format!("ran/{key}"),
                    }
                ),
                *at,
            ),
            Command::Prune(p) => IdempotencyKey::Prune(p.runs_before, p.events_before, p.logs_before),
            Command::Slots(SlotChange::Hold { holder, .. }) => {
                IdempotencyKey::Slots(format!("hold/{holder}"))
            }
            Command::Remember(r) => IdempotencyKey::Remember(r.request_id),
            Command::Slots(SlotChange::Complete { holds }) => {
                IdempotencyKey::Slots(format!("complete/{}", holds.len()))
            }
            Command::Slots(SlotChange::Free { holders, tag }) => IdempotencyKey::Slots(format!(
                "free/{}/{}",
                tag.as_deref().unwrap_or("*"),
                holders.first().map(ToString::to_string).unwrap_or_default()
            )),
        }
    }

    /// About how many bytes the command takes encoded (never less): what batches between nodes
    /// are capped by, without encoding each command twice.
    pub fn size_hint(&self) -> usize {
        const BASE: usize = 160;
        let state = |p: &Proposal| {
            BASE + p.state.message.as_ref().map_or(0, String::len)
                + match &p.state.result {
                    Some(crate::state::ResultRef::Inline(b)) => b.len(),
                    Some(crate::state::ResultRef::Stored { key, .. }) => key.len() + 16,
                    None => 0,
                }
        };
        match self {
            Command::CreateFlowRun(n) => {
                BASE + n.flow_name.len()
                    + json_size(&n.parameters)
                    + n.tags.iter().map(|t| t.len() + 2).sum::<usize>()
                    + n.idempotency_key.as_ref().map_or(0, String::len)
            }
            Command::CreateTaskRun(n) => {
                BASE + n.key.task_key.len() + n.cache_key.as_ref().map_or(0, String::len)
            }
            Command::ProposeFlowRunState { proposal, .. } | Command::ProposeTaskRunState { proposal, .. } => {
                state(proposal)
            }
            Command::RecordTaskRun {
                create, proposals, ..
            } => {
                create.as_ref().map_or(0, |n| BASE + n.key.task_key.len())
                    + proposals.iter().map(state).sum::<usize>()
            }
            Command::AppendLogs { lines, .. } => {
                BASE + lines
                    .iter()
                    .map(|l| 64 + l.message.len() + l.target.len())
                    .sum::<usize>()
            }
            Command::PutDeployment(d) => BASE * 4 + json_size(&d.parameters),
            Command::Remember(r) => BASE + r.answer.len(),
            Command::PutSettings { settings, .. } => settings
                .iter()
                .map(|s| BASE + json_size(&serde_json::to_value(s).unwrap_or_default()))
                .sum(),
            Command::EditAutomation { edit, .. } => {
                BASE * 2 + json_size(&serde_json::to_value(edit).unwrap_or_default())
            }
            Command::AppendEvent(e) => {
                BASE * 2 + json_size(&serde_json::to_value(&e.payload).unwrap_or_default())
            }
            _ => BASE * 2,
        }
    }

    /// A short name of the command's kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreateFlowRun(_) => "create-flow-run",
            Command::ProposeFlowRunState { .. } => "propose-flow-run-state",
            Command::CreateTaskRun(_) => "create-task-run",
            Command::ProposeTaskRunState { .. } => "propose-task-run-state",
            Command::RecordTaskRun { .. } => "record-task-run",
            Command::RetryFlowRun { .. } => "retry-flow-run",
            Command::RetryTaskRun { .. } => "retry-task-run",
            Command::MarkNodeCrashed { .. } => "mark-node-crashed",
            Command::AppendLogs { .. } => "append-logs",
            Command::PutDeployment(_) => "put-deployment",
            Command::DeleteDeployment { .. } => "delete-deployment",
            Command::AppendEvent(_) => "append-event",
            Command::PutSetting { .. } => "put-setting",
            Command::DeleteSetting { .. } => "delete-setting",
            Command::EditWorkQueue { .. } => "edit-work-queue",
            Command::PutSettings { .. } => "put-settings",
            Command::EditAutomation { .. } => "edit-automation",
            Command::Prune(_) => "prune",
            Command::Slots(_) => "slots",
            Command::Remember(_) => "remember",
        }
    }
}
