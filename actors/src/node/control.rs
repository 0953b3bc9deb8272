//! The control actor, on the control node: the cluster's one entrance to the control state.
//! It takes commands and reads from workers (in order, durable before it answers), keeps the
//! membership from their heartbeats, marks a member unreachable after a silence and crashes
//! its runs, places flow runs on live nodes, and serves the client protocol.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_cluster::wire::{
    ClusterStatus, ErrorKind, LimitChange, MemberStatus, QueueChange, QueueInfo, Request, Response,
    WAIT_MS_MAX, WireError,
};
use flotilla_runtime::{
    Command, Decision, FlowRunId, NewFlowRun, NodeId, Proposal, Reply, RetryRequest, SlotChange, State,
    StateName, StateType, TaskRunId, Timestamp, TransitionId, codec,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;
use rand::SeedableRng;
use rand::rngs::SmallRng;

mod answers;
mod leases;
mod requests;

use super::agent::{AgentMsg, agent_of};
use super::dispatch::{Action, Dispatch, Placement};
use super::slots::{SlotGrant, SlotRequest, Slots};
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

struct Member {
    status: MemberStatus,
    last_seen: Instant,
    /// Runs placed on it since its last heartbeat.
    placed: u32,
}

/// The control actor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Control;

/// The control actor's state.
pub struct ControlState {
    persistence: PersistenceHandle,
    members: BTreeMap<NodeId, Member>,
    settings: MembershipSettings,
    rng: SmallRng,
    /// Large results.
    results: ResultStore,
    /// The flows this node knows: their parameters are checked and their options applied when
    /// a run is created (a flow only other nodes know is checked when it runs).
    flows: std::collections::HashMap<String, Arc<dyn FlowFn>>,
    /// Their options, which the runs made here take.
    catalog: crate::engine::FlowCatalog,
    /// Runs due, by queue and deployment, and those running: placed as soon as a node can
    /// take them and their limits let them.
    dispatch: Dispatch,
    /// Tag limits and their leases.
    slots: Slots<SlotWaiter>,
    /// Runs handed to nodes and not yet seen there (taken back if their node never starts them).
    handouts: flotilla_runtime::control::Handouts,
    /// Whether the runs under way were read back once since the start.
    restored: bool,
    /// How many answers to mutating requests are remembered, and how long.
    answers: super::replies::AnswerBounds,
    /// Requests being answered, and every try of each waiting for the answer: a try that
    /// arrives meanwhile (from this node or another) waits for the first answer rather than
    /// act again.
    asking: std::collections::HashMap<flotilla_runtime::control::RequestId, Vec<RpcReplyPort<Vec<u8>>>>,
    /// Whether the slot holdings were recorded before this start (a data directory from before
    /// the record has none: then new holders wait one lease TTL after a start).
    holds_known: bool,
}

/// A task run waiting for slots: who, and where to answer.
type SlotWaiter = (TaskRunId, RpcReplyPort<Vec<u8>>);

/// A run running, as read back from the store.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct Running {
    run: FlowRunId,
    queue: Option<String>,
    deployment: Option<flotilla_runtime::DeploymentId>,
    node: Option<NodeId>,
}

/// By default, a run whose scheduled time passed this long ago without starting is marked Late.
pub const LATE_AFTER: Duration = Duration::from_secs(15);

