//! Reads of the control state: what can be asked, and the answers. Every list is paged with a
//! bounded page size.

use flotilla_runtime::{
    Deployment, DeploymentId, Event, EventId, FlowRun, FlowRunId, LogIndex, LogLine, State, StateType,
    TaskRun, TaskRunId,
};
use serde::{Deserialize, Serialize};

/// The largest page any read returns.
pub const PAGE_MAX: usize = 1_000;

/// Which flow runs to list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunFilter {
    /// All, in creation order.
    All,
    /// Those in a state type.
    State(StateType),
    /// Those of a deployment.
    Deployment(DeploymentId),
}

pub use flotilla_runtime::LogCursor;

/// A read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Read {
    /// One flow run.
    FlowRun(FlowRunId),
    /// A page of flow runs, after `after` (by id).
    FlowRuns {
        /// Which.
        filter: RunFilter,
        /// The last id of the previous page.
        after: Option<FlowRunId>,
        /// At most this many (capped at [`PAGE_MAX`]).
        limit: usize,
    },
    /// One task run.
    TaskRun(TaskRunId),
    /// A page of a flow run's task runs, in creation order.
    TaskRuns {
        /// The flow run.
        flow_run: FlowRunId,
        /// The last id of the previous page.
        after: Option<TaskRunId>,
        /// At most this many.
        limit: usize,
    },
    /// A page of a flow run's state history, oldest first.
    FlowRunHistory {
        /// The run.
        run: FlowRunId,
        /// States to skip.
        offset: usize,
        /// At most this many.
        limit: usize,
    },
    /// A page of a task run's state history, oldest first.
    TaskRunHistory {
        /// The run.
        run: TaskRunId,
        /// States to skip.
        offset: usize,
        /// At most this many.
        limit: usize,
    },
    /// A page of events after an id, in append order.
    Events {
        /// The last id of the previous page.
        after: Option<EventId>,
        /// At most this many.
        limit: usize,
    },
    /// A page of a flow run's log lines.
    Logs {
        /// The run.
        flow_run: FlowRunId,
        /// Where the previous page ended.
        after: Option<LogCursor>,
        /// At most this many lines.
        limit: usize,
    },
    /// One deployment.
    Deployment(DeploymentId),
    /// One deployment, by name.
    DeploymentByName(String),
    /// A page of deployments in name order, after `after` (a name).
    Deployments {
        /// The last name of the previous page.
        after: Option<String>,
        /// At most this many.
        limit: usize,
    },
    /// Every work queue and tag limit, by key.
    Settings,
    /// The answer remembered for a client's request, if still remembered at `now`.
    Answer {
        /// The request.
        request_id: flotilla_runtime::control::RequestId,
        /// The time to judge its age by.
        now: flotilla_runtime::Timestamp,
    },
    /// Who holds the slots of tag limits, as recorded (None: the record is not complete yet —
    /// a data directory from before it, not one lease TTL past its first start since).
    SlotHolds,
    /// The unexpired cached Completed state for a cache key.
    Cached {
        /// The cache key.
        key: String,
        /// The time to judge expiry at.
        now: flotilla_runtime::Timestamp,
    },
    /// Figures about the store.
    Stats,
}

/// Figures about the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// The last command applied.
    pub applied: LogIndex,
    /// The last command the store holds.
    pub stored: LogIndex,
    /// The last command the store holds durably (the log is truncated up to here).
    pub checkpointed: LogIndex,
    /// Flow runs.
    pub flow_runs: usize,
    /// Flow and task runs held in memory (the rest live in the store alone).
    #[serde(default)]
    pub resident_runs: usize,
    /// Log bytes applied but not yet in the store.
    pub lag_bytes: u64,
    /// Command log segments.
    pub log_segments: usize,
    /// Batches written to the log (one `fdatasync` each).
    pub log_syncs: u64,
}

/// The answer to a read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ReadReply {
    /// A flow run, if it exists.
    FlowRun(Option<Box<FlowRun>>),
    /// Flow runs.
    FlowRuns(Vec<FlowRun>),
    /// A task run, if it exists.
    TaskRun(Option<Box<TaskRun>>),
    /// Task runs.
    TaskRuns(Vec<TaskRun>),
    /// States (None when the run does not exist).
    History(Option<Vec<State>>),
    /// Events.
    Events(Vec<Event>),
    /// Log lines and where the next page starts (None: no more for now).
    Logs {
        /// The lines.
        lines: Vec<LogLine>,
        /// The cursor of the next page.
        next: Option<LogCursor>,
    },
    /// A deployment, if it exists.
    Deployment(Option<Box<Deployment>>),
    /// Deployments.
    Deployments(Vec<Deployment>),
    /// Work queues and tag limits.
    Settings(Vec<flotilla_runtime::Setting>),
    /// A remembered answer, encoded as it was sent.
    Answer(Option<Vec<u8>>),
    /// (tag, holder, node) for every recorded holding.
    SlotHolds(Option<Vec<(String, flotilla_runtime::TaskRunId, flotilla_runtime::NodeId)>>),
    /// A cached state, if there is one.
    Cached(Option<State>),
    /// Figures.
    Stats(StoreStats),
}
