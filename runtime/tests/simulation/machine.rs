//! Seeded simulation of the control machine, driven as the control actor drives it: worker
//! nodes that heartbeat, claim the runs they are told to start, run one task per run holding
//! tag-limit slots, crash, restart (their previous life's late, epoch-less proposals still in
//! flight) and get cut off; a client making runs in three work queues and two limited
//! deployments through a lossy link, sending each request again until it is answered (now and
//! then its user runs the command again with the same `--idempotency-key`); a scheduler firing
//! a deployment's schedule, which fires again what it fired last after a restart; a control node
//! that restarts (losing what it had not logged); the lead moving to another control node while
//! the deposed one goes on for a while unaware (its appends refused, its starts and slot answers
//! still reaching nodes, some of which still talk to it); messages lost, repeated and delayed (now and
//! then by a slow link); the store's read-backs taking a while. Every command goes through the
//! real `apply`.
//!
//! After every step: no tag has more task runs believing they hold a slot than its limit, nor
//! more leases; no queue or deployment has more runs under way than its limit; never two nodes
//! run one run under its epoch; no node's proposal is accepted for a run it does not hold under
//! the run's epoch; no run completes twice; no run the client was told of is lost; one request,
//! one idempotency key, one fire time: one run. Once quiet: every run ended, no slot is held, no
//! run that resumes is left Crashed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_runtime::control::machine::{
    ControlConfig, ControlMachine, Effect, Input, Running, SlotAnswer, resume_after_loss,
};
use flotilla_runtime::control::{MemberStatus, Placement, SlotGrant, derived_id};
use flotilla_runtime::{
    ApplyContext, CollisionStrategy, Command, ConcurrencyLimit, Decision, DeploymentId, FlowRunId, LogIndex,
    MemState, NewFlowRun, NodeId, Proposal, Reply, Setting, State, StateName, StateType, StateView,
    TaskRunId, Timestamp, TransitionId, WorkQueue, WorkQueueId, apply,
};

use crate::Rng;

#[path = "clients.rs"]
mod clients;
#[path = "invariants.rs"]
mod invariants;
#[path = "nodes.rs"]
mod nodes;

use clients::{Client, Scheduler};

const FAULT_PHASE: Duration = Duration::from_secs(8);
const QUIET_MAX: Duration = Duration::from_secs(40);
const BEAT_EVERY: Duration = Duration::from_millis(100);
const TICK_EVERY: Duration = Duration::from_millis(50);
const RESEND_AFTER: Duration = Duration::from_millis(400);
/// The longest a deposed control node goes on answering before it notices it lost the lead
/// (with replication: a leader refuses once it has heard no quorum for a second).
const DEPOSED_MAX: Duration = Duration::from_millis(900);
const TRACE_MAX: usize = 60;
/// (tag, limit, lease TTL in ms)
const LIMITS: [(&str, u32, u64); 2] = [("db", 2, 800), ("gpu", 1, 500)];
const TAG_SETS: [&[&str]; 4] = [&["db"], &["gpu"], &["db", "gpu"], &["free"]];
/// (queue, priority, concurrency limit)
const QUEUES: [(&str, u32, Option<u32>); 3] = [("default", 1, None), ("etl", 1, Some(2)), ("bulk", 2, None)];
/// (deployment key, limit, collision)
const DEPLOYMENTS: [(&str, u32, CollisionStrategy); 2] = [
    ("one-at-a-time", 1, CollisionStrategy::Enqueue),
    ("two-or-cancel", 2, CollisionStrategy::CancelNew),
];

/// Where a task run's slot answer goes back to: which request it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Token {
    task: TaskRunId,
    sent_at: Timestamp,
}

#[derive(Clone, Debug)]
enum Msg {
    /// Control → node (the incarnation addressed).
    Start(NodeId, u64, FlowRunId),
    Slots(NodeId, u64, Token, SlotAnswer),
    /// Node → control.
    Beat(MemberStatus),
    Acquire(NodeId, Token, Vec<String>),
    Renew(NodeId, Token, Vec<String>),
    Release(TaskRunId),
    /// Control → itself: read a run back, then take it back if it still waits.
    Recheck(FlowRunId),
    TakeBack(Placement),
    /// Client → control: make this run (sent again, the same, until answered).
    Create(Box<NewFlowRun>),
    /// Control → client: the run made for the request of this run id.
    Created(FlowRunId, FlowRunId),
    /// A node's previous life → control: a late proposal of a run it held under an epoch.
    Late(NodeId, flotilla_runtime::Epoch, Command),
}

