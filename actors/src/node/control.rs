//! The control actor, on the control node: the cluster's one entrance to the control state,
//! and the driver of the [`ControlMachine`]. It takes commands and reads from workers (in order,
//! durable before it answers) and serves the client protocol; every live decision —
//! membership, placement, dispatch, tag-limit slots — is the control machine's, a pure machine in
//! the runtime crate: this actor turns messages into its inputs and carries out its effects
//! (the log, messages to nodes, reads of the store).

use std::sync::Arc;
use std::time::Duration;

use flotilla_cluster::wire::{
    ClusterStatus, ErrorKind, LimitChange, MemberStatus, QueueChange, QueueInfo, Request, Response,
    WAIT_MS_MAX, WireError,
};
use flotilla_runtime::control::machine::{
    ControlConfig, ControlMachine, Effect, Input, Notice, Running, SlotAnswer, resume_after_loss,
};
use flotilla_runtime::control::{Placement, RequestId, SlotRequest};
use flotilla_runtime::{
    Command, Decision, FlowRunId, NewFlowRun, NodeId, Proposal, Reply, RetryRequest, State, StateName,
    StateType, TaskRunId, Timestamp, codec,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;
use rand::SeedableRng;
use rand::rngs::SmallRng;

mod answers;
mod args;
mod effects;
mod msg;
mod requests;

pub use args::{ControlArgs, MembershipSettings};
pub use msg::ControlMsg;

pub(crate) use effects::{placement_of, send_agent};
use effects::{reload_settings, replace};

pub use flotilla_runtime::control::machine::LATE_AFTER;

use super::agent::{AgentMsg, agent_of};
use crate::engine::FlowFn;
use crate::engine::results::ResultStore;
use crate::persistence::{
    PAGE_MAX, PersistError, PersistenceHandle, Read, ReadReply, RunFilter, SubmitResult,
};

/// The process group of the control actor.
pub const CONTROL_GROUP: &str = "flotilla.control";

/// The control actor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Control;

/// Where a task run waiting for slots is answered.
type SlotReply = RpcReplyPort<Vec<u8>>;

/// The control actor's state.
pub struct ControlState {
    persistence: PersistenceHandle,
    /// The live decisions.
    machine: ControlMachine<SlotReply>,
    rng: SmallRng,
    /// Large results.
    results: ResultStore,
    /// The flows this node knows: their parameters are checked and their options applied when
    /// a run is created (a flow only other nodes know is checked when it runs).
    flows: std::collections::HashMap<String, Arc<dyn FlowFn>>,
    /// Their options, which the runs made here take.
    catalog: crate::engine::FlowCatalog,
    /// How many answers to mutating requests are remembered, and how long.
    answers: super::replies::AnswerBounds,
    /// Requests being answered, and every try of each waiting for the answer: a try that
    /// arrives meanwhile (from this node or another) waits for the first answer rather than
    /// act again.
    asking: std::collections::HashMap<RequestId, Vec<RpcReplyPort<Vec<u8>>>>,
}

impl std::fmt::Debug for ControlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlState")
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

fn now() -> Timestamp {
    Timestamp::from(chrono::Utc::now())
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    codec::encode(v).unwrap_or_default()
}

/// A message's payload decoded, or None (and a log line naming `what`).
fn decoded<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Option<T> {
    codec::decode(bytes)
        .map_err(|e| tracing::error!(error = %e, "{what} could not be decoded"))
        .ok()
}

/// Answers a request that could not be decoded.
fn undecodable(reply: RpcReplyPort<Vec<u8>>, e: impl std::fmt::Display) {
    let _ = reply.send(encode(&refused(
        ErrorKind::Protocol,
        format!("an undecodable request: {e}"),
    )));
}

fn refused(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error(WireError::new(kind, message))
}

fn persist_err(e: PersistError) -> Response {
    refused(ErrorKind::Unavailable, e.to_string())
}

impl ControlState {
    fn status(&self) -> ClusterStatus {
        ClusterStatus {
            nodes: self.machine.members(),
        }
    }

    /// A member's heartbeat: the flows' options it runs are learned, and the cluster's status
    /// is the answer.
    fn heartbeat(&mut self, report: MemberStatus) -> ClusterStatus {
        for (flow, o) in &report.flow_options {
            self.catalog.learn(flow, o);
        }
        self.drive(Input::Heartbeat(report));
        self.status()
    }

    fn tid(&mut self) -> flotilla_runtime::TransitionId {
        flotilla_runtime::TransitionId::new(now(), &mut self.rng)
    }
}

/// The registered name of the control actor (local lookups).
pub const CONTROL_NAME: &str = "flotilla.control";

impl Actor for Control {
    type Msg = ControlMsg;
    type State = ControlState;
    type Arguments = ControlArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join(CONTROL_GROUP.to_owned(), vec![myself.get_cell()]);
        myself.send_interval(args.settings.check_every, || ControlMsg::Tick);
        effects::follow_ends(args.persistence.clone(), myself.clone());
        Ok(ControlState {
            persistence: args.persistence,
            results: args.results,
            machine: ControlMachine::new(ControlConfig {
                unreachable_after: args.settings.unreachable_after,
                late_after: args.settings.late_after,
            }),
            rng: SmallRng::seed_from_u64(now().as_micros() as u64),
            catalog: args.catalog,
            flows: args.flows.into_iter().map(|f| (f.name().to_owned(), f)).collect(),
            answers: args.answers,
            asking: Default::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ControlMsg::Submit(bytes, reply) => s.submit(&bytes, reply),
            ControlMsg::Read(bytes, reply) => {
                let p = s.persistence.clone();
                tokio::spawn(async move {
                    let r = match codec::decode::<Read>(&bytes) {
                        Ok(read) => p.read(read).await,
                        Err(e) => Err(PersistError::Read(format!("an undecodable read: {e}"))),
                    };
                    let _ = reply.send(encode(&r));
                });
            }
            ControlMsg::Heartbeat(bytes, reply) => {
                if let Some(report) = decoded::<MemberStatus>(&bytes, "a heartbeat") {
                    let _ = reply.send(encode(&s.heartbeat(report)));
                }
            }
            ControlMsg::Request(bytes, reply) => match codec::decode::<Request>(&bytes) {
                Ok(request) => s.request(request, reply),
                Err(e) => undecodable(reply, e),
            },
            ControlMsg::Asked(bytes, reply) => s.asked(&bytes, reply, &myself),
            ControlMsg::Answered(bytes) => s.answered(&bytes),
            ControlMsg::Place(bytes) => {
                if let Some(p) = decoded(&bytes, "a placement") {
                    s.drive(Input::Due(p));
                }
            }
            ControlMsg::Ended(bytes) => {
                if let Some(run) = super::agent::id_of(&bytes) {
                    s.drive(Input::Ended(run));
                }
            }
            ControlMsg::TakeBack(bytes) => {
                if let Some(p) = decoded(&bytes, "a placement") {
                    s.drive(Input::TakeBack(p));
                }
            }
            ControlMsg::Restore(bytes) => {
                if let Some(running) = decoded(&bytes, "the runs under way") {
                    s.drive(Input::Restore(running));
                }
            }
            ControlMsg::Queues(bytes) => {
                if let Some(queues) = decoded(&bytes, "the work queues") {
                    s.drive(Input::Queues(queues));
                }
            }
            ControlMsg::Limits(bytes) => {
                if let Some(limits) = decoded(&bytes, "the tag limits") {
                    s.drive(Input::Limits(limits));
                }
            }
            ControlMsg::Holds(bytes) => {
                if let Some(holds) = decoded(&bytes, "the slot holdings") {
                    s.drive(Input::Holds(holds));
                }
            }
            ControlMsg::Tick => s.drive(Input::Tick),
            ControlMsg::Resumed(bytes) => {
                if let Some(ids) = decoded(&bytes, "resumed runs") {
                    effects::place_resumed(s.persistence.clone(), ids);
                }
            }
            ControlMsg::AcquireSlots(bytes, reply) => match decoded(&bytes, "a slot request") {
                Some(SlotRequest::Acquire { holder, node, tags }) => s.drive(Input::Acquire {
                    holder,
                    node,
                    tags,
                    reply,
                }),
                other => tracing::warn!(request = ?other, "a slot request that is not an acquire"),
            },
            ControlMsg::RenewSlots(bytes, reply) => match decoded(&bytes, "a slot request") {
                Some(SlotRequest::Renew { holder, node, tags }) => s.drive(Input::Renew {
                    holder,
                    node,
                    tags,
                    reply,
                }),
                other => tracing::warn!(request = ?other, "a slot request that is not a renewal"),
            },
            ControlMsg::Slots(bytes) => match decoded(&bytes, "a slot request") {
                Some(SlotRequest::Release(holders)) => s.drive(Input::Release(holders)),
                other => tracing::warn!(request = ?other, "a slot request sent without a reply port"),
            },
        }
        Ok(())
    }
}
