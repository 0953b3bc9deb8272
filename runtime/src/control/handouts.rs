//! Runs handed to a node and not yet seen running there. A node's heartbeats list the runs it
//! holds; a run that its node leaves out of [`MISSED_MAX`] heartbeats in a row was never
//! started (its start message was lost, or the node restarted before it) and is taken back to
//! be placed again. Plain data: the control node's driver feeds it and re-places what it
//! returns once it has checked the run still waits.

use std::collections::BTreeMap;

use crate::ids::{FlowRunId, NodeId};

/// How many heartbeats in a row may leave out a run handed to the node.
pub const MISSED_MAX: u32 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Handout {
    node: NodeId,
    missed: u32,
}

/// The runs handed out and not yet seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Handouts {
    runs: BTreeMap<FlowRunId, Handout>,
}

impl Handouts {
    /// `run` was sent to `node` (again, if it had been sent elsewhere).
    pub fn handed(&mut self, run: FlowRunId, node: NodeId) {
        self.runs.insert(run, Handout { node, missed: 0 });
    }

    /// `run` ended, or is no longer this tracker's concern.
    pub fn forget(&mut self, run: &FlowRunId) {
        self.runs.remove(run);
    }

    /// How many runs wait to be seen.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// `node` is gone (declared unreachable): every run handed to it is taken back.
    pub fn take_node(&mut self, node: &NodeId) -> Vec<FlowRunId> {
        let back: Vec<FlowRunId> = self
            .runs
            .iter()
            .filter(|(_, h)| &h.node == node)
            .map(|(r, _)| *r)
            .collect();
        for r in &back {
            self.runs.remove(r);
        }
        back
    }

    /// A heartbeat of `node` listing the runs it holds (running or queued): the runs it left
    /// out [`MISSED_MAX`] times in a row are returned, taken back. A run seen is still watched
    /// until it ends ([`Handouts::forget`]): a copy the node dropped without ending it (a stale
    /// copy of a run it was given again under a new epoch, refused and stopped) leaves the run
    /// waiting, and it is read back like one never started.
    pub fn heartbeat(&mut self, node: &NodeId, holds: &[FlowRunId]) -> Vec<FlowRunId> {
        let mut back = Vec::new();
        self.runs.retain(|run, h| {
            if &h.node != node {
                return true;
            }
            if holds.contains(run) {
                h.missed = 0;
                return true;
            }
            h.missed += 1;
            if h.missed >= MISSED_MAX {
                back.push(*run);
                return false;
            }
            true
        });
        back
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn run(n: u8) -> FlowRunId {
        FlowRunId::from_bytes([n; 16])
    }

    fn node(s: &str) -> NodeId {
        s.parse().unwrap()
    }

    /// Regression (fix 8): a run sent to a node that never started it stayed Scheduled forever.
    #[test]
    fn a_run_left_out_of_two_heartbeats_is_taken_back() {
        let mut h = Handouts::default();
        h.handed(run(1), node("n2"));
        h.handed(run(2), node("n2"));
        h.handed(run(3), node("n3"));
        // The first heartbeat may predate the start message: nothing is taken back yet.
        assert!(h.heartbeat(&node("n2"), &[run(2)]).is_empty());
        // Another node's heartbeats say nothing of n2's runs.
        assert!(h.heartbeat(&node("n3"), &[]).is_empty());
        assert_eq!(h.heartbeat(&node("n2"), &[]), vec![run(1)]);
        // Run 2 was seen, then left out twice (its copy dropped without ending): read back too.
        assert!(h.heartbeat(&node("n2"), &[run(2)]).is_empty());
        assert!(h.heartbeat(&node("n2"), &[]).is_empty());
        assert_eq!(h.heartbeat(&node("n2"), &[]), vec![run(2)]);
        assert_eq!(h.heartbeat(&node("n3"), &[]), vec![run(3)]);
        assert!(h.is_empty());
    }

    #[test]
    fn a_run_handed_again_or_ended_starts_afresh() {
        let mut h = Handouts::default();
        h.handed(run(1), node("n2"));
        assert!(h.heartbeat(&node("n2"), &[]).is_empty());
        h.handed(run(1), node("n3"));
        assert!(h.heartbeat(&node("n2"), &[]).is_empty());
        assert!(h.heartbeat(&node("n3"), &[]).is_empty());
        h.forget(&run(1));
        assert!(h.heartbeat(&node("n3"), &[]).is_empty());
        assert!(h.is_empty());
    }

    #[test]
    fn a_node_declared_gone_gives_back_every_run_handed_to_it() {
        let mut h = Handouts::default();
        h.handed(run(1), node("n2"));
        h.handed(run(2), node("n3"));
        h.handed(run(3), node("n2"));
        assert_eq!(h.take_node(&node("n2")), vec![run(1), run(3)]);
        assert_eq!(h.len(), 1);
    }
}
