//! Live membership, in memory only: which node incarnations are alive, what they can run, when
//! each was last heard, and how many heartbeats in a row left out a run it holds. Rebuilt after
//! a restart from the applied state (the nodes that hold runs) and the nodes' next messages.

use std::collections::BTreeMap;
use std::time::Duration;

use super::ids::Incarnation;
use crate::ids::{FlowRunId, NodeId};
use crate::time::Timestamp;

/// One node incarnation as the machine knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its incarnation.
    pub incarnation: Incarnation,
    /// How many runs it runs at once (0 until it joins).
    pub slots: u32,
    /// The flows it can run.
    pub flows: Vec<String>,
    /// When it was last heard.
    pub last_heard: Timestamp,
    /// The sequence number of its last heartbeat.
    pub last_seq: Option<u64>,
    /// False once declared dead (until its death is applied and it comes back as another
    /// incarnation).
    pub alive: bool,
    /// False for a member known only from the applied state after a restart, until it joins.
    pub joined: bool,
    /// Assignments to it appended and not applied yet.
    pub placing: u32,
    /// Per run it holds: how many heartbeats in a row left it out.
    missed: BTreeMap<FlowRunId, u32>,
}

/// The members, by node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    members: BTreeMap<NodeId, Member>,
}

impl Membership {
    /// A member.
    pub fn get(&self, node: &NodeId) -> Option<&Member> {
        self.members.get(node)
    }

    /// A member, to change.
    pub fn get_mut(&mut self, node: &NodeId) -> Option<&mut Member> {
        self.members.get_mut(node)
    }

    /// Every member.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &Member)> {
        self.members.iter()
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A node incarnation joined (replacing what was known of the node).
    pub fn join(
        &mut self,
        node: NodeId,
        incarnation: Incarnation,
        slots: u32,
        flows: Vec<String>,
        now: Timestamp,
    ) {
        let (placing, last_seq) = match self.members.get(&node) {
            Some(m) if m.incarnation == incarnation => (m.placing, m.last_seq),
            _ => (0, None),
        };
        self.members.insert(
            node,
            Member {
                incarnation,
                slots,
                flows,
                last_heard: now,
                last_seq,
                alive: true,
                joined: true,
                placing,
                missed: BTreeMap::new(),
            },
        );
    }

    /// After a restart: a node incarnation that holds runs, not heard yet. It gets the usual
    /// time to speak before it is declared dead, and no new runs until it joins.
    pub fn recovered(&mut self, node: NodeId, incarnation: Incarnation, now: Timestamp) {
        self.members.entry(node).or_insert(Member {
            incarnation,
            slots: 0,
            flows: Vec::new(),
            last_heard: now,
            last_seq: None,
            alive: true,
            joined: false,
            placing: 0,
            missed: BTreeMap::new(),
        });
    }

    /// The live members silent for longer than `after` at `now`.
    pub fn silent(&self, now: Timestamp, after: Duration) -> Vec<(NodeId, Incarnation)> {
        self.members
            .iter()
            .filter(|(_, m)| m.alive && now.saturating_since(m.last_heard) > after)
            .map(|(n, m)| (n.clone(), m.incarnation))
            .collect()
    }

    /// The joined, live member that runs `flow` with a free slot and the least load
    /// (`load(node)`: runs held and being assigned), ties to the first by name.
    pub fn pick(&self, flow: &str, load: impl Fn(&NodeId, &Member) -> u32) -> Option<(NodeId, Incarnation)> {
        self.members
            .iter()
            .filter(|(_, m)| m.alive && m.joined && m.slots > 0 && m.flows.iter().any(|f| f == flow))
            .map(|(n, m)| (n, m, load(n, m)))
            .filter(|(_, m, l)| *l < m.slots)
            .min_by(|a, b| {
                (u64::from(a.2) * u64::from(b.1.slots)).cmp(&(u64::from(b.2) * u64::from(a.1.slots)))
            })
            .map(|(n, m, _)| (n.clone(), m.incarnation))
    }

    /// Counts a heartbeat of `node` that did (`reported`) or did not report `run`; returns how
    /// many in a row did not.
    pub fn missed(&mut self, node: &NodeId, run: FlowRunId, reported: bool) -> u32 {
        let Some(m) = self.members.get_mut(node) else {
            return 0;
        };
        if reported {
            m.missed.remove(&run);
            return 0;
        }
        let n = m.missed.entry(run).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// Forgets the heartbeat counts of the runs `node` no longer holds.
    pub fn keep_runs(&mut self, node: &NodeId, held: &[FlowRunId]) {
        if let Some(m) = self.members.get_mut(node) {
            m.missed.retain(|r, _| held.contains(r));
        }
    }

    /// Forgets a member.
    pub fn remove(&mut self, node: &NodeId) -> Option<Member> {
        self.members.remove(node)
    }
}
