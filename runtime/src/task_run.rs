//! A task run: one call of a task inside a flow run, with all its attempts.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, FlowRunId, TaskRunId};
use crate::lifecycle::Lifecycle;
use crate::retry::RetryPolicy;
use crate::time::Timestamp;

/// What identifies a task call within its flow run, so that a resumed or retried flow finds
/// each call's recorded result again: the flow run, the task's registered name, and the call
/// index (the count of earlier calls of that task in the flow run, fixed when the task is called
/// or submitted, not when it starts).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskRunKey {
    /// The flow run.
    pub flow_run: FlowRunId,
    /// The task's registered name.
    pub task_key: String,
    /// The call index.
    pub call_index: u32,
}

impl fmt::Display for TaskRunKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}#{}", self.flow_run, self.task_key, self.call_index)
    }
}

/// One call of a task inside a flow run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRun {
    /// The task run's id.
    pub id: TaskRunId,
    /// Flow run, task key and call index.
    pub key: TaskRunKey,
    /// Retries of this task.
    #[serde(default, skip_serializing_if = "RetryPolicy::is_none")]
    pub retry_policy: RetryPolicy,
    /// The cache key of this call, if the task caches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    /// How long a cached result stays valid (forever when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_expiration: Option<Duration>,
    /// Run even when a cached result exists.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refresh_cache: bool,
    /// Tags (concurrency limits apply by tag).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// When it was created.
    pub created: Timestamp,
    /// The flow run's epoch when this task run last started.
    pub flow_epoch: Epoch,
    /// State, history, run count and timing.
    pub lifecycle: Lifecycle,
}
