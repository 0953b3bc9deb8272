//! What flow runs and task runs share: the current state, the history, and the bookkeeping of
//! run count and timing that orchestration keeps.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{EventId, TransitionId};
use crate::state::{State, StateType};
use crate::time::Timestamp;

/// How many recent transition ids a run remembers, so that a resent proposal that is no longer
/// the current one is still recognised.
pub const RECENT_TRANSITIONS_MAX: usize = 4;

/// How many history entries a run record holds; when the window is full its entries move to
/// an archived history block (numbered from 0) and the window starts again, so that the run
/// record keeps a bounded size however long the history grows.
pub const HISTORY_WINDOW: usize = 8;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// How a past proposal was decided, remembered by its transition id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PastDecision {
    /// Written as proposed.
    Accepted,
    /// Another state was written instead.
    Rejected,
}

/// A transition the run remembers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PastTransition {
    /// The proposer's transition id.
    pub id: TransitionId,
    /// How it was decided.
    pub decision: PastDecision,
}

/// The state and bookkeeping of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lifecycle {
    /// The current state.
    pub state: State,
    /// The events that recorded the latest states, oldest first (the recent window of the
    /// state history; earlier entries are in archived blocks).
    #[serde(default)]
    pub history: Vec<EventId>,
    /// How many history blocks were archived (each of [`HISTORY_WINDOW`] entries).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub archived_blocks: u32,
    /// How many times the run entered Running.
    #[serde(default)]
    pub run_count: u32,
    /// When it first entered Running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Timestamp>,
    /// When it last entered a terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Timestamp>,
    /// The time spent Running, over all attempts.
    #[serde(default)]
    pub total_run_time: Duration,
    /// The recent transitions (newest last), for idempotent resends.
    #[serde(default)]
    pub recent: Vec<PastTransition>,
}

impl Lifecycle {
    /// A lifecycle starting in `state`.
    pub fn new(state: State) -> Self {
        Lifecycle {
            state,
            history: Vec::new(),
            archived_blocks: 0,
            run_count: 0,
            start_time: None,
            end_time: None,
            total_run_time: Duration::ZERO,
            recent: Vec::new(),
        }
    }

    /// The type of the current state.
    pub fn kind(&self) -> StateType {
        self.state.kind
    }

    /// How a transition with this id was decided, if the run remembers it.
    pub fn past(&self, id: TransitionId) -> Option<PastDecision> {
        self.recent.iter().rev().find(|t| t.id == id).map(|t| t.decision)
    }

    /// The length of the whole state history.
    pub fn history_len(&self) -> usize {
        self.archived_blocks as usize * HISTORY_WINDOW + self.history.len()
    }

    /// Appends a history entry; when the window was full, returns the archived block (its
    /// number and entries) that the caller must store.
    pub fn record(&mut self, event: EventId) -> Option<(u32, Vec<EventId>)> {
        let archived = if self.history.len() >= HISTORY_WINDOW {
            let block = self.archived_blocks;
            self.archived_blocks = self.archived_blocks.saturating_add(1);
            Some((block, std::mem::take(&mut self.history)))
        } else {
            None
        };
        self.history.push(event);
        archived
    }

    /// Moves to `next`, keeping the run count and timing by the states' timestamps: entering
    /// Running counts a run and starts the clock; leaving Running adds the time spent; entering a
    /// terminal state sets the end time. `event` is the event that records the new state; an
    /// archived history block is returned as by [`Lifecycle::record`].
    #[must_use = "an archived history block must be stored"]
    pub fn enter(&mut self, next: State, event: EventId) -> Option<(u32, Vec<EventId>)> {
        let now = next.timestamp;
        if self.state.kind == StateType::Running && next.kind != StateType::Running {
            self.total_run_time += now.saturating_since(self.state.timestamp);
        }
        if next.kind == StateType::Running && self.state.kind != StateType::Running {
            self.run_count = self.run_count.saturating_add(1);
            self.start_time.get_or_insert(now);
        }
        if next.kind.is_terminal() {
            self.end_time = Some(now);
        } else if self.state.kind.is_terminal() {
            self.end_time = None;
        }
        self.state = next;
        self.record(event)
    }

    /// Remembers how a proposal was decided.
    pub fn remember(&mut self, id: TransitionId, decision: PastDecision) {
        if self.recent.len() >= RECENT_TRANSITIONS_MAX {
            self.recent.remove(0);
        }
        self.recent.push(PastTransition { id, decision });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateName;

    fn ev(n: u8) -> EventId {
        EventId::from_bytes([n; 16])
    }

    #[test]
    fn keeps_run_count_start_end_and_total_run_time() {
        let t = |s: i64| Timestamp::from_millis(s * 1000);
        let mut l = Lifecycle::new(State::of(StateType::Scheduled, t(0)));
        let _ = l.enter(State::of(StateType::Pending, t(1)), ev(1));
        let _ = l.enter(State::of(StateType::Running, t(2)), ev(2));
        assert_eq!((l.run_count, l.start_time), (1, Some(t(2))));
        let _ = l.enter(State::named(StateName::AwaitingRetry, t(5)), ev(3));
        let _ = l.enter(State::named(StateName::Retrying, t(6)), ev(4));
        let _ = l.enter(State::of(StateType::Completed, t(10)), ev(5));
        assert_eq!(l.run_count, 2);
        assert_eq!(l.start_time, Some(t(2)));
        assert_eq!(l.end_time, Some(t(10)));
        assert_eq!(l.total_run_time, Duration::from_secs(3 + 4));
        assert_eq!(l.history.len(), 5);
    }

    #[test]
    fn the_history_window_archives_full_blocks() {
        let mut l = Lifecycle::new(State::of(StateType::Scheduled, Timestamp::EPOCH));
        let mut archived = Vec::new();
        for i in 0..20u8 {
            if let Some(block) = l.record(ev(i)) {
                archived.push(block);
            }
        }
        assert_eq!(l.history_len(), 20);
        assert_eq!(archived.len(), 2);
        assert_eq!(archived[0], (0, (0..8).map(ev).collect()));
        assert_eq!(archived[1], (1, (8..16).map(ev).collect()));
        assert_eq!(l.history, (16..20).map(ev).collect::<Vec<_>>());
    }

    #[test]
    fn remembers_a_bounded_number_of_transitions() {
        let mut l = Lifecycle::new(State::of(StateType::Scheduled, Timestamp::EPOCH));
        for i in 0..40u8 {
            l.remember(TransitionId::from_bytes([i; 16]), PastDecision::Accepted);
        }
        assert_eq!(l.recent.len(), RECENT_TRANSITIONS_MAX);
        assert_eq!(
            l.past(TransitionId::from_bytes([39; 16])),
            Some(PastDecision::Accepted)
        );
        assert_eq!(l.past(TransitionId::from_bytes([0; 16])), None);
    }
}
