//! What the control actor starts from, and how membership works.

use super::*;

/// How membership works.
#[derive(Clone, Copy, Debug)]
pub struct MembershipSettings {
    /// A member silent this long is unreachable.
    pub unreachable_after: Duration,
    /// How often silence is checked.
    pub check_every: Duration,
    /// A run that starts (or still waits) this long after its scheduled time is marked Late.
    pub late_after: Duration,
}

impl Default for MembershipSettings {
    fn default() -> Self {
        MembershipSettings {
            unreachable_after: Duration::from_secs(1),
            check_every: Duration::from_millis(50),
            late_after: LATE_AFTER,
        }
    }
}

/// What the control actor starts from.
#[allow(missing_debug_implementations)]
pub struct ControlArgs {
    /// The persistence actor.
    pub persistence: PersistenceHandle,
    /// How membership works.
    pub settings: MembershipSettings,
    /// The flows registered on this node.
    pub flows: Vec<Arc<dyn FlowFn>>,
    /// The control node's result store (large results, shipped by the nodes that made them).
    pub results: ResultStore,
    /// The flows' options (shared with the scheduler; learned from the nodes' heartbeats).
    pub catalog: crate::engine::FlowCatalog,
    /// How many answers to mutating requests are remembered in the log, and how long.
    pub answers: crate::node::replies::AnswerBounds,
    /// This voter's replication, when the control state is replicated (this node leads it).
    pub replication: Option<crate::replication::voter::Voter>,
    /// What seals and opens blocks' secret fields.
    pub secrets: Option<Arc<flotilla_cluster::secrets::SecretsKey>>,
}
