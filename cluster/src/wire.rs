//! The client protocol: what a client asks a node and what it answers. One request per QUIC
//! bidirectional stream, each a frame of [`crate::frame`], answered by one frame.

use serde::{Deserialize, Serialize};

use flotilla_runtime::{
    Deployment, DeploymentId, DeploymentSpec, FlowRun, FlowRunId, LogCursor, LogLine, NodeId, State,
    StateType, TaskRun,
};

/// The longest a [`Request::Wait`] waits.
pub const WAIT_MS_MAX: u32 = 5_000;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// A request with the protocol version of its sender.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The sender's protocol version.
    pub version: u16,
    /// The request.
    pub request: Request,
    /// The client's id for this request, chosen once and sent again with every retry of it: a
    /// node answers a request it already answered with the first answer (and a retry that
    /// arrives while the first is under way waits for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<flotilla_runtime::control::RequestId>,
    /// A read that may be answered from the replica of the node asked (it may lag the leader),
    /// rather than by the leader after it confirmed it still leads.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
}

/// What a client can ask.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Every member of the cluster and its health.
    Status,
    /// Create a run of a flow and place it on a node.
    RunFlow {
        /// The flow's name.
        flow: String,
        /// Its parameters, as a JSON object.
        params: serde_json::Value,
        /// The run's id, chosen once by the client and sent again on a retry: a resent request
        /// returns the run the first one made.
        #[serde(default)]
        id: Option<FlowRunId>,
        /// The user's key: a run created with a key already used is the existing run.
        #[serde(default)]
        idempotency_key: Option<String>,
    },
    /// One flow run.
    FlowRun(FlowRunId),
    /// A page of flow runs.
    FlowRuns {
        /// Only those in this state type.
        state: Option<StateType>,
        /// After this id.
        after: Option<FlowRunId>,
        /// At most this many (≤ 1,000).
        limit: u32,
        /// Only those of this deployment (then `state` is ignored).
        #[serde(default)]
        deployment: Option<DeploymentId>,
    },
    /// The task runs of a flow run.
    TaskRuns(FlowRunId),
    /// The states of a flow run, oldest first.
    History(FlowRunId),
    /// A page of a flow run's log lines.
    Logs {
        /// The run.
        run: FlowRunId,
        /// Where the previous page ended.
        after: Option<LogCursor>,
        /// At most this many lines.
        limit: u32,
    },
    /// The result of a completed flow run (rmp-serde bytes).
    Result(FlowRunId),
    /// Cancel a flow run.
    Cancel(FlowRunId),
    /// Run a finished flow run again.
    Retry {
        /// The run.
        run: FlowRunId,
        /// Also a Completed one.
        force: bool,
    },
    /// The flow run once it is in a terminal state, or as it is after `timeout_ms` (at most
    /// [`WAIT_MS_MAX`]) — a long poll.
    Wait {
        /// The run.
        run: FlowRunId,
        /// How long to wait at most, in milliseconds.
        timeout_ms: u32,
    },
    /// Forget a member (it must be unreachable).
    RemoveNode(NodeId),
    /// Change the voters of the replicated control state; answered with the status after.
    Voters(VoterChange),
    /// Create or replace a deployment (by name).
    PutDeployment(Box<DeploymentSpec>),
    /// One deployment, by name.
    Deployment(String),
    /// Every deployment, in name order.
    Deployments,
    /// Delete a deployment (its runs that have not started are cancelled).
    DeleteDeployment(String),
    /// An ad-hoc run of a deployment, its parameters over the deployment's.
    RunDeployment {
        /// The deployment's name.
        name: String,
        /// Parameters over the deployment's (a JSON object, or null).
        params: serde_json::Value,
        /// The run's id, chosen once by the client and sent again on a retry.
        #[serde(default)]
        id: Option<FlowRunId>,
        /// The user's key: a run created with a key already used is the existing run.
        #[serde(default)]
        idempotency_key: Option<String>,
    },
    /// Figures about the scheduler.
    SchedulerStats,
    /// Create or change a work queue.
    WorkQueue {
        /// Its name.
        name: String,
        /// What to do.
        change: QueueChange,
    },
    /// Every work queue with its figures.
    WorkQueues,
    /// Create, reset or delete a tag limit.
    ConcurrencyLimit {
        /// The tag.
        tag: String,
        /// What to do.
        change: LimitChange,
    },
    /// Every tag limit with the slots held now.
    ConcurrencyLimits,
    /// Events after a point, oldest first.
    Events {
        /// After this event (None: from the oldest kept).
        after: Option<flotilla_runtime::EventId>,
        /// Only events whose name starts with this.
        prefix: Option<String>,
        /// At most this many (≤ 1,000).
        limit: u32,
        /// When there is none yet, wait up to this long for one (≤ [`WAIT_MS_MAX`]).
        wait_ms: u32,
    },
    /// Events after a point that match a filter, oldest first; answered with a page and where
    /// the scan stopped (to go on from there).
    FindEvents {
        /// After this event (None: from the filter's `since`, or the oldest kept).
        after: Option<flotilla_runtime::EventId>,
        /// Which events.
        filter: Box<flotilla_runtime::EventFilter>,
        /// At most this many (≤ 1,000).
        limit: u32,
        /// When there is none yet, wait up to this long for one (≤ [`WAIT_MS_MAX`]).
        wait_ms: u32,
    },
    /// Record a user's event (durable before it is answered; the same event id again is the
    /// same event).
    EmitEvent(Box<flotilla_runtime::Event>),
    /// A node's heartbeat (its report), on a connection of its own; answered with the
    /// membership.
    Heartbeat(Box<MemberStatus>),
    /// Keep a large result in the control node's result store (a node shipping what a run
    /// made; the key is the result store's).
    PutResult {
        /// The result's key.
        key: String,
        /// Its bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// A large result from the control node's result store, by its key (a node resuming a run
    /// reads what another node's task runs made; answered with [`Response::Result`]).
    GetResult {
        /// The result's key.
        key: String,
    },
    /// A page of the task runs of a flow run, in creation order, after `after` (answered with
    /// [`Response::TaskRuns`]).
    TaskRunsPage {
        /// The flow run.
        run: FlowRunId,
        /// The last task run of the previous page.
        #[serde(default)]
        after: Option<flotilla_runtime::TaskRunId>,
        /// At most this many (1 to 1,000).
        limit: u32,
    },
    /// A page of the states of a flow run, oldest first, from `offset` (answered with
    /// [`Response::History`]).
    HistoryPage {
        /// The flow run.
        run: FlowRunId,
        /// States already read.
        offset: u32,
        /// At most this many (1 to 1,000).
        limit: u32,
    },
    /// Create or replace automations, all of them or none (answered with
    /// [`Response::SettingsPut`]).
    PutAutomations(Vec<flotilla_runtime::automation::AutomationSpec>),
    /// Every automation, in name order.
    Automations,
    /// Read, pause, resume or delete one automation.
    Automation {
        /// Its name.
        name: String,
        /// What to do.
        change: AutomationChange,
    },
    /// Create or replace a block (its secret fields are sealed before they are stored).
    PutBlock {
        /// Its type.
        kind: flotilla_runtime::block::BlockType,
        /// Its name.
        name: String,
        /// Its fields (a JSON object).
        fields: serde_json::Value,
    },
    /// Every block, masked, in type and name order.
    Blocks,
    /// Read (masked) or delete one block.
    Block {
        /// Its type.
        kind: flotilla_runtime::block::BlockType,
        /// Its name.
        name: String,
        /// Delete it (else read it).
        delete: bool,
    },
    /// An `s3` block, unsealed, for a node's result store (nodes only: a client's
    /// certificate may not ask it).
    StoreBlock(String),
    /// The blocks a run needs, unsealed, for the node that runs it under this epoch (nodes
    /// only: a client's certificate may not ask it).
    ResolveBlocks {
        /// The run.
        flow_run: FlowRunId,
        /// Its epoch on the asking node.
        epoch: flotilla_runtime::Epoch,
        /// `TYPE/NAME` each.
        refs: Vec<String>,
    },
}

