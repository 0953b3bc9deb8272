//! The `Worker` actor: a node's slots and the flows it can run. It starts one `FlowRun` actor per
//! flow run it is given (queueing beyond its slots), runs subflows beside them, and on start-up
//! resumes what a previous process of this node left unfinished.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use flotilla_runtime::{
    Command, FlowRunId, NewFlowRun, Proposal, Reply, RetryRequest, State, StateName, StateType, TaskRunId,
    Timestamp, TransitionId,
};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::oneshot;

use super::flow_run::{FlowRunActor, FlowRunArgs, FlowRunMsg};
use super::limits::TagLimits;
use super::logs::LogCapture;
use super::results::ResultStore;
use super::{EngineConfig, FlowFn};
use crate::node::plane::ControlPlane;
use crate::persistence::{PersistError, RunFilter};

/// How a flow run ended, for whoever waits on it in-process.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Its final state.
    pub state: State,
    /// Its result, when it completed.
    pub result: Option<Vec<u8>>,
}

/// What every actor of the engine shares.
#[derive(Debug)]
pub struct EngineCtx {
    /// The configuration.
    pub config: EngineConfig,
    /// The persistence actor.
    pub persistence: ControlPlane,
    /// Where results go.
    pub results: ResultStore,
    /// Tag limits.
    pub limits: TagLimits,
    /// Log capture.
    pub logs: LogCapture,
    /// Starts task-run actors.
    pub spawner: super::task_run::Spawner,
}

pub(crate) fn now() -> Timestamp {
    Timestamp::from(chrono::Utc::now())
}

/// The most flow runs a node lists in one heartbeat.
pub const HELD_MAX: usize = 10_000;

/// Messages of the worker.
pub enum WorkerMsg {
    /// Run this flow run (claim it, then run it) when a slot is free; the run as the control
    /// node placed it, when it sent it.
    Run(FlowRunId, Option<Box<flotilla_runtime::FlowRun>>),
    /// Run this flow run now, outside the slots (a subflow), and say how it ended.
    RunChild(FlowRunId, Arc<dyn FlowFn>, oneshot::Sender<RunOutcome>),
    /// Cancel this flow run if it runs here.
    Cancel(FlowRunId),
    /// A flow run's actor (this one) finished.
    Ended(FlowRunId, ActorId),
    /// How many flow runs run and wait here.
    Load(oneshot::Sender<(usize, usize)>),
    /// The flow runs that run and wait here (at most [`HELD_MAX`]).
    Held(oneshot::Sender<Vec<FlowRunId>>),
}

impl ractor::Message for WorkerMsg {}

impl std::fmt::Debug for WorkerMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerMsg::Run(id, _) => write!(f, "Run({id})"),
            WorkerMsg::RunChild(id, ..) => write!(f, "RunChild({id})"),
            WorkerMsg::Cancel(id) => write!(f, "Cancel({id})"),
            WorkerMsg::Ended(id, _) => write!(f, "Ended({id})"),
            WorkerMsg::Load(_) => f.write_str("Load"),
            WorkerMsg::Held(_) => f.write_str("Held"),
        }
    }
}

/// The worker actor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Worker;

/// What the worker starts from.
#[allow(missing_debug_implementations)]
pub struct WorkerArgs {
    /// Shared context.
    pub ctx: Arc<EngineCtx>,
    /// The flows this node runs, by name.
    pub flows: HashMap<String, Arc<dyn FlowFn>>,
}

/// The worker's state.
pub struct WorkerState {
    ctx: Arc<EngineCtx>,
    flows: HashMap<String, Arc<dyn FlowFn>>,
    running: HashMap<FlowRunId, ActorRef<FlowRunMsg>>,
    actors: HashMap<ActorId, FlowRunId>,
    queue: VecDeque<FlowRunId>,
    /// The runs queued as the control node placed them, when it sent them.
    known: HashMap<FlowRunId, Box<flotilla_runtime::FlowRun>>,
    /// Runs asked to start again while their previous actor was still ending (a retry right
    /// after the end): started once it has ended, never dropped.
    again: std::collections::HashSet<FlowRunId>,
    handle: Option<EngineHandle>,
}

