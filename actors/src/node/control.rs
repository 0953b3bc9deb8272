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
use flotilla_runtime::control::{Placement, RequestId, SlotGrant, SlotRequest};
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
mod events;
mod msg;
mod requests;
mod settings;
pub(crate) use requests::read_request;
pub(crate) use settings::unseal;

pub use args::{ControlArgs, MembershipSettings};
pub use msg::ControlMsg;

pub(crate) use effects::{placement_of, send_agent};
use effects::{reload_settings, replace};

pub use flotilla_runtime::control::machine::LATE_AFTER;

use super::agent::{AgentMsg, agent_of};
use super::typed::Wire;
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
enum SlotReply {
    /// An acquire's: the grant.
    Acquire(RpcReplyPort<Wire<SlotGrant>>),
    /// A renewal's: whether the holder still holds its slots.
    Renew(RpcReplyPort<Wire<bool>>),
}

impl SlotReply {
    /// Answers: a grant to an acquire, whether it holds them to a renewal. False when nobody
    /// waits for the answer any more.
    fn send(self, answer: SlotAnswer) -> bool {
        match (self, answer) {
            (SlotReply::Acquire(port), SlotAnswer::Grant(grant)) => port.send(Wire::new(grant)).is_ok(),
            (SlotReply::Renew(port), SlotAnswer::Renewed(held)) => port.send(Wire::new(held)).is_ok(),
            (_, answer) => {
                tracing::error!(?answer, "a slot answer of the wrong kind");
                false
            }
        }
    }
}

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
    asking: std::collections::HashMap<RequestId, Vec<RpcReplyPort<Wire<Response>>>>,
    /// This voter's replication, when the control state is replicated.
    replication: Option<crate::replication::voter::Voter>,
    /// What seals and opens blocks' secret fields.
    secrets: Option<Arc<flotilla_cluster::secrets::SecretsKey>>,
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

/// A message's payload, or None (and a log line naming `what`) if it could not be decoded.
fn got<T>(payload: Wire<T>, what: &str) -> Option<T> {
    payload
        .get()
        .map_err(|e| tracing::error!(error = %e, "{what} could not be decoded"))
        .ok()
}

