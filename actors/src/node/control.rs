//! The control actor, on the control node: the cluster's one entrance to the control state.
//! It takes commands and reads from workers (in order, durable before it answers), keeps the
//! membership from their heartbeats, marks a member unreachable after a silence and crashes
//! its runs, places flow runs on live nodes, and serves the client protocol.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_cluster::wire::{
    ClusterStatus, ErrorKind, MemberStatus, Request, Response, WAIT_MS_MAX, WireError,
};
use flotilla_runtime::{
    Command, Decision, FlowRunId, NewFlowRun, NodeId, Proposal, Reply, RetryRequest, State, StateName,
    StateType, Timestamp, TransitionId, codec,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;
use rand::SeedableRng;
use rand::rngs::SmallRng;

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
    /// Place a run (encoded `(FlowRunId, flow name)`) on a live node that runs its flow.
    Place(Vec<u8>),
    /// Time to look for silent members.
    Tick,
}

/// How membership works.
#[derive(Clone, Copy, Debug)]
pub struct MembershipSettings {
    /// A member silent this long is unreachable.
    pub unreachable_after: Duration,
    /// How often silence is checked.
    pub check_every: Duration,
}

impl Default for MembershipSettings {
    fn default() -> Self {
        MembershipSettings {
            unreachable_after: Duration::from_secs(1),
            check_every: Duration::from_millis(50),
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
    /// Runs due that no live node could take yet, oldest first: placed as soon as one can.
    waiting: std::collections::VecDeque<Waiting>,
}

/// A run waiting for a node.
struct Waiting {
    run: FlowRunId,
    flow: String,
    due: Timestamp,
    late: bool,
}

/// A run whose scheduled time passed this long ago without a node to take it is marked Late.
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
        let best = self
            .members
            .values_mut()
            .filter(|m| {
                m.status.reachable && m.status.slots_total > 0 && m.status.flows.iter().any(|f| f == flow)
            })
            .min_by(|a, b| {
                let load = |m: &Member| {
                    f64::from(m.status.slots_used + m.placed) / f64::from(m.status.slots_total.max(1))
                };
                load(a).total_cmp(&load(b))
            })?;
        best.placed += 1;
        Some(best.status.name.clone())
    }

    /// Places a run, or keeps it waiting (oldest first) until a node can take it.
    fn place_or_wait(&mut self, w: Waiting) {
        if self.waiting.is_empty()
            && let Some(node) = self.place(&w.flow)
            && send_agent(&node, AgentMsg::Run(w.run.as_bytes().to_vec()))
        {
            return;
        }
        tracing::debug!(flow_run = %w.run, flow = %w.flow, "no reachable node runs this flow now; the run waits");
        self.waiting.push_back(w);
        self.place_waiting();
    }

    /// Places the waiting runs that a node can take now; marks Late those waiting too long.
    fn place_waiting(&mut self) {
        let t = now();
        let mut keep = std::collections::VecDeque::new();
        while let Some(mut w) = self.waiting.pop_front() {
            if let Some(node) = self.place(&w.flow)
                && send_agent(&node, AgentMsg::Run(w.run.as_bytes().to_vec()))
            {
                continue;
            }
            if !w.late && t.saturating_since(w.due) > LATE_AFTER {
                w.late = true;
                let p = Proposal::new(State::named(StateName::Late, t), self.tid());
                drop(self.persistence.enqueue(Command::ProposeFlowRunState {
                    run: w.run,
                    proposal: p,
                }));
            }
            keep.push_back(w);
        }
        self.waiting = keep;
    }

    fn tid(&mut self) -> TransitionId {
        TransitionId::new(now(), &mut self.rng)
    }

    /// Looks for members silent too long: they become unreachable and their runs crash.
    fn check(&mut self) {
        let after = self.settings.unreachable_after;
        for m in self.members.values_mut() {
            if m.status.reachable && m.last_seen.elapsed() > after {
                m.status.reachable = false;
                let node = m.status.name.clone();
                tracing::warn!(node = %node, silent_ms = m.last_seen.elapsed().as_millis() as u64, "member unreachable");
                let cmd = Command::MarkNodeCrashed {
                    node: node.clone(),
                    message: format!("node {node} became unreachable"),
                    key: format!("unreachable/{node}/{}", now()),
                };
                drop(self.persistence.enqueue(cmd));
            }
        }
    }