impl std::fmt::Debug for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerState")
            .field("running", &self.running.len())
            .field("queued", &self.queue.len())
            .finish()
    }
}

impl WorkerState {
    async fn spawn(
        &mut self,
        myself: &ActorRef<WorkerMsg>,
        id: FlowRunId,
        flow: Option<Arc<dyn FlowFn>>,
        on_done: Option<oneshot::Sender<RunOutcome>>,
        counts: bool,
    ) {
        let known = self.known.remove(&id);
        let flow = match (flow, &known) {
            (Some(f), _) => f,
            (None, Some(run)) => match self.flows.get(&run.flow_name) {
                Some(f) => f.clone(),
                None => {
                    tracing::warn!(flow_run = %id, flow = %run.flow_name, "this node does not run that flow; leaving the run for another");
                    return;
                }
            },
            (None, None) => match self.ctx.persistence.flow_run(id).await {
                Ok(Some(run)) => match self.flows.get(&run.flow_name) {
                    Some(f) => f.clone(),
                    None => {
                        tracing::warn!(flow_run = %id, flow = %run.flow_name, "this node does not run that flow; leaving the run for another");
                        return;
                    }
                },
                Ok(None) => {
                    tracing::warn!(flow_run = %id, "no such flow run");
                    return;
                }
                Err(e) => {
                    tracing::error!(flow_run = %id, error = %e, "cannot read the flow run");
                    return;
                }
            },
        };
        let Some(handle) = self.handle.clone() else { return };
        let args = FlowRunArgs {
            id,
            flow,
            ctx: self.ctx.clone(),
            engine: handle,
            worker: counts.then(|| myself.clone()),
            on_done,
            known,
        };
        match Actor::spawn_linked(None, FlowRunActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.actors.insert(actor.get_id(), id);
                if counts {
                    self.running.insert(id, actor);
                }
            }
            Err(e) => tracing::error!(flow_run = %id, error = %e, "cannot start the flow run's actor"),
        }
    }

    /// A run's actor ended (said so, or terminated: whichever comes first): its slot is free,
    /// and a start asked meanwhile is queued. A word from an earlier actor of the same run is
    /// ignored.
    fn ended(&mut self, id: FlowRunId, actor: ActorId) {
        if self.running.get(&id).is_some_and(|a| a.get_id() == actor) {
            self.running.remove(&id);
            if self.again.remove(&id) {
                self.queue.push_back(id);
            }
        }
    }

    async fn start_queued(&mut self, myself: &ActorRef<WorkerMsg>) {
        while self.running.len() < self.ctx.config.slots.max(1) {
            let Some(id) = self.queue.pop_front() else { break };
            self.spawn(myself, id, None, None, true).await;
        }
    }
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(WorkerState {
            ctx: args.ctx,
            flows: args.flows,
            running: HashMap::new(),
            actors: HashMap::new(),
            queue: VecDeque::new(),
            known: HashMap::new(),
            again: std::collections::HashSet::new(),
            handle: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.handle = Some(EngineHandle {
            worker: myself,
            ctx: state.ctx.clone(),
            flows: Arc::new(state.flows.clone()),
        });
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Run(id, known) => {
                tracing::debug!(flow_run = %id, "a run handed to this node");
                if state.running.contains_key(&id) {
                    // Its actor may be ending (the run just finished, and this is its retry):
                    // start it again once it has ended. A start sent twice costs one claim
                    // refused.
                    state.again.insert(id);
                    return Ok(());
                }
                if let Some(run) = known {
                    state.known.insert(id, run);
                }
                if state.queue.contains(&id) {
                    return Ok(());
                }
                state.queue.push_back(id);
                state.start_queued(&myself).await;
            }
            WorkerMsg::RunChild(id, flow, done) => {
                state.spawn(&myself, id, Some(flow), Some(done), false).await
            }
            WorkerMsg::Cancel(id) => {
                if let Some(actor) = state.running.get(&id) {
                    let _ = actor.cast(FlowRunMsg::Cancel);
                } else if let Some(actor) = state.actors.iter().find(|(_, r)| **r == id).map(|(a, _)| *a) {
                    // A subflow: find its actor among the children.
                    if let Some(cell) = myself.get_children().into_iter().find(|c| c.get_id() == actor) {
                        let _ = cell.send_message(FlowRunMsg::Cancel);
                    }
                } else {
                    state.queue.retain(|q| *q != id);
                }
            }
            WorkerMsg::Ended(id, actor) => {
                state.ended(id, actor);
                state.start_queued(&myself).await;
            }
            WorkerMsg::Load(reply) => {
                let _ = reply.send((state.running.len(), state.queue.len()));
            }
            WorkerMsg::Held(reply) => {
                let held = state
                    .running
                    .keys()
                    .chain(state.queue.iter())
                    .take(HELD_MAX)
                    .copied()
                    .collect();
                let _ = reply.send(held);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure): (ActorCell, Option<String>) = match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            _ => return Ok(()),
        };
        let Some(id) = state.actors.remove(&cell.get_id()) else {
            return Ok(());
        };
        if let Some(reason) = failure {
            // A bug in the engine, not in user code: the run crashes, the node goes on.
            tracing::error!(flow_run = %id, %reason, "the flow run's actor failed");
            let mut rng = SmallRng::from_rng(&mut rand::rng());
            let crashed =
                State::named(StateName::Crashed, now()).with_message(format!("the engine failed: {reason}"));
            let tid = TransitionId::new(now(), &mut rng);
            let (ctx, me) = (state.ctx.clone(), state.ctx.config.node.clone());
            // Fenced like every proposal of a node: under the epoch this node holds, and only
            // while it still owns the run.
            tokio::spawn(async move {
                match ctx.persistence.flow_run(id).await {
                    Ok(Some(run)) if run.owner.as_ref() == Some(&me) => {
                        let proposal = Proposal::from_worker(crashed, tid, run.epoch, me);
                        let _ = ctx
                            .persistence
                            .submit(Command::ProposeFlowRunState { run: id, proposal })
                            .await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(flow_run = %id, error = %e, "cannot read the run to mark it Crashed")
                    }
                }
            });
        }
        state.ended(id, cell.get_id());
        state.start_queued(&myself).await;
        Ok(())
    }
}

