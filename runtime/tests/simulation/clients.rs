//! The clients of the control machine simulation: a user asking for runs through a lossy link
//! (each request sent again, the same, until it is answered; now and then the command run again
//! under the same `--idempotency-key`), the scheduler machine making a deployment's runs ahead
//! of its fire times and handing each out when due (rebuilt from the store at each control
//! restart; the deployment deleted when the faults stop), and a restarted node's previous life
//! whose late proposals carry no epoch — with what each must see: one request, one key, one
//! fire time: one run; nothing answered lost; no node's proposal accepted for a run it does not
//! hold under the run's epoch.

use super::*;

use flotilla_runtime::control::scheduler::{self, Ahead, KnownRun};
use flotilla_runtime::{Deployment, Schedule, ScheduleKind};

/// The scheduled deployment's key (no limit): two schedules, each every second, half a second
/// apart.
const SCHEDULED: &str = "twice-a-second";

/// A user's requests and what they were answered.
#[derive(Debug, Default)]
pub struct Client {
    /// Requests not answered yet, by their run id: when last sent, and the request.
    asked: BTreeMap<FlowRunId, (Timestamp, NewFlowRun)>,
    /// The run each request (by its run id) was answered with.
    answered: BTreeMap<FlowRunId, FlowRunId>,
    /// The user's keys, and the runs their requests were answered with.
    keys: BTreeMap<String, BTreeSet<FlowRunId>>,
}

/// The scheduler machine, the wake-ups it asked for and the runs it asked to make that are not
/// logged yet (both lost with the control node).
#[derive(Debug)]
pub struct Scheduler {
    machine: scheduler::Scheduler,
    wakes: BTreeSet<Timestamp>,
    making: Vec<(Timestamp, scheduler::Effect)>,
    /// When it (re)starts, if it is down.
    starting: Option<Timestamp>,
    /// Whether the deployment was deleted (once the faults stop).
    deleted: bool,
    /// When the scheduled deployment was changed last (the store's version of it).
    version: Timestamp,
}

impl Scheduler {
    pub fn new() -> Self {
        Scheduler {
            machine: scheduler::Scheduler::new(Ahead {
                runs: 3,
                time: Duration::from_secs(1),
                max: 10,
            }),
            wakes: BTreeSet::new(),
            making: Vec::new(),
            starting: None,
            deleted: false,
            version: Timestamp::from_micros(0),
        }
    }

    /// The control node restarted: it starts afresh at `at`.
    pub fn start_at(&mut self, at: Timestamp) {
        self.wakes.clear();
        self.making.clear();
        self.starting = Some(at);
    }
}

/// The deployments: one on two schedules (no limit), and the limited ones the
/// client makes runs of (no schedule).
fn deployments(start: Timestamp, version: Timestamp) -> Vec<Deployment> {
    let mut all = vec![scheduled(start, version)];
    for (key, limit, collision) in DEPLOYMENTS {
        all.push(Deployment {
            id: deployment(key),
            name: key.into(),
            schedules: Vec::new(),
            concurrency_limit: Some(limit),
            collision,
            work_queue: Some(queue_of(key).into()),
            ..scheduled(start, start)
        });
    }
    all
}

/// A limited deployment's work queue (its runs are made in it).
fn queue_of(key: &str) -> &'static str {
    if key == DEPLOYMENTS[0].0 { "etl" } else { "default" }
}

/// The scheduled deployment as changed last at `version` (its parameters name the version).
fn scheduled(start: Timestamp, version: Timestamp) -> Deployment {
    Deployment {
        id: deployment(SCHEDULED),
        name: SCHEDULED.into(),
        flow_name: "f".into(),
        parameters: serde_json::json!({ "version": version.as_micros() }),
        schedules: [0, 500]
            .into_iter()
            .map(|offset| Schedule {
                kind: ScheduleKind::Interval {
                    every: Duration::from_secs(1),
                    anchor: start + Duration::from_millis(offset),
                },
                active: true,
                parameters: serde_json::json!({}),
                catchup: offset == 0,
            })
            .collect(),
        work_queue: Some("default".into()),
        tags: Vec::new(),
        concurrency_limit: None,
        collision: CollisionStrategy::Enqueue,
        paused: false,
        result_storage: None,
        created: start,
        updated: version,
    }
}

