//! What the control machine is told: client requests, node messages, timers, and the commands
//! the driver applied.

use serde::{Deserialize, Serialize};

use super::command::{ControlCommand, ControlOutcome};
use super::ids::{Incarnation, RequestId};
use crate::ids::{Epoch, FlowRunId, LogIndex, NodeId, TaskRunId, TransitionId};
use crate::state::State;
use crate::time::Timestamp;
use crate::work_queue::Setting;

/// One input of [`super::ControlMachine::handle`].
#[derive(Clone, Debug, PartialEq)]
// Inputs are handled one at a time and moved, never stored in bulk: no box needed.
#[allow(clippy::large_enum_variant)]
pub enum Input {
    /// The machine (re)starts: it rebuilds its memory from the applied state and arms its timer.
    Started,
    /// A client request.
    Client {
        /// The client's id for the request (a resend carries the same one).
        request_id: RequestId,
        /// The request.
        request: ClientRequest,
    },
    /// A message from a node.
    Node {
        /// The sending node.
        node: NodeId,
        /// The message.
        msg: NodeMsg,
    },
    /// A timer set by [`super::Effect::SetTimer`] is due.
    Timer(TimerKind),
    /// A command the machine appended was applied (durable, in log order).
    Applied {
        /// Its position in the log.
        index: LogIndex,
        /// The command.
        command: ControlCommand,
        /// What applying it did.
        outcome: ControlOutcome,
    },
}

/// A new flow run, as a client asks for it (its id is derived from the request id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateRun {
    /// The flow's registered name.
    pub flow_name: String,
    /// Parameters, as JSON.
    #[serde(default)]
    pub parameters: serde_json::Value,
    /// The user's idempotency key: creating again with it returns the existing run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The work queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_queue: Option<String>,
    /// Whether a crash of its node resumes it elsewhere.
    #[serde(default)]
    pub resume: bool,
    /// When it is due (now when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<Timestamp>,
}

impl CreateRun {
    /// A run of `flow` with no parameters, due now.
    pub fn of(flow: impl Into<String>) -> Self {
        CreateRun {
            flow_name: flow.into(),
            parameters: serde_json::Value::Null,
            idempotency_key: None,
            tags: Vec::new(),
            work_queue: None,
            resume: false,
            scheduled_time: None,
        }
    }
}

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Create a flow run.
    CreateRun(CreateRun),
    /// Cancel a flow run.
    CancelRun {
        /// The run.
        run: FlowRunId,
    },
    /// Create or replace a work queue or a tag limit.
    PutSetting(Setting),
}

/// A message from a node to the control plane. Each carries the sender's incarnation, so that
/// a message from an earlier life of the node is recognised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum NodeMsg {
    /// The node (re)starts, or answers [`super::ToNodeMsg::Rejoin`].
    Join {
        /// Its incarnation.
        incarnation: Incarnation,
        /// How many runs it runs at once.
        slots: u32,
        /// The flows it can run.
        flows: Vec<String>,
    },
    /// The node is alive, and runs these runs under these epochs (including runs whose last
    /// proposal is not acknowledged yet).
    Heartbeat {
        /// Its incarnation.
        incarnation: Incarnation,
        /// Grows by one per heartbeat of the incarnation: older or repeated ones are ignored.
        seq: u64,
        /// The runs it runs.
        running: Vec<(FlowRunId, Epoch)>,
    },
    /// The next state of a run the node runs.
    StateProposal {
        /// Its incarnation.
        incarnation: Incarnation,
        /// The run.
        run: FlowRunId,
        /// The epoch under which the node runs it (a proposal without one is refused).
        epoch: Option<Epoch>,
        /// The proposed state.
        state: State,
        /// The node's id for this transition (a resend carries the same one).
        transition: TransitionId,
    },
    /// A slot of every limited tag among `tags`, for `holder`.
    Acquire {
        /// Its incarnation.
        incarnation: Incarnation,
        /// The task holding the slots.
        holder: TaskRunId,
        /// Its tags.
        tags: Vec<String>,
        /// The node's time when it sent this: echoed in the grant; the holder counts its lease
        /// from it.
        sent_at: Timestamp,
    },
    /// Keep the leases of `holder` (re-taken if they lapsed and there is room).
    Renew {
        /// Its incarnation.
        incarnation: Incarnation,
        /// The holder.
        holder: TaskRunId,
        /// Its tags.
        tags: Vec<String>,
        /// The node's time when it sent this (echoed).
        sent_at: Timestamp,
    },
    /// Give these holders' slots back.
    Release {
        /// Its incarnation.
        incarnation: Incarnation,
        /// The holders.
        holders: Vec<TaskRunId>,
    },
}

impl NodeMsg {
    /// The sender's incarnation.
    pub fn incarnation(&self) -> Incarnation {
        match self {
            NodeMsg::Join { incarnation, .. }
            | NodeMsg::Heartbeat { incarnation, .. }
            | NodeMsg::StateProposal { incarnation, .. }
            | NodeMsg::Acquire { incarnation, .. }
            | NodeMsg::Renew { incarnation, .. }
            | NodeMsg::Release { incarnation, .. } => *incarnation,
        }
    }
}

/// The machine's timers (one of each kind at a time; setting one again moves it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TimerKind {
    /// Look for silent nodes, lapsed leases and due runs.
    Tick,
}