/// A handle on a node's engine.
#[derive(Clone)]
pub struct EngineHandle {
    worker: ActorRef<WorkerMsg>,
    ctx: Arc<EngineCtx>,
    flows: Arc<HashMap<String, Arc<dyn FlowFn>>>,
}

impl EngineHandle {
    /// Where commands go: the control state.
    pub(crate) fn control(&self) -> &ControlPlane {
        &self.ctx.persistence
    }
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("worker", &self.worker.get_id())
            .finish_non_exhaustive()
    }
}

/// Why the engine could not do something.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The persistence actor failed or stopped.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The worker actor is not running.
    #[error("the engine is not running")]
    Stopped,
    /// The actor could not be started.
    #[error("cannot start the engine: {0}")]
    Start(String),
}

/// Starts a node's engine: the worker actor with the given flows.
pub async fn start(
    config: EngineConfig,
    persistence: ControlPlane,
    flows: Vec<Arc<dyn FlowFn>>,
) -> Result<(EngineHandle, ractor::concurrency::JoinHandle<()>), EngineError> {
    let logs = LogCapture::start(
        persistence.clone(),
        config.log_batch_lines_max,
        config.log_flush_interval,
        config.log_to_stderr,
    );
    let mut results = ResultStore::new(config.results_dir.clone(), config.result_inline_bytes_max);
    if let Some(shipper) = &config.result_shipper {
        results = results.with_shipper(shipper.clone());
    }
    if let Some(blocks) = &config.result_blocks {
        results = results.with_blocks(blocks.clone());
    }
    let ctx = Arc::new(EngineCtx {
        results,
        limits: match &config.cluster_slots {
            Some(service) => TagLimits::new(&config.tag_limits).with_cluster(service.clone()),
            None => TagLimits::new(&config.tag_limits),
        },
        config,
        persistence,
        logs,
        spawner: super::task_run::Spawner::start(),
    });
    let flows: HashMap<String, Arc<dyn FlowFn>> =
        flows.into_iter().map(|f| (f.name().to_owned(), f)).collect();
    let (worker, join) = Actor::spawn(
        None,
        Worker,
        WorkerArgs {
            ctx: ctx.clone(),
            flows: flows.clone(),
        },
    )
    .await
    .map_err(|e| EngineError::Start(e.to_string()))?;
    Ok((
        EngineHandle {
            worker,
            ctx,
            flows: Arc::new(flows),
        },
        join,
    ))
}

