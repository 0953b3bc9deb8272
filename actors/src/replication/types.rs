//! What the Raft log carries and what applying it answers.

use flotilla_runtime::{Command, Refusal, Reply, Timestamp};
use serde::{Deserialize, Serialize};

/// A command as the Raft log carries it, with the leader's time for it (so that every replica
/// applies it at the same time).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Logged {
    /// The control plane's time for it.
    pub now: Timestamp,
    /// The command.
    pub command: Command,
}

impl std::fmt::Display for Logged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "command at {}", self.now)
    }
}

/// What applying a logged command answered.
pub type Applied = Result<Reply, Refusal>;

/// A voter or learner as the membership records it: its name and where it listens.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's name (the one in its certificate).
    pub name: String,
    /// Its cluster address.
    pub addr: String,
}

openraft::declare_raft_types!(
    /// The replicated control state: logged commands in, their answers out.
    pub Control:
        D = Logged,
        R = Applied,
        Node = Member,
);
