//! The control node's live membership: each member's last report, when it was last heard
//! from, and the runs placed on it since; where a run goes (the live member that runs its flow
//! with the most free room); who has been silent too long.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{FlowRunId, NodeId};
use crate::retry::RetryPolicy;
use crate::time::Timestamp;

/// What a run of a flow takes from the flow when it is created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowDefaults {
    /// Flow-level retries.
    pub retry: RetryPolicy,
    /// Whether a crash of its node resumes it.
    pub resume: bool,
    /// Whether a boolean `resume` parameter of a run decides that for the run.
    #[serde(default)]
    pub resume_param: bool,
}

/// A member of the cluster, as the control node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Its name.
    pub name: NodeId,
    /// Where it listens.
    pub addr: String,
    /// `control` or `worker`.
    pub role: String,
    /// Whether it was heard from recently.
    pub reachable: bool,
    /// Flow runs it runs now.
    pub slots_used: u32,
    /// Flow runs it may run at once.
    pub slots_total: u32,
    /// The flows it can run.
    pub flows: Vec<String>,
    /// The work queues it serves (empty: all).
    #[serde(default)]
    pub queues: Vec<String>,
    /// When it was last heard from.
    pub last_heartbeat: Option<Timestamp>,
    /// Which start of the node this is (it changes on every restart).
    #[serde(default)]
    pub incarnation: u64,
    /// In a node's heartbeat: the flow runs it holds (running or queued), so that a run handed
    /// to it and never started is taken back. Empty in the cluster's status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holds: Vec<FlowRunId>,
    /// In a node's heartbeat: the options of the flows it runs, which runs created for them on
    /// the control node take. Empty in the cluster's status.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub flow_options: std::collections::BTreeMap<String, FlowDefaults>,
}

struct Member {
    status: MemberStatus,
    last_seen: Timestamp,
    /// Runs placed on it since its last heartbeat.
    placed: u32,
}

/// The members, by name.
#[derive(Default)]
pub struct Roster {
    members: BTreeMap<NodeId, Member>,
}

impl std::fmt::Debug for Roster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Roster")
            .field("members", &self.members.len())
            .finish()
    }
}

impl Roster {
    /// Every member's status. One expected but never heard from (a new leader's start) is
    /// shown unreachable: it runs nothing yet, and may be gone.
    pub fn statuses(&self) -> Vec<MemberStatus> {
        self.members
            .values()
            .map(|m| MemberStatus {
                reachable: m.status.reachable && m.status.last_heartbeat.is_some(),
                ..m.status.clone()
            })
            .collect()
    }

    /// A member's status.
    pub fn get(&self, node: &NodeId) -> Option<&MemberStatus> {
        self.members.get(node).map(|m| &m.status)
    }

    /// Forgets a member.
    pub fn remove(&mut self, node: &NodeId) {
        self.members.remove(node);
    }

    /// Every flow some member runs.
    pub fn flows(&self) -> std::collections::BTreeSet<String> {
        self.members
            .values()
            .flat_map(|m| m.status.flows.iter().cloned())
            .collect()
    }

    /// Whether a reachable member runs `flow`.
    pub fn runs_flow(&self, flow: &str) -> bool {
        self.members
            .values()
            .any(|m| m.status.reachable && m.status.flows.iter().any(|f| f == flow))
    }

    /// A member's heartbeat at `now`: it is reachable, its figures are its own again (the runs
    /// placed on it since its last one are counted in them). True when it was not reachable.
    pub fn heard(&mut self, now: Timestamp, report: MemberStatus) -> bool {
        let entry = self.members.entry(report.name.clone()).or_insert_with(|| Member {
            status: report.clone(),
            last_seen: now,
            placed: 0,
        });
        let back = !entry.status.reachable;
        entry.status = MemberStatus {
            reachable: true,
            last_heartbeat: Some(now),
            holds: Vec::new(),
            flow_options: BTreeMap::new(),
            ..report
        };
        entry.last_seen = now;
        entry.placed = 0;
        back
    }

    /// A node that holds runs but has not been heard from since this control node started (a
    /// new leader, a restart): it counts as heard at `now` (the caller adds time to reconnect),
    /// and is declared dead like a member gone silent if it never speaks. Its incarnation is unknown:
    /// `incarnation` stands for it (a value this start alone uses). A member heard from is kept.
    pub fn expect(&mut self, now: Timestamp, node: &NodeId, incarnation: u64) {
        self.members.entry(node.clone()).or_insert_with(|| Member {
            status: MemberStatus {
                name: node.clone(),
                addr: String::new(),
                role: String::new(),
                reachable: true,
                slots_used: 0,
                slots_total: 0,
                flows: Vec::new(),
                queues: Vec::new(),
                last_heartbeat: None,
                incarnation,
                holds: Vec::new(),
                flow_options: BTreeMap::new(),
            },
            last_seen: now,
            placed: 0,
        });
    }

    /// The members silent longer than `after` at `now`, marked unreachable (each returned once),
    /// with the incarnation that went silent and how long it was silent.
    pub fn silent(&mut self, now: Timestamp, after: Duration) -> Vec<(NodeId, u64, Duration)> {
        let mut out = Vec::new();
        for m in self.members.values_mut() {
            let silent = now.saturating_since(m.last_seen);
            if m.status.reachable && silent > after {
                m.status.reachable = false;
                out.push((m.status.name.clone(), m.status.incarnation, silent));
            }
        }
        out
    }

    /// Marks a member unreachable (a message to it could not be sent).
    pub fn unreachable(&mut self, node: &NodeId) {
        if let Some(m) = self.members.get_mut(node) {
            m.status.reachable = false;
        }
    }

    /// Whether a member is known and declared unreachable.
    pub fn is_down(&self, node: &NodeId) -> bool {
        self.members.get(node).is_some_and(|m| !m.status.reachable)
    }

    /// A run on `node` ended: a slot of it is free again.
    pub fn freed(&mut self, node: &NodeId) {
        if let Some(m) = self.members.get_mut(node) {
            if m.placed > 0 {
                m.placed -= 1;
            } else {
                m.status.slots_used = m.status.slots_used.saturating_sub(1);
            }
        }
    }

    /// The live member that runs `flow`, serves `queue` and has a free slot, with the most free
    /// room; the run counts against it until its next heartbeat or its end.
    pub fn pick(&mut self, flow: &str, queue: &str) -> Option<NodeId> {
        let load =
            |m: &Member| f64::from(m.status.slots_used + m.placed) / f64::from(m.status.slots_total.max(1));
        let best = self
            .members
            .values_mut()
            .filter(|m| {
                m.status.reachable
                    && m.status.slots_used + m.placed < m.status.slots_total
                    && m.status.flows.iter().any(|f| f == flow)
                    && (m.status.queues.is_empty() || m.status.queues.iter().any(|x| x == queue))
            })
            .min_by(|a, b| load(a).total_cmp(&load(b)))?;
        best.placed += 1;
        Some(best.status.name.clone())
    }
}
