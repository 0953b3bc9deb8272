//! The machine's durable commands: the run commands of [`crate::command::Command`] wrapped with
//! what the machine adds (the client request they answer, the node and incarnation that hold a
//! run, the tag-limit leases), and what applying one did.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ids::{Incarnation, RequestId};
use crate::apply::{Refusal, Write};
use crate::command::Command;
use crate::ids::{Epoch, FlowRunId, NodeId, TaskRunId, TransitionId};
use crate::rules::Decision;
use crate::state::{State, StateType};
use crate::time::Timestamp;

/// Every change the control machine makes to the control state. Each is idempotent: applied
/// twice (a resend, a replay) it changes nothing the second time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlCommand {
    /// A client's request: applied once per request id, whose outcome is remembered.
    Client {
        /// The request.
        request_id: RequestId,
        /// The run command it makes.
        command: Command,
    },
    /// Claim a Scheduled run for a node under the run's current epoch (Pending, owned by the
    /// node): the node is then told to start it.
    Assign {
        /// The run.
        run: FlowRunId,
        /// The node.
        node: NodeId,
        /// The node's incarnation.
        incarnation: Incarnation,
        /// The run's epoch (refused if it is no longer the run's).
        epoch: Epoch,
    },
    /// A node's state proposal for a run it holds.
    Propose {
        /// The run.
        run: FlowRunId,
        /// The proposing node.
        node: NodeId,
        /// Its incarnation.
        incarnation: Incarnation,
        /// The epoch it holds the run under (None: refused).
        epoch: Option<Epoch>,
        /// The state proposed.
        state: State,
        /// The node's transition id.
        transition: TransitionId,
    },
    /// Take a run back from its holder, which does not run it (its start was lost, or it
    /// restarted): a run that had not started is Scheduled again under the next epoch; one that
    /// had is Crashed (and resumed by a later [`ControlCommand::Resume`] if it may be).
    Reclaim {
        /// The run.
        run: FlowRunId,
        /// The holder.
        node: NodeId,
        /// Its incarnation.
        incarnation: Incarnation,
        /// The epoch it holds the run under (nothing happens if the run moved on).
        epoch: Epoch,
    },
    /// A node incarnation is dead: its runs crash (`MarkNodeCrashed`, key
    /// `crash/{node}/{incarnation}`) and it may never hold a run again. Its leases lapse by
    /// their TTL (its tasks may still be running, cut off).
    NodeDead {
        /// The node.
        node: NodeId,
        /// The incarnation.
        incarnation: Incarnation,
    },
    /// Resume a run that crashed under `epoch` (Scheduled, named Resuming, under the next epoch).
    Resume {
        /// The run.
        run: FlowRunId,
        /// The epoch it crashed under.
        epoch: Epoch,
    },
    /// A change to the tag-limit leases.
    Lease(LeaseCommand),
}

/// A change to the tag-limit leases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LeaseCommand {
    /// Take one slot of every limited tag among `tags`, or none.
    Acquire {
        /// The holder.
        holder: TaskRunId,
        /// Its node.
        node: NodeId,
        /// The node's incarnation.
        incarnation: Incarnation,
        /// Its tags.
        tags: Vec<String>,
        /// The node's time of the request (echoed to it).
        sent_at: Timestamp,
    },
    /// Extend the holder's leases; a lapsed one is re-taken only if there is room.
    Renew {
        /// The holder.
        holder: TaskRunId,
        /// Its node.
        node: NodeId,
        /// The node's incarnation.
        incarnation: Incarnation,
        /// Its tags.
        tags: Vec<String>,
        /// The node's time of the request (echoed to it).
        sent_at: Timestamp,
    },
    /// Give slots back.
    Release {
        /// The holders.
        holders: Vec<TaskRunId>,
        /// Their node.
        node: NodeId,
    },
    /// Let leases go whose time ran out: `(tag, holder, expires)`, each removed only if it still
    /// expires then (a renewal in between keeps it).
    Expire {
        /// The leases.
        leases: Vec<(String, TaskRunId, Timestamp)>,
    },
}