/// A change to an automation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AutomationChange {
    /// Nothing: read it.
    Inspect,
    /// Stop evaluating it.
    Pause,
    /// Evaluate it again.
    Resume,
    /// Delete it.
    Delete,
}

/// A block as it may be shown: secret fields masked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockView {
    /// Its type.
    #[serde(rename = "type")]
    pub kind: flotilla_runtime::block::BlockType,
    /// Its name.
    pub name: String,
    /// Its fields, `********` for each secret one.
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// When it was created.
    pub created: flotilla_runtime::Timestamp,
    /// When it was last changed.
    pub updated: flotilla_runtime::Timestamp,
}

impl From<&flotilla_runtime::block::BlockRecord> for BlockView {
    fn from(b: &flotilla_runtime::block::BlockRecord) -> Self {
        BlockView {
            kind: b.kind,
            name: b.name.clone(),
            fields: b.masked(),
            created: b.created,
            updated: b.updated,
        }
    }
}

impl Request {
    /// Whether it changes anything (a read-only client's such requests are `forbidden`).
    pub fn is_mutating(&self) -> bool {
        match self {
            Request::Status
            | Request::FlowRun(_)
            | Request::FlowRuns { .. }
            | Request::TaskRuns(_)
            | Request::TaskRunsPage { .. }
            | Request::History(_)
            | Request::HistoryPage { .. }
            | Request::Logs { .. }
            | Request::Result(_)
            | Request::GetResult { .. }
            | Request::Wait { .. }
            | Request::Deployment(_)
            | Request::Deployments
            | Request::SchedulerStats
            | Request::WorkQueues
            | Request::ConcurrencyLimits
            | Request::Events { .. }
            | Request::FindEvents { .. }
            | Request::Automations
            | Request::Blocks
            | Request::ResolveBlocks { .. }
            | Request::StoreBlock(_) => false,
            Request::Automation { change, .. } => *change != AutomationChange::Inspect,
            Request::Block { delete, .. } => *delete,
            Request::WorkQueue { change, .. } => *change != QueueChange::Inspect,
            Request::ConcurrencyLimit { change, .. } => *change != LimitChange::Inspect,
            Request::RunFlow { .. }
            | Request::Cancel(_)
            | Request::Retry { .. }
            | Request::RemoveNode(_)
            | Request::Voters(_)
            | Request::PutDeployment(_)
            | Request::DeleteDeployment(_)
            | Request::RunDeployment { .. }
            | Request::PutResult { .. }
            | Request::EmitEvent(_)
            | Request::PutAutomations(_)
            | Request::PutBlock { .. }
            | Request::Heartbeat(_) => true,
        }
    }