impl EngineHandle {
    /// The shared context.
    pub fn ctx(&self) -> &Arc<EngineCtx> {
        &self.ctx
    }

    /// The flow of that name, if this node runs it.
    pub fn flow(&self, name: &str) -> Option<Arc<dyn FlowFn>> {
        self.flows.get(name).cloned()
    }

    /// Whether this node runs a flow of that name.
    pub fn runs_flow(&self, name: &str) -> bool {
        self.flows.contains_key(name)
    }

    /// The names of the flows this node runs.
    pub fn flow_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.flows.keys().cloned().collect();
        names.sort();
        names
    }

    /// What runs of each flow this node runs take from it, by name.
    pub fn flow_defaults(&self) -> std::collections::BTreeMap<String, flotilla_cluster::wire::FlowDefaults> {
        self.flows
            .iter()
            .map(|(name, f)| (name.clone(), f.options().defaults()))
            .collect()
    }

    /// Has the worker run a flow run (claim it, run it) when a slot is free.
    pub fn run(&self, id: FlowRunId) -> Result<(), EngineError> {
        self.run_known(id, None)
    }

    /// As [`EngineHandle::run`], with the run as the control node placed it (claimed without
    /// reading it first).
    pub fn run_known(
        &self,
        id: FlowRunId,
        known: Option<Box<flotilla_runtime::FlowRun>>,
    ) -> Result<(), EngineError> {
        self.worker
            .cast(WorkerMsg::Run(id, known))
            .map_err(|_| EngineError::Stopped)
    }

    /// Has the worker cancel a flow run that runs here.
    pub fn cancel(&self, id: FlowRunId) -> Result<(), EngineError> {
        self.worker
            .cast(WorkerMsg::Cancel(id))
            .map_err(|_| EngineError::Stopped)
    }

    /// How many flow runs run and wait on this node.
    pub async fn load(&self) -> Result<(usize, usize), EngineError> {
        let (tx, rx) = oneshot::channel();
        self.worker
            .cast(WorkerMsg::Load(tx))
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// The flow runs that run and wait here (at most [`HELD_MAX`]).
    pub async fn held(&self) -> Result<Vec<FlowRunId>, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.worker
            .cast(WorkerMsg::Held(tx))
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Stops the engine (its flow runs with it).
    pub async fn stop(&self, join: ractor::concurrency::JoinHandle<()>) {
        self.worker.stop(None);
        let _ = join.await;
    }

    /// Runs `flow` as a subflow of the task run `parent`: creates the child flow run (once,
    /// by `idempotency_key`), runs it here and returns its result. A child that already
    /// completed returns its recorded result; one that failed or crashed is resumed.
    pub(crate) async fn run_subflow(
        &self,
        flow: Arc<dyn FlowFn>,
        params: serde_json::Value,
        parent: TaskRunId,
        idempotency_key: String,
    ) -> Result<Vec<u8>, String> {
        let p = &self.ctx.persistence;
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        let options = flow.options();
        let create = Command::CreateFlowRun(NewFlowRun {
            parent_task_run: Some(parent),
            ..NewFlowRun::new(FlowRunId::new(now(), &mut rng), flow.name(), params)
                .with_options(options.retry, options.resume)
                .with_key(Some(idempotency_key))
        });
        let run = match p.submit(create).await {
            Ok(Ok(Reply::FlowRunCreated { run, .. })) => run,
            Ok(Ok(other)) => return Err(format!("unexpected answer creating the subflow run: {other:?}")),
            Ok(Err(refusal)) => return Err(format!("the subflow run was refused: {refusal}")),
            Err(e) => return Err(e.to_string()),
        };
        match run.lifecycle.state.kind {
            StateType::Completed => {
                let result = run
                    .lifecycle
                    .state
                    .result
                    .as_ref()
                    .ok_or("the completed subflow run has no result")?;
                return self
                    .ctx
                    .results
                    .load_async(result)
                    .await
                    .map_err(|e| e.to_string());
            }
            k if k.is_terminal() => {
                let request = RetryRequest {
                    transition_id: TransitionId::new(now(), &mut rng),
                    resume: true,
                    force: false,
                    message: Some("resumed by its parent".into()),
                };
                match p.submit(Command::RetryFlowRun { run: run.id, request }).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(r)) => return Err(format!("the subflow run cannot be resumed: {r}")),
                    Err(e) => return Err(e.to_string()),
                }
            }
            _ => {}
        }
        let (tx, rx) = oneshot::channel();
        self.worker
            .cast(WorkerMsg::RunChild(run.id, flow, tx))
            .map_err(|_| "the engine is not running".to_owned())?;
        let outcome = rx
            .await
            .map_err(|_| "the subflow run's actor stopped".to_owned())?;
        match (outcome.state.kind, outcome.result) {
            (StateType::Completed, Some(bytes)) => Ok(bytes),
            (kind, _) => Err(format!(
                "subflow {} ended {kind}{}",
                run.flow_name,
                outcome
                    .state
                    .message
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )),
        }
    }

    /// Resumes what a previous process of this node left: its Pending and Running runs become
    /// Crashed (those Cancelling, Cancelled) and, unless their flow says `resume = false`, go
    /// back to Scheduled (named Resuming, with a new epoch) and run again, skipping the task
    /// calls that completed. Scheduled runs of this node's flows are queued, except those of
    /// deployments: the scheduler hands those out when they are due. Returns the runs resumed.
    /// `incarnation` names this start of the node: the crash it declares is keyed by it, so
    /// that declaring it again is one change. With `hand_off` (a cluster node), the runs
    /// resumed are not run here but returned, for the control plane to place under their
    /// queue's and deployment's limits, and the Scheduled runs are left to it.
    pub async fn recover(&self, incarnation: u64, hand_off: bool) -> Result<Vec<FlowRunId>, EngineError> {
        let p = &self.ctx.persistence;
        let node = self.ctx.config.node.clone();
        let key = format!("crash/{node}/restart/{incarnation}");
        let crashed = match p
            .submit(Command::MarkNodeCrashed {
                node,
                message: "its node restarted".into(),
                key,
            })
            .await?
        {
            Ok(Reply::NodeCrashed { crashed, .. }) => crashed,
            _ => Vec::new(),
        };
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        let mut resumed = Vec::new();
        for id in crashed {
            let Some(run) = p.flow_run(id).await? else {
                continue;
            };
            if !run.resume || run.parent_task_run.is_some() || !self.runs_flow(&run.flow_name) {
                continue;
            }
            let request = RetryRequest {
                transition_id: TransitionId::new(now(), &mut rng),
                resume: true,
                force: false,
                message: Some("resumed after its node restarted".into()),
            };
            if let Ok(Ok(_)) = p.submit(Command::RetryFlowRun { run: id, request }).await {
                resumed.push(id);
                if !hand_off {
                    self.run(id)?;
                }
            }
        }
        if hand_off {
            return Ok(resumed);
        }
        let mut after = None;
        loop {
            let page = p
                .flow_runs(RunFilter::State(StateType::Scheduled), after, 500)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for run in page {
                if run.parent_task_run.is_none()
                    && run.deployment_id.is_none()
                    && run.owner.is_none()
                    && self.runs_flow(&run.flow_name)
                    && !resumed.contains(&run.id)
                {
                    self.run(run.id)?;
                }
            }
        }
        Ok(resumed)
    }
}