#[derive(Debug)]
enum Phase {
    /// Waiting for its slots since it asked.
    Acquiring(Timestamp),
    /// Holding them (it believes) until `deadline`; renewing since `renewing`, if it is.
    Holding {
        deadline: Timestamp,
        renewing: Option<Timestamp>,
        work_left: Duration,
    },
}

#[derive(Debug)]
struct Task {
    id: TaskRunId,
    tags: Vec<String>,
    ttl: Duration,
    phase: Phase,
}

impl Task {
    /// Its request for its slots from `node` at `now` (a renewal, or an acquire).
    fn ask(&self, node: &NodeId, now: Timestamp, renew: bool) -> Msg {
        let token = Token {
            task: self.id,
            sent_at: now,
        };
        if renew {
            Msg::Renew(node.clone(), token, self.tags.clone())
        } else {
            Msg::Acquire(node.clone(), token, self.tags.clone())
        }
    }
}

#[derive(Debug)]
struct SimNode {
    name: NodeId,
    up: bool,
    incarnation: u64,
    slots: u32,
    queues: Vec<String>,
    runs: BTreeMap<FlowRunId, (flotilla_runtime::Epoch, Task)>,
    /// What it ran when it crashed (its late proposals are sent when it restarts).
    lost: Vec<(FlowRunId, flotilla_runtime::Epoch)>,
    /// Runs done whose end is not acknowledged yet (sent again until it is, as the worker's
    /// link does).
    finishing: Vec<(FlowRunId, flotilla_runtime::Epoch, Timestamp)>,
    next_beat: Timestamp,
    down_until: Timestamp,
    cut_off_until: Timestamp,
}

/// A command the control machine appended, not logged yet: when it will be, and the slot answer it
/// is recorded for (sent once it is).
type Unlogged = (Timestamp, Command, Then);

/// What follows when an append is logged.
#[derive(Debug)]
enum Then {
    Nothing,
    /// Answer a task run about its slots (a holding logged).
    Answer(NodeId, Token, SlotAnswer),
    /// Resume elsewhere what the dead node's crash left (a node's death logged).
    Resume(NodeId),
    /// Answer the client's request for the run of this id (its run logged).
    Created(FlowRunId),
}

/// One simulated run.
pub struct Sim {
    rng: Rng,
    pub now: Timestamp,
    start: Timestamp,
    pub state: MemState,
    index: u64,
    coord: ControlMachine<Token>,
    /// the control machine's appends not logged yet: (due, command, the slot answer it is recorded
    /// for).
    unlogged: Vec<Unlogged>,
    nodes: Vec<SimNode>,
    msgs: Vec<(Timestamp, u64, Msg)>,
    msg_seq: u64,
    next_tick: Timestamp,
    next_run: Timestamp,
    made: u64,
    ended: BTreeSet<FlowRunId>,
    pub trace: Vec<String>,
    pub control_restarts: u32,
    /// The control machine of a deposed leader, still answering until then, and the nodes
    /// whose sessions still lead to it.
    deposed: Option<(ControlMachine<Token>, Timestamp, BTreeSet<NodeId>)>,
    pub leader_changes: u32,
    /// Slot answers a deposed leader sent.
    pub deposed_answers: u32,
    client: Client,
    scheduler: Scheduler,
    /// The run made under each idempotency key.
    keyed: BTreeMap<String, FlowRunId>,
    /// How many times each run's Completed was accepted.
    completions: BTreeMap<FlowRunId, u32>,
    /// A broken invariant seen while a command was logged.
    violation: Option<String>,
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn node_name(i: usize) -> NodeId {
    format!("n{}", i + 1).parse().expect("a node name")
}

fn deployment(key: &str) -> DeploymentId {
    DeploymentId::from_uuid(derived_id(&format!("deployment/{key}")))
}

impl Sim {
    pub fn new(seed: u64) -> Self {
        let start = Timestamp::from_micros(1_800_000_000_000_000);
        let mut rng = Rng(seed);
        let nodes = (0..3)
            .map(|i| SimNode {
                name: node_name(i),
                up: true,
                incarnation: 1,
                slots: 1 + rng.below(3) as u32,
                // One node serves only the bulk queue.
                queues: if i == 2 { vec!["bulk".into()] } else { Vec::new() },
                runs: BTreeMap::new(),
                lost: Vec::new(),
                finishing: Vec::new(),
                next_beat: start,
                down_until: start,
                cut_off_until: start,
            })
            .collect();
        let mut sim = Sim {
            rng,
            now: start,
            start,
            state: MemState::new(),
            index: 0,
            coord: ControlMachine::new(Self::config()),
            unlogged: Vec::new(),
            nodes,
            msgs: Vec::new(),
            msg_seq: 0,
            next_tick: start,
            next_run: start,
            made: 0,
            ended: BTreeSet::new(),
            trace: Vec::new(),
            control_restarts: 0,
            deposed: None,
            leader_changes: 0,
            deposed_answers: 0,
            client: Client::default(),
            scheduler: Scheduler::new(),
            keyed: BTreeMap::new(),
            completions: BTreeMap::new(),
            violation: None,
        };
        for (name, priority, concurrency_limit) in QUEUES {
            let q = WorkQueue {
                id: WorkQueueId::from_uuid(derived_id(&format!("queue/{name}"))),
                name: name.into(),
                priority,
                concurrency_limit,
                paused: false,
            };
            let _ = sim.log(Command::PutSetting {
                setting: Setting::WorkQueue(q),
                at: start,
            });
        }
        for (tag, limit, ttl) in LIMITS {
            let l = ConcurrencyLimit {
                tag: tag.into(),
                limit,
                lease_ttl: ms(ttl),
                leases: Vec::new(),
            };
            let _ = sim.log(Command::PutSetting {
                setting: Setting::ConcurrencyLimit(l),
                at: start,
            });
        }
        sim.control_started();
        sim
    }

