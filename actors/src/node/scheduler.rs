//! The scheduler: a singleton on the control node. It keeps each active deployment's next runs
//! created ahead of time (Scheduled at their fire time), and hands each to the control actor's
//! placement the moment it is due — a timer on the earliest due run, no polling.
//!
//! Runs are created with the idempotency key
//! `sched/{deployment}/{schedule}/{version}/{fire time}` (the version is the deployment's last
//! change), so a restart never creates a run twice; on start it reads back what is there: runs that have not
//! started are handed out when due (at once if their time passed — the control actor marks them
//! Late if no node takes them), and fire times that fell while it was down are skipped unless
//! the schedule has `catchup`. Changing, pausing or deleting a deployment cancels its runs that
//! have not started and schedules afresh.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use flotilla_cluster::wire::SchedulerStats;
use flotilla_runtime::deployment::Compiled;
use flotilla_runtime::{
    Command, Deployment, DeploymentId, FlowRunId, NewFlowRun, Proposal, Reply, State, StateName, StateType,
    Timestamp, TransitionId,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::control::{CONTROL_NAME, ControlMsg};
use crate::persistence::{PAGE_MAX, PersistenceHandle, RunFilter};
use flotilla_runtime::control::Placement;

/// The scheduler's registered name.
pub const SCHEDULER_NAME: &str = "flotilla.scheduler";

/// How far ahead runs are created.
#[derive(Clone, Copy, Debug)]
pub struct ScheduleSettings {
    /// At least this many runs ahead per deployment...
    pub ahead_runs: usize,
    /// ...and at least this far ahead...
    pub ahead_time: Duration,
    /// ...but never more than this many.
    pub ahead_max: usize,
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        ScheduleSettings {
            ahead_runs: 3,
            ahead_time: Duration::from_secs(3600),
            ahead_max: 100,
        }
    }
}

/// Messages of the scheduler.
#[allow(missing_debug_implementations)]
pub enum SchedulerMsg {
    /// A deployment was created, changed or deleted.
    Changed(DeploymentId),
    /// Runs created ahead: (deployment, its generation, (fire time, run)).
    Created(DeploymentId, u64, Vec<(Timestamp, FlowRunId)>),
    /// Time to hand out due runs.
    Wake,
    /// Its figures.
    Stats(RpcReplyPort<SchedulerStats>),
}

impl ractor::Message for SchedulerMsg {}

struct Dep {
    d: Deployment,
    compiled: Vec<Option<Compiled>>,
    /// The last fire time a run was created for, per schedule.
    last: Vec<Option<Timestamp>>,
    /// Runs created and not yet due.
    ahead: usize,
    /// The latest fire time created.
    horizon: Option<Timestamp>,
    refilling: bool,
    generation: u64,
}

impl Dep {
    fn new(d: Deployment) -> Dep {
        let compiled: Vec<Option<Compiled>> = d
            .schedules
            .iter()
            .map(|s| s.active.then(|| s.kind.compile().ok()).flatten())
            .collect();
        let n = compiled.len();
        Dep {
            d,
            compiled,
            last: vec![None; n],
            ahead: 0,
            horizon: None,
            refilling: false,
            generation: 0,
        }
    }
}

/// A run waiting to be handed out.
struct Due {
    deployment: DeploymentId,
    flow: String,
    /// Created by a schedule (counted ahead, cancelled when the deployment changes), not ad hoc.
    scheduled: bool,
}

/// The scheduler's state.
pub struct SchedulerState {
    persistence: PersistenceHandle,
    settings: ScheduleSettings,
    deps: HashMap<DeploymentId, Dep>,
    due: BTreeMap<(Timestamp, FlowRunId), Due>,
    armed: Option<Timestamp>,
    rng: SmallRng,
    stats: SchedulerStats,
    /// The options of the flows this node knows (its runs take them).
    flows: crate::engine::FlowCatalog,
}

impl std::fmt::Debug for SchedulerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerState")
            .field("deployments", &self.deps.len())
            .finish_non_exhaustive()
    }
}

fn now() -> Timestamp {
    Timestamp::from(chrono::Utc::now())
}

