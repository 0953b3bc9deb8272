//! Seeded simulation of the control machine: a simulated command log, the machine, worker
//! nodes with slots and tag-limit leases, clients that retry, virtual time, and one seeded PRNG
//! injecting message loss, duplication, reordering and delay, node crashes and restarts,
//! partitions, control restarts and lease expiry. Invariants are checked after every step.
//!
//! `FLOTILLA_SIM_SEEDS` (default 1000) seeds run; `FLOTILLA_SIM_SEED=<seed>` replays one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "simulation/coordinator.rs"]
mod coordinator;
#[path = "simulation/invariants.rs"]
mod invariants;
#[path = "simulation/nodes.rs"]
mod nodes;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use flotilla_runtime::control::{
    ClientReply, ClientRequest, ClientResult, ControlCommand, ControlConfig, ControlMachine, ControlReply,
    ControlState, CreateRun, Effect, Incarnation, Input, NodeMsg, RequestId, TimerKind, ToNodeMsg,
    derived_id,
};
use flotilla_runtime::{
    ApplyContext, ConcurrencyLimit, Decision, Epoch, FlowRunId, LogIndex, NodeId, Setting, State, StateName,
    StateType, TaskRunId, Timestamp, TransitionId,
};

/// splitmix64: the one source of randomness of a simulated run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

const FAULT_PHASE: Duration = Duration::from_secs(6);
const QUIET_MAX: Duration = Duration::from_secs(20);
const NODE_TICK: Duration = Duration::from_millis(50);
const RESEND_AFTER: Duration = Duration::from_millis(200);
const TRACE_MAX: usize = 50;
/// (tag, limit, lease TTL)
const LIMITS: [(&str, u32, u64); 2] = [("db", 2, 1000), ("gpu", 1, 600)];
const TAG_SETS: [&[&str]; 4] = [&["db"], &["gpu"], &["db", "gpu"], &["free"]];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    Control,
    Node(usize),
    Client,
}

