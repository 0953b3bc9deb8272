//! A flow run: one execution of a flow.

use serde::{Deserialize, Serialize};

use crate::ids::{DeploymentId, Epoch, FlowRunId, NodeId, TaskRunId};
use crate::lifecycle::Lifecycle;
use crate::retry::RetryPolicy;
use crate::time::Timestamp;

/// One execution of a flow, with its parameters, state, ownership and timing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRun {
    /// The run's id.
    pub id: FlowRunId,
    /// The registered name of the flow.
    pub flow_name: String,
    /// The parameters, as JSON.
    #[serde(default)]
    pub parameters: serde_json::Value,
    /// The deployment that created it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<DeploymentId>,
    /// For a subflow: the task run in the parent flow that called it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_task_run: Option<TaskRunId>,
    /// The creator's idempotency key: creating again with it returns this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The work queue it waits in, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_queue: Option<String>,
    /// Flow-level retries.
    #[serde(default, skip_serializing_if = "RetryPolicy::is_none")]
    pub retry_policy: RetryPolicy,
    /// Whether a crash of its owner resumes it automatically.
    #[serde(default = "yes")]
    pub resume: bool,
    /// When it was created.
    pub created: Timestamp,
    /// When it was first due to start.
    pub expected_start_time: Timestamp,
    /// The ownership epoch: grows on each (re)assignment.
    pub epoch: Epoch,
    /// The node that claimed it (Pending) under the current epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<NodeId>,
    /// State, history, run count and timing.
    pub lifecycle: Lifecycle,
}

fn yes() -> bool {
    true
}

/// An upper bound on the size of a flow or task name.
pub const NAME_LEN_MAX: usize = 256;
/// An upper bound on the number of tags.
pub const TAGS_MAX: usize = 64;
/// An upper bound on the encoded size of a run's parameters.
pub const PARAMETERS_BYTES_MAX: usize = 1024 * 1024;
