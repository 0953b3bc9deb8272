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
    Command, Decision, FlowRunId, NewFlowRun, NodeId, Proposal, Reply, RetryRequest, State, StateName,
    StateType, TaskRunId, Timestamp, TransitionId, codec,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;
use rand::SeedableRng;
use rand::rngs::SmallRng;

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
    /// A task run asks for slots of its tags (an encoded `SlotRequest::Acquire`); the answer, an
    /// encoded `SlotGrant`, comes when it holds them.
    #[rpc]
    AcquireSlots(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// Leases renewed or released (an encoded `SlotRequest`).
    Slots(Vec<u8>),
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
    /// Runs due, by queue and deployment, and those running: placed as soon as a node can
    /// take them and their limits let them.
    dispatch: Dispatch,
    /// Tag limits and their leases.
    slots: Slots<SlotWaiter>,
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

    /// Answers waiters that got their slots; a waiter gone (its call timed out) gives them
    /// back.
    fn grant(&mut self, mut served: Vec<(SlotWaiter, SlotGrant)>) {
        while !served.is_empty() {
            let mut gone = Vec::new();
            for ((holder, reply), grant) in served {
                if reply.send(encode(&grant)).is_err() && grant != SlotGrant::Unlimited {
                    gone.push(holder);
                }
            }
            served = if gone.is_empty() {
                Vec::new()
            } else {
                self.slots.release(&gone, Instant::now())
            };
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
                                replace(&Placement::plain(run.id, run.flow_name.clone(), now()));
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
                            // The owner as of the change (a claim just before it counts).
                            let owner = p.flow_run(id).await.ok().flatten().and_then(|r| r.owner);
                            if let Some(owner) = owner.filter(|_| !s.is_terminal()) {
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
                            if let Ok(Some(f)) = p.flow_run(run).await {
                                replace(&placement_of(&p, &f, now()).await);
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
            Request::WorkQueue { name, change } => {
                let id = flotilla_runtime::WorkQueueId::new(now(), &mut self.rng);
                let loads = self.dispatch.loads();
                tokio::spawn(async move {
                    let r = queue_change(&p, name, change, id, &loads).await;
                    answer(reply, r);
                });
            }
            Request::WorkQueues => {
                let loads = self.dispatch.loads();
                tokio::spawn(async move {
                    let r = match p.settings().await {
                        Ok(settings) => Response::WorkQueues(queue_infos(settings, &loads)),
                        Err(e) => persist_err(e),
                    };
                    answer(reply, r);
                });
            }
            Request::ConcurrencyLimits => {
                answer(
                    reply,
                    Response::ConcurrencyLimits(self.slots.describe(Instant::now(), now())),
                );
            }
            Request::ConcurrencyLimit { tag, change } => {
                let current = self
                    .slots
                    .describe(Instant::now(), now())
                    .into_iter()
                    .find(|l| l.tag == tag);
                match change {
                    LimitChange::Inspect => {
                        let r = match current {
                            Some(l) => Response::ConcurrencyLimits(vec![l]),
                            None => refused(
                                ErrorKind::NotFound,
                                format!("no concurrency limit on tag {tag:?}"),
                            ),
                        };
                        answer(reply, r);
                    }
                    LimitChange::Reset => {
                        if current.is_none() {
                            return answer(
                                reply,
                                refused(
                                    ErrorKind::NotFound,
                                    format!("no concurrency limit on tag {tag:?}"),
                                ),
                            );
                        }
                        let served = self.slots.reset(&tag, Instant::now());
                        self.grant(served);
                        let l = self
                            .slots
                            .describe(Instant::now(), now())
                            .into_iter()
                            .find(|l| l.tag == tag);
                        answer(reply, Response::ConcurrencyLimits(l.into_iter().collect()));
                    }
                    LimitChange::Put { limit, lease_ttl_ms } => {
                        let setting =
                            flotilla_runtime::Setting::ConcurrencyLimit(flotilla_runtime::ConcurrencyLimit {
                                tag,
                                limit,
                                lease_ttl: Duration::from_millis(lease_ttl_ms),
                                leases: Vec::new(),
                            });
                        tokio::spawn(async move {
                            let r = put_setting(&p, setting.clone()).await;
                            let r = match (r, setting) {
                                (Response::Done, flotilla_runtime::Setting::ConcurrencyLimit(l)) => {
                                    Response::ConcurrencyLimits(vec![l])
                                }
                                (r, _) => r,
                            };
                            answer(reply, r);
                        });
                    }
                    LimitChange::Delete => {
                        tokio::spawn(async move {
                            let key = flotilla_runtime::work_queue::limit_key(&tag);
                            let r =
                                delete_setting(&p, key, format!("no concurrency limit on tag {tag:?}")).await;
                            answer(reply, r);
                        });
                    }
                }
            }
            Request::Events {
                after,
                prefix,
                limit,
                wait_ms,
            } => {
                tokio::spawn(async move {
                    let r = events(&p, after, prefix, limit, wait_ms).await;
                    answer(reply, r);
                });
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
                            replace(&Placement {
                                run: run.id,
                                flow: run.flow_name.clone(),
                                due: now(),
                                queue: d.work_queue.clone(),
                                deployment: Some((d.id, d.concurrency_limit.map(|l| (l, d.collision)))),
                            });
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

fn run_id(bytes: &[u8]) -> Option<FlowRunId> {
    <[u8; 16]>::try_from(bytes).ok().map(FlowRunId::from_bytes)
}

/// Reads back the work queues and the runs that run now, for the control actor.
async fn restore(p: &PersistenceHandle, me: &ActorRef<ControlMsg>) {
    reload_settings(p, me).await;
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

/// Work queues with their figures, by priority then name; the default queue is listed even
/// when it was never created.
fn queue_infos(
    settings: Vec<flotilla_runtime::Setting>,
    loads: &std::collections::HashMap<String, super::dispatch::QueueLoad>,
) -> Vec<QueueInfo> {
    let mut queues: Vec<flotilla_runtime::WorkQueue> = settings
        .into_iter()
        .filter_map(|s| match s {
            flotilla_runtime::Setting::WorkQueue(q) => Some(q),
            _ => None,
        })
        .collect();
    if !queues.iter().any(|q| q.name == flotilla_runtime::DEFAULT_QUEUE) {
        queues.push(default_queue(flotilla_runtime::DEFAULT_QUEUE, None));
    }
    // Queues runs name without anyone creating them.
    for name in loads.keys() {
        if !queues.iter().any(|q| q.name == *name) {
            queues.push(default_queue(name, None));
        }
    }
    queues.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    queues
        .into_iter()
        .map(|q| {
            let l = loads.get(&q.name).cloned().unwrap_or_default();
            QueueInfo {
                queue: q,
                waiting: l.waiting,
                active: l.active,
            }
        })
        .collect()
}

/// A queue as runs find it when nobody created it: priority 1, no limit, not paused. Its id is
/// nil until it is created.
fn default_queue(name: &str, id: Option<flotilla_runtime::WorkQueueId>) -> flotilla_runtime::WorkQueue {
    flotilla_runtime::WorkQueue {
        id: id.unwrap_or_else(|| flotilla_runtime::WorkQueueId::from_uuid(uuid::Uuid::nil())),
        name: name.to_owned(),
        priority: 1,
        concurrency_limit: None,
        paused: false,
    }
}

async fn queue_change(
    p: &PersistenceHandle,
    name: String,
    change: QueueChange,
    id: flotilla_runtime::WorkQueueId,
    loads: &std::collections::HashMap<String, super::dispatch::QueueLoad>,
) -> Response {
    let settings = match p.settings().await {
        Ok(s) => s,
        Err(e) => return persist_err(e),
    };
    let key = flotilla_runtime::work_queue::queue_key(&name);
    let stored = settings.iter().find_map(|s| match s {
        flotilla_runtime::Setting::WorkQueue(q) if q.name == name => Some(q.clone()),
        _ => None,
    });
    // The default queue exists before anyone creates it.
    let current = stored
        .clone()
        .or_else(|| (name == flotilla_runtime::DEFAULT_QUEUE).then(|| default_queue(&name, Some(id))));
    let missing = || refused(ErrorKind::NotFound, format!("no work queue named {name:?}"));
    let info = |q: flotilla_runtime::WorkQueue| {
        let l = loads.get(&q.name).cloned().unwrap_or_default();
        Response::WorkQueues(vec![QueueInfo {
            queue: q,
            waiting: l.waiting,
            active: l.active,
        }])
    };
    let new = match (change, current) {
        (QueueChange::Inspect, Some(q)) => return info(q),
        (QueueChange::Delete, _) if stored.is_none() => return missing(),
        (QueueChange::Delete, _) => {
            return delete_setting(p, key, format!("no work queue named {name:?}")).await;
        }
        (QueueChange::Create { .. }, Some(_)) if stored.is_some() => {
            return refused(
                ErrorKind::Refused,
                format!("a work queue named {name:?} exists already"),
            );
        }
        (
            QueueChange::Create {
                priority,
                concurrency_limit,
                paused,
            },
            _,
        ) => flotilla_runtime::WorkQueue {
            id,
            name: name.clone(),
            priority,
            concurrency_limit,
            paused,
        },
        (_, None) => return missing(),
        (QueueChange::Pause, Some(q)) => flotilla_runtime::WorkQueue { paused: true, ..q },
        (QueueChange::Resume, Some(q)) => flotilla_runtime::WorkQueue { paused: false, ..q },
        (QueueChange::SetConcurrencyLimit(l), Some(q)) => flotilla_runtime::WorkQueue {
            concurrency_limit: l,
            ..q
        },
        (QueueChange::SetPriority(n), Some(q)) => flotilla_runtime::WorkQueue { priority: n, ..q },
    };
    match put_setting(p, flotilla_runtime::Setting::WorkQueue(new.clone())).await {
        Response::Done => info(new),
        other => other,
    }
}

/// Stores a setting and has the control actor read the settings again.
async fn put_setting(p: &PersistenceHandle, setting: flotilla_runtime::Setting) -> Response {
    match p.submit(Command::PutSetting { setting, at: now() }).await {
        Ok(Ok(_)) => {
            if let Some(me) = control_ref() {
                reload_settings(p, &me).await;
            }
            Response::Done
        }
        Ok(Err(refusal)) => refused(ErrorKind::Refused, refusal.to_string()),
        Err(e) => persist_err(e),
    }
}

/// Deletes a setting and has the control actor read the settings again.
async fn delete_setting(p: &PersistenceHandle, key: String, missing: String) -> Response {
    match p.submit(Command::DeleteSetting { key, at: now() }).await {
        Ok(Ok(Reply::SettingDeleted { existed: false })) => refused(ErrorKind::NotFound, missing),
        Ok(Ok(_)) => {
            if let Some(me) = control_ref() {
                reload_settings(p, &me).await;
            }
            Response::Done
        }
        Ok(Err(refusal)) => refused(ErrorKind::Refused, refusal.to_string()),
        Err(e) => persist_err(e),
    }
}

fn control_ref() -> Option<ActorRef<ControlMsg>> {
    ractor::registry::where_is(CONTROL_NAME).map(ActorRef::from)
}

/// Events after a cursor whose names start with `prefix`; waits up to `wait_ms` for one when
/// there is none yet. Reads at most 20 pages past events that do not match.
async fn events(
    p: &PersistenceHandle,
    after: Option<flotilla_runtime::EventId>,
    prefix: Option<String>,
    limit: u32,
    wait_ms: u32,
) -> Response {
    let limit = (limit as usize).clamp(1, PAGE_MAX);
    let matches = |e: &flotilla_runtime::Event| prefix.as_deref().is_none_or(|x| e.event.starts_with(x));
    // Subscribe before reading, so an event between the two is not missed.
    let mut live = p.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(wait_ms.min(WAIT_MS_MAX)));
    let mut cursor = after;
    loop {
        let mut out = Vec::new();
        for _ in 0..20 {
            let page = match p.events(cursor, PAGE_MAX).await {
                Ok(page) => page,
                Err(e) => return persist_err(e),
            };
            let Some(last) = page.last() else { break };
            cursor = Some(last.id);
            for e in page {
                if matches(&e) {
                    out.push(e);
                    if out.len() == limit {
                        return Response::Events(out);
                    }
                }
            }
        }
        if !out.is_empty() {
            return Response::Events(out);
        }
        // Nothing yet: wait for a matching event (or the deadline).
        let waited = tokio::time::timeout_at(deadline, async {
            loop {
                match live.recv().await {
                    Ok(e) if matches(&e) => return true,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
                }
            }
        })
        .await;
        if !matches!(waited, Ok(true)) {
            return Response::Events(Vec::new());
        }
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
            flows: args.flows.into_iter().map(|f| (f.name().to_owned(), f)).collect(),
            dispatch: Dispatch::default(),
            slots: Slots::default(),
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
            ControlMsg::Place(bytes) => match codec::decode::<Placement>(&bytes) {
                Ok(p) => s.due(p),
                Err(e) => tracing::error!(error = %e, "an undecodable placement"),
            },
            ControlMsg::Ended(bytes) => {
                if let Some(run) = run_id(&bytes) {
                    s.ended(run);
                }
            }
            ControlMsg::Restore(bytes) => {
                if let Ok(running) = codec::decode::<Vec<Running>>(&bytes) {
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
                let served = s.slots.expire(Instant::now());
                s.grant(served);
            }
            ControlMsg::Limits(bytes) => {
                if let Ok(limits) = codec::decode::<Vec<flotilla_runtime::ConcurrencyLimit>>(&bytes) {
                    let served = s.slots.set_all(&limits, Instant::now());
                    s.grant(served);
                }
            }
            ControlMsg::AcquireSlots(bytes, reply) => match codec::decode::<SlotRequest>(&bytes) {
                Ok(SlotRequest::Acquire { holder, node, tags }) => {
                    if let Some(granted) =
                        s.slots
                            .acquire(holder, node, tags, Instant::now(), (holder, reply))
                    {
                        s.grant(vec![granted]);
                    }
                }
                Ok(other) => tracing::warn!(request = ?other, "a slot request that is not an acquire"),
                Err(e) => tracing::error!(error = %e, "an undecodable slot request"),
            },
            ControlMsg::Slots(bytes) => match codec::decode::<SlotRequest>(&bytes) {
                Ok(SlotRequest::Renew(holders)) => s.slots.renew(&holders, Instant::now()),
                Ok(SlotRequest::Release(holders)) => {
                    let served = s.slots.release(&holders, Instant::now());
                    s.grant(served);
                }
                Ok(other) => tracing::warn!(request = ?other, "an acquire sent without a reply port"),
                Err(e) => tracing::error!(error = %e, "an undecodable slot request"),
            },
        }
        Ok(())
    }
}
