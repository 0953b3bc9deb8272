//! States of flow runs and task runs: a type, a name, a message, a timestamp, details and an
//! optional reference to a result.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::TransitionId;
use crate::time::Timestamp;

/// The nine state types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StateType {
    /// Waiting for its scheduled time (or for a retry, a resume, a concurrency slot).
    Scheduled,
    /// Claimed by a worker, about to run.
    Pending,
    /// Running.
    Running,
    /// Paused by the flow itself or by a user.
    Paused,
    /// Asked to stop; ends as Cancelled.
    Cancelling,
    /// Finished with a result.
    Completed,
    /// Finished with an error.
    Failed,
    /// Stopped on request.
    Cancelled,
    /// Its owner died or lost contact.
    Crashed,
}

impl StateType {
    /// Every state type, in lifecycle order.
    pub const ALL: [StateType; 9] = [
        StateType::Scheduled,
        StateType::Pending,
        StateType::Running,
        StateType::Paused,
        StateType::Cancelling,
        StateType::Completed,
        StateType::Failed,
        StateType::Cancelled,
        StateType::Crashed,
    ];

    /// Completed, Failed, Cancelled and Crashed: the run is over until a retry.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            StateType::Completed | StateType::Failed | StateType::Cancelled | StateType::Crashed
        )
    }

    /// Pending, Running and Cancelling: a worker owns the run and may be executing it.
    pub const fn is_claimed(self) -> bool {
        matches!(
            self,
            StateType::Pending | StateType::Running | StateType::Cancelling
        )
    }

    /// The name a state of this type has unless another is given.
    pub const fn default_name(self) -> StateName {
        match self {
            StateType::Scheduled => StateName::Scheduled,
            StateType::Pending => StateName::Pending,
            StateType::Running => StateName::Running,
            StateType::Paused => StateName::Paused,
            StateType::Cancelling => StateName::Cancelling,
            StateType::Completed => StateName::Completed,
            StateType::Failed => StateName::Failed,
            StateType::Cancelled => StateName::Cancelled,
            StateType::Crashed => StateName::Crashed,
        }
    }

    /// The name (`Completed`).
    pub const fn as_str(self) -> &'static str {
        match self {
            StateType::Scheduled => "Scheduled",
            StateType::Pending => "Pending",
            StateType::Running => "Running",
            StateType::Paused => "Paused",
            StateType::Cancelling => "Cancelling",
            StateType::Completed => "Completed",
            StateType::Failed => "Failed",
            StateType::Cancelled => "Cancelled",
            StateType::Crashed => "Crashed",
        }
    }

    /// The upper-case name used in events and JSON (`COMPLETED`).
    pub const fn as_upper(self) -> &'static str {
        match self {
            StateType::Scheduled => "SCHEDULED",
            StateType::Pending => "PENDING",
            StateType::Running => "RUNNING",
            StateType::Paused => "PAUSED",
            StateType::Cancelling => "CANCELLING",
            StateType::Completed => "COMPLETED",
            StateType::Failed => "FAILED",
            StateType::Cancelled => "CANCELLED",
            StateType::Crashed => "CRASHED",
        }
    }
}

impl fmt::Display for StateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no state type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown state type {0:?} (expected one of Scheduled, Pending, Running, Paused, Cancelling, Completed, Failed, Cancelled, Crashed)"
)]
pub struct StateTypeParseError(String);

impl FromStr for StateType {
    type Err = StateTypeParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StateType::ALL
            .into_iter()
            .find(|t| t.as_upper().eq_ignore_ascii_case(s))
            .ok_or_else(|| StateTypeParseError(s.to_owned()))
    }
}

/// The standard state names. Each belongs to one state type ([`StateName::state_type`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StateName {
    /// Scheduled.
    Scheduled,
    /// Scheduled, and its time passed without it starting.
    Late,
    /// Scheduled, waiting for a retry's delay.
    AwaitingRetry,
    /// Scheduled, waiting for a concurrency slot.
    AwaitingConcurrencySlot,
    /// Scheduled, an automatic resume after a crash.
    Resuming,
    /// Pending.
    Pending,
    /// Running.
    Running,
    /// Running again after a failure.
    Retrying,
    /// Paused.
    Paused,
    /// Cancelling.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Completed.
    Completed,
    /// Completed from the cache, without running.
    Cached,
    /// Failed.
    Failed,
    /// Failed because it ran past its timeout.
    TimedOut,
    /// Failed because its concurrency slot's lease was not renewed in time (it is retried by
    /// its policy, waiting for a slot again).
    LeaseLost,
    /// Crashed.
    Crashed,
}

impl StateName {
    /// The type this name belongs to.
    pub const fn state_type(self) -> StateType {
        match self {
            StateName::Scheduled
            | StateName::Late
            | StateName::AwaitingRetry
            | StateName::AwaitingConcurrencySlot
            | StateName::Resuming => StateType::Scheduled,
            StateName::Pending => StateType::Pending,
            StateName::Running | StateName::Retrying => StateType::Running,
            StateName::Paused => StateType::Paused,
            StateName::Cancelling => StateType::Cancelling,
            StateName::Cancelled => StateType::Cancelled,
            StateName::Completed | StateName::Cached => StateType::Completed,
            StateName::Failed | StateName::TimedOut | StateName::LeaseLost => StateType::Failed,
            StateName::Crashed => StateType::Crashed,
        }
    }
}