    /// Why a peer with this certificate may not ask it, if it may not.
    pub fn forbidden_for(&self, role: crate::role::CertRole) -> Option<WireError> {
        use crate::role::CertRole;
        let why = match role {
            CertRole::Node
                if !matches!(
                    self,
                    Request::PutResult { .. } | Request::GetResult { .. } | Request::Heartbeat(_)
                ) =>
            {
                "a node's certificate speaks the node protocol; use a client certificate"
            }
            CertRole::Client | CertRole::ReadOnlyClient if matches!(self, Request::Heartbeat(_)) => {
                "only a node's certificate reports a node's heartbeat"
            }
            _ if matches!(self, Request::ResolveBlocks { .. } | Request::StoreBlock(_)) => {
                "secrets go only to the node that runs the flow run needing them"
            }
            CertRole::ReadOnlyClient if self.is_mutating() => "this client certificate is read-only",
            _ => return None,
        };
        Some(WireError::new(ErrorKind::Forbidden, why))
    }
}

/// How a failed request failed. Each kind has a stable machine-readable [`ErrorKind::code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The thing asked about does not exist (`not_found`).
    NotFound,
    /// The request was turned down by a rule (`refused`).
    Refused,
    /// The cluster cannot serve it now (no control node, no node runs the flow…)
    /// (`unavailable`).
    Unavailable,
    /// The request does not make sense (another protocol version…) (`protocol`).
    Protocol,
    /// It collides with what exists (a name taken, a run in the wrong state) (`conflict`).
    Conflict,
    /// Bad input: parameters, names, values out of range (`invalid`).
    Invalid,
    /// Over the node's message limit (`payload_too_large`).
    PayloadTooLarge,
    /// Not allowed for this certificate (`forbidden`).
    Forbidden,
}

impl ErrorKind {
    /// The stable code printed by the CLI's `--json` (`{"error": {"code", "message"}}`).
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Refused => "refused",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Invalid => "invalid",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Forbidden => "forbidden",
        }
    }

    /// The kind of a refusal by the control state's rules.
    pub fn of_refusal(r: &flotilla_runtime::Refusal) -> ErrorKind {
        use flotilla_runtime::Refusal;
        match r {
            Refusal::FlowRunNotFound(_)
            | Refusal::TaskRunNotFound(_)
            | Refusal::WorkQueueNotFound(_)
            | Refusal::AutomationNotFound(_) => ErrorKind::NotFound,
            Refusal::DeploymentNameTaken { .. }
            | Refusal::WorkQueueExists(_)
            | Refusal::StaleEpoch { .. }
            | Refusal::FlowRunNotRunning { .. }
            | Refusal::NotRetriable(_) => ErrorKind::Conflict,
            Refusal::Invalid(_) => ErrorKind::Invalid,
            _ => ErrorKind::Refused,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// An error, as sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// One line that says what happened.
    pub message: String,
}

impl WireError {
    /// A request or reply over the message limit.
    pub fn too_large(what: &str, size: usize, limit: usize) -> Self {
        WireError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "{what} of {size} bytes is over the message limit of {limit} bytes (send large inputs as a result or in smaller pieces)"
            ),
        )
    }

    /// An error of a kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        WireError {
            kind,
            message: message.into(),
        }
    }
}