#[derive(Clone, Debug)]
enum Payload {
    FromNode(usize, NodeMsg),
    FromClient(RequestId, ClientRequest),
    ToNode(Incarnation, ToNodeMsg),
    ToClient(RequestId, ClientResult),
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Event {
    Deliver(Dest, Payload),
    ControlTimer(Timestamp),
    Commit,
    ControlUp,
    NodeTick(usize, u64),
    NodeUp(usize),
    ClientTick,
    FaultTick,
}

/// A run a node runs under an epoch.
struct Copy {
    epoch: Epoch,
    /// How long it runs once its Running state is acknowledged.
    length: Duration,
    finish_at: Timestamp,
    running_acked: bool,
    ending: Option<StateName>,
    last_sent: Timestamp,
}

/// A task holding (or waiting for) tag-limit slots.
struct Task {
    tags: Vec<String>,
    held: bool,
    /// The holder's own deadline: 80 % of the TTL after the send time of the last acknowledged
    /// request (None while held: no limited tag).
    deadline: Option<Timestamp>,
    ttl: Option<Duration>,
    hold: Duration,
    until: Timestamp,
    last_sent: Timestamp,
}

impl Task {
    fn believes(&self, now: Timestamp) -> bool {
        self.held && self.ttl.is_some() && self.deadline.is_some_and(|d| now < d)
    }
}

struct SimNode {
    id: NodeId,
    up: bool,
    inc: Incarnation,
    slots: u32,
    flows: Vec<String>,
    seq: u64,
    ticks: u64,
    tick_gen: u64,
    cut_until: Timestamp,
    copies: BTreeMap<FlowRunId, Copy>,
    tasks: BTreeMap<TaskRunId, Task>,
    holders_made: u64,
}

struct ClientReq {
    id: RequestId,
    req: ClientRequest,
    reply: Option<ClientResult>,
    last_sent: Timestamp,
}

struct Sim {
    seed: u64,
    rng: Rng,
    now: Timestamp,
    start: Timestamp,
    events: BTreeMap<(Timestamp, u64), Event>,
    seq: u64,
    trace: VecDeque<String>,
    faults: bool,
    loss: u64,
    dup: u64,
    delay_max_ms: u64,
    restart_rate: u64,
    config: ControlConfig,
    up: bool,
    machine: ControlMachine,
    state: ControlState,
    log: Vec<(ControlCommand, Timestamp)>,
    pending: Vec<ControlCommand>,
    commit_scheduled: bool,
    timer: Option<Timestamp>,
    nodes: Vec<SimNode>,
    requests: Vec<ClientReq>,
    completed: BTreeMap<FlowRunId, u32>,
    created: BTreeMap<RequestId, FlowRunId>,
}

fn tid(run: FlowRunId, epoch: Epoch, name: StateName) -> TransitionId {
    TransitionId::from_uuid(derived_id(&format!("{run}/{epoch}/{name}")))
}

type Check = Result<(), String>;

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let config = ControlConfig::for_tests();
        let start = Timestamp::from_millis(1_700_000_000_000);
        let flows: [&[&str]; 4] = [&["f1", "f2"], &["f1"], &["f2"], &["f1", "f2"]];
        let nodes = (0..3 + rng.below(2) as usize)
            .map(|i| SimNode {
                id: format!("n{i}").parse().unwrap(),
                up: true,
                inc: Incarnation::new(1),
                slots: 1 + rng.below(3) as u32,
                flows: flows[i].iter().map(|f| f.to_string()).collect(),
                seq: 0,
                ticks: 0,
                tick_gen: 0,
                cut_until: start,
                copies: BTreeMap::new(),
                tasks: BTreeMap::new(),
                holders_made: 0,
            })
            .collect();
        let mut sim = Sim {
            seed,
            loss: rng.below(150),
            dup: rng.below(100),
            delay_max_ms: 2 + rng.below(60),
            restart_rate: rng.below(60),
            rng,
            now: start,
            start,
            events: BTreeMap::new(),
            seq: 0,
            trace: VecDeque::new(),
            faults: true,
            machine: ControlMachine::new(config.clone()),
            state: ControlState::new(&config),
            config,
            up: true,
            log: Vec::new(),
            pending: Vec::new(),
            commit_scheduled: false,
            timer: None,
            nodes,
            requests: Vec::new(),
            completed: BTreeMap::new(),
            created: BTreeMap::new(),
        };
        for (tag, limit, ttl) in LIMITS {
            let setting = Setting::ConcurrencyLimit(ConcurrencyLimit {
                tag: tag.into(),
                limit,
                lease_ttl: Duration::from_millis(ttl),
                leases: Vec::new(),
            });
            let command = flotilla_runtime::Command::PutSetting { setting, at: start };
            let request_id = RequestId::from_uuid(derived_id(tag));
            sim.pending.push(ControlCommand::Client { request_id, command });
        }
        sim.commit().expect("setup");
        sim.control(Input::Started);
        for i in 0..sim.nodes.len() {
            sim.node_up(i, false);
        }
        sim.at(Duration::ZERO, Event::ClientTick);
        sim.at(Duration::ZERO, Event::FaultTick);
        sim
    }

    fn at(&mut self, after: Duration, e: Event) {
        self.seq += 1;
        self.events.insert((self.now + after, self.seq), e);
    }

    fn note(&mut self, line: String) {
        if self.trace.len() >= TRACE_MAX {
            self.trace.pop_front();
        }
        let ms = self.now.saturating_since(self.start).as_millis();
        self.trace.push_back(format!("{ms:>6}ms {line}"));
    }

    fn send(&mut self, to: Dest, p: Payload) {
        let node = match (&to, &p) {
            (Dest::Node(i), _) | (_, Payload::FromNode(i, _)) => Some(*i),
            _ => None,
        };
        if node.is_some_and(|i| self.nodes[i].cut_until > self.now) {
            return;
        }
        let (loss, dup) = if self.faults {
            (self.loss, self.dup)
        } else {
            (0, 0)
        };
        if self.rng.chance(loss) {
            return;
        }
        let copies = if self.rng.chance(dup) { 2 } else { 1 };
        for _ in 0..copies {
            let mut delay = self.rng.ms(1, self.delay_max_ms);
            if self.faults && self.rng.chance(20) {
                delay += self.rng.ms(100, 600); // a straggler
            }
            self.at(delay, Event::Deliver(to, p.clone()));
        }
    }

    /// Feeds the machine and carries out its effects.
    fn control(&mut self, input: Input) {
        if !self.up {
            return;
        }
        let effects = self.machine.handle(self.now, &self.state, input);
        for e in effects {
            match e {
                Effect::Append(cmd) => {
                    self.pending.push(cmd);
                    if !self.commit_scheduled {
                        self.commit_scheduled = true;
                        let d = self.rng.ms(0, 4);
                        self.at(d, Event::Commit);
                    }
                }
                Effect::Reply { request_id, result } => {
                    self.send(Dest::Client, Payload::ToClient(request_id, result))
                }
                Effect::Send {
                    node,
                    incarnation,
                    msg,
                } => {
                    let i = self.nodes.iter().position(|n| n.id == node).unwrap();
                    self.send(Dest::Node(i), Payload::ToNode(incarnation, msg));
                }
                Effect::SetTimer {
                    at,
                    timer: TimerKind::Tick,
                } => {
                    self.timer = Some(at);
                    self.at(at.saturating_since(self.now), Event::ControlTimer(at));
                }
            }
        }
    }

    /// Appends and applies what the machine appended (durable from here), then tells it.
    fn commit(&mut self) -> Check {
        self.commit_scheduled = false;
        let mut rounds = 0;
        while !self.pending.is_empty() {
            rounds += 1;
            if rounds > 10_000 {
                return Err("the machine keeps appending without end".into());
            }
            for cmd in std::mem::take(&mut self.pending) {
                let index = LogIndex::new(self.log.len() as u64 + 1);
                let before = match &cmd {
                    ControlCommand::Propose { run, .. } => self.state.holder(run).cloned(),
                    _ => None,
                };
                let outcome = self
                    .state
                    .apply(cmd.clone(), ApplyContext { index, now: self.now });
                self.log.push((cmd.clone(), self.now));
                self.check_applied(&cmd, &outcome, before)?;
                self.control(Input::Applied {
                    index,
                    command: cmd,
                    outcome,
                });
            }
        }
        Ok(())
    }

    fn client_tick(&mut self) {
        let now = self.now;
        if self.faults && self.rng.chance(300) {
            let n = self.requests.len();
            let id = RequestId::from_uuid(derived_id(&format!("req/{}/{n}", self.seed)));
            let flow =
                ["f1", "f1", "f2", "f2", "f1", "f2", "f1", "f2", "f1", "orphan"][self.rng.below(10) as usize];
            let mut c = CreateRun::of(flow);
            c.resume = self.rng.chance(500);
            if self.rng.chance(300) {
                c.idempotency_key = Some(format!("key{}", self.rng.below(4)));
            }
            self.requests.push(ClientReq {
                id,
                req: ClientRequest::CreateRun(c),
                reply: None,
                last_sent: Timestamp::EPOCH,
            });
        }
        if self.faults && !self.created.is_empty() && self.rng.chance(40) {
            let runs: Vec<FlowRunId> = self.created.values().copied().collect();
            let run = runs[self.rng.below(runs.len() as u64) as usize];
            let n = self.requests.len();
            let id = RequestId::from_uuid(derived_id(&format!("req/{}/{n}", self.seed)));
            self.requests.push(ClientReq {
                id,
                req: ClientRequest::CancelRun { run },
                reply: None,
                last_sent: Timestamp::EPOCH,
            });
        }
        let mut out = Vec::new();
        for r in self.requests.iter_mut().filter(|r| r.reply.is_none()) {
            if now.saturating_since(r.last_sent) >= Duration::from_millis(300) {
                r.last_sent = now;
                out.push(Payload::FromClient(r.id, r.req.clone()));
            }
        }
        for p in out {
            self.send(Dest::Control, p);
        }
        self.at(Duration::from_millis(100), Event::ClientTick);
    }

    fn fault_tick(&mut self) -> Check {
        if !self.faults {
            return Ok(());
        }
        let up: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].up).collect();
        let r = self.rng.below(1000);
        if r < 15 && up.len() >= 2 {
            let i = up[self.rng.below(up.len() as u64) as usize];
            let n = &mut self.nodes[i];
            n.up = false;
            n.copies.clear();
            n.tasks.clear();
            self.note(format!("FAULT node {i} crashes"));
            let d = self.rng.ms(50, 1500);
            self.at(d, Event::NodeUp(i));
        } else if r < 30 {
            let i = self.rng.below(self.nodes.len() as u64) as usize;
            let d = self.rng.ms(200, 1500);
            self.nodes[i].cut_until = self.now + d;
            self.note(format!("FAULT node {i} cut off for {d:?}"));
        } else if r < 30 + self.restart_rate && self.up {
            self.note("FAULT control restarts".into());
            self.restart_control()?;
        }
        self.at(Duration::from_millis(100), Event::FaultTick);
        Ok(())
    }

    /// Drops the machine and the appends not yet applied; rebuilds the state from the log.
    fn restart_control(&mut self) -> Check {
        self.up = false;
        self.pending.clear();
        self.commit_scheduled = false;
        self.timer = None;
        let mut fresh = ControlState::new(&self.config);
        for (i, (cmd, at)) in self.log.iter().enumerate() {
            let _ = fresh.apply(
                cmd.clone(),
                ApplyContext {
                    index: LogIndex::new(i as u64 + 1),
                    now: *at,
                },
            );
        }
        if digest(&fresh, self.now) != digest(&self.state, self.now) {
            return Err("a control restart lost or changed acknowledged state (replay differs)".into());
        }
        for r in &self.requests {
            if let Some(Ok(ClientReply::RunCreated { run, .. })) = &r.reply
                && fresh.run(run).is_none()
            {
                return Err(format!("acknowledged run {run} is gone after a control restart"));
            }
        }
        self.state = fresh;
        self.machine = ControlMachine::new(self.config.clone());
        let d = self.rng.ms(0, 300);
        self.at(d, Event::ControlUp);
        Ok(())
    }

    fn step(&mut self) -> Check {
        let Some(((at, _), event)) = self.events.pop_first() else {
            return Err("nothing left to happen".into());
        };
        self.now = at;
        match event {
            Event::Deliver(Dest::Control, p) => {
                if !self.up {
                    return Ok(());
                }
                if let Payload::FromNode(i, _) = &p
                    && self.nodes[*i].cut_until > self.now
                {
                    return Ok(());
                }
                let input = match p {
                    Payload::FromNode(i, msg) => {
                        self.note(format!("n{i} -> control {msg:?}"));
                        Input::Node {
                            node: self.nodes[i].id.clone(),
                            msg,
                        }
                    }
                    Payload::FromClient(request_id, request) => Input::Client { request_id, request },
                    _ => return Ok(()),
                };
                self.control(input);
            }
            Event::Deliver(Dest::Node(i), Payload::ToNode(inc, msg)) => {
                let n = &self.nodes[i];
                if n.up && n.inc == inc && n.cut_until <= self.now {
                    self.note(format!("control -> n{i} {msg:?}"));
                    self.node_msg(i, msg);
                }
            }
            Event::Deliver(Dest::Client, Payload::ToClient(id, result)) => {
                if let Some(r) = self.requests.iter_mut().find(|r| r.id == id) {
                    match (&r.reply, &result) {
                        (
                            Some(Ok(ClientReply::RunCreated { run: a, .. })),
                            Ok(ClientReply::RunCreated { run: b, .. }),
                        ) if a != b => {
                            return Err(format!("(4) request {id} answered with two runs: {a} and {b}"));
                        }
                        (None, _) => r.reply = Some(result),
                        _ => {}
                    }
                }
            }
            Event::Deliver(..) => {}
            Event::ControlTimer(at) => {
                if self.up && self.timer == Some(at) {
                    self.control(Input::Timer(TimerKind::Tick));
                }
            }
            Event::Commit => {
                if self.up {
                    self.commit()?;
                }
            }
            Event::ControlUp => {
                self.up = true;
                self.note("control up".into());
                self.control(Input::Started);
            }
            Event::NodeTick(i, tick) => {
                if self.nodes[i].up && self.nodes[i].tick_gen == tick {
                    self.node_tick(i);
                }
            }
            Event::NodeUp(i) => self.node_up(i, true),
            Event::ClientTick => self.client_tick(),
            Event::FaultTick => self.fault_tick()?,
        }
        self.check_step()
    }

    fn run(&mut self) -> Check {
        let fault_end = self.start + FAULT_PHASE;
        while self.now < fault_end {
            self.step()?;
        }
        self.faults = false;
        self.note("faults end".into());
        for n in &mut self.nodes {
            n.cut_until = self.now;
        }
        let quiet_end = self.now + QUIET_MAX;
        let mut next_look = self.now;
        while self.now < quiet_end {
            self.step()?;
            if self.now >= next_look {
                next_look = self.now + Duration::from_millis(500);
                if self.unsettled().is_none() {
                    break;
                }
            }
        }
        if let Some(what) = self.unsettled() {
            return Err(format!("not quiet {QUIET_MAX:?} after the faults ended: {what}"));
        }
        self.check_keys()?;
        self.restart_control()
    }
}

