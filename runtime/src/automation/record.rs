//! An automation as the control state holds it: its declaration, when it was armed, the mark
//! of the last firing recorded per bucket (so that a firing decided again — after a restart or
//! a change of leader — is recognised and not acted on twice), and its last firings with the
//! outcomes of their actions.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{AutomationSpec, Firing};
use crate::ids::EventId;
use crate::time::Timestamp;

/// The most recent firings an automation keeps (with their outcomes).
pub const RECENT_MAX: usize = 20;

/// Where a firing stands in its bucket: later firings have greater marks. The event that made
/// it fire comes first: event ids grow in log order, while events' times need not (two
/// clients' events reach the log in either order); a proactive firing has none, and its window
/// starts (when it was armed) grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FiringMark {
    /// The event that made it fire (none for a proactive firing).
    pub event: Option<EventId>,
    /// The start of the window that fired.
    pub window_start: Timestamp,
}

impl Firing {
    /// Its mark in its bucket.
    pub fn mark(&self) -> FiringMark {
        FiringMark {
            window_start: self.window_start,
            event: self.events.iter().max().copied(),
        }
    }
}

/// What one action of a firing did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionOutcome {
    /// The action's type (`run-deployment`, …).
    pub action: String,
    /// Whether it did what it was asked.
    pub ok: bool,
    /// What it did, or why it failed.
    pub detail: String,
    /// When it was done (its outcome is recorded after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Timestamp>,
}

/// A firing and, once its actions ran, their outcomes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FiringRecord {
    /// The firing.
    pub firing: Firing,
    /// Each action's outcome, in order (empty until they ran).
    #[serde(default)]
    pub outcomes: Vec<ActionOutcome>,
    /// Whether the actions ran.
    #[serde(default)]
    pub done: bool,
}

/// An automation in the control state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutomationRecord {
    /// As declared (`paused` is its current state).
    pub spec: AutomationSpec,
    /// When it was created.
    pub created: Timestamp,
    /// When it was last created, changed or resumed: its counting starts here.
    pub armed: Timestamp,
    /// Per bucket, the mark of the last firing recorded.
    #[serde(default)]
    pub fired: BTreeMap<String, FiringMark>,
    /// The last firings, oldest first (at most [`RECENT_MAX`]).
    #[serde(default)]
    pub recent: VecDeque<FiringRecord>,
    /// How many times it fired.
    #[serde(default)]
    pub firings: u64,
}

/// A change to an automation, applied to it as it is then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AutomationEdit {
    /// Stop evaluating it.
    Pause,
    /// Evaluate it again, armed afresh.
    Resume,
    /// It fired (recorded once: a firing with a mark not above its bucket's is a repeat).
    Fired(Firing),
    /// The actions of a firing ran.
    Ran {
        /// The firing's key.
        key: String,
        /// Each action's outcome.
        outcomes: Vec<ActionOutcome>,
    },
}

impl AutomationRecord {
    /// A new automation, armed at `now`.
    pub fn new(spec: AutomationSpec, now: Timestamp) -> Self {
        AutomationRecord {
            spec,
            created: now,
            armed: now,
            fired: BTreeMap::new(),
            recent: VecDeque::new(),
            firings: 0,
        }
    }

    /// This declaration put over `old`: unchanged when it is the same; otherwise re-armed at
    /// `now`, keeping its history and marks.
    pub fn replacing(mut self, old: Option<&AutomationRecord>, now: Timestamp) -> Self {
        if let Some(old) = old {
            if old.spec == self.spec {
                return old.clone();
            }
            self.created = old.created;
            self.armed = now;
            self.fired = old.fired.clone();
            self.recent = old.recent.clone();
            self.firings = old.firings;
        }
        self
    }

    /// Records a firing; false when its bucket already has one at or past its mark.
    pub fn fire(&mut self, firing: &Firing) -> bool {
        let mark = firing.mark();
        if self.fired.get(&firing.bucket).is_some_and(|m| *m >= mark) {
            return false;
        }
        if !self.fired.contains_key(&firing.bucket) && self.fired.len() >= super::evaluator::BUCKETS_MAX {
            let oldest = self.fired.iter().min_by_key(|(_, m)| **m).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.fired.remove(&k);
            }
        }
        self.fired.insert(firing.bucket.clone(), mark);
        self.recent.push_back(FiringRecord {
            firing: firing.clone(),
            outcomes: Vec::new(),
            done: false,
        });
        while self.recent.len() > RECENT_MAX {
            self.recent.pop_front();
        }
        self.firings += 1;
        true
    }

    /// Records the outcomes of a firing's actions; false when they were recorded already.
    pub fn ran(&mut self, key: &str, outcomes: &[ActionOutcome]) -> bool {
        match self.recent.iter_mut().find(|r| r.firing.key == key) {
            Some(r) if r.done => false,
            Some(r) => {
                r.outcomes = outcomes.to_vec();
                r.done = true;
                true
            }
            None => true,
        }
    }

    /// Firings recorded whose actions have not run (a leader that stopped between the two).
    pub fn pending(&self) -> impl Iterator<Item = &Firing> {
        self.recent.iter().filter(|r| !r.done).map(|r| &r.firing)
    }
}