    fn config() -> ControlConfig {
        ControlConfig {
            unreachable_after: Duration::from_secs(1),
            late_after: Duration::from_secs(2),
            lease_grace: DEPOSED_MAX,
        }
    }

    fn note(&mut self, what: String) {
        let t = self.now.saturating_since(self.start).as_millis();
        self.trace.push(format!("{t:>6} ms  {what}"));
        if self.trace.len() > TRACE_MAX {
            self.trace.remove(0);
        }
    }

    /// Appends and applies a command (durable at once); a run it ended is told to the
    /// control machine, as the store's events tell the control actor.
    fn log(&mut self, command: Command) -> Result<Reply, flotilla_runtime::Refusal> {
        self.index += 1;
        let proposed = match &command {
            Command::ProposeFlowRunState { run, .. } => Some(*run),
            _ => None,
        };
        let at = ApplyContext {
            index: LogIndex::new(self.index),
            now: self.now,
        };
        let out = apply(&mut self.state, command, at);
        if let Ok(Reply::FlowRunCreated { run, created: true }) = &out.reply {
            self.made_under_key(run);
        }
        if let (
            Some(run),
            Ok(Reply::FlowRunTransition {
                decision: Decision::Accept(s),
                ..
            }),
        ) = (proposed, &out.reply)
            && s.kind == StateType::Completed
        {
            let n = self.completions.entry(run).or_default();
            *n += 1;
            if *n > 1 && self.violation.is_none() {
                self.violation = Some(format!("{} completed {n} times", short(run)));
            }
        }
        let changed: Vec<FlowRunId> = out
            .writes
            .iter()
            .filter_map(|w| match w {
                flotilla_runtime::Write::FlowRun(id) => Some(*id),
                _ => None,
            })
            .collect();
        for run in changed {
            let terminal = self
                .state
                .hot()
                .flow_run(&run)
                .is_some_and(|r| r.lifecycle.state.is_terminal());
            // Each time it ends (a run resumed after a crash ends again).
            if !terminal {
                self.ended.remove(&run);
            } else if self.ended.insert(run) {
                self.drive(Input::Ended(run));
            }
        }
        out.reply
    }

    fn send(&mut self, delay: Duration, msg: Msg) {
        self.msg_seq += 1;
        self.msgs.push((self.now + delay, self.msg_seq, msg));
    }

    /// Sends with the network's faults: lost, repeated, delayed.
    fn send_faulty(&mut self, msg: Msg) {
        if self.faults() && self.rng.chance(40) {
            return;
        }
        // Now and then a slow link: a message arrives long after the ones sent after it.
        let delay = if self.faults() && self.rng.chance(15) {
            self.rng.ms(300, 1_200)
        } else {
            self.rng.ms(1, 60)
        };
        if self.faults() && self.rng.chance(30) {
            let again = msg.clone();
            let later = self.rng.ms(1, 150);
            self.send(later, again);
        }
        self.send(delay, msg);
    }

    fn faults(&self) -> bool {
        self.now.saturating_since(self.start) < FAULT_PHASE
    }