/// Figures about the scheduler.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerStats {
    /// Deployments it schedules.
    pub deployments: u64,
    /// Runs it created ahead of time.
    pub created: u64,
    /// Runs it handed out when due.
    pub handed_out: u64,
    /// Time spent handling its messages, in microseconds (its CPU time, as it never waits).
    pub busy_us: u64,
}

pub use flotilla_runtime::control::{FlowDefaults, MemberStatus};

/// The cluster's members.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Every member.
    pub nodes: Vec<MemberStatus>,
    /// The replicated control state, when it is replicated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationStatus>,
}

/// A change of the voters of the replicated control state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VoterChange {
    /// Make the node a voter (it catches up first).
    Add(String),
    /// Make the voter hold no replica.
    Remove(String),
    /// Hand the lead to the voter.
    TransferLeader(String),
}

/// The replicated control state as its leader sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// The leader's name.
    pub leader: Option<String>,
    /// The leader's term.
    pub term: u64,
    /// The last index in the leader's log.
    pub last_index: Option<u64>,
    /// The last index the leader has applied.
    pub applied: Option<u64>,
    /// The last index of the leader's last snapshot (a durable checkpoint of its store).
    #[serde(default)]
    pub snapshot: Option<u64>,
    /// The leader's log is purged through this index.
    #[serde(default)]
    pub purged: Option<u64>,
    /// The voters and learners: name, whether a voter, and the last index it holds (the leader:
    /// has applied), when known.
    pub members: Vec<ReplicaStatus>,
}

/// One member of the replicated control state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Its name.
    pub name: String,
    /// A voter (else a learner).
    pub voter: bool,
    /// The last log index it holds as far as the leader knows (the leader: it has applied).
    pub applied: Option<u64>,
}

/// What a node answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The members.
    Status(ClusterStatus),
    /// The run created.
    Ran(FlowRunId),
    /// A flow run.
    FlowRun(Box<FlowRun>),
    /// Flow runs.
    FlowRuns(Vec<FlowRun>),
    /// Task runs.
    TaskRuns(Vec<TaskRun>),
    /// States.
    History(Vec<State>),
    /// Log lines and where the next page starts.
    Logs {
        /// The lines.
        lines: Vec<LogLine>,
        /// The cursor of the next page.
        next: Option<LogCursor>,
    },
    /// A result's bytes.
    Result(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A state (after cancel or retry).
    State(State),
    /// A deployment.
    Deployment(Box<Deployment>),
    /// Deployments.
    Deployments(Vec<Deployment>),
    /// The scheduler's figures.
    SchedulerStats(SchedulerStats),
    /// Work queues.
    WorkQueues(Vec<QueueInfo>),
    /// Tag limits, with their leases.
    ConcurrencyLimits(Vec<flotilla_runtime::ConcurrencyLimit>),
    /// Events, oldest first.
    Events(Vec<flotilla_runtime::Event>),
    /// A page of events that matched, oldest first, and the last event scanned (None: the
    /// scan reached the end of the filter's window).
    EventPage {
        /// The events.
        events: Vec<flotilla_runtime::Event>,
        /// Where to go on from.
        next: Option<flotilla_runtime::EventId>,
    },
    /// The event recorded.
    EventEmitted(flotilla_runtime::EventId),
    /// Settings stored, all of them.
    SettingsPut {
        /// How many were new.
        created: u32,
        /// How many replaced one.
        updated: u32,
    },
    /// Automations, in name order.
    Automations(Vec<flotilla_runtime::automation::AutomationRecord>),
    /// Blocks, masked.
    Blocks(Vec<BlockView>),
    /// Blocks unsealed: `TYPE/NAME` and its fields, each.
    Resolved(Vec<(String, serde_json::Value)>),
    /// Done, nothing to say.
    Done,
    /// The request failed.
    Error(WireError),
}

/// A change to a work queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueChange {
    /// Create it or change one of its fields (applied in order with every other change).
    Edit(flotilla_runtime::QueueEdit),
    /// Delete it (its runs go on in a queue with default settings).
    Delete,
    /// Nothing: read it.
    Inspect,
}

/// A change to a tag limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitChange {
    /// Create or change it.
    Put {
        /// Slots.
        limit: u32,
        /// How long a slot's lease lasts without renewal, in milliseconds.
        lease_ttl_ms: u64,
    },
    /// Free every slot held now (their holders lose them).
    Reset,
    /// Delete it.
    Delete,
    /// Nothing: read it.
    Inspect,
}

/// A work queue and how busy it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// The queue.
    pub queue: flotilla_runtime::WorkQueue,
    /// Runs due and waiting.
    pub waiting: u32,
    /// Runs handed out and not ended.
    pub active: u32,
}
