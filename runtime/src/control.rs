//! The control plane's decisions, as pure, deterministic machines in the style of quinn-proto
//! and openraft's engine.
//!
//! - [`Coordinator`] is what the control node runs: membership and failure detection, placement
//!   by work queue and deployment limit, take-back of runs never started, tag-limit slots. Its
//!   control actor feeds it inputs and carries out its effects (see [`coordinator`]).
//! - [`ControlMachine`] (below) models the replicated protocol that comes next: assignments and
//!   proposals under epochs, leases and request outcomes as its own commands.
//!
//! Both run under a seeded simulation (`runtime/tests/simulation.rs`).
//!
//! The control machine:
//!
//! ```text
//! ControlMachine::handle(&mut self, now, &ControlState, Input) -> Vec<Effect>
//! Input  = Started | Client { request_id, request } | Node { node, msg } | Timer(TimerKind)
//!        | Applied { index, command, outcome }
//! Effect = Append(ControlCommand) | Reply { request_id, result } | Send { node, msg }
//!        | SetTimer { at, timer }
//! ```
//!
//! Two halves:
//!
//! - [`ControlState`] is the durable control state: the runs (a [`crate::view::MemState`]
//!   changed by [`crate::apply::apply`]), which node holds which run under which epoch, the
//!   tag-limit leases, the outcomes of client requests, and the node incarnations declared dead.
//!   It changes only by [`ControlState::apply`] of a [`ControlCommand`], in log order, so
//!   replaying the log rebuilds it exactly.
//! - [`ControlMachine`] is memory only: live membership, last heartbeats, waiting lease
//!   requests, in-flight appends, timers. It reads the applied state and decides; every durable
//!   change it wants is an [`Effect::Append`], carried out by the driver (append to the log,
//!   apply, then feed back [`Input::Applied`]). Replies and messages that report a change are
//!   emitted only on `Applied` (persist before you announce). After a restart it is rebuilt
//!   from the applied state ([`Input::Started`]) and the nodes' next heartbeats.
//!
//! Nothing here reads a clock or OS randomness: `now` is an argument and the keys of the
//! commands the machine makes are derived from what they are about (`crash/{node}/{incarnation}`,
//! run + epoch, request id).

mod command;
pub mod coordinator;
pub mod dispatch;
mod effect;
pub mod handouts;
mod ids;
mod input;
mod leases;
mod machine;
mod membership;
mod requests;
mod roster;
pub mod slots;
mod state;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use command::{
    ClientReply, ClientResult, ControlCommand, ControlOutcome, ControlReply, LeaseCommand, LeaseReply,
};
pub use coordinator::Coordinator;
pub use dispatch::{Placement, QueueLoad, Whereabouts};
pub use effect::{Effect, ToNodeMsg};
pub use handouts::Handouts;
pub use ids::{Incarnation, RequestId, derived_id};
pub use input::{ClientRequest, CreateRun, Input, NodeMsg, TimerKind};
pub use leases::{LeaseRecord, Leases};
pub use machine::ControlMachine;
pub use membership::{Member, Membership};
pub use requests::RequestOutcomes;
pub use roster::{FlowDefaults, MemberStatus};
pub use slots::{SlotGrant, SlotRequest};
pub use state::{ControlState, Holder};

/// How the control machine works: every figure with its unit in the name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlConfig {
    /// How often nodes send heartbeats (they are told nothing; this sizes the checks).
    pub heartbeat_interval: Duration,
    /// A node silent this long is declared dead.
    pub unreachable_after: Duration,
    /// How often the machine looks for silent nodes and due runs.
    pub tick_interval: Duration,
    /// A run held by a node that leaves it out of this many consecutive heartbeats is taken
    /// back (its start was lost, or the node restarted).
    pub missed_heartbeats_max: u32,
    /// At most this many request outcomes are remembered (the most recent).
    pub request_outcomes_max: usize,
    /// Request outcomes older than this are forgotten.
    pub request_outcome_retention: Duration,
    /// At most this many runs are placed in one pass.
    pub placements_per_pass_max: usize,
    /// At most this many lease requests wait for a slot (more are refused).
    pub lease_waiters_max: usize,
    /// At most this many client requests wait for their command to be applied.
    pub pending_requests_max: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            heartbeat_interval: Duration::from_millis(250),
            unreachable_after: Duration::from_secs(1),
            tick_interval: Duration::from_millis(50),
            missed_heartbeats_max: 2,
            request_outcomes_max: 100_000,
            request_outcome_retention: Duration::from_secs(24 * 3600),
            placements_per_pass_max: 1_000,
            lease_waiters_max: 100_000,
            pending_requests_max: 100_000,
        }
    }
}

impl ControlConfig {
    /// Tiny limits and short timeouts, for tests.
    pub fn for_tests() -> Self {
        ControlConfig {
            heartbeat_interval: Duration::from_millis(100),
            unreachable_after: Duration::from_millis(400),
            tick_interval: Duration::from_millis(20),
            missed_heartbeats_max: 2,
            request_outcomes_max: 64,
            request_outcome_retention: Duration::from_secs(60),
            placements_per_pass_max: 16,
            lease_waiters_max: 64,
            pending_requests_max: 64,
        }
    }
}
