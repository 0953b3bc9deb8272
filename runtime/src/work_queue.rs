//! Work queues: named, prioritised, limited, pausable lines of runs waiting for workers.

use serde::{Deserialize, Serialize};

use crate::ids::WorkQueueId;

/// A work queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkQueue {
    /// The queue's id.
    pub id: WorkQueueId,
    /// Its unique name.
    pub name: String,
    /// 1 is the highest priority.
    pub priority: u32,
    /// At most this many of its runs at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_limit: Option<u32>,
    /// A paused queue hands out nothing.
    #[serde(default)]
    pub paused: bool,
}