    /// The control machine handles an input; its effects are carried out.
    fn drive(&mut self, input: Input<Token>) {
        let effects = self.coord.handle(self.now, input);
        for e in effects {
            match e {
                Effect::Append(command) => {
                    let at = self.log_at();
                    self.unlogged.push((at, command, Then::Nothing));
                }
                Effect::DeclareDead { node, command } => {
                    let at = self.log_at();
                    self.unlogged.push((at, command, Then::Resume(node)));
                }
                Effect::Start { node, placement } => {
                    let Some(n) = self.nodes.iter().find(|n| n.name == node) else {
                        continue;
                    };
                    let inc = n.incarnation;
                    self.note(format!("start {} on {node}", short(placement.run)));
                    self.send_faulty(Msg::Start(node.clone(), inc, placement.run));
                }
                Effect::Recheck { runs, .. } => {
                    // The driver reads each run from the store, off the actor, and sends
                    // itself a take-back: both take a while, as claims go on meanwhile.
                    for run in runs {
                        let delay = self.rng.ms(0, 30);
                        self.send(delay, Msg::Recheck(run));
                    }
                }
                Effect::Hold {
                    holder,
                    node,
                    tags,
                    reply,
                    answer,
                } => {
                    let at = self.log_at();
                    let command = Command::Slots(flotilla_runtime::SlotChange::Hold {
                        holder,
                        node: node.clone(),
                        tags,
                    });
                    self.unlogged
                        .push((at, command, Then::Answer(node, reply, answer)));
                }
                Effect::Answer { reply, answer } => {
                    if let Some(node) = self.node_of(reply.task) {
                        self.answer(node, reply, answer);
                    }
                }
                Effect::Notice(n) => self.note(format!("notice {n:?}")),
            }
        }
    }

    /// When an append will be logged: a little later, and never before the one appended before
    /// it (the log keeps their order, so a restart loses a suffix of them).
    fn log_at(&mut self) -> Timestamp {
        let at = self.now + self.rng.ms(0, 20);
        self.unlogged.last().map_or(at, |(last, ..)| at.max(*last))
    }