/// Answers a request that could not be decoded.
fn undecodable(reply: RpcReplyPort<Wire<Response>>, e: impl std::fmt::Display) {
    let _ = reply.send(Wire::new(refused(
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
    /// Feeds the machine the input a message's payload makes (a payload that could not be
    /// decoded is logged and dropped).
    fn feed<T>(&mut self, payload: Wire<T>, what: &str, input: impl FnOnce(T) -> Input<SlotReply>) {
        if let Some(value) = got(payload, what) {
            self.drive(input(value));
        }
    }

    fn status(&self) -> ClusterStatus {
        ClusterStatus {
            nodes: self.machine.members(),
            replication: self
                .replication
                .as_ref()
                .map(crate::replication::voter::Voter::status),
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

/// The registered name of the control actor.
pub const CONTROL_NAME: &str = "flotilla.control";

/// This node's control actor, while it leads: the local member of the control group. Never
/// looked up by its registered name: when a remote actor goes, ractor drops its name from
/// this process's registry whichever actor holds it there, so a new leader's control actor
/// lost its name once the old leader's session closed.
pub(crate) fn local_control() -> Option<ActorRef<ControlMsg>> {
    ractor::pg::get_local_members(&CONTROL_GROUP.to_owned())
        .into_iter()
        .next()
        .map(ActorRef::from)
}

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
        // A new leader has heard from nobody yet: every replica is expected to speak, and one
        // that never does (the leader it replaces, often) is declared dead like any node.
        let expected: Vec<NodeId> = args
            .replication
            .as_ref()
            .map(|v| {
                v.status()
                    .members
                    .into_iter()
                    .filter_map(|m| m.name.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let mut state = ControlState {
            persistence: args.persistence,
            results: args.results,
            machine: ControlMachine::new(ControlConfig {
                unreachable_after: args.settings.unreachable_after,
                late_after: args.settings.late_after,
                // A deposed leader answers renewals until it has heard no quorum for a
                // second (then it answers none): leases restored here outlast that, with room
                // for messages on the way.
                lease_grace: if args.replication.is_some() {
                    crate::replication::machine::QUORUM_LOST_AFTER * 2
                } else {
                    Duration::ZERO
                },
            }),
            rng: SmallRng::from_rng(&mut rand::rng()),
            catalog: args.catalog,
            flows: args.flows.into_iter().map(|f| (f.name().to_owned(), f)).collect(),
            answers: args.answers,
            replication: args.replication,
            secrets: args.secrets,
            asking: Default::default(),
        };
        state.drive(Input::Expect(expected));
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ControlMsg::Submit(commands, reply) => s.submit(commands, reply),
            ControlMsg::Read(read, reply) => {
                let p = s.persistence.clone();
                tokio::spawn(async move {
                    let r = match read.get() {
                        Ok(read) => p.read(read).await,
                        Err(e) => Err(PersistError::Read(format!("an undecodable read: {e}"))),
                    };
                    let _ = reply.send(Wire::new(r));
                });
            }
            ControlMsg::Heartbeat(report, reply) => {
                if let Some(report) = got(report, "a heartbeat") {
                    let _ = reply.send(Wire::new(s.heartbeat(report)));
                }
            }
            ControlMsg::Request(request, reply) => match request.get() {
                Ok(request) => s.request(request, reply),
                Err(e) => undecodable(reply, e),
            },
            ControlMsg::Asked(asked, reply) => s.asked(asked, reply, &myself),
            ControlMsg::Answered(answer) => s.answered(answer),
            ControlMsg::Place(p) => s.feed(p, "a placement", |p| {
                tracing::debug!(flow_run = %p.run, "a run to place");
                Input::Due(p)
            }),
            ControlMsg::Ended(run) => s.feed(run, "a run that ended", Input::Ended),
            ControlMsg::TakeBack(p) => s.feed(p, "a placement", Input::TakeBack),
            ControlMsg::Restore(running) => s.feed(running, "the runs under way", Input::Restore),
            ControlMsg::Held(runs) => s.feed(runs, "the runs held for the scheduler", Input::Held),
            ControlMsg::Queues(queues) => s.feed(queues, "the work queues", Input::Queues),
            ControlMsg::Limits(limits) => s.feed(limits, "the tag limits", Input::Limits),
            ControlMsg::Holds(holds) => s.feed(holds, "the slot holdings", Input::Holds),
            ControlMsg::Tick => s.drive(Input::Tick),
            ControlMsg::Resumed(ids) => {
                if let Some(ids) = got(ids, "resumed runs") {
                    effects::place_resumed(s.persistence.clone(), ids);
                }
            }
            ControlMsg::AcquireSlots(request, reply) => match got(request, "a slot request") {
                Some(SlotRequest::Acquire { holder, node, tags }) => s.drive(Input::Acquire {
                    holder,
                    node,
                    tags,
                    reply: SlotReply::Acquire(reply),
                }),
                other => tracing::warn!(request = ?other, "a slot request that is not an acquire"),
            },
            ControlMsg::RenewSlots(request, reply) => match got(request, "a slot request") {
                Some(SlotRequest::Renew { holder, node, tags }) => s.drive(Input::Renew {
                    holder,
                    node,
                    tags,
                    reply: SlotReply::Renew(reply),
                }),
                other => tracing::warn!(request = ?other, "a slot request that is not a renewal"),
            },
            ControlMsg::Slots(request) => match got(request, "a slot request") {
                Some(SlotRequest::Release(holders)) => s.drive(Input::Release(holders)),
                other => tracing::warn!(request = ?other, "a slot request sent without a reply port"),
            },
        }
        Ok(())
    }
}
