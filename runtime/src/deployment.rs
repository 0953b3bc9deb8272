//! Deployments and their schedules.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::DeploymentId;
use crate::time::Timestamp;

/// When a deployment's runs are due.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ScheduleKind {
    /// A cron expression read in an IANA time zone.
    Cron {
        /// The expression (5-field crontab, 6-field with seconds first, or an `@alias`).
        expression: String,
        /// The IANA time zone name (`UTC` when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timezone: Option<String>,
    },
    /// Every `every`, counted from `anchor`.
    Interval {
        /// The period.
        every: Duration,
        /// An instant the schedule fires at; other fire times are whole periods away.
        anchor: Timestamp,
    },
}

/// One schedule of a deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// When it fires.
    pub kind: ScheduleKind,
    /// Whether it creates runs.
    #[serde(default = "yes")]
    pub active: bool,
    /// Parameters merged over the deployment's for runs of this schedule.
    #[serde(default)]
    pub parameters: serde_json::Value,
    /// Whether fire times missed while the control node was down are run afterwards.
    #[serde(default)]
    pub catchup: bool,
}

fn yes() -> bool {
    true
}

/// What happens to a new run when the deployment's concurrency limit is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CollisionStrategy {
    /// Wait (Scheduled named AwaitingConcurrencySlot) until a slot frees.
    #[default]
    Enqueue,
    /// Cancel the new run.
    CancelNew,
}

/// A flow with default parameters, schedules, a work queue, tags and limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// The deployment's id.
    pub id: DeploymentId,
    /// Its unique name.
    pub name: String,
    /// The flow it runs.
    pub flow_name: String,
    /// Default parameters.
    #[serde(default)]
    pub parameters: serde_json::Value,
    /// Schedules.
    #[serde(default)]
    pub schedules: Vec<Schedule>,
    /// The work queue its runs go to (the default queue when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_queue: Option<String>,
    /// Tags given to its runs.
    #[serde(default)]
    pub tags: Vec<String>,
    /// At most this many of its runs at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_limit: Option<u32>,
    /// What a run over the limit does.
    #[serde(default)]
    pub collision: CollisionStrategy,
    /// A paused deployment's schedules create no runs.
    #[serde(default)]
    pub paused: bool,
    /// When it was created.
    pub created: Timestamp,
    /// When it last changed.
    pub updated: Timestamp,
}