impl fmt::Display for StateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Where a result is: inline in the store, or in the result store under a key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResultRef {
    /// The serialized value itself (rmp-serde), when it is small.
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A value kept in the result store.
    Stored {
        /// The key in the result store (a relative path).
        key: String,
        /// Its size in bytes.
        size: u64,
        /// CRC-32 of its bytes, checked when it is read back.
        crc32: u32,
        /// The `s3` block of the object store it went to (`s3/NAME`), when its flow or
        /// deployment names one; else the node's result store.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        store: Option<String>,
    },
}

impl fmt::Debug for ResultRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResultRef::Inline(b) => write!(f, "Inline({} bytes)", b.len()),
            ResultRef::Stored { key, size, .. } => write!(f, "Stored({key}, {size} bytes)"),
        }
    }
}

/// The details a state carries besides its type and name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StateDetails {
    /// The proposer's id for the transition that wrote this state; a proposal carrying the
    /// current state's transition id is a resend and changes nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transition_id: Option<TransitionId>,
    /// When a Scheduled run is due (copied onto the Pending state that claims it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<Timestamp>,
    /// The cache key a task run's result was stored or found under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    /// Until when the cached result is valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_expiration: Option<Timestamp>,
    /// On a proposed Failed state: `Some(false)` when the user's retry condition declined a
    /// retry for this error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retriable: Option<bool>,
}

/// One state of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The state type.
    #[serde(rename = "type")]
    pub kind: StateType,
    /// The state name; always one that belongs to `kind`.
    pub name: StateName,
    /// A human-readable message (an error's text, a reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the state was written (set by the control plane).
    pub timestamp: Timestamp,
    /// Details.
    #[serde(default)]
    pub details: StateDetails,
    /// The result, for Completed states (and Failed ones that carry an error value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultRef>,
}

impl State {
    /// A state of the given name (its type follows from the name), written at `timestamp`.
    pub fn named(name: StateName, timestamp: Timestamp) -> State {
        State {
            kind: name.state_type(),
            name,
            message: None,
            timestamp,
            details: StateDetails::default(),
            result: None,
        }
    }

    /// A state of the given type with its default name.
    pub fn of(kind: StateType, timestamp: Timestamp) -> State {
        State::named(kind.default_name(), timestamp)
    }

    /// A Scheduled state due at `at`.
    pub fn scheduled(at: Timestamp, timestamp: Timestamp) -> State {
        State::named(StateName::Scheduled, timestamp).with_scheduled_time(at)
    }

    /// With a message.
    pub fn with_message(mut self, message: impl Into<String>) -> State {
        self.message = Some(message.into());
        self
    }

    /// With a scheduled time.
    pub fn with_scheduled_time(mut self, at: Timestamp) -> State {
        self.details.scheduled_time = Some(at);
        self
    }

    /// With a result.
    pub fn with_result(mut self, result: ResultRef) -> State {
        self.result = Some(result);
        self
    }

    /// With a transition id.
    pub fn with_transition(mut self, id: TransitionId) -> State {
        self.details.transition_id = Some(id);
        self
    }

    /// Whether the type is terminal.
    pub fn is_terminal(&self) -> bool {
        self.kind.is_terminal()
    }

    /// The transition id that wrote this state, if any.
    pub fn transition_id(&self) -> Option<TransitionId> {
        self.details.transition_id
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name == self.kind.default_name() {
            write!(f, "{}", self.kind)?;
        } else {
            write!(f, "{}({})", self.kind, self.name)?;
        }
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_belongs_to_its_type() {
        for t in StateType::ALL {
            assert_eq!(t.default_name().state_type(), t);
        }
        assert_eq!(StateName::Late.state_type(), StateType::Scheduled);
        assert_eq!(StateName::Cached.state_type(), StateType::Completed);
        assert_eq!(StateName::TimedOut.state_type(), StateType::Failed);
        assert_eq!(StateName::Retrying.state_type(), StateType::Running);
        assert_eq!(StateName::Resuming.state_type(), StateType::Scheduled);
    }

    #[test]
    fn terminal_and_claimed_types() {
        let terminal: Vec<_> = StateType::ALL.into_iter().filter(|t| t.is_terminal()).collect();
        assert_eq!(
            terminal,
            [
                StateType::Completed,
                StateType::Failed,
                StateType::Cancelled,
                StateType::Crashed
            ]
        );
        let claimed: Vec<_> = StateType::ALL.into_iter().filter(|t| t.is_claimed()).collect();
        assert_eq!(
            claimed,
            [StateType::Pending, StateType::Running, StateType::Cancelling]
        );
    }

    #[test]
    fn state_types_parse_case_insensitively() {
        assert_eq!("completed".parse::<StateType>(), Ok(StateType::Completed));
        assert_eq!("RUNNING".parse::<StateType>(), Ok(StateType::Running));
        assert!(
            "done"
                .parse::<StateType>()
                .unwrap_err()
                .to_string()
                .contains("expected one of")
        );
    }

    #[test]
    fn display_shows_name_when_not_default() {
        let t = Timestamp::EPOCH;
        assert_eq!(State::of(StateType::Running, t).to_string(), "Running");
        assert_eq!(
            State::named(StateName::AwaitingRetry, t)
                .with_message("boom")
                .to_string(),
            "Scheduled(AwaitingRetry): boom"
        );
    }
}