impl Sim {
    /// A user asks for a run in a random queue, maybe of a limited deployment, maybe under an
    /// idempotency key of its own.
    pub(super) fn make_run(&mut self) {
        self.made += 1;
        let id = FlowRunId::from_uuid(derived_id(&format!("run/{}", self.made)));
        let d = match self.rng.below(4) {
            0 => Some(DEPLOYMENTS[0]),
            1 => Some(DEPLOYMENTS[1]),
            _ => None,
        };
        // A deployment's runs are made in its queue.
        let queue = match d {
            Some((key, ..)) => queue_of(key),
            None => QUEUES[self.rng.below(3) as usize].0,
        };
        let key = self.rng.chance(200).then(|| format!("key-{}", self.made));
        let new = NewFlowRun {
            resume: self.rng.chance(500),
            work_queue: Some(queue.into()),
            deployment_id: d.map(|(key, ..)| deployment(key)),
            scheduled_time: Some(self.now),
            idempotency_key: key.clone(),
            ..NewFlowRun::new(id, "f", serde_json::Value::Null)
        };
        self.note(format!(
            "asks for {} in {queue}, deployment {:?}, key {key:?}",
            short(id),
            d.map(|d| d.0)
        ));
        if let Some(key) = key {
            self.client.keys.entry(key).or_default();
        }
        self.ask(new);
    }

    fn ask(&mut self, new: NewFlowRun) {
        self.client.asked.insert(new.id, (self.now, new.clone()));
        self.send_faulty(Msg::Create(Box::new(new)));
    }

    /// What the clients do at `now`: requests not answered are sent again; now and then a user
    /// runs a command again under a key it used (a new request, the same key); the schedule
    /// fires.
    pub(super) fn clients_act(&mut self) {
        let now = self.now;
        let again: Vec<NewFlowRun> = self
            .client
            .asked
            .values()
            .filter(|(at, _)| now.saturating_since(*at) >= RESEND_AFTER)
            .map(|(_, new)| new.clone())
            .collect();
        for new in again {
            self.ask(new);
        }
        if !self.faults() {
            return;
        }
        if self.rng.chance(20) && !self.client.keys.is_empty() {
            let i = self.rng.below(self.client.keys.len() as u64) as usize;
            let key = self.client.keys.keys().nth(i).cloned();
            self.made += 1;
            let id = FlowRunId::from_uuid(derived_id(&format!("run/{}", self.made)));
            self.note(format!("runs its command again under {key:?}: {}", short(id)));
            self.ask(NewFlowRun {
                work_queue: Some("default".into()),
                scheduled_time: Some(now),
                idempotency_key: key,
                ..NewFlowRun::new(id, "f", serde_json::Value::Null)
            });
        }
    }

    /// The scheduler starts when its time came; its runs whose making is logged are told to
    /// it; its wake-ups that came; once the faults stop, its deployment is deleted.
    pub(super) fn scheduler_acts(&mut self) {
        if let Some(at) = self.scheduler.starting {
            if at > self.now {
                return;
            }
            self.scheduler.starting = None;
            self.scheduler_started();
        }
        let now = self.now;
        let (logged, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.scheduler.making)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.scheduler.making = later;
        for (_, create) in logged {
            self.make_scheduled(create);
        }
        // Now and then its user changes the deployment: what it made ahead is cancelled and it
        // schedules afresh under the new version.
        if self.faults() && self.rng.chance(3) && !self.scheduler.deleted {
            self.scheduler.version = self.now;
            self.note("the scheduled deployment is changed".into());
            let deployment = scheduled(self.start, self.now);
            let id = deployment.id;
            self.schedule(scheduler::Input::Changed {
                id,
                deployment: Some(deployment),
            });
        }
        if !self.faults() && !self.scheduler.deleted {
            self.scheduler.deleted = true;
            self.note("the scheduled deployment is deleted".into());
            let id = deployment(SCHEDULED);
            self.schedule(scheduler::Input::Changed { id, deployment: None });
        }
        while let Some(&at) = self.scheduler.wakes.first()
            && at <= self.now
        {
            self.scheduler.wakes.remove(&at);
            self.schedule(scheduler::Input::Wake);
        }
    }