impl std::fmt::Debug for ControlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlState")
            .field("members", &self.members.len())
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
            nodes: self.members.values().map(|m| m.status.clone()).collect(),
        }
    }

    /// The live member that runs `flow` with the most free room (slots in use counting the runs
    /// placed on it since its last heartbeat).
    fn place(&mut self, flow: &str) -> Option<NodeId> {
        pick(&mut self.members, flow, None)
    }

    /// Hands out every due run that can go now; marks those its deployment holds back.
    fn pump(&mut self) {
        if self.dispatch.waiting() == 0 {
            return;
        }
        let members = &mut self.members;
        let actions = self
            .dispatch
            .dispatch(|flow, queue| pick(members, flow, Some(queue)));
        for action in actions {
            match action {
                Action::Place(p, node, marked) => {
                    // Handed out long after its time (a downtime of the control node, a busy
                    // cluster): it starts marked Late.
                    if !marked && now().saturating_since(p.due) > self.settings.late_after {
                        self.mark(p.run, State::named(StateName::Late, now()));
                    }
                    self.handouts.handed(p.run, node.clone());
                    if !send_agent(&node, AgentMsg::Run(p.run.as_bytes().to_vec())) {
                        // The node went away since its last heartbeat: the run waits again.
                        self.dispatch.ended(p.run);
                        if let Some(m) = self.members.get_mut(&node) {
                            m.status.reachable = false;
                        }
                        self.dispatch.add(p);
                    }
                }
                Action::Await(run) => self.mark(run, State::named(StateName::AwaitingConcurrencySlot, now())),
                Action::Cancel(run) => self.mark(
                    run,
                    State::named(StateName::Cancelling, now()).with_message(
                        "its deployment is at its concurrency limit (collision strategy cancel-new)",
                    ),
                ),
            }
        }
    }

    /// The node making this claim (a Pending proposal), if it is a member declared unreachable.
    fn dead_claimer(&self, c: &Command) -> Option<NodeId> {
        let Command::ProposeFlowRunState { proposal, .. } = c else {
            return None;
        };
        let node = proposal.node.as_ref()?;
        if proposal.state.kind != StateType::Pending {
            return None;
        }
        // A node not heard of yet is joining (its first heartbeat is on its way).
        match self.members.get(node) {
            Some(m) if !m.status.reachable => Some(node.clone()),
            _ => None,
        }
    }

    /// Proposes a state for a run that has not started.
    fn mark(&mut self, run: FlowRunId, state: State) {
        let proposal = Proposal::new(state, self.tid());
        drop(
            self.persistence
                .enqueue(Command::ProposeFlowRunState { run, proposal }),
        );
    }

    /// A run came due.
    fn due(&mut self, p: Placement) {
        self.dispatch.add(p);
        self.pump();
    }

    /// A run ended: its node has a free slot again.
    fn ended(&mut self, run: FlowRunId) {
        if let Some(node) = self.dispatch.ended(run)
            && let Some(m) = self.members.get_mut(&node)
        {
            if m.placed > 0 {
                m.placed -= 1;
            } else {
                m.status.slots_used = m.status.slots_used.saturating_sub(1);
            }
        }
        self.pump();
    }

    /// Marks Late the runs waiting too long, and hands out what can go.
    fn place_waiting(&mut self) {
        for run in self.dispatch.late(now(), self.settings.late_after) {
            self.mark(run, State::named(StateName::Late, now()));
        }
        self.pump();
    }

    fn tid(&mut self) -> TransitionId {
        TransitionId::new(now(), &mut self.rng)
    }

    /// Looks for members silent too long: they become unreachable and their runs crash.
    fn check(&mut self) {
        let after = self.settings.unreachable_after;
        let mut gone = Vec::new();
        for m in self.members.values_mut() {
            if m.status.reachable && m.last_seen.elapsed() > after {
                m.status.reachable = false;
                let node = m.status.name.clone();
                tracing::warn!(node = %node, silent_ms = m.last_seen.elapsed().as_millis() as u64, "member unreachable");
                // The key names the node's life that ended, never the clock: the same death
                // declared twice is one crash.
                let cmd = Command::MarkNodeCrashed {
                    node: node.clone(),
                    message: format!("node {node} became unreachable"),
                    key: format!("crash/{node}/{}", m.status.incarnation),
                };
                drop(self.persistence.enqueue(cmd));
                gone.push(node);
            }
        }
        // Runs handed to a node that died before it started them wait for another node.
        for node in gone {
            let back = self.handouts.take_node(&node);
            self.take_back(&node, back);
        }
    }

    /// Runs handed to `node` that it never started: each is placed again if it still waits
    /// (Scheduled, claimed by nobody).
    fn take_back(&self, node: &NodeId, runs: Vec<FlowRunId>) {
        for run in runs {
            tracing::warn!(%node, flow_run = %run, "a run handed to the node never started there; placing it again");
            let p = self.persistence.clone();
            tokio::spawn(async move {
                if let Ok(Some(r)) = p.flow_run(run).await
                    && r.lifecycle.state.kind == StateType::Scheduled
                    && r.owner.is_none()
                    && let Some(me) =
                        ractor::registry::where_is(CONTROL_NAME).map(ActorRef::<ControlMsg>::from)
                    && let Ok(bytes) = codec::encode(&placement_of(&p, &r, r.expected_start_time).await)
                {
                    let _ = me.cast(ControlMsg::TakeBack(bytes));
                }
            });
        }
    }

    fn heartbeat(&mut self, report: MemberStatus) -> ClusterStatus {
        // A run handed to the node and left out of its heartbeats was never started there:
        // taken back, and placed again if it still waits (fix 8).
        let back = self.handouts.heartbeat(&report.name, &report.holds);
        self.take_back(&report.name, back);
        let entry = self.members.entry(report.name.clone()).or_insert_with(|| Member {
            status: report.clone(),
            last_seen: Instant::now(),
            placed: 0,
        });
        if !entry.status.reachable {
            tracing::info!(node = %report.name, "member reachable");
        }
        for (flow, o) in &report.flow_options {
            self.catalog.learn(flow, &o.retry, o.resume);
        }
        entry.status = MemberStatus {
            reachable: true,
            last_heartbeat: Some(now()),
            holds: Vec::new(),
            flow_options: Default::default(),
            ..report
        };
        entry.last_seen = Instant::now();
        entry.placed = 0;
        self.status()
    }
}

