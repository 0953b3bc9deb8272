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
use flotilla_runtime::control::{Placement, SlotRequest};
use flotilla_runtime::{
    Command, Decision, FlowRunId, NewFlowRun, NodeId, Proposal, Reply, RetryRequest, State, StateName,
    StateType, TaskRunId, Timestamp, codec,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;
use rand::SeedableRng;
use rand::rngs::SmallRng;

mod answers;
mod effects;
mod requests;

use effects::{ended_run, reload_settings, replace, restore};
pub(crate) use effects::{placement_of, send_agent};

pub use flotilla_runtime::control::machine::LATE_AFTER;

use super::agent::{AgentMsg, agent_of};
use crate::engine::FlowFn;
use crate::engine::results::ResultStore;
use crate::persistence::{
    PAGE_MAX, PersistError, PersistenceHandle, Read, ReadReply, RunFilter, SubmitResult,
};

/// The process group of the control actor.
pub const CONTROL_GROUP: &str = "flotilla.control";

/// Messages of the control actor (remotable: every payload is encoded bytes).
#[derive(RactorClusterMessage)]
#[allow(missing_debug_implementations)]
pub enum ControlMsg {
    /// Commands, in order (encoded `Vec<Command>`); the answer is the encoded `Vec<SubmitResult>`.
    #[rpc]
    Submit(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// A read (encoded `Read`); the answer is the encoded `Result<ReadReply, PersistError>`.
    #[rpc]
    Read(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// A member's report (encoded `MemberStatus`); the answer is the encoded `ClusterStatus`.
    #[rpc]
    Heartbeat(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// A client request (encoded `Request`); the answer is the encoded `Response`.
    #[rpc]
    Request(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// A mutating client request with the client's id for it (encoded `(RequestId, Request)`):
    /// answered once, the answer remembered in the log, so that the request sent again — even
    /// after a restart of this node — gets the first answer instead of acting twice.
    #[rpc]
    Asked(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// The answer to an asked request (encoded `(RequestId, answer)`), remembered: it goes to
    /// every try of the request that arrived meanwhile.
    Answered(Vec<u8>),
    /// Place a run (an encoded [`Placement`]) on a live node that runs its flow and serves its
    /// queue, when its queue and deployment let it go.
    Place(Vec<u8>),
    /// A flow run ended (its id's 16 bytes): its slots free.
    Ended(Vec<u8>),
    /// The runs running now (encoded `Vec<Running>`), read back after a start or a missed event.
    Restore(Vec<u8>),
    /// The work queues now (encoded `Vec<WorkQueue>`).
    Queues(Vec<u8>),
    /// The tag limits now (encoded `Vec<ConcurrencyLimit>`).
    Limits(Vec<u8>),
    /// The slot holdings recorded before a start (encoded
    /// `Option<Vec<(tag, TaskRunId, NodeId)>>`; None: never recorded).
    Holds(Vec<u8>),
    /// A task run asks for slots of its tags (an encoded `SlotRequest::Acquire`); the answer, an
    /// encoded `SlotGrant`, comes when it holds them.
    #[rpc]
    AcquireSlots(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// Leases released (an encoded `SlotRequest::Release`).
    Slots(Vec<u8>),
    /// A holder renews its leases (an encoded `SlotRequest::Renew`); the answer, an encoded
    /// `bool`, says whether it holds them (false: it lost its slots and must stop).
    #[rpc]
    RenewSlots(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// Runs a restarted node resumed (their ids' 16 bytes each, encoded): placed as they are
    /// now, under their queue's and deployment's limits.
    Resumed(Vec<u8>),
    /// Time to look for silent members.
    Tick,
    /// A run handed to a node that never started it, still waiting (an encoded [`Placement`]):
    /// placed again.
    TakeBack(Vec<u8>),
}

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
    asking: std::collections::HashMap<flotilla_runtime::control::RequestId, Vec<RpcReplyPort<Vec<u8>>>>,
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
    pub answers: super::replies::AnswerBounds,
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
        // Runs that end free their slots: the store's events say when.
        {
            let p = args.persistence.clone();
            let me = myself.clone();
            let mut events = p.subscribe();
            tokio::spawn(async move {
                restore(&p, &me).await;
                loop {
                    match events.recv().await {
                        Ok(e) => {
                            if let Some(run) = ended_run(&e) {
                                let _ = me.cast(ControlMsg::Ended(run.as_bytes().to_vec()));
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(
                                missed = n,
                                "the control actor missed events; reading back what runs"
                            );
                            restore(&p, &me).await;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
            });
        }
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
            ControlMsg::Submit(bytes, reply) => {
                // Queued in order at once; answered when durable, without holding the actor.
                let p = s.persistence.clone();
                // A claim counts only from a node whose membership is alive: one declared
                // unreachable has had its runs crashed and must not take new ones.
                let answers: Result<Vec<_>, _> = codec::decode::<Vec<Command>>(&bytes).map(|cmds| {
                    cmds.into_iter()
                        .map(|c| match s.machine.admit(&c) {
                            Err(refusal) => Err(refusal),
                            Ok(()) => Ok(p.enqueue(c)),
                        })
                        .collect()
                });
                tokio::spawn(async move {
                    let results: Vec<SubmitResult> = match answers {
                        Ok(answers) => {
                            let mut out = Vec::with_capacity(answers.len());
                            for a in answers {
                                out.push(match a {
                                    Ok(a) => a.await.unwrap_or(Err(PersistError::Stopped)),
                                    Err(refusal) => Ok(Err(refusal)),
                                });
                            }
                            out
                        }
                        Err(e) => vec![Err(PersistError::Encode(format!("an undecodable batch: {e}")))],
                    };
                    let _ = reply.send(encode(&results));
                });
            }
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
                if let Ok(report) = codec::decode::<MemberStatus>(&bytes) {
                    let status = s.heartbeat(report);
                    let _ = reply.send(encode(&status));
                }
            }
            ControlMsg::Request(bytes, reply) => match codec::decode::<Request>(&bytes) {
                Ok(request) => s.request(request, reply),
                Err(e) => {
                    let _ = reply.send(encode(&refused(
                        ErrorKind::Protocol,
                        format!("an undecodable request: {e}"),
                    )));
                }
            },
            ControlMsg::Asked(bytes, reply) => {
                match codec::decode::<(flotilla_runtime::control::RequestId, Request)>(&bytes) {
                    Ok((id, request)) => match s.asking.entry(id) {
                        std::collections::hash_map::Entry::Occupied(mut tries) => tries.get_mut().push(reply),
                        std::collections::hash_map::Entry::Vacant(first) => {
                            first.insert(vec![reply]);
                            answers::answer_once(
                                s.persistence.clone(),
                                myself.clone(),
                                s.answers,
                                (id, request),
                            );
                        }
                    },
                    Err(e) => {
                        let _ = reply.send(encode(&refused(
                            ErrorKind::Protocol,
                            format!("an undecodable request: {e}"),
                        )));
                    }
                }
            }
            ControlMsg::Answered(bytes) => {
                match codec::decode::<(flotilla_runtime::control::RequestId, Vec<u8>)>(&bytes) {
                    Ok((id, answer)) => {
                        for reply in s.asking.remove(&id).unwrap_or_default() {
                            let _ = reply.send(answer.clone());
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "an undecodable answer"),
                }
            }
            ControlMsg::Place(bytes) => match codec::decode::<Placement>(&bytes) {
                Ok(p) => s.drive(Input::Due(p)),
                Err(e) => tracing::error!(error = %e, "an undecodable placement"),
            },
            ControlMsg::Ended(bytes) => {
                if let Some(run) = super::agent::id_of(&bytes) {
                    s.drive(Input::Ended(run));
                }
            }
            ControlMsg::TakeBack(bytes) => match codec::decode::<Placement>(&bytes) {
                Ok(p) => s.drive(Input::TakeBack(p)),
                Err(e) => tracing::error!(error = %e, "an undecodable placement"),
            },
            ControlMsg::Restore(bytes) => match codec::decode::<Vec<Running>>(&bytes) {
                Ok(running) => s.drive(Input::Restore(running)),
                Err(e) => tracing::error!(error = %e, "undecodable runs"),
            },
            ControlMsg::Queues(bytes) => match codec::decode::<Vec<flotilla_runtime::WorkQueue>>(&bytes) {
                Ok(queues) => s.drive(Input::Queues(queues)),
                Err(e) => tracing::error!(error = %e, "undecodable work queues"),
            },
            ControlMsg::Tick => s.drive(Input::Tick),
            ControlMsg::Resumed(bytes) => match codec::decode::<Vec<[u8; 16]>>(&bytes) {
                Ok(ids) => {
                    let p = s.persistence.clone();
                    tokio::spawn(async move {
                        for id in ids {
                            if let Ok(Some(r)) = p.flow_run(FlowRunId::from_bytes(id)).await
                                && r.lifecycle.state.kind == StateType::Scheduled
                            {
                                replace(&placement_of(&p, &r, now()).await);
                            }
                        }
                    });
                }
                Err(e) => tracing::error!(error = %e, "undecodable resumed runs"),
            },
            ControlMsg::Holds(bytes) => {
                match codec::decode::<Option<Vec<(String, TaskRunId, NodeId)>>>(&bytes) {
                    Ok(holds) => s.drive(Input::Holds(holds)),
                    Err(e) => tracing::error!(error = %e, "undecodable slot holdings"),
                }
            }
            ControlMsg::Limits(bytes) => {
                match codec::decode::<Vec<flotilla_runtime::ConcurrencyLimit>>(&bytes) {
                    Ok(limits) => s.drive(Input::Limits(limits)),
                    Err(e) => tracing::error!(error = %e, "undecodable tag limits"),
                }
            }
            ControlMsg::AcquireSlots(bytes, reply) => match codec::decode::<SlotRequest>(&bytes) {
                Ok(SlotRequest::Acquire { holder, node, tags }) => s.drive(Input::Acquire {
                    holder,
                    node,
                    tags,
                    reply,
                }),
                Ok(other) => tracing::warn!(request = ?other, "a slot request that is not an acquire"),
                Err(e) => tracing::error!(error = %e, "an undecodable slot request"),
            },
            ControlMsg::RenewSlots(bytes, reply) => match codec::decode::<SlotRequest>(&bytes) {
                Ok(SlotRequest::Renew { holder, node, tags }) => s.drive(Input::Renew {
                    holder,
                    node,
                    tags,
                    reply,
                }),
                Ok(other) => tracing::warn!(request = ?other, "a slot request that is not a renewal"),
                Err(e) => tracing::error!(error = %e, "an undecodable slot request"),
            },
            ControlMsg::Slots(bytes) => match codec::decode::<SlotRequest>(&bytes) {
                Ok(SlotRequest::Release(holders)) => s.drive(Input::Release(holders)),
                Ok(other) => tracing::warn!(request = ?other, "a slot request sent without a reply port"),
                Err(e) => tracing::error!(error = %e, "an undecodable slot request"),
            },
        }
        Ok(())
    }
}
