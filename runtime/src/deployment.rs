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
    /// Where its large results go: `s3/NAME`, an `s3` block (the node's result store when
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_storage: Option<String>,
    /// When it was created.
    pub created: Timestamp,
    /// When it last changed.
    pub updated: Timestamp,
}

/// What a user gives to create or replace a deployment (the id and times are the control
/// plane's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentSpec {
    /// Its unique name.
    pub name: String,
    /// The flow it runs.
    pub flow_name: String,
    /// Default parameters (a JSON object).
    #[serde(default)]
    pub parameters: serde_json::Value,
    /// Schedules.
    #[serde(default)]
    pub schedules: Vec<Schedule>,
    /// The work queue its runs go to.
    #[serde(default)]
    pub work_queue: Option<String>,
    /// Tags given to its runs.
    #[serde(default)]
    pub tags: Vec<String>,
    /// At most this many of its runs at once.
    #[serde(default)]
    pub concurrency_limit: Option<u32>,
    /// What a run over the limit does.
    #[serde(default)]
    pub collision: CollisionStrategy,
    /// Paused: its schedules create no runs.
    #[serde(default)]
    pub paused: bool,
    /// Where its large results go: `s3/NAME`, an `s3` block (the node's result store when
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_storage: Option<String>,
}

impl DeploymentSpec {
    /// Checks what can be checked without the control state.
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > crate::flow_run::NAME_LEN_MAX {
            return Err(format!(
                "a deployment name must be 1 to {} bytes long",
                crate::flow_run::NAME_LEN_MAX
            ));
        }
        if self.flow_name.is_empty() {
            return Err("a deployment needs a flow".into());
        }
        if !(self.parameters.is_null() || self.parameters.is_object()) {
            return Err("a deployment's parameters must be a JSON object".into());
        }
        if self.schedules.len() > 16 {
            return Err("at most 16 schedules per deployment".into());
        }
        for s in &self.schedules {
            s.kind.compile().map_err(|e| e.to_string())?;
        }
        if self.concurrency_limit == Some(0) {
            return Err("a concurrency limit must be at least 1".into());
        }
        if let Some(s) = &self.result_storage {
            crate::block::check_result_storage(s)?;
        }
        Ok(())
    }

    /// The deployment: a new one, or `old` replaced (its id and creation time kept).
    pub fn into_deployment(self, id: DeploymentId, old: Option<&Deployment>, now: Timestamp) -> Deployment {
        Deployment {
            id: old.map_or(id, |o| o.id),
            name: self.name,
            flow_name: self.flow_name,
            parameters: if self.parameters.is_null() {
                serde_json::json!({})
            } else {
                self.parameters
            },
            schedules: self.schedules,
            work_queue: self.work_queue,
            tags: self.tags,
            concurrency_limit: self.concurrency_limit,
            collision: self.collision,
            paused: self.paused,
            result_storage: self.result_storage,
            created: old.map_or(now, |o| o.created),
            updated: now,
        }
    }
}

impl Deployment {
    /// What it was made from.
    pub fn spec(&self) -> DeploymentSpec {
        DeploymentSpec {
            name: self.name.clone(),
            flow_name: self.flow_name.clone(),
            parameters: self.parameters.clone(),
            schedules: self.schedules.clone(),
            work_queue: self.work_queue.clone(),
            tags: self.tags.clone(),
            concurrency_limit: self.concurrency_limit,
            collision: self.collision,
            paused: self.paused,
            result_storage: self.result_storage.clone(),
        }
    }
}

/// A schedule that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The cron expression is invalid.
    #[error(transparent)]
    Cron(#[from] crate::cron::CronError),
    /// The time zone is not an IANA zone.
    #[error(transparent)]
    Timezone(#[from] crate::cron::TimezoneError),
    /// An interval of zero, or over the maximum.
    #[error("an interval must be between 1 s and {max_days} days, not {0:?}", max_days = INTERVAL_MAX.as_secs() / 86_400)]
    Interval(Duration),
}

/// The longest interval accepted.
pub const INTERVAL_MAX: Duration = Duration::from_secs(366 * 86_400);

/// A schedule ready to compute fire times.
#[derive(Clone, Debug)]
pub enum Compiled {
    /// A cron expression in a zone.
    Cron(crate::cron::CronExpr, chrono_tz::Tz),
    /// Every `every` from `anchor`.
    Interval {
        /// The period in microseconds.
        every_us: i64,
        /// The anchor.
        anchor: Timestamp,
    },
}

impl ScheduleKind {
    /// Checks the schedule and prepares it for computing fire times.
    pub fn compile(&self) -> Result<Compiled, ScheduleError> {
        match self {
            ScheduleKind::Cron { expression, timezone } => {
                let e = crate::cron::CronExpr::parse(expression)?;
                let tz = crate::cron::parse_timezone(timezone.as_deref().unwrap_or("UTC"))?;
                Ok(Compiled::Cron(e, tz))
            }
            ScheduleKind::Interval { every, anchor } => {
                if *every < Duration::from_secs(1) || *every > INTERVAL_MAX {
                    return Err(ScheduleError::Interval(*every));
                }
                Ok(Compiled::Interval {
                    every_us: every.as_micros() as i64,
                    anchor: *anchor,
                })
            }
        }
    }
}

impl Compiled {
    /// The first fire time strictly after `after` (None: it fires no more).
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        match self {
            Compiled::Cron(e, tz) => e.next_after(*tz, after.to_datetime()).map(Timestamp::from),
            Compiled::Interval { every_us, anchor } => {
                let (a, t) = (anchor.as_micros(), after.as_micros());
                let k = (t - a).div_euclid(*every_us) + 1;
                Some(Timestamp::from_micros(a.checked_add(k.checked_mul(*every_us)?)?))
            }
        }
    }

    /// The next `count` fire times strictly after `after`.
    pub fn upcoming(&self, after: Timestamp, count: usize) -> Vec<Timestamp> {
        let mut out = Vec::with_capacity(count);
        let mut t = after;
        while out.len() < count {
            match self.next_after(t) {
                Some(n) => {
                    out.push(n);
                    t = n;
                }
                None => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod schedule_tests {
    use super::*;

    #[test]
    fn intervals_count_from_their_anchor() {
        let anchor: Timestamp = "2026-03-01T00:00:05Z".parse().unwrap();
        let s = ScheduleKind::Interval {
            every: Duration::from_secs(600),
            anchor,
        }
        .compile()
        .unwrap();
        let after: Timestamp = "2026-03-01T10:07:00Z".parse().unwrap();
        let got: Vec<String> = s.upcoming(after, 2).iter().map(ToString::to_string).collect();
        assert_eq!(got, ["2026-03-01T10:10:05Z", "2026-03-01T10:20:05Z"]);
        // Before the anchor too, and `after` itself excluded.
        let before: Timestamp = "2026-02-28T23:50:05Z".parse().unwrap();
        assert_eq!(s.next_after(before).unwrap().to_string(), "2026-03-01T00:00:05Z");
        assert!(
            ScheduleKind::Interval {
                every: Duration::ZERO,
                anchor
            }
            .compile()
            .is_err()
        );
        let bad = ScheduleKind::Cron {
            expression: "* * * * *".into(),
            timezone: Some("Nowhere/Land".into()),
        };
        assert!(matches!(bad.compile(), Err(ScheduleError::Timezone(_))));
    }
}
