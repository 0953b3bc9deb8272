//! The scheduler actor: a singleton on the control node, the driver of the pure
//! [`Scheduler`](flotilla_runtime::control::scheduler::Scheduler) machine, which decides which
//! runs each deployment's schedules make and when each is handed to placement. This actor reads
//! the deployments and their runs back at its start, makes the runs the machine asks for (with
//! the flows' options), hands due runs to the control actor's placement and sets the machine's
//! wake-ups. Runs are keyed `sched/{deployment}/{schedule}/{version}/{fire time}`, so a restart
//! never makes a fire time's run twice.

use std::time::{Duration, Instant};

use flotilla_cluster::wire::SchedulerStats;
use flotilla_runtime::control::scheduler::{Ahead, Effect, Input, KnownRun, Scheduler as Machine};
use flotilla_runtime::{DeploymentId, FlowRunId, Reply, StateType, Timestamp};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::control::ControlMsg;
use crate::persistence::{PAGE_MAX, PersistenceHandle, RunFilter};

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

impl From<ScheduleSettings> for Ahead {
    fn from(s: ScheduleSettings) -> Ahead {
        Ahead {
            runs: s.ahead_runs,
            time: s.ahead_time,
            max: s.ahead_max,
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

/// The scheduler's state.
pub struct SchedulerState {
    persistence: PersistenceHandle,
    machine: Machine,
    /// Time spent handling messages, in microseconds.
    busy_us: u64,
    /// The options of the flows this node knows (its runs take them).
    flows: crate::engine::FlowCatalog,
}

impl std::fmt::Debug for SchedulerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerState")
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

fn now() -> Timestamp {
    Timestamp::from(chrono::Utc::now())
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
    /// Feeds the machine one input and carries out what it decides.
    fn drive(&mut self, input: Input, myself: &ActorRef<SchedulerMsg>) {
        for effect in self.machine.handle(now(), input) {
            match effect {
                Effect::Create {
                    deployment,
                    generation,
                    runs,
                } => self.create(deployment, generation, runs, myself),
                Effect::Append(command) => drop(self.persistence.enqueue(*command)),
                Effect::HandOut(p) => match super::control::local_control() {
                    Some(c) => {
                        let _ = c.cast(ControlMsg::Place(super::typed::Wire::new(p)));
                    }
                    None => tracing::warn!(flow_run = %p.run, "no control actor to hand a run to"),
                },
                Effect::WakeAt(at) => {
                    myself.send_after(at.saturating_since(now()), || SchedulerMsg::Wake);
                }
            }
        }
    }

    /// Makes a deployment's runs (with their flows' options) and tells the machine which wait.
    fn create(
        &mut self,
        id: DeploymentId,
        generation: u64,
        runs: Vec<(Timestamp, flotilla_runtime::NewFlowRun)>,
        myself: &ActorRef<SchedulerMsg>,
    ) {
        let enqueued: Vec<_> = runs
            .into_iter()
            .map(|(t, new)| {
                let cmd = flotilla_runtime::Command::CreateFlowRun(self.flows.apply(new));
                (t, self.persistence.enqueue(cmd))
            })
            .collect();
        let me = myself.clone();
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

    /// A deployment's runs as the store has them.
    async fn runs_of(&self, id: DeploymentId) -> Result<Vec<KnownRun>, ActorProcessingErr> {
        let mut runs = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .persistence
                .flow_runs(RunFilter::Deployment(id), after, PAGE_MAX)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            runs.extend(page.into_iter().map(|r| KnownRun {
                id: r.id,
                flow: r.flow_name,
                queue: r.work_queue,
                waiting: r.lifecycle.state.kind == StateType::Scheduled && r.owner.is_none(),
                due: r.expected_start_time,
                key: r.idempotency_key,
            }));
        }
        Ok(runs)
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
            machine: Machine::new(args.settings.into()),
            busy_us: 0,
            flows: args.flows,
        };
        for deployment in s.persistence.all_deployments().await? {
            let runs = s.runs_of(deployment.id).await?;
            s.drive(Input::Loaded { deployment, runs }, &myself);
        }
        s.drive(Input::Started, &myself);
        tracing::info!(
            deployments = s.machine.counts().deployments,
            waiting = s.machine.waiting(),
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
            SchedulerMsg::Changed(id) => match s.persistence.deployment(id).await {
                Ok(deployment) => s.drive(Input::Changed { id, deployment }, &myself),
                Err(e) => tracing::warn!(deployment = %id, error = %e, "cannot reschedule the deployment"),
            },
            SchedulerMsg::Created(deployment, generation, runs) => s.drive(
                Input::Created {
                    deployment,
                    generation,
                    runs,
                },
                &myself,
            ),
            SchedulerMsg::Wake => s.drive(Input::Wake, &myself),
            SchedulerMsg::Stats(reply) => {
                let c = s.machine.counts();
                let _ = reply.send(SchedulerStats {
                    deployments: c.deployments,
                    created: c.created,
                    handed_out: c.handed_out,
                    busy_us: s.busy_us,
                });
            }
        }
        s.busy_us += started.elapsed_us();
        Ok(())
    }
}
