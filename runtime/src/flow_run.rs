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
    /// That deployment's name when the run was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_name: Option<String>,
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
    /// Where its large results go (`s3/NAME`, an `s3` block): its deployment's choice; when
    /// absent, its flow's, and else the node's result store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_storage: Option<String>,
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

/// How long a run that resumes after a crash may stay Crashed before a waiter takes Crashed as
/// its end (it is resumed on another node as soon as its node's death is recorded).
pub const RESUME_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl FlowRun {
    /// The run `new` makes at `now`: Scheduled (due when it says, else now), under the first
    /// epoch, owned by nobody, its history not yet recorded.
    pub fn scheduled(new: crate::command::NewFlowRun, now: Timestamp) -> FlowRun {
        let due = new.scheduled_time.unwrap_or(now);
        FlowRun {
            id: new.id,
            flow_name: new.flow_name,
            parameters: new.parameters,
            deployment_id: new.deployment_id,
            deployment_name: new.deployment_name,
            parent_task_run: new.parent_task_run,
            idempotency_key: new.idempotency_key,
            tags: new.tags,
            work_queue: new.work_queue,
            retry_policy: new.retry_policy,
            resume: new.resume,
            created: now,
            expected_start_time: due,
            epoch: crate::ids::Epoch::FIRST,
            owner: None,
            lifecycle: crate::Lifecycle::new(crate::state::State::scheduled(due, now)),
            result_storage: new.result_storage,
        }
    }

    /// Whether a waiter is done with the run at `at`: None when it ended; Some(d) when it may
    /// still change, within `d` at the latest (`Duration::MAX`: not ended at all). The Crashed
    /// state of a run that resumes is not its end until it stayed so for [`RESUME_GRACE`].
    pub fn still_going(&self, at: Timestamp) -> Option<std::time::Duration> {
        let s = &self.lifecycle.state;
        if !s.is_terminal() {
            return Some(std::time::Duration::MAX);
        }
        let resumes =
            s.kind == crate::state::StateType::Crashed && self.resume && self.parent_task_run.is_none();
        let crashed_for = at.saturating_since(s.timestamp);
        (resumes && crashed_for < RESUME_GRACE).then(|| RESUME_GRACE - crashed_for)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;
    use crate::apply::{ApplyContext, apply};
    use crate::command::{Command, NewFlowRun};
    use crate::ids::LogIndex;
    use crate::state::{State, StateName};
    use crate::view::{MemState, StateView};

    fn run(resume: bool) -> FlowRun {
        let mut view = MemState::new();
        let id = FlowRunId::from_bytes([7; 16]);
        let new =
            NewFlowRun::new(id, "f", serde_json::Value::Null).with_options(RetryPolicy::default(), resume);
        let at = ApplyContext {
            index: LogIndex::new(1),
            now: Timestamp::from_micros(1_800_000_000_000_000),
        };
        let _ = apply(&mut view, Command::CreateFlowRun(new), at);
        view.hot().flow_run(&id).expect("made").clone()
    }

    #[test]
    fn crashed_is_the_end_of_a_run_only_if_it_does_not_resume_or_stayed_crashed() {
        let t = Timestamp::from_micros(1_800_000_000_000_000);
        let mut r = run(true);
        assert_eq!(r.still_going(t), Some(Duration::MAX), "Scheduled");
        r.lifecycle.state = State::named(StateName::Crashed, t);
        assert_eq!(
            r.still_going(t + Duration::from_secs(1)),
            Some(RESUME_GRACE - Duration::from_secs(1))
        );
        assert_eq!(r.still_going(t + RESUME_GRACE), None, "stayed Crashed");
        let mut r = run(false);
        r.lifecycle.state = State::named(StateName::Crashed, t);
        assert_eq!(r.still_going(t), None, "does not resume");
        r.lifecycle.state = State::named(StateName::Completed, t);
        assert_eq!(r.still_going(t), None);
    }
}
