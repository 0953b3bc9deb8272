//! What the control machine asks its driver to do, in order.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::command::{ClientResult, ControlCommand};
use super::ids::{Incarnation, RequestId};
use super::input::TimerKind;
use crate::ids::{Epoch, FlowRunId, NodeId, TaskRunId, TransitionId};
use crate::state::StateType;
use crate::time::Timestamp;

/// One effect of [`super::ControlMachine::handle`]; the driver carries them out in order.
#[derive(Clone, Debug, PartialEq)]
// Most effects are appends and sends: boxing them would cost an allocation each for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Effect {
    /// Append the command to the log, apply it, then hand it back as
    /// [`super::Input::Applied`].
    Append(ControlCommand),
    /// Answer a client (only ever about something durable).
    Reply {
        /// The request answered.
        request_id: RequestId,
        /// The answer.
        result: ClientResult,
    },
    /// Send a node a message (only ever about something durable).
    Send {
        /// The node.
        node: NodeId,
        /// The incarnation addressed: a node in another life drops the message.
        incarnation: Incarnation,
        /// The message.
        msg: ToNodeMsg,
    },
    /// Fire [`super::Input::Timer`] at `at` (replacing the timer of the same kind).
    SetTimer {
        /// When.
        at: Timestamp,
        /// Which.
        timer: TimerKind,
    },
}

/// A message from the control plane to a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToNodeMsg {
    /// Run this run under this epoch (it is assigned to the node, durably).
    StartRun {
        /// The run.
        run: FlowRunId,
        /// The epoch to carry on every proposal.
        epoch: Epoch,
    },
    /// The run is being cancelled: stop it and propose Cancelled.
    CancelRun {
        /// The run.
        run: FlowRunId,
        /// The node's epoch of it.
        epoch: Epoch,
    },
    /// Stop your copy of this run under this epoch at once, proposing nothing: it is not
    /// yours (any more).
    StopRun {
        /// The run.
        run: FlowRunId,
        /// The epoch of the copy to stop (None: whatever copy it has).
        epoch: Option<Epoch>,
    },
    /// The decision on a proposal: the run's state type after it.
    Decided {
        /// The run.
        run: FlowRunId,
        /// The epoch it was proposed under.
        epoch: Epoch,
        /// The proposal's transition id.
        transition: TransitionId,
        /// The run's state type now.
        state: StateType,
    },
    /// The holder holds its slots (granted or renewed) until `sent_at` + `ttl` by the node's
    /// clock; it renews before that, and stops on its own if no renewal is acknowledged in time.
    LeaseGranted {
        /// The holder.
        holder: TaskRunId,
        /// The lease's TTL (None: no tag is limited, nothing to renew).
        ttl: Option<Duration>,
        /// The `sent_at` of the request granted.
        sent_at: Timestamp,
    },
    /// The holder's lease lapsed and its slot went to another: it must stop.
    LeaseLost {
        /// The holder.
        holder: TaskRunId,
    },
    /// The control plane does not know this node (it restarted, or the join was lost): send
    /// [`super::NodeMsg::Join`] again.
    Rejoin,
    /// This incarnation was declared dead: stop every run and lease, and come back under a
    /// higher incarnation.
    Dead,
}