/// What a client request did, as remembered for its resends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientReply {
    /// A flow run was created, or existed already under the key.
    RunCreated {
        /// The run.
        run: FlowRunId,
        /// False when it existed already.
        created: bool,
    },
    /// A run's state after the request.
    RunState {
        /// The run.
        run: FlowRunId,
        /// Its state type now.
        state: StateType,
    },
    /// A setting was stored.
    SettingPut,
}

/// The answer to a client request.
pub type ClientResult = Result<ClientReply, Refusal>;

/// The answer to a lease command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LeaseReply {
    /// Held until `expires` (control-plane time).
    Granted {
        /// When the lease lapses unless renewed.
        expires: Timestamp,
        /// The TTL (the shortest among the tags).
        ttl: Duration,
    },
    /// None of the tags is limited: nothing to hold.
    Unlimited,
    /// No room now: the request waits.
    Full,
    /// The lease lapsed and its slot is taken: the holder must stop.
    Lost,
    /// Leases removed (released or expired).
    Removed {
        /// How many (holder, tag) leases.
        count: usize,
    },
}

/// What applying a [`ControlCommand`] answered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlReply {
    /// A client request's outcome.
    Client(ClientResult),
    /// The run is assigned under this epoch, or not.
    Assigned(Result<Epoch, Refusal>),
    /// The decision on a node's proposal (a refusal when it does not hold the run), and the
    /// run's state type after it.
    Proposed {
        /// The decision.
        decision: Result<Decision, Refusal>,
        /// The run's state type now (None: no such run).
        state: Option<StateType>,
    },
    /// A run taken back: its state type now, or None when it had moved on already.
    Reclaimed(Option<StateType>),
    /// The runs of a dead node: crashed and cancelled (empty when it was dead already).
    NodeDead {
        /// Now Crashed.
        crashed: Vec<FlowRunId>,
        /// Now Cancelled.
        cancelled: Vec<FlowRunId>,
    },
    /// A run resumed under this epoch, or not.
    Resumed(Result<Epoch, Refusal>),
    /// A lease command's answer.
    Lease(LeaseReply),
}

/// What applying a [`ControlCommand`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlOutcome {
    /// The answer.
    pub reply: ControlReply,
    /// The records the run command wrote (see [`crate::apply::Outcome::writes`]).
    pub writes: Vec<Write>,
}

impl ControlOutcome {
    /// An outcome that wrote nothing.
    pub fn reply(reply: ControlReply) -> Self {
        ControlOutcome {
            reply,
            writes: Vec::new(),
        }
    }

    /// The flow runs the command changed.
    pub fn flow_runs(&self) -> impl Iterator<Item = FlowRunId> + '_ {
        self.writes.iter().filter_map(|w| match w {
            Write::FlowRun(id) => Some(*id),
            _ => None,
        })
    }
}

impl ControlCommand {
    /// A short name of the command's kind, for traces.
    pub fn kind(&self) -> &'static str {
        match self {
            ControlCommand::Client { command, .. } => command.kind(),
            ControlCommand::Assign { .. } => "assign",
            ControlCommand::Propose { .. } => "propose",
            ControlCommand::Reclaim { .. } => "reclaim",
            ControlCommand::NodeDead { .. } => "node-dead",
            ControlCommand::Resume { .. } => "resume",
            ControlCommand::Lease(LeaseCommand::Acquire { .. }) => "lease-acquire",
            ControlCommand::Lease(LeaseCommand::Renew { .. }) => "lease-renew",
            ControlCommand::Lease(LeaseCommand::Release { .. }) => "lease-release",
            ControlCommand::Lease(LeaseCommand::Expire { .. }) => "lease-expire",
        }
    }
}