/// The live member that runs `flow` (and serves `queue`, then only with a free slot) with the
/// most free room; the run counts against it until its next heartbeat.
fn pick(members: &mut BTreeMap<NodeId, Member>, flow: &str, queue: Option<&str>) -> Option<NodeId> {
    let load =
        |m: &Member| f64::from(m.status.slots_used + m.placed) / f64::from(m.status.slots_total.max(1));
    let best = members
        .values_mut()
        .filter(|m| {
            m.status.reachable
                && m.status.slots_total > 0
                && m.status.flows.iter().any(|f| f == flow)
                && queue.is_none_or(|q| {
                    (m.status.queues.is_empty() || m.status.queues.iter().any(|x| x == q))
                        && m.status.slots_used + m.placed < m.status.slots_total
                })
        })
        .min_by(|a, b| load(a).total_cmp(&load(b)))?;
    best.placed += 1;
    Some(best.status.name.clone())
}

/// The flow run an event says ended.
fn ended_run(e: &flotilla_runtime::Event) -> Option<FlowRunId> {
    let state = e.event.strip_prefix("flotilla.flow-run.")?;
    if !matches!(state, "Completed" | "Failed" | "Cancelled" | "Crashed") {
        return None;
    }
    e.resource.id()?.strip_prefix("flotilla.flow-run.")?.parse().ok()
}

/// Reads back the work queues and the runs that run now, for the control actor.
async fn restore(p: &PersistenceHandle, me: &ActorRef<ControlMsg>) {
    reload_settings(p, me).await;
    match p.slot_holds().await {
        Ok(holds) => {
            let _ = me.cast(ControlMsg::Holds(encode(&holds)));
        }
        Err(e) => tracing::error!(error = %e, "cannot read the slot holders"),
    }
    restore_running(p, me).await;
}

/// Reads back the work queues and tag limits, for the control actor.
async fn reload_settings(p: &PersistenceHandle, me: &ActorRef<ControlMsg>) {
    match p.settings().await {
        Ok(settings) => {
            let (mut queues, mut limits) = (Vec::new(), Vec::new());
            for s in settings {
                match s {
                    flotilla_runtime::Setting::WorkQueue(q) => queues.push(q),
                    flotilla_runtime::Setting::ConcurrencyLimit(l) => limits.push(l),
                }
            }
            let _ = me.cast(ControlMsg::Queues(encode(&queues)));
            let _ = me.cast(ControlMsg::Limits(encode(&limits)));
        }
        Err(e) => tracing::error!(error = %e, "cannot read the work queues"),
    }
}

/// Reads back the runs that run now, for the control actor.
async fn restore_running(p: &PersistenceHandle, me: &ActorRef<ControlMsg>) {
    let mut running = Vec::new();
    for state in [StateType::Pending, StateType::Running, StateType::Cancelling] {
        let mut after = None;
        loop {
            let page = match p.flow_runs(RunFilter::State(state), after, PAGE_MAX).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the runs running");
                    return;
                }
            };
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            running.extend(
                page.into_iter()
                    .filter(|r| r.parent_task_run.is_none())
                    .map(|r| Running {
                        run: r.id,
                        queue: r.work_queue.clone(),
                        deployment: r.deployment_id,
                        node: r.owner.clone(),
                    }),
            );
        }
    }
    let _ = me.cast(ControlMsg::Restore(encode(&running)));
}

/// Hands a run back to the control actor's placement (it waits until a node can take it).
fn replace(p: &Placement) {
    if let Some(cell) = ractor::registry::where_is(CONTROL_NAME)
        && let Ok(msg) = flotilla_runtime::codec::encode(p)
    {
        let _ = ActorRef::<ControlMsg>::from(cell).cast(ControlMsg::Place(msg));
    }
}

/// How a run is placed: its queue, and its deployment's limit read from the store.
pub(crate) async fn placement_of(
    p: &PersistenceHandle,
    run: &flotilla_runtime::FlowRun,
    due: Timestamp,
) -> Placement {
    let deployment = match run.deployment_id {
        Some(id) => {
            let limit = p
                .deployment(id)
                .await
                .ok()
                .flatten()
                .and_then(|d| d.concurrency_limit.map(|l| (l, d.collision)));
            Some((id, limit))
        }
        None => None,
    };
    Placement {
        run: run.id,
        flow: run.flow_name.clone(),
        due,
        queue: run.work_queue.clone(),
        deployment,
    }
}