    fn heartbeat(&mut self, report: MemberStatus) -> ClusterStatus {
        let entry = self.members.entry(report.name.clone()).or_insert_with(|| Member {
            status: report.clone(),
            last_seen: Instant::now(),
            placed: 0,
        });
        if !entry.status.reachable {
            tracing::info!(node = %report.name, "member reachable");
        }
        entry.status = MemberStatus {
            reachable: true,
            last_heartbeat: Some(now()),
            ..report
        };
        entry.last_seen = Instant::now();
        entry.placed = 0;
        self.status()
    }

    /// Answers a client request. Work that waits on the store runs on a task of its own.
    fn request(&mut self, request: Request, reply: RpcReplyPort<Vec<u8>>) {
        let p = self.persistence.clone();
        let answer = |reply: RpcReplyPort<Vec<u8>>, r: Response| {
            let _ = reply.send(encode(&r));
        };
        match request {
            Request::Status => answer(reply, Response::Status(self.status())),
            Request::RemoveNode(node) => match self.members.get(&node) {
                None => answer(
                    reply,
                    refused(ErrorKind::NotFound, format!("no member named {node}")),
                ),
                Some(m) if m.status.reachable => answer(
                    reply,
                    refused(
                        ErrorKind::Refused,
                        format!("{node} is reachable; stop it before removing it"),
                    ),
                ),
                Some(_) => {
                    self.members.remove(&node);
                    answer(reply, Response::Done);
                }
            },
            Request::RunFlow { flow, params } => {
                let params = if params.is_null() {
                    serde_json::json!({})
                } else {
                    params
                };
                let (retry_policy, resume) = match self.flows.get(&flow) {
                    Some(f) => {
                        if let Err(e) = f.check_params(&params) {
                            return answer(
                                reply,
                                refused(ErrorKind::Refused, format!("invalid parameters: {e}")),
                            );
                        }
                        let o = f.options();
                        (o.retry, o.resume)
                    }
                    None => (Default::default(), false),
                };
                let Some(node) = self.place(&flow) else {
                    let known: std::collections::BTreeSet<String> = self
                        .members
                        .values()
                        .flat_map(|m| m.status.flows.clone())
                        .collect();
                    let known: Vec<String> = known.into_iter().collect();
                    let msg = if known.contains(&flow) {
                        format!("no reachable node runs flow {flow:?} now")
                    } else {
                        format!("no node runs a flow named {flow:?} (known: {})", known.join(", "))
                    };
                    return answer(reply, refused(ErrorKind::Unavailable, msg));
                };
                let id = FlowRunId::new(now(), &mut self.rng);
                tokio::spawn(async move {
                    let cmd = Command::CreateFlowRun(NewFlowRun {
                        id,
                        flow_name: flow,
                        parameters: params,
                        deployment_id: None,
                        parent_task_run: None,
                        idempotency_key: None,
                        tags: vec![],
                        work_queue: None,
                        retry_policy,
                        resume,
                        scheduled_time: None,
                    });
                    let r = match p.submit(cmd).await {
                        Ok(Ok(Reply::FlowRunCreated { run, .. })) => {
                            if !send_agent(&node, AgentMsg::Run(run.id.as_bytes().to_vec())) {
                                // The node went away: the run waits for another one.
                                replace(run.id, run.flow_name.clone(), now());
                            }
                            Response::Ran(run.id)
                        }
                        Ok(Ok(other)) => refused(ErrorKind::Refused, format!("unexpected answer {other:?}")),
                        Ok(Err(refusal)) => refused(ErrorKind::Refused, refusal.to_string()),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::Cancel(id) => {
                let tid = self.tid();
                tokio::spawn(async move {
                    let prop = Proposal::new(State::named(StateName::Cancelling, now()), tid);
                    let owner = p.flow_run(id).await.ok().flatten().and_then(|r| r.owner);
                    let r = match p
                        .submit(Command::ProposeFlowRunState {
                            run: id,
                            proposal: prop,
                        })
                        .await
                    {
                        Ok(Ok(Reply::FlowRunTransition {
                            decision: Decision::Accept(s) | Decision::Reject(s),
                            ..
                        })) => {
                            if let Some(owner) = owner {
                                let _ = send_agent(&owner, AgentMsg::Cancel(id.as_bytes().to_vec()));
                            }
                            Response::State(s)
                        }
                        Ok(Ok(Reply::FlowRunTransition {
                            decision: Decision::Abort(r),
                            ..
                        })) => refused(ErrorKind::Refused, r.to_string()),
                        Ok(Ok(other)) => refused(ErrorKind::Refused, format!("unexpected answer {other:?}")),
                        Ok(Err(refusal)) => not_found_or(refusal),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::Retry { run, force } => {
                let tid = self.tid();
                tokio::spawn(async move {
                    let request = RetryRequest {
                        transition_id: tid,
                        resume: false,
                        force,
                        message: None,
                    };
                    let r = match p.submit(Command::RetryFlowRun { run, request }).await {
                        Ok(Ok(Reply::Retried { state, .. })) => {
                            // Placed like a new run, by the control actor.
                            if let (Ok(Some(f)), Some(me)) =
                                (p.flow_run(run).await, super::plane::control_actor())
                            {
                                let _ = me.cast(ControlMsg::Place(encode(&(run, f.flow_name, now()))));
                            }
                            Response::State(state)
                        }
                        Ok(Ok(other)) => refused(ErrorKind::Refused, format!("unexpected answer {other:?}")),
                        Ok(Err(refusal)) => not_found_or(refusal),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::PutDeployment(spec) => {
                let id = flotilla_runtime::DeploymentId::new(now(), &mut self.rng);
                tokio::spawn(async move { answer(reply, put_deployment(&p, *spec, id).await) });
            }
            Request::DeleteDeployment(name) => {
                tokio::spawn(async move {
                    let r = match p.deployment_by_name(&name).await {
                        Ok(Some(d)) => match p.submit(Command::DeleteDeployment { id: d.id }).await {
                            Ok(Ok(_)) => {
                                tell_scheduler(d.id);
                                Response::Done
                            }
                            Ok(Err(refusal)) => refused(ErrorKind::Refused, refusal.to_string()),
                            Err(e) => persist_err(e),
                        },
                        Ok(None) => refused(ErrorKind::NotFound, format!("no deployment named {name:?}")),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::Deployment(name) => {
                tokio::spawn(async move {
                    let r = match p.deployment_by_name(&name).await {
                        Ok(Some(d)) => Response::Deployment(Box::new(d)),
                        Ok(None) => refused(ErrorKind::NotFound, format!("no deployment named {name:?}")),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::Deployments => {
                tokio::spawn(async move {
                    let r = match p.all_deployments().await {
                        Ok(all) => Response::Deployments(all),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::RunDeployment { name, params } => {
                let id = FlowRunId::new(now(), &mut self.rng);
                tokio::spawn(async move {
                    let d = match p.deployment_by_name(&name).await {
                        Ok(Some(d)) => d,
                        Ok(None) => {
                            return answer(
                                reply,
                                refused(ErrorKind::NotFound, format!("no deployment named {name:?}")),
                            );
                        }
                        Err(e) => return answer(reply, persist_err(e)),
                    };
                    let cmd = Command::CreateFlowRun(NewFlowRun {
                        id,
                        flow_name: d.flow_name.clone(),
                        parameters: super::scheduler::merge_params(&d.parameters, &params),
                        deployment_id: Some(d.id),
                        parent_task_run: None,
                        idempotency_key: None,
                        tags: d.tags.clone(),
                        work_queue: d.work_queue.clone(),
                        retry_policy: Default::default(),
                        resume: false,
                        scheduled_time: None,
                    });
                    let r = match p.submit(cmd).await {
                        Ok(Ok(Reply::FlowRunCreated { run, .. })) => {
                            if let Some(me) = super::plane::control_actor() {
                                let _ = me.cast(ControlMsg::Place(encode(&(
                                    run.id,
                                    run.flow_name.clone(),
                                    now(),
                                ))));
                            }
                            Response::Ran(run.id)
                        }
                        Ok(Ok(other)) => refused(ErrorKind::Refused, format!("unexpected answer {other:?}")),
                        Ok(Err(refusal)) => refused(ErrorKind::Refused, refusal.to_string()),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::SchedulerStats => {
                tokio::spawn(async move {
                    let r = match ractor::registry::where_is(super::scheduler::SCHEDULER_NAME) {
                        Some(cell) => {
                            let sched: ActorRef<super::scheduler::SchedulerMsg> = cell.into();
                            match sched
                                .call(
                                    super::scheduler::SchedulerMsg::Stats,
                                    Some(Duration::from_secs(10)),
                                )
                                .await
                            {
                                Ok(ractor::rpc::CallResult::Success(st)) => Response::SchedulerStats(st),
                                _ => refused(ErrorKind::Unavailable, "the scheduler did not answer"),
                            }
                        }
                        None => refused(ErrorKind::Unavailable, "no scheduler runs here"),
                    };
                    answer(reply, r);
                });
            }
            Request::Wait { run, timeout_ms } => {
                tokio::spawn(async move {
                    let limit = Duration::from_millis(u64::from(timeout_ms.min(WAIT_MS_MAX)));
                    answer(reply, wait_for_end(&p, run, limit).await);
                });
            }
            other => {
                let results = self.results.clone();
                tokio::spawn(async move {
                    let r = read_request(&p, &results, other).await;
                    answer(reply, r);
                });
            }
        }
    }
}

/// Tells the scheduler a deployment changed.
fn tell_scheduler(id: flotilla_runtime::DeploymentId) {
    if let Some(cell) = ractor::registry::where_is(super::scheduler::SCHEDULER_NAME) {
        let sched: ActorRef<super::scheduler::SchedulerMsg> = cell.into();
        let _ = sched.cast(super::scheduler::SchedulerMsg::Changed(id));
    }
}

/// Creates or replaces a deployment by name.
async fn put_deployment(
    p: &PersistenceHandle,
    spec: flotilla_runtime::DeploymentSpec,
    id: flotilla_runtime::DeploymentId,
) -> Response {
    if let Err(e) = spec.check() {
        return refused(ErrorKind::Refused, e);
    }
    let old = match p.deployment_by_name(&spec.name).await {
        Ok(old) => old,
        Err(e) => return persist_err(e),
    };
    if let Some(o) = &old
        && o.spec() == spec
    {
        return Response::Deployment(Box::new(o.clone()));
    }
    let d = spec.into_deployment(id, old.as_ref(), now());
    match p.submit(Command::PutDeployment(d.clone())).await {
        Ok(Ok(_)) => {
            tell_scheduler(d.id);
            Response::Deployment(Box::new(d))
        }
        Ok(Err(refusal)) => refused(ErrorKind::Refused, refusal.to_string()),
        Err(e) => persist_err(e),
    }
}

fn not_found_or(refusal: flotilla_runtime::Refusal) -> Response {
    match refusal {
        flotilla_runtime::Refusal::FlowRunNotFound(id) => {
            refused(ErrorKind::NotFound, format!("no flow run {id}"))
        }
        other => refused(ErrorKind::Refused, other.to_string()),
    }
}

/// Tells a node's agent something (it is looked up afresh: remote ids change on reconnect).
/// Hands a run back to the control actor's placement (it waits until a node can take it).
fn replace(run: FlowRunId, flow: String, due: Timestamp) {
    if let Some(cell) = ractor::registry::where_is(CONTROL_NAME)
        && let Ok(msg) = flotilla_runtime::codec::encode(&(run, flow, due))
    {
        let _ = ActorRef::<ControlMsg>::from(cell).cast(ControlMsg::Place(msg));
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

/// The run once it is terminal, or as it is when `limit` has passed.
async fn wait_for_end(p: &PersistenceHandle, id: FlowRunId, limit: Duration) -> Response {
    let deadline = tokio::time::Instant::now() + limit;
    let resource = format!("flotilla.flow-run.{id}");
    // Subscribe before reading, so an end between the two is not missed.
    let mut events = p.subscribe();
    loop {
        let run = match p.flow_run(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return refused(ErrorKind::NotFound, format!("no flow run {id}")),
            Err(e) => return persist_err(e),
        };
        if run.lifecycle.state.is_terminal() {
            return Response::FlowRun(Box::new(run));
        }
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => return Response::FlowRun(Box::new(run)),
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                    return refused(ErrorKind::Unavailable, "the store stopped".to_owned());
                }
                Ok(Ok(e)) => {
                    if e.resource.id() == Some(resource.as_str()) && e.state().is_some_and(State::is_terminal)
                    {
                        break;
                    }
                }
            }
        }
    }
}

async fn read_request(p: &PersistenceHandle, results: &ResultStore, request: Request) -> Response {
    let missing = |id: FlowRunId| refused(ErrorKind::NotFound, format!("no flow run {id}"));
    match request {
        Request::FlowRun(id) => match p.flow_run(id).await {
            Ok(Some(r)) => Response::FlowRun(Box::new(r)),
            Ok(None) => missing(id),
            Err(e) => persist_err(e),
        },
        Request::FlowRuns {
            state,
            after,
            limit,
            deployment,
        } => {
            let filter = match deployment {
                Some(d) => RunFilter::Deployment(d),
                None => state.map_or(RunFilter::All, RunFilter::State),
            };
            match p.flow_runs(filter, after, (limit as usize).min(PAGE_MAX)).await {
                Ok(runs) => Response::FlowRuns(runs),
                Err(e) => persist_err(e),
            }
        }
        Request::TaskRuns(id) => {
            let mut all = Vec::new();
            let mut after = None;
            loop {
                match p.task_runs(id, after, PAGE_MAX).await {
                    Ok(page) if page.is_empty() => break,
                    Ok(page) => {
                        after = page.last().map(|t| t.id);
                        all.extend(page);
                    }
                    Err(e) => return persist_err(e),
                }
            }
            Response::TaskRuns(all)
        }
        Request::History(id) => {
            let mut all = Vec::new();
            loop {
                match p.flow_run_history(id, all.len(), PAGE_MAX).await {
                    Ok(Some(page)) if page.is_empty() => break,
                    Ok(Some(page)) => all.extend(page),
                    Ok(None) => return missing(id),
                    Err(e) => return persist_err(e),
                }
            }
            Response::History(all)
        }
        Request::Logs { run, after, limit } => match p
            .read(Read::Logs {
                flow_run: run,
                after,
                limit: limit as usize,
            })
            .await
        {
            Ok(ReadReply::Logs { lines, next }) => Response::Logs { lines, next },
            Ok(other) => refused(ErrorKind::Refused, format!("unexpected answer {other:?}")),
            Err(e) => persist_err(e),
        },
        Request::Result(id) => match p.flow_run(id).await {
            Ok(Some(r)) => match (&r.lifecycle.state.kind, &r.lifecycle.state.result) {
                (StateType::Completed, Some(flotilla_runtime::ResultRef::Inline(b))) => {
                    Response::Result(b.clone())
                }
                (StateType::Completed, Some(stored)) => {
                    let (results, stored) = (results.clone(), stored.clone());
                    match tokio::task::spawn_blocking(move || results.load(&stored)).await {
                        Ok(Ok(bytes)) if bytes.len() + 64 <= flotilla_cluster::frame::FRAME_BYTES_MAX => {
                            Response::Result(bytes)
                        }
                        Ok(Ok(bytes)) => refused(
                            ErrorKind::Refused,
                            format!(
                                "the result is {} bytes, more than one answer carries",
                                bytes.len()
                            ),
                        ),
                        Ok(Err(e)) => refused(ErrorKind::Unavailable, e.to_string()),
                        Err(e) => refused(ErrorKind::Unavailable, format!("cannot read the result: {e}")),
                    }
                }
                _ => refused(
                    ErrorKind::Refused,
                    format!("flow run {id} is {}; it has no result", r.lifecycle.state),
                ),
            },
            Ok(None) => missing(id),
            Err(e) => persist_err(e),
        },
        other => refused(ErrorKind::Protocol, format!("{other:?} is not served here")),
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
        Ok(ControlState {
            persistence: args.persistence,
            results: args.results,
            members: BTreeMap::new(),
            settings: args.settings,
            rng: SmallRng::seed_from_u64(now().as_micros() as u64),
            flows: args.flows.into_iter().map(|f| (f.name().to_owned(), f)).collect(),
            waiting: std::collections::VecDeque::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ControlMsg::Submit(bytes, reply) => {
                // Queued in order at once; answered when durable, without holding the actor.
                let p = s.persistence.clone();
                let answers: Result<Vec<_>, _> = codec::decode::<Vec<Command>>(&bytes)
                    .map(|cmds| cmds.into_iter().map(|c| p.enqueue(c)).collect());
                tokio::spawn(async move {
                    let results: Vec<SubmitResult> = match answers {
                        Ok(answers) => {
                            let mut out = Vec::with_capacity(answers.len());
                            for a in answers {
                                out.push(a.await.unwrap_or(Err(PersistError::Stopped)));
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
            ControlMsg::Place(bytes) => {
                if let Ok((run, flow, due)) = codec::decode::<(FlowRunId, String, Timestamp)>(&bytes) {
                    s.place_or_wait(Waiting {
                        run,
                        flow,
                        due,
                        late: false,
                    });
                }
            }
            ControlMsg::Tick => {
                s.check();
                s.place_waiting();
            }
        }
        Ok(())
    }
}