fn join(n: &SimNode) -> NodeMsg {
    NodeMsg::Join {
        incarnation: n.inc,
        slots: n.slots,
        flows: n.flows.clone(),
    }
}

/// What must survive a restart, as text.
fn digest(s: &ControlState, now: Timestamp) -> String {
    let mut runs: Vec<String> = s
        .view()
        .hot
        .flow_runs()
        .map(|r| {
            format!(
                "{} {} {} {:?} {}",
                r.id, r.lifecycle.state, r.epoch, r.owner, r.lifecycle.run_count
            )
        })
        .collect();
    runs.sort();
    let holders: Vec<String> = s.holders().map(|(r, h)| format!("{r} {h:?}")).collect();
    let dead: Vec<String> = s.dead().map(|(n, i)| format!("{n} {i}")).collect();
    let leases: BTreeSet<String> = s
        .leases()
        .tags()
        .flat_map(|t| s.leases().of(t).map(move |(h, l)| format!("{t} {h} {l:?}")))
        .collect();
    format!(
        "{runs:?}\n{holders:?}\n{dead:?}\n{leases:?}\n{} {}",
        s.requests().len(),
        s.leases().live("db", now)
    )
}

fn seeds() -> Vec<u64> {
    if let Ok(one) = std::env::var("FLOTILLA_SIM_SEED") {
        return vec![one.trim().parse().expect("FLOTILLA_SIM_SEED is a number")];
    }
    let n = std::env::var("FLOTILLA_SIM_SEEDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1000);
    (0..n).collect()
}

fn run_seed(seed: u64) -> Sim {
    let mut sim = Sim::new(seed);
    if let Err(what) = sim.run() {
        let trace: Vec<&str> = sim.trace.iter().map(String::as_str).collect();
        panic!(
            "simulation seed {seed} failed: {what}\nreplay: FLOTILLA_SIM_SEED={seed} cargo test -p flotilla-runtime --test simulation\nlast {} events:\n{}",
            trace.len(),
            trace.join("\n")
        );
    }
    sim
}

#[test]
fn the_control_machine_keeps_its_invariants_under_faults() {
    let started = std::time::Instant::now();
    let (mut runs, mut commands) = (0, 0);
    for seed in seeds() {
        let sim = run_seed(seed);
        runs += sim.state.view().hot.flow_run_count();
        commands += sim.log.len();
    }
    eprintln!("{runs} runs, {commands} commands, {:?}", started.elapsed());
}

fn run_coordinator_seed(seed: u64) -> coordinator::Sim {
    let mut sim = coordinator::Sim::new(seed);
    if let Err(what) = sim.run() {
        panic!(
            "coordinator simulation seed {seed} failed: {what}\nreplay: FLOTILLA_SIM_SEED={seed} cargo test -p flotilla-runtime --test simulation the_coordinator\nlast {} events:\n{}",
            sim.trace.len(),
            sim.trace.join("\n")
        );
    }
    sim
}

#[test]
fn the_coordinator_keeps_its_invariants_under_faults() {
    let started = std::time::Instant::now();
    let (mut runs, mut restarts) = (0, 0);
    for seed in seeds() {
        let sim = run_coordinator_seed(seed);
        runs += sim.runs();
        restarts += sim.control_restarts;
    }
    eprintln!(
        "coordinator: {runs} runs, {restarts} control restarts, {:?}",
        started.elapsed()
    );
}

#[test]
fn a_seed_replays_the_same() {
    let a = run_seed(7);
    let b = run_seed(7);
    assert_eq!(a.log.len(), b.log.len());
    assert_eq!(digest(&a.state, a.now), digest(&b.state, b.now));
    assert_eq!(a.trace, b.trace);
}