/// Sends a node's agent a message; false (and a log line) when it cannot be reached.
pub(crate) fn send_agent(node: &NodeId, msg: AgentMsg) -> bool {
    match agent_of(node) {
        Some(agent) => match agent.cast(msg) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(%node, error = %e, "cannot reach the node's agent");
                false
            }
        },
        None => {
            tracing::warn!(%node, "the node's agent is not connected");
            false
        }
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
            members: BTreeMap::new(),
            settings: args.settings,
            rng: SmallRng::seed_from_u64(now().as_micros() as u64),
            catalog: args.catalog,
            flows: args.flows.into_iter().map(|f| (f.name().to_owned(), f)).collect(),
            dispatch: Dispatch::default(),
            slots: Slots::default(),
            handouts: Default::default(),
            restored: false,
            holds_known: false,
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
                        .map(|c| match s.dead_claimer(&c) {
                            Some(node) => Err(flotilla_runtime::Refusal::Invalid(format!(
                                "node {node} is not a live member: it cannot claim runs"
                            ))),
                            None => Ok(p.enqueue(c)),
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
                    s.pump();
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
                Ok(p) => s.due(p),
                Err(e) => tracing::error!(error = %e, "an undecodable placement"),
            },
            ControlMsg::Ended(bytes) => {
                if let Some(run) = super::agent::id_of(&bytes) {
                    s.handouts.forget(&run);
                    s.ended(run);
                }
            }
            ControlMsg::TakeBack(bytes) => match codec::decode::<Placement>(&bytes) {
                Ok(p) => {
                    s.ended(p.run);
                    s.due(p);
                }
                Err(e) => tracing::error!(error = %e, "an undecodable placement"),
            },
            ControlMsg::Restore(bytes) => {
                if let Ok(running) = codec::decode::<Vec<Running>>(&bytes) {
                    // Started with runs under way and no complete record of who holds slots (a
                    // data directory from before the record, or a restart soon after): new
                    // holders wait until every lease that may be held was renewed or ran out.
                    if !s.restored && !running.is_empty() && !s.holds_known {
                        s.slots.restarted(Instant::now());
                    }
                    s.restored = true;
                    s.complete_holds();
                    s.dispatch.clear_active();
                    for r in running {
                        s.dispatch
                            .restore(r.run, r.queue.as_deref(), r.deployment, r.node);
                    }
                    s.pump();
                }
            }
            ControlMsg::Queues(bytes) => {
                if let Ok(queues) = codec::decode::<Vec<flotilla_runtime::WorkQueue>>(&bytes) {
                    s.dispatch.set_queues(queues);
                    s.pump();
                }
            }
            ControlMsg::Tick => {
                s.check();
                s.place_waiting();
                s.complete_holds();
                s.expire_slots();
            }
            ControlMsg::Holds(bytes) => {
                if let Ok(holds) = codec::decode::<Option<Vec<(String, TaskRunId, NodeId)>>>(&bytes) {
                    s.restore_holds(holds);
                }
            }
            ControlMsg::Limits(bytes) => {
                if let Ok(limits) = codec::decode::<Vec<flotilla_runtime::ConcurrencyLimit>>(&bytes) {
                    let served = s.slots.set_all(&limits, Instant::now());
                    s.grant(served);
                }
            }
            ControlMsg::AcquireSlots(bytes, reply) => match codec::decode::<SlotRequest>(&bytes) {
                Ok(SlotRequest::Acquire { holder, node, tags }) => s.acquire_slots(holder, node, tags, reply),
                Ok(other) => tracing::warn!(request = ?other, "a slot request that is not an acquire"),
                Err(e) => tracing::error!(error = %e, "an undecodable slot request"),
            },
            ControlMsg::RenewSlots(bytes, reply) => match codec::decode::<SlotRequest>(&bytes) {
                Ok(SlotRequest::Renew { holder, node, tags }) => s.renew_slots(holder, node, &tags, reply),
                Ok(other) => tracing::warn!(request = ?other, "a slot request that is not a renewal"),
                Err(e) => tracing::error!(error = %e, "an undecodable slot request"),
            },
            ControlMsg::Slots(bytes) => match codec::decode::<SlotRequest>(&bytes) {
                Ok(SlotRequest::Release(holders)) => s.release_slots(holders),
                Ok(other) => tracing::warn!(request = ?other, "a slot request sent without a reply port"),
                Err(e) => tracing::error!(error = %e, "an undecodable slot request"),
            },
        }
        Ok(())
    }
}
