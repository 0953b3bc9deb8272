//! The SDK's errors: typed, documented, and open to new variants.

use std::time::Duration;

use flotilla_actors::engine::TaskFailure;
use flotilla_actors::engine::worker::EngineError;
use flotilla_actors::persistence::{PersistError, StartError};
use flotilla_runtime::{FlowRunId, Refusal, TaskRunId};

/// Why a task call gave no result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The task failed for good (no retries left, or the error was not retriable).
    #[error("task {task} failed: {message}")]
    Failed {
        /// The task's name.
        task: String,
        /// The error's text (a panic's message for a panic).
        message: String,
    },
    /// Its last attempt ran past its timeout.
    #[error("task {task} timed out after {after:?}")]
    TimedOut {
        /// The task's name.
        task: String,
        /// The timeout.
        after: Duration,
    },
    /// It was cancelled with its flow run.
    #[error("task {task} was cancelled")]
    Cancelled {
        /// The task's name.
        task: String,
    },
    /// A task it waited for did not complete.
    #[error("task {task} did not run: a task it waits for did not complete ({upstream})")]
    UpstreamFailed {
        /// The task's name.
        task: String,
        /// What happened upstream.
        upstream: String,
    },
    /// Its recorded result cannot be read back (a result file is missing or damaged).
    #[error("the result of task run {run} cannot be read: {reason}")]
    ResultUnreadable {
        /// The task run.
        run: TaskRunId,
        /// Why.
        reason: String,
    },
    /// Its arguments or result could not be encoded or decoded.
    #[error("task {task}: {reason}")]
    Codec {
        /// The task's name.
        task: String,
        /// What went wrong.
        reason: String,
    },
    /// The flow run stopped (cancelled, crashed, or taken over by another worker).
    #[error("the flow run stopped: {0}")]
    Aborted(String),
}

impl TaskError {
    pub(crate) fn from_failure(f: TaskFailure) -> Self {
        match f {
            TaskFailure::Failed { task, message } => TaskError::Failed { task, message },
            TaskFailure::TimedOut { task, after } => TaskError::TimedOut { task, after },
            TaskFailure::Cancelled { task } => TaskError::Cancelled { task },
            TaskFailure::ResultUnreadable { run, reason } => TaskError::ResultUnreadable { run, reason },
            TaskFailure::Aborted(m) => TaskError::Aborted(m),
            other => TaskError::Aborted(other.to_string()),
        }
    }
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The builder's settings do not hold together.
    #[error("invalid node settings: {0}")]
    Config(String),
    /// The data directory could not be opened (locked, damaged, newer format, unreadable…).
    #[error(transparent)]
    Storage(#[from] StartError),
    /// The engine could not start or recover.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No flow run with that id.
    #[error("no flow run {0}")]
    NotFound(FlowRunId),
    /// No flow of that name is registered on the node.
    #[error("no flow named {name:?} is registered (registered: {registered})")]
    UnknownFlow {
        /// The name asked for.
        name: String,
        /// The names there are.
        registered: String,
    },
    /// The parameters do not fit the flow.
    #[error("invalid parameters: {0}")]
    Parameters(String),
    /// The control plane turned the request down.
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    /// The store failed or stopped.
    #[error(transparent)]
    Storage(#[from] PersistError),
    /// The engine is not running.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The run ended without a result of the asked type.
    #[error("flow run {run} has no result: {reason}")]
    NoResult {
        /// The run.
        run: FlowRunId,
        /// Why.
        reason: String,
    },
    /// Waiting took longer than allowed.
    #[error("flow run {0} did not finish in time")]
    Timeout(FlowRunId),
    /// The node could not be reached, or the connection to it was lost.
    #[error("{0}")]
    Unreachable(String),
    /// The cluster turned the request down (an unknown flow, bad parameters, a rule…).
    #[error("{0}")]
    Rejected(String),
    /// The cluster cannot serve the request now (no control node, no node runs the flow…).
    #[error("{0}")]
    Unavailable(String),
    /// The node answered something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The cluster turned the request down, with a stable code (`not_found`, `conflict`,
    /// `invalid`, `payload_too_large`, `forbidden`, `refused`).
    #[error("{message}")]
    Cluster {
        /// The stable machine-readable code.
        code: &'static str,
        /// One line that says what happened.
        message: String,
    },
}

impl Error {
    /// A stable machine-readable code for this error: `not_found`, `conflict`, `invalid`,
    /// `payload_too_large`, `forbidden`, `unavailable`, `refused`, `timeout`, `protocol`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotFound(_) | Error::NoResult { .. } => "not_found",
            Error::UnknownFlow { .. } | Error::Parameters(_) => "invalid",
            Error::Refused(r) => match r {
                Refusal::FlowRunNotFound(_) | Refusal::TaskRunNotFound(_) | Refusal::WorkQueueNotFound(_) => {
                    "not_found"
                }
                Refusal::Invalid(_) => "invalid",
                _ => "conflict",
            },
            Error::Storage(_) | Error::Engine(_) | Error::Unreachable(_) | Error::Unavailable(_) => {
                "unavailable"
            }
            Error::Timeout(_) => "timeout",
            Error::Rejected(_) => "refused",
            Error::Protocol(_) => "protocol",
            Error::Cluster { code, .. } => code,
        }
    }
}