    /// The runs of a `Create` are logged: the scheduler is told which wait.
    fn make_scheduled(&mut self, create: scheduler::Effect) {
        let scheduler::Effect::Create {
            deployment,
            generation,
            runs,
        } = create
        else {
            return;
        };
        let mut made = Vec::new();
        for (at, new) in runs {
            if let Ok(Reply::FlowRunCreated { run, .. }) = self.log(Command::CreateFlowRun(new))
                && run.lifecycle.state.kind == StateType::Scheduled
                && run.owner.is_none()
            {
                made.push((at, run.id));
            }
        }
        self.schedule(scheduler::Input::Created {
            deployment,
            generation,
            runs: made,
        });
    }

    /// The control node (re)starts its scheduler: a new machine, given the deployment and its
    /// runs as the store has them.
    pub(super) fn scheduler_started(&mut self) {
        self.scheduler.machine = Scheduler::new().machine;
        for deployment in deployments(self.start, self.scheduler.version) {
            if deployment.name == SCHEDULED && self.scheduler.deleted {
                continue;
            }
            let d = deployment.id;
            let mut runs: Vec<KnownRun> = self
                .state
                .hot()
                .flow_runs()
                .filter(|r| r.deployment_id == Some(d))
                .map(|r| KnownRun {
                    id: r.id,
                    flow: r.flow_name.clone(),
                    queue: r.work_queue.clone(),
                    key: r.idempotency_key.clone(),
                    due: r.expected_start_time,
                    waiting: r.lifecycle.state.kind == StateType::Scheduled && r.owner.is_none(),
                })
                .collect();
            runs.sort_by_key(|r| r.id);
            self.schedule(scheduler::Input::Loaded { deployment, runs });
        }
        self.schedule(scheduler::Input::Started);
    }