fn key(d: &Deployment, schedule: usize, t: Timestamp) -> String {
    format!(
        "sched/{}/{schedule}/{}/{}",
        d.id,
        d.updated.as_micros(),
        t.as_micros()
    )
}

/// The schedule index, deployment version and fire time of a scheduler-made run's key.
fn parse_key(k: &str) -> Option<(usize, Timestamp, Timestamp)> {
    let mut parts = k.strip_prefix("sched/")?.split('/');
    let _dep = parts.next()?;
    let i = parts.next()?.parse().ok()?;
    let version = parts.next()?.parse().ok()?;
    let t = parts.next()?.parse().ok()?;
    Some((i, Timestamp::from_micros(version), Timestamp::from_micros(t)))
}

pub use flotilla_runtime::command::merge_params;

/// The CPU time of the thread handling a message (its wall time if the handler moved to
/// another thread across an await).
struct CpuClock {
    wall: Instant,
    thread: std::thread::ThreadId,
    cpu: Option<Duration>,
}

fn thread_cpu() -> Option<Duration> {
    #[cfg(unix)]
    {
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
            .ok()
            .map(Duration::from)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

impl CpuClock {
    fn start() -> CpuClock {
        CpuClock {
            wall: Instant::now(),
            thread: std::thread::current().id(),
            cpu: thread_cpu(),
        }
    }

    fn elapsed_us(&self) -> u64 {
        let d = match (self.cpu, thread_cpu()) {
            (Some(a), Some(b)) if std::thread::current().id() == self.thread => b.saturating_sub(a),
            _ => self.wall.elapsed(),
        };
        d.as_micros() as u64
    }
}

/// The scheduler actor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scheduler;

/// What the scheduler starts from.
#[allow(missing_debug_implementations)]
pub struct SchedulerArgs {
    /// The persistence actor.
    pub persistence: PersistenceHandle,
    /// How far ahead.
    pub settings: ScheduleSettings,
    /// The options of the flows this node knows.
    pub flows: crate::engine::FlowCatalog,
}

impl SchedulerState {
    /// Reads a deployment's runs back: those not started wait to be handed out, the last fire
    /// time per schedule is where creation goes on.
    async fn load(&mut self, d: Deployment, at: Timestamp) -> Result<(), ActorProcessingErr> {
        let id = d.id;
        let mut dep = Dep::new(d);
        let mut after = None;
        let mut stale = Vec::new();
        loop {
            let page = self
                .persistence
                .flow_runs(RunFilter::Deployment(id), after, PAGE_MAX)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for run in page {
                let waiting = run.lifecycle.state.kind == StateType::Scheduled && run.owner.is_none();
                let Some((i, version, t)) = run.idempotency_key.as_deref().and_then(parse_key) else {
                    // An ad-hoc run of the deployment not started yet: handed out as well.
                    if waiting {
                        let due = Due {
                            deployment: id,
                            flow: run.flow_name.clone(),
                            scheduled: false,
                        };
                        self.due.insert((run.expected_start_time, run.id), due);
                    }
                    continue;
                };
                if version != dep.d.updated {
                    // Made before the deployment's last change and left behind by a crash.
                    if waiting {
                        stale.push(run.id);
                    }
                    continue;
                }
                if let Some(l) = dep.last.get_mut(i) {
                    *l = Some(l.map_or(t, |x| x.max(t)));
                }
                if waiting {
                    dep.ahead += 1;
                    dep.horizon = Some(dep.horizon.map_or(t, |h| h.max(t)));
                    let due = Due {
                        deployment: id,
                        flow: run.flow_name.clone(),
                        scheduled: true,
                    };
                    self.due.insert((t, run.id), due);
                }
            }
        }
        self.cancel(stale);
        // Fire times missed while down: skipped, unless the schedule catches up.
        for (i, s) in dep.d.schedules.iter().enumerate() {
            if !s.catchup
                && let Some(l) = dep.last[i]
                && l < at
            {
                dep.last[i] = Some(at);
            }
        }
        self.stats.deployments += 1;
        self.deps.insert(id, dep);
        Ok(())
    }

    /// Cancels runs made for a deployment as it was before a change.
    fn cancel(&mut self, runs: Vec<FlowRunId>) {
        for run in runs {
            let p = Proposal::new(
                State::named(StateName::Cancelling, now()).with_message("its deployment changed"),
                TransitionId::new(now(), &mut self.rng),
            );
            drop(
                self.persistence
                    .enqueue(Command::ProposeFlowRunState { run, proposal: p }),
            );
        }
    }

    /// Creates a deployment's next runs until it is covered far enough ahead.
    fn refill(&mut self, id: DeploymentId, myself: &ActorRef<SchedulerMsg>) {
        let settings = self.settings;
        let t0 = now();
        let Some(dep) = self.deps.get_mut(&id) else { return };
        if dep.d.paused || dep.refilling {
            return;
        }
        let covered = |ahead: usize, horizon: Option<Timestamp>| {
            ahead >= settings.ahead_max
                || (ahead >= settings.ahead_runs && horizon.is_some_and(|h| h >= t0 + settings.ahead_time))
        };
        if covered(dep.ahead, dep.horizon) {
            return;
        }
        // The next fire times of every schedule, merged in time order, as far as needed.
        let mut cursors: Vec<(usize, Option<Timestamp>)> = dep
            .compiled
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c.next_after(dep.last[i].unwrap_or(t0)))))
            .collect();
        let mut make = Vec::new();
        let (mut ahead, mut horizon) = (dep.ahead, dep.horizon);
        while !covered(ahead, horizon) {
            let Some((slot, t)) = cursors
                .iter()
                .enumerate()
                .filter_map(|(slot, (_, t))| t.map(|t| (slot, t)))
                .min_by_key(|(_, t)| *t)
            else {
                break;
            };
            let i = cursors[slot].0;
            ahead += 1;
            horizon = Some(horizon.map_or(t, |h| h.max(t)));
            dep.last[i] = Some(t);
            make.push((t, i));
            cursors[slot].1 = dep.compiled[i].as_ref().and_then(|c| c.next_after(t));
        }
        if make.is_empty() {
            return;
        }
        dep.ahead = ahead;
        dep.horizon = horizon;
        dep.refilling = true;
        let d = &dep.d;
        let enqueued: Vec<_> = make
            .into_iter()
            .map(|(t, i)| {
                let cmd = Command::CreateFlowRun(
                    self.flows
                        .apply(NewFlowRun::of_deployment(
                            FlowRunId::new(t0, &mut self.rng),
                            d,
                            &d.schedules[i].parameters,
                        ))
                        .with_key(Some(key(d, i, t)))
                        .due_at(t),
                );
                (t, self.persistence.enqueue(cmd))
            })
            .collect();
        self.stats.created += enqueued.len() as u64;
        let (me, generation) = (myself.clone(), dep.generation);
        tokio::spawn(async move {
            let mut created = Vec::with_capacity(enqueued.len());
            for (t, answer) in enqueued {
                match answer.await {
                    Ok(Ok(Ok(Reply::FlowRunCreated { run, .. }))) => {
                        if run.lifecycle.state.kind == StateType::Scheduled && run.owner.is_none() {
                            created.push((t, run.id));
                        }
                    }
                    other => {
                        tracing::warn!(deployment = %id, answer = ?other, "a scheduled run was not created")
                    }
                }
            }
            let _ = me.cast(SchedulerMsg::Created(id, generation, created));
        });
    }

    /// Hands out every run that is due.
    fn wake(&mut self, myself: &ActorRef<SchedulerMsg>) {
        let t = now();
        let control = ractor::registry::where_is(CONTROL_NAME).map(ActorRef::<ControlMsg>::from);
        let mut touched = Vec::new();
        while let Some(entry) = self.due.first_entry() {
            if entry.key().0 > t {
                break;
            }
            let ((at, run), due) = entry.remove_entry();
            if let Some(c) = &control {
                let d = self.deps.get(&due.deployment).map(|d| &d.d);
                let p = Placement {
                    run,
                    flow: due.flow.clone(),
                    due: at,
                    queue: d.and_then(|d| d.work_queue.clone()),
                    deployment: Some((
                        due.deployment,
                        d.and_then(|d| d.concurrency_limit.map(|l| (l, d.collision))),
                    )),
                };
                let msg = flotilla_runtime::codec::encode(&p).unwrap_or_default();
                let _ = c.cast(ControlMsg::Place(msg));
            }
            self.stats.handed_out += 1;
            if due.scheduled
                && let Some(d) = self.deps.get_mut(&due.deployment)
            {
                d.ahead = d.ahead.saturating_sub(1);
                touched.push(due.deployment);
            }
        }
        touched.dedup();
        for dep in touched {
            self.refill(dep, myself);
        }
        self.arm(myself);
    }

    /// Makes sure a wake-up is due at the earliest due run.
    fn arm(&mut self, myself: &ActorRef<SchedulerMsg>) {
        let Some(&(first, _)) = self.due.keys().next() else {
            return;
        };
        if self.armed.is_some_and(|a| a <= first) {
            return;
        }
        self.armed = Some(first);
        let wait = first.saturating_since(now());
        myself.send_after(wait, || SchedulerMsg::Wake);
    }

    /// A deployment changed: its runs that have not started are cancelled and it starts afresh.
    async fn changed(
        &mut self,
        id: DeploymentId,
        myself: &ActorRef<SchedulerMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let fresh = self.persistence.deployment(id).await?;
        if let (Some(old), Some(new)) = (self.deps.get(&id), &fresh)
            && old.d.spec() == new.spec()
        {
            return Ok(());
        }
        let generation = self.deps.get(&id).map_or(0, |d| d.generation + 1);
        let stale: Vec<FlowRunId> = self
            .due
            .iter()
            .filter(|(_, d)| d.deployment == id && d.scheduled)
            .map(|((_, run), _)| *run)
            .collect();
        self.due.retain(|_, d| !(d.deployment == id && d.scheduled));
        if self.deps.remove(&id).is_some() {
            self.stats.deployments -= 1;
        }
        self.cancel(stale);
        if let Some(d) = fresh {
            let mut dep = Dep::new(d);
            dep.generation = generation;
            self.deps.insert(id, dep);
            self.stats.deployments += 1;
            self.refill(id, myself);
        }
        Ok(())
    }
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut s = SchedulerState {
            persistence: args.persistence,
            settings: args.settings,
            deps: HashMap::new(),
            due: BTreeMap::new(),
            armed: None,
            rng: SmallRng::seed_from_u64(now().as_micros() as u64 ^ 0x5eed),
            stats: SchedulerStats::default(),
            flows: args.flows,
        };
        let at = now();
        for d in s.persistence.all_deployments().await? {
            s.load(d, at).await?;
        }
        let ids: Vec<DeploymentId> = s.deps.keys().copied().collect();
        for id in ids {
            s.refill(id, &myself);
        }
        s.arm(&myself);
        tracing::info!(
            deployments = s.deps.len(),
            waiting = s.due.len(),
            "scheduler started"
        );
        Ok(s)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let started = CpuClock::start();
        match msg {
            SchedulerMsg::Changed(id) => {
                if let Err(e) = s.changed(id, &myself).await {
                    tracing::warn!(deployment = %id, error = %e, "cannot reschedule the deployment");
                }
            }
            SchedulerMsg::Created(id, generation, runs) => {
                if let Some(dep) = s.deps.get_mut(&id)
                    && dep.generation == generation
                {
                    dep.refilling = false;
                    let flow = dep.d.flow_name.clone();
                    for (t, run) in runs {
                        let due = Due {
                            deployment: id,
                            flow: flow.clone(),
                            scheduled: true,
                        };
                        s.due.insert((t, run), due);
                    }
                    s.arm(&myself);
                    // Due ones already (a slow store) go at once.
                    s.wake(&myself);
                }
            }
            SchedulerMsg::Wake => {
                s.armed = None;
                s.wake(&myself);
            }
            SchedulerMsg::Stats(reply) => {
                let _ = reply.send(s.stats.clone());
            }
        }
        s.stats.busy_us += started.elapsed_us();
        Ok(())
    }
}
