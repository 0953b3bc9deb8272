//! Log lines captured from flows and tasks.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{FlowRunId, LogBatchId, TaskRunId};
use crate::time::Timestamp;

/// The longest message kept; longer ones are cut and marked.
pub const LOG_MESSAGE_BYTES_MAX: usize = 16 * 1024;

/// The level of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LogLevel {
    /// Trace.
    Trace,
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warn.
    Warn,
    /// Error.
    Error,
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::Trace => "TRACE",
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warn => "WARN",
            LogLevel::Error => "ERROR",
        })
    }
}

/// One log line of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The flow run it belongs to.
    pub flow_run: FlowRunId,
    /// The task run, when it was emitted inside a task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_run: Option<TaskRunId>,
    /// When it was emitted.
    pub timestamp: Timestamp,
    /// Its level.
    pub level: LogLevel,
    /// The emitting module or logger.
    #[serde(default)]
    pub target: String,
    /// The text.
    pub message: String,
}

impl LogLine {
    /// Cuts the message to [`LOG_MESSAGE_BYTES_MAX`] bytes (on a character boundary).
    pub fn bounded(mut self) -> Self {
        if self.message.len() > LOG_MESSAGE_BYTES_MAX {
            let mut cut = LOG_MESSAGE_BYTES_MAX;
            while !self.message.is_char_boundary(cut) {
                cut -= 1;
            }
            self.message.truncate(cut);
            self.message.push_str(" …[truncated]");
        }
        self
    }
}

/// Where a page of log lines continues: after line `line` of batch `batch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCursor {
    /// The batch.
    pub batch: LogBatchId,
    /// Lines of it already returned.
    pub line: u32,
}
