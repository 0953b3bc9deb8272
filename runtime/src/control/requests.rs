//! The outcomes of client requests, remembered by request id so that a resent request gets the
//! first outcome instead of acting twice. Bounded: the most recent `max` outcomes, none older
//! than `retention` (part of the durable state, so pruning happens in `apply`, by the applied
//! command's time: replay prunes the same).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::command::ClientResult;
use super::ids::RequestId;
use crate::time::Timestamp;

/// Remembered request outcomes, oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOutcomes {
    by_id: BTreeMap<RequestId, ClientResult>,
    order: VecDeque<(Timestamp, RequestId)>,
    max: usize,
    retention: Duration,
}

impl RequestOutcomes {
    /// Remembers at most `max` outcomes, each at most `retention`.
    pub fn new(max: usize, retention: Duration) -> Self {
        RequestOutcomes {
            by_id: BTreeMap::new(),
            order: VecDeque::new(),
            max,
            retention,
        }
    }

    /// The outcome of a request, if remembered.
    pub fn get(&self, id: &RequestId) -> Option<&ClientResult> {
        self.by_id.get(id)
    }

    /// How many outcomes are remembered.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Remembers an outcome at `now` (the first one stays), forgetting the oldest beyond the
    /// bounds.
    pub fn remember(&mut self, id: RequestId, now: Timestamp, outcome: ClientResult) {
        if let std::collections::btree_map::Entry::Vacant(e) = self.by_id.entry(id) {
            e.insert(outcome);
            self.order.push_back((now, id));
        }
        self.prune(now);
    }

    /// Forgets outcomes beyond the bounds.
    pub fn prune(&mut self, now: Timestamp) {
        while let Some(&(at, id)) = self.order.front() {
            let too_many = self.order.len() > self.max;
            let too_old = now.saturating_since(at) > self.retention;
            if !too_many && !too_old {
                break;
            }
            self.order.pop_front();
            self.by_id.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ClientReply, derived_id};

    fn id(n: u32) -> RequestId {
        RequestId::from_uuid(derived_id(&n.to_string()))
    }

    #[test]
    fn keeps_the_most_recent_within_the_retention() {
        let mut r = RequestOutcomes::new(3, Duration::from_secs(10));
        let t = |s: i64| Timestamp::from_millis(s * 1000);
        for n in 0..5 {
            r.remember(id(n), t(i64::from(n)), Ok(ClientReply::SettingPut));
        }
        assert_eq!(r.len(), 3);
        assert!(r.get(&id(1)).is_none());
        assert!(r.get(&id(4)).is_some());
        r.prune(t(13));
        assert_eq!(r.len(), 2, "the outcome of t=2 is older than 10 s at t=13");
        r.remember(id(4), t(13), Err(crate::apply::Refusal::Invalid("x".into())));
        assert_eq!(r.len(), 2, "a request remembered again is not counted twice");
    }
}