    fn node_of(&self, task: TaskRunId) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|n| n.runs.values().any(|(_, t)| t.id == task))
            .map(|n| n.name.clone())
    }

    fn answer(&mut self, node: NodeId, token: Token, answer: SlotAnswer) {
        let Some(inc) = self.nodes.iter().find(|n| n.name == node).map(|n| n.incarnation) else {
            return;
        };
        self.send_faulty(Msg::Slots(node, inc, token, answer));
    }

    /// The run as placement sees it, if it still waits (Scheduled, claimed by nobody).
    fn waiting_placement(&self, run: FlowRunId) -> Option<Placement> {
        let r = self.state.hot().flow_run(&run)?;
        if r.lifecycle.state.kind != StateType::Scheduled || r.owner.is_some() {
            return None;
        }
        let deployment = r.deployment_id.map(|d| {
            let limit = DEPLOYMENTS
                .iter()
                .find(|(key, ..)| deployment(key) == d)
                .map(|(_, l, c)| (*l, *c));
            (d, limit)
        });
        Some(Placement {
            run,
            flow: r.flow_name.clone(),
            due: r.expected_start_time,
            queue: r.work_queue.clone(),
            deployment,
            known: None,
        })
    }

    /// The control node (re)starts: a new control machine reads back the settings, the slot
    /// holdings, the runs under way and the runs waiting.
    fn control_started(&mut self) {
        self.coord = ControlMachine::new(Self::config());
        let hot = self.state.hot();
        let holds = hot.slot_holds_complete().then(|| {
            hot.slot_holds()
                .map(|((tag, holder), node)| (tag.clone(), *holder, node.clone()))
                .collect::<Vec<_>>()
        });
        let (mut queues, mut limits) = (Vec::new(), Vec::new());
        for s in hot.settings() {
            match s {
                Setting::WorkQueue(q) => queues.push(q.clone()),
                Setting::ConcurrencyLimit(l) => limits.push(l.clone()),
                Setting::Automation(_) | Setting::Block(_) => {}
            }
        }
        let mut running = Vec::new();
        let mut waiting = Vec::new();
        for r in hot.flow_runs() {
            match r.lifecycle.state.kind {
                StateType::Pending | StateType::Running | StateType::Cancelling => running.push(Running {
                    run: r.id,
                    queue: r.work_queue.clone(),
                    deployment: r.deployment_id,
                    node: r.owner.clone(),
                }),
                StateType::Scheduled => waiting.push(r.id),
                _ => {}
            }
        }
        // The hot state's maps iterate in no fixed order: sorted, a seed replays the same.
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        limits.sort_by(|a, b| a.tag.cmp(&b.tag));
        running.sort_by_key(|r| r.run);
        waiting.sort();
        // ... and then shuffled by the seed: the store reads them back in any order.
        for i in (1..waiting.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            waiting.swap(i, j);
        }
        let holds = holds.map(|mut h| {
            h.sort();
            h
        });
        self.drive(Input::Queues(queues));
        self.drive(Input::Limits(limits));
        self.drive(Input::Holds(holds));
        self.drive(Input::Restore(running));
        // Those of a deployment are the scheduler's to hand out: held until it does.
        let mut held = Vec::new();
        for run in waiting {
            match self.waiting_placement(run) {
                Some(p) if p.deployment.is_none() => self.drive(Input::Due(p)),
                Some(p) => held.push(p.run),
                None => {}
            }
        }
        self.drive(Input::Held(held));
        // The scheduler starts a while after the control node (its reads take time): the
        // fire times that fall meanwhile are caught up or skipped as their schedule says.
        let after = if self.control_restarts == 0 {
            Duration::ZERO
        } else {
            self.rng.ms(0, 1_500)
        };
        self.scheduler.start_at(self.now + after);
    }

    /// Faults of the step: a node crashes or is cut off, the control node restarts.
    fn faults_act(&mut self) {
        if !self.faults() {
            return;
        }
        if self.rng.chance(4) {
            let i = self.rng.below(3) as usize;
            if self.nodes[i].up {
                let down = self.rng.ms(200, 1_500);
                let n = &mut self.nodes[i];
                n.up = false;
                n.lost = std::mem::take(&mut n.runs)
                    .into_iter()
                    .map(|(r, (e, _))| (r, e))
                    .collect();
                n.finishing.clear();
                n.down_until = self.now + down;
                let name = n.name.clone();
                self.note(format!("{name} crashes for {down:?}"));
            }
        }
        if self.rng.chance(3) {
            let i = self.rng.below(3) as usize;
            let cut = self.rng.ms(300, 2_500);
            self.nodes[i].cut_off_until = self.now + cut;
            let name = self.nodes[i].name.clone();
            self.note(format!("{name} cut off for {cut:?}"));
        }
        if self.rng.chance(3) {
            let lost = self.unlogged.len();
            self.unlogged.clear();
            self.control_restarts += 1;
            self.note(format!("control restarts ({lost} commands not logged are lost)"));
            self.control_started();
        }
        if self.deposed.is_none() && self.rng.chance(3) {
            let lost = self.unlogged.len();
            self.unlogged.clear();
            let window = self.rng.ms(0, DEPOSED_MAX.as_millis() as u64);
            let old = std::mem::replace(&mut self.coord, ControlMachine::new(Self::config()));
            let stuck: BTreeSet<NodeId> = (0..self.nodes.len())
                .filter(|_| self.rng.chance(500))
                .map(|i| self.nodes[i].name.clone())
                .collect();
            self.note(format!("{stuck:?} still talk to the deposed leader"));
            self.deposed = Some((old, self.now + window, stuck));
            self.leader_changes += 1;
            self.note(format!(
                "the lead moves ({lost} commands not committed are lost); the deposed leader goes on for {window:?}"
            ));
            // The new leader expects every replica (here, every node) to speak.
            let names = self.nodes.iter().map(|n| n.name.clone()).collect();
            self.drive(Input::Expect(names));
            self.control_started();
        }
    }

    /// An input from `node` to the control node: to the deposed leader instead while it goes
    /// on, when the node's session still leads there.
    fn send_control(&mut self, node: Option<NodeId>, input: Input<Token>) {
        let deposed = self
            .deposed
            .as_ref()
            .is_some_and(|(_, until, stuck)| self.now < *until && node.is_some_and(|n| stuck.contains(&n)));
        if deposed {
            self.drive_deposed(input);
        } else {
            self.drive(input);
        }
    }

    /// The deposed leader's control machine handles an input: what it appends is refused (it
    /// no longer leads), so a holding it records never reaches its holder; its starts and its
    /// other slot answers still reach the nodes.
    fn drive_deposed(&mut self, input: Input<Token>) {
        let now = self.now;
        let Some((machine, ..)) = self.deposed.as_mut() else {
            return;
        };
        for e in machine.handle(now, input) {
            match e {
                Effect::Start { node, placement } => {
                    let Some(inc) = self.nodes.iter().find(|n| n.name == node).map(|n| n.incarnation) else {
                        continue;
                    };
                    self.note(format!(
                        "the deposed leader starts {} on {node}",
                        short(placement.run)
                    ));
                    self.send_faulty(Msg::Start(node, inc, placement.run));
                }
                Effect::Answer { reply, answer } => {
                    if let Some(node) = self.node_of(reply.task) {
                        self.deposed_answers += 1;
                        self.note(format!("the deposed leader answers {node}: {answer:?}"));
                        self.answer(node, reply, answer);
                    }
                }
                Effect::Append(_)
                | Effect::DeclareDead { .. }
                | Effect::Hold { .. }
                | Effect::Recheck { .. }
                | Effect::Notice(_) => {}
            }
        }
    }

    /// Resumes the runs a node's crash left that resume, each placed by the control machine (as the
    /// control actor does for a node declared dead, and for the runs a restarted node hands it).
    fn resume_crashed(&mut self, node: &NodeId, crashed: Vec<FlowRunId>) {
        for run in crashed {
            let resume = self
                .state
                .hot()
                .flow_run(&run)
                .and_then(|r| resume_after_loss(r, node));
            if let Some(command) = resume
                && self.log(command).is_ok()
                && let Some(p) = self.waiting_placement(run)
            {
                self.note(format!("resume {} lost with {node}", short(run)));
                self.drive(Input::Due(p));
            }
        }
    }

    /// the control machine's appends whose time came are logged; a holding recorded is answered.
    fn log_due(&mut self) {
        let now = self.now;
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unlogged)
            .into_iter()
            .partition(|(at, ..)| *at <= now);
        self.unlogged = rest;
        for (_, command, then) in due {
            let reply = self.log(command);
            match then {
                Then::Nothing => {}
                Then::Answer(node, token, answer) => {
                    if reply.is_ok() {
                        self.answer(node, token, answer);
                    } else {
                        self.drive(Input::Release(vec![token.task]));
                    }
                }
                Then::Resume(node) => {
                    if let Ok(Reply::NodeCrashed { crashed, .. }) = reply {
                        self.resume_crashed(&node, crashed);
                    }
                }
                Then::Created(asked) => self.created(asked, reply),
            }
        }
    }

    pub fn run(&mut self) -> Result<(), String> {
        let end = self.start + FAULT_PHASE + QUIET_MAX;
        while self.now < end {
            let step = self.rng.ms(5, 25);
            self.now = self.now + step;
            if self.faults() && self.next_run <= self.now {
                self.next_run = self.now + self.rng.ms(20, 200);
                self.make_run();
            }
            self.faults_act();
            self.clients_act();
            self.scheduler_acts();
            self.log_due();
            loop {
                let now = self.now;
                let Some(pos) = self
                    .msgs
                    .iter()
                    .enumerate()
                    .filter(|(_, (at, ..))| *at <= now)
                    .min_by_key(|(_, (at, seq, _))| (*at, *seq))
                    .map(|(i, _)| i)
                else {
                    break;
                };
                let (_, _, msg) = self.msgs.swap_remove(pos);
                self.deliver(msg);
                self.check()?;
            }
            if self.next_tick <= self.now {
                self.next_tick = self.now + TICK_EVERY;
                self.drive(Input::Tick);
                match &self.deposed {
                    Some((_, until, _)) if self.now < *until => self.drive_deposed(Input::Tick),
                    Some(_) => {
                        self.deposed = None;
                        self.note("the deposed leader notices and stops".into());
                    }
                    None => {}
                }
            }
            self.nodes_act();
            self.check()?;
            self.check_clients()?;
            if !self.faults() && self.settled().is_ok() && self.msgs.is_empty() {
                return Ok(());
            }
        }
        self.settled()
    }

    /// How many runs were made (by the client and the scheduler).
    pub fn runs(&self) -> usize {
        self.state.hot().flow_runs().count()
    }
}

fn accepted(reply: &Result<Reply, flotilla_runtime::Refusal>) -> bool {
    matches!(
        reply,
        Ok(Reply::FlowRunTransition {
            decision: Decision::Accept(_),
            ..
        })
    )
}

fn short(run: FlowRunId) -> String {
    let s = run.to_string();
    s[s.len() - 6..].to_owned()
}

fn short_task(t: TaskRunId) -> String {
    let s = t.to_string();
    s[s.len() - 6..].to_owned()
}