    /// The scheduler machine handles an input; its effects are carried out as the scheduler
    /// actor does: runs made (then it is told which wait), due runs handed to placement.
    fn schedule(&mut self, input: scheduler::Input) {
        let mut inputs = std::collections::VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            for effect in self.scheduler.machine.handle(self.now, input) {
                match effect {
                    create @ scheduler::Effect::Create { .. } => {
                        // Logged a little later (lost if the control node restarts first).
                        let at = self.now + self.rng.ms(0, 40);
                        self.scheduler.making.push((at, create));
                    }
                    scheduler::Effect::Append(command) => {
                        let _ = self.log(*command);
                    }
                    scheduler::Effect::HandOut(p) => {
                        self.note(format!("the schedule's {} is due", short(p.run)));
                        self.drive(Input::Due(p));
                    }
                    scheduler::Effect::WakeAt(at) => {
                        self.scheduler.wakes.insert(at);
                    }
                }
            }
        }
    }

    /// The control node gets a request for a run: it makes it (once: by its run id, or its
    /// key) and, once that is logged, answers with the run. A restart before loses it: the
    /// client asks again.
    pub(super) fn control_creates(&mut self, new: NewFlowRun) {
        let at = self.log_at();
        let asked = new.id;
        self.unlogged
            .push((at, Command::CreateFlowRun(new), Then::Created(asked)));
    }

    /// The request for the run `asked` is logged: answered with the run.
    pub(super) fn created(&mut self, asked: FlowRunId, reply: Result<Reply, flotilla_runtime::Refusal>) {
        match reply {
            Ok(Reply::FlowRunCreated { run, created }) => {
                if created {
                    self.note(format!("made {}", short(run.id)));
                    if let Some(p) = self.waiting_placement(run.id) {
                        self.drive(Input::Due(p));
                    }
                }
                self.send_faulty(Msg::Created(asked, run.id));
            }
            other => self.broken(format!("the request for {} answered {other:?}", short(asked))),
        }
    }

    /// The user is answered: the run made for its request.
    pub(super) fn client_told(&mut self, asked: FlowRunId, run: FlowRunId) {
        let key = self
            .client
            .asked
            .remove(&asked)
            .and_then(|(_, new)| new.idempotency_key);
        if let Some(first) = self.client.answered.insert(asked, run)
            && first != run
        {
            self.broken(format!(
                "the request for {} answered with {} and then {}",
                short(asked),
                short(first),
                short(run)
            ));
        }
        if let Some(key) = key {
            let runs = self.client.keys.entry(key.clone()).or_default();
            runs.insert(run);
            if runs.len() > 1 {
                let runs: Vec<String> = runs.iter().map(|r| short(*r)).collect();
                self.broken(format!("the key {key} answered with runs {runs:?}"));
            }
        }
    }

    /// A restarted node's previous life still had proposals in flight for the runs it held:
    /// Crashed, without an epoch (as a worker once sent them).
    pub(super) fn late_proposals(&mut self, i: usize) {
        let node = self.nodes[i].name.clone();
        for (run, epoch) in std::mem::take(&mut self.nodes[i].lost) {
            if !self.rng.chance(500) {
                continue;
            }
            let mut late = self.proposal(run, epoch, &node, StateName::Crashed, self.now);
            if let Command::ProposeFlowRunState { proposal, .. } = &mut late {
                proposal.epoch = None;
            }
            self.send_faulty(Msg::Late(node.clone(), epoch, late));
        }
    }

    /// A late proposal arrives: accepted only if the run is still where that life left it.
    pub(super) fn late_arrives(&mut self, node: NodeId, held: flotilla_runtime::Epoch, late: Command) {
        let Command::ProposeFlowRunState { run, .. } = &late else {
            return;
        };
        let run = *run;
        let before = self.state.hot().flow_run(&run).map(|r| r.epoch);
        let reply = self.log(late);
        if accepted(&reply) && before != Some(held) {
            self.broken(format!(
                "{node}'s previous life, which held {} under {held}, changed it under epoch {before:?}",
                short(run)
            ));
        }
    }

    fn broken(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }

    /// A run made under a key (the user's, or a fire time's): the first under its key.
    pub(super) fn made_under_key(&mut self, run: &flotilla_runtime::FlowRun) {
        let Some(key) = &run.idempotency_key else {
            return;
        };
        if let Some(first) = self.keyed.insert(key.clone(), run.id) {
            self.broken(format!(
                "two runs under the key {key}: {} and {}",
                short(first),
                short(run.id)
            ));
        }
    }

    /// What broke while a command was logged or a message handled.
    pub(super) fn check_clients(&self) -> Result<(), String> {
        self.violation.clone().map_or(Ok(()), Err)
    }

    /// Once quiet: every request answered, and every run answered is there (the runs are never
    /// pruned here); no fire time has two runs that were not cancelled (whatever the version:
    /// a change of the deployment cancels what it made ahead, before it ran).
    pub(super) fn clients_settled(&self) -> Result<(), String> {
        if let Some(run) = self.client.asked.keys().next() {
            return Err(format!("the request for {} was never answered", short(*run)));
        }
        let mut fired: BTreeMap<String, Vec<FlowRunId>> = BTreeMap::new();
        for r in self.state.hot().flow_runs() {
            let Some(key) = &r.idempotency_key else { continue };
            let parts: Vec<&str> = key.split('/').collect();
            if let ["sched", deployment, schedule, _version, time] = parts[..]
                && r.lifecycle.state.kind != StateType::Cancelled
            {
                fired
                    .entry(format!("{deployment}/{schedule}/{time}"))
                    .or_default()
                    .push(r.id);
            }
        }
        if let Some((at, runs)) = fired.iter().find(|(_, runs)| runs.len() > 1) {
            let runs: Vec<String> = runs.iter().map(|r| short(*r)).collect();
            return Err(format!("fire time {at} has {} runs: {runs:?}", runs.len()));
        }
        let hot = self.state.hot();
        match self.client.answered.values().find(|r| hot.flow_run(r).is_none()) {
            Some(lost) => Err(format!("{} was answered and is lost", short(*lost))),
            None => Ok(()),
        }
    }

    /// What the run came to: the log's length and every run's state and epoch.
    pub fn digest(&self) -> String {
        let mut runs: Vec<String> = self
            .state
            .hot()
            .flow_runs()
            .map(|r| format!("{} {} {}", r.id, r.lifecycle.state.name, r.epoch))
            .collect();
        runs.sort();
        format!("{} commands, {} runs: {runs:?}", self.index, runs.len())
    }
}
