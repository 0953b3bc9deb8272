//! The control machine: the control node's live decisions, as a pure machine its control actor
//! drives. It keeps the membership from the nodes' heartbeats and declares a silent node
//! unreachable (its runs crash); it places due runs on live nodes by work queue, priority and
//! deployment limit, marks those that wait too long Late, and takes back a run handed to a node
//! that never started it; it grants, renews and expires tag-limit slots, each holding recorded
//! in the log before its holder hears of it.
//!
//! ```text
//! ControlMachine::handle(&mut self, now, Input) -> Vec<Effect>
//! Input  = Heartbeat | Tick | Due | Ended | StartFailed | TakeBack | Restore | Held | Queues | Limits
//!        | Holds | Acquire | Renew | Release | ResetLimit
//! Effect = Append(Command) | DeclareDead { node, command } | Start { node, placement }
//!        | Recheck { node, runs }
//!        | Hold { holder, .., reply, answer } | Answer { reply, answer } | Notice(..)
//! ```
//!
//! Every durable change is an [`Effect::Append`] of a [`Command`] with a key derived from what it
//! is about (`crash/{node}/{incarnation}`, a transition id derived from the run and the time), so
//! that the same decision made again is one change. What the control machine keeps (membership,
//! the runs waiting and running, the leases) is memory, rebuilt after a start from the store
//! ([`Input::Restore`], [`Input::Queues`], [`Input::Limits`], [`Input::Holds`]) and the nodes' next
//! heartbeats. Time is an argument (`now`); nothing here reads a clock. `R` is the driver's way
//! to answer a task run waiting for slots (a reply port; a token in tests).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dispatch::{Action, Dispatch, Placement, QueueLoad, Whereabouts};
use super::handouts::Handouts;
use super::ids::derived_id;
use super::roster::{MemberStatus, Roster};
use super::slots::{Served, SlotGrant, Slots};
use crate::apply::Refusal;
use crate::command::{Command, RetryRequest, SlotChange};
use crate::concurrency::ConcurrencyLimit;
use crate::flow_run::FlowRun;
use crate::ids::{DeploymentId, FlowRunId, NodeId, TaskRunId, TransitionId};
use crate::rules::Proposal;
use crate::state::{State, StateName, StateType};
use crate::time::Timestamp;
use crate::work_queue::WorkQueue;

#[cfg(test)]
mod tests;

/// How the control machine works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlConfig {
    /// A member silent this long is unreachable.
    pub unreachable_after: Duration,
    /// A run that starts (or still waits) this long after its scheduled time is marked Late.
    pub late_after: Duration,
    /// How long a control node that was deposed (another took over) may still answer slot
    /// renewals before it notices: zero for a control node of its own; with replication, how
    /// long a leader goes on without a quorum before it stops answering. A machine that starts
    /// counts restored leases this much longer, and keeps new holders waiting this much longer
    /// after a restart, so that a holder a deposed one renewed never overlaps a new holder.
    pub lease_grace: Duration,
}

/// By default, a run whose scheduled time passed this long ago without starting is marked Late.
pub const LATE_AFTER: Duration = Duration::from_secs(15);

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            unreachable_after: Duration::from_secs(1),
            late_after: LATE_AFTER,
            lease_grace: Duration::ZERO,
        }
    }
}

/// A run running, as read back from the store after a start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// The run.
    pub run: FlowRunId,
    /// Its work queue.
    pub queue: Option<String>,
    /// Its deployment.
    pub deployment: Option<DeploymentId>,
    /// The node that holds it.
    pub node: Option<NodeId>,
}

/// How long, beyond the unreachable window, a node is given to reconnect to a control node
/// that just started (its redial backs off up to 2 s).
const RECONNECT_GRACE: Duration = Duration::from_secs(4);

/// One input of [`ControlMachine::handle`].
#[derive(Debug)]
pub enum Input<R> {
    /// A member's heartbeat.
    Heartbeat(MemberStatus),
    /// Time to look for silent members, late runs and lapsed leases.
    Tick,
    /// A run came due: placed when a node can take it and its limits let it go.
    Due(Placement),
    /// A flow run ended (or was cancelled): its slots free.
    Ended(FlowRunId),
    /// The start of a run could not be sent to its node: the run waits again.
    StartFailed {
        /// The node.
        node: NodeId,
        /// The run.
        placement: Placement,
    },
    /// A run handed to a node that never started it, still waiting: placed again.
    TakeBack(Placement),
    /// The runs running now, read back after a start or a missed event.
    Restore(Vec<Running>),
    /// The nodes the cluster's membership names (a new leader's start): each not heard from
    /// yet gets time to speak and is declared dead like a silent member if it never does (the
    /// leader it replaces among them).
    Expect(Vec<NodeId>),
    /// Runs of deployments waiting, read back after a start: the scheduler hands them out when
    /// due; until then a claim of one (a start sent before the restart) is refused.
    Held(Vec<FlowRunId>),
    /// The work queues now.
    Queues(Vec<WorkQueue>),
    /// The tag limits now.
    Limits(Vec<ConcurrencyLimit>),
    /// The slot holdings recorded before this start (None: never recorded).
    Holds(Option<Vec<(String, TaskRunId, NodeId)>>),
    /// A task run asks for a slot of each limited tag among `tags`.
    Acquire {
        /// The task run.
        holder: TaskRunId,
        /// Its node.
        node: NodeId,
        /// Its tags.
        tags: Vec<String>,
        /// Where to answer.
        reply: R,
    },
    /// A holder renews its leases.
    Renew {
        /// The task run.
        holder: TaskRunId,
        /// Its node.
        node: NodeId,
        /// Its tags.
        tags: Vec<String>,
        /// Where to answer.
        reply: R,
    },
    /// Holders give their slots back.
    Release(Vec<TaskRunId>),
    /// Every slot of a tag is freed (its holders hear it when they renew).
    ResetLimit(String),
}

/// What a task run asking for slots is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotAnswer {
    /// An acquire's answer.
    Grant(SlotGrant),
    /// A renewal's answer: whether it holds its slots (false: it lost them and must stop).
    Renewed(bool),
}

/// Something worth a line in the node's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A member was silent too long.
    Unreachable {
        /// The member.
        node: NodeId,
        /// How long it was silent.
        silent: Duration,
    },
    /// A member unreachable before was heard from again.
    Reachable(NodeId),
    /// A lease was not renewed in time: its slot is free again.
    LeaseLapsed {
        /// The tag.
        tag: String,
        /// The holder.
        holder: TaskRunId,
    },
}

/// One effect of [`ControlMachine::handle`]; the driver carries them out in order.
#[derive(Debug)]
pub enum Effect<R> {
    /// Append a command to the log (nobody waits for its answer).
    Append(Command),
    /// Append this `MarkNodeCrashed` of a node declared dead, then resume elsewhere each run it
    /// crashed that [`resume_after_loss`] says is to be, and hand the resumed runs back as
    /// [`Input::Due`].
    DeclareDead {
        /// The node.
        node: NodeId,
        /// The command.
        command: Command,
    },
    /// Tell `node` to start the run; if it cannot be reached, give back
    /// [`Input::StartFailed`].
    Start {
        /// The node.
        node: NodeId,
        /// The run.
        placement: Placement,
    },
    /// These runs were handed to `node`, which never started them: read each back and give
    /// [`Input::TakeBack`] for each still Scheduled and claimed by nobody.
    Recheck {
        /// The node.
        node: NodeId,
        /// The runs.
        runs: Vec<FlowRunId>,
    },
    /// Record (durably) that `holder` holds these slots, then answer it; if the record fails or
    /// the holder is gone, give back [`Input::Release`] for it.
    Hold {
        /// The holder.
        holder: TaskRunId,
        /// Its node.
        node: NodeId,
        /// The tags it holds.
        tags: Vec<String>,
        /// Where to answer.
        reply: R,
        /// The answer.
        answer: SlotAnswer,
    },
    /// Answer a task run about its slots.
    Answer {
        /// Where to answer.
        reply: R,
        /// The answer.
        answer: SlotAnswer,
    },
    /// Log this.
    Notice(Notice),
}

/// The command that resumes on another node a run its dead `node` left Crashed, if it is to be
/// resumed: a top-level run (a subflow is resumed by its parent) whose flow resumes after a
/// crash. Scheduled, named Resuming, under the next epoch; the transition id is derived from the
/// run and the epoch it crashed under, so that resuming it again is one change.
pub fn resume_after_loss(run: &FlowRun, node: &NodeId) -> Option<Command> {
    if !run.resume || run.parent_task_run.is_some() || run.lifecycle.state.kind != StateType::Crashed {
        return None;
    }
    let key = format!("resume/{}/{}", run.id, run.epoch.get());
    Some(Command::RetryFlowRun {
        run: run.id,
        request: RetryRequest {
            transition_id: TransitionId::from_uuid(derived_id(&key)),
            resume: true,
            force: false,
            message: Some(format!("resumed after its node {node} was lost")),
        },
    })
}

/// Why a member cannot be removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveRefused {
    /// No such member.
    NotFound,
    /// It is reachable: stop it first.
    Reachable,
}

/// The control machine (see the module docs).
pub struct ControlMachine<R> {
    config: ControlConfig,
    roster: Roster,
    dispatch: Dispatch,
    slots: Slots<(TaskRunId, R)>,
    handouts: Handouts,
    /// Runs handed to a node that never showed them, being read back (by node) before they are
    /// taken back: a claim admitted meanwhile cancels the take-back.
    rechecking: BTreeMap<FlowRunId, NodeId>,
    /// Whether the runs under way were read back once since the start.
    restored: bool,
    /// Whether the slot holdings were recorded before this start (a data directory from before
    /// the record has none: then new holders wait one lease TTL after a start).
    holds_known: bool,
}

impl<R> std::fmt::Debug for ControlMachine<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlMachine")
            .field("roster", &self.roster)
            .field("dispatch", &self.dispatch)
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl<R> ControlMachine<R> {
    /// A control machine that knows nothing yet.
    pub fn new(config: ControlConfig) -> Self {
        ControlMachine {
            config,
            roster: Roster::default(),
            dispatch: Dispatch::default(),
            slots: Slots::default(),
            handouts: Handouts::default(),
            rechecking: BTreeMap::new(),
            restored: false,
            holds_known: false,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ControlConfig {
        &self.config
    }

    /// Handles one input at `now`; returns what to do, in order.
    pub fn handle(&mut self, now: Timestamp, input: Input<R>) -> Vec<Effect<R>> {
        let mut out = Vec::new();
        match input {
            Input::Heartbeat(report) => self.heartbeat(now, report, &mut out),
            Input::Tick => self.tick(now, &mut out),
            Input::Due(p) => {
                // Placed afresh (resumed, retried): a read-back of it from before is moot. A
                // run already waiting or placed (handed out twice) is left as it is, its
                // read-back too.
                if !matches!(
                    self.dispatch.whereabouts(&p.run),
                    Whereabouts::Placed(_) | Whereabouts::Waiting
                ) || self.dispatch.is_held(&p.run)
                {
                    self.rechecking.remove(&p.run);
                }
                self.dispatch.add(p);
                self.pump(now, &mut out);
            }
            Input::Ended(run) => {
                self.handouts.forget(&run);
                self.rechecking.remove(&run);
                self.ended(run);
                self.pump(now, &mut out);
            }
            Input::StartFailed { node, placement } => {
                self.handouts.forget(&placement.run);
                self.dispatch.ended(placement.run);
                self.roster.unreachable(&node);
                self.dispatch.add(placement);
            }
            Input::TakeBack(p) => {
                // Claimed since it was read back (or read back before a restart): not taken.
                if self.rechecking.remove(&p.run).is_none() {
                    return out;
                }
                self.ended(p.run);
                self.dispatch.add(p);
                self.pump(now, &mut out);
            }
            Input::Restore(running) => self.restore(now, running, &mut out),
            Input::Expect(nodes) => {
                for node in &nodes {
                    self.roster
                        .expect(now + RECONNECT_GRACE, node, Self::unknown_incarnation(now));
                }
            }
            Input::Held(runs) => self.dispatch.hold(runs),
            Input::Queues(queues) => {
                self.dispatch.set_queues(queues);
                self.pump(now, &mut out);
            }
            Input::Limits(limits) => {
                let served = self.slots.set_all(&limits, now);
                self.grant(served, &mut out);
            }
            Input::Holds(holds) => {
                self.holds_known = holds.is_some();
                // Leases counted from the end of the grace: a deposed control node may have
                // renewed them until then.
                let from = now + self.config.lease_grace;
                self.slots.restore(&holds.unwrap_or_default(), from);
            }
            Input::Acquire {
                holder,
                node,
                tags,
                reply,
            } => {
                if let Some(granted) = self.slots.acquire(holder, node, tags, now, (holder, reply)) {
                    self.grant(vec![granted], &mut out);
                }
            }
            Input::Renew {
                holder,
                node,
                tags,
                reply,
            } => self.renew(now, holder, node, &tags, reply, &mut out),
            Input::Release(holders) => {
                Self::free(holders.clone(), None, &mut out);
                let served = self.slots.release(&holders, now);
                self.grant(served, &mut out);
            }
            Input::ResetLimit(tag) => {
                Self::free(self.slots.holders_of(&tag), Some(tag.clone()), &mut out);
                let served = self.slots.reset(&tag, now);
                self.grant(served, &mut out);
            }
        }
        out
    }

    /// Every member's status.
    pub fn members(&self) -> Vec<MemberStatus> {
        self.roster.statuses()
    }

    /// Forgets a member declared unreachable.
    pub fn remove_member(&mut self, node: &NodeId) -> Result<(), RemoveRefused> {
        match self.roster.get(node) {
            None => Err(RemoveRefused::NotFound),
            Some(m) if m.reachable => Err(RemoveRefused::Reachable),
            Some(_) => {
                self.roster.remove(node);
                Ok(())
            }
        }
    }

    /// Whether a reachable member runs `flow`. Err: none does, with every flow known.
    pub fn runs_flow(&self, flow: &str) -> Result<(), Vec<String>> {
        if self.roster.runs_flow(flow) {
            Ok(())
        } else {
            Err(self.roster.flows().into_iter().collect())
        }
    }

    /// Every queue's figures (queues with runs waiting or running).
    pub fn loads(&self) -> std::collections::HashMap<String, QueueLoad> {
        self.dispatch.loads()
    }

    /// Where dispatch has a run: waiting to be placed, placed (on which node), or not at all.
    pub fn whereabouts(&self, run: &FlowRunId) -> Whereabouts<'_> {
        self.dispatch.whereabouts(run)
    }

    /// Every tag limit with its leases.
    pub fn limits(&self) -> Vec<ConcurrencyLimit> {
        self.slots.describe()
    }

    /// Admits a command from a node, or refuses it. Refused: a claim of a run (a Pending
    /// proposal naming a node) made by a member declared unreachable (its runs have crashed and
    /// it must not take new ones; a node not heard of yet is joining, its first heartbeat on its
    /// way), and one of a run that dispatch placed on another node or holds waiting (a start
    /// that arrived after its run was taken back, or after a restart of the control node, must
    /// not run it beside its limits). A claim admitted of a run being read back cancels its
    /// take-back (as its end does, or its being placed afresh), and the run is watched in its
    /// claimer's heartbeats (should the claim still fail).
    pub fn admit(&mut self, command: &Command) -> Result<(), Refusal> {
        if let Some(refusal) = self.refuse_claim(command) {
            return Err(refusal);
        }
        if let Command::ProposeFlowRunState { run, proposal } = command
            && proposal.state.kind == StateType::Pending
            && let Some(node) = &proposal.node
            && self.rechecking.remove(run).is_some()
        {
            self.handouts.handed(*run, node.clone());
        }
        Ok(())
    }

    fn refuse_claim(&self, command: &Command) -> Option<Refusal> {
        let Command::ProposeFlowRunState { run, proposal } = command else {
            return None;
        };
        let node = proposal.node.as_ref()?;
        if proposal.state.kind != StateType::Pending {
            return None;
        }
        if self.roster.is_down(node) {
            return Some(Refusal::Invalid(format!(
                "node {node} is not a live member: it cannot claim runs"
            )));
        }
        match self.dispatch.whereabouts(run) {
            Whereabouts::Waiting => Some(Refusal::Invalid(format!(
                "flow run {run} waits to be placed: node {node} was not given it"
            ))),
            Whereabouts::Dropped => Some(Refusal::Invalid(format!(
                "flow run {run} is cancelled: its deployment is at its concurrency limit"
            ))),
            Whereabouts::Placed(Some(other)) if other != node => Some(Refusal::Invalid(format!(
                "flow run {run} was placed on node {other}, not {node}"
            ))),
            _ => None,
        }
    }

    fn heartbeat(&mut self, now: Timestamp, report: MemberStatus, out: &mut Vec<Effect<R>>) {
        // A run handed to the node and left out of its heartbeats was never started there:
        // taken back, and placed again if it still waits (fix 8).
        let back = self.handouts.heartbeat(&report.name, &report.holds);
        self.recheck(&report.name, back, out);
        let node = report.name.clone();
        if self.roster.heard(now, report) {
            out.push(Effect::Notice(Notice::Reachable(node)));
        }
        self.pump(now, out);
    }

    /// Runs handed to `node` that it never showed: read back, and taken back if they still wait.
    fn recheck(&mut self, node: &NodeId, runs: Vec<FlowRunId>, out: &mut Vec<Effect<R>>) {
        if runs.is_empty() {
            return;
        }
        for run in &runs {
            self.rechecking.insert(*run, node.clone());
        }
        out.push(Effect::Recheck {
            node: node.clone(),
            runs,
        });
    }

    fn tick(&mut self, now: Timestamp, out: &mut Vec<Effect<R>>) {
        for (node, incarnation, silent) in self.roster.silent(now, self.config.unreachable_after) {
            out.push(Effect::Notice(Notice::Unreachable {
                node: node.clone(),
                silent,
            }));
            // The key names the node's life that ended, never the clock: the same death
            // declared twice is one crash.
            out.push(Effect::DeclareDead {
                node: node.clone(),
                command: Command::MarkNodeCrashed {
                    node: node.clone(),
                    message: format!("node {node} became unreachable"),
                    key: format!("crash/{node}/{incarnation}"),
                },
            });
            // Runs handed to it that it never started wait for another node.
            let runs = self.handouts.take_node(&node);
            self.recheck(&node, runs, out);
        }
        for run in self.dispatch.late(now, self.config.late_after) {
            Self::mark(now, run, State::named(StateName::Late, now), out);
        }
        self.pump(now, out);
        self.complete_holds(now, out);
        self.expire_slots(now, out);
    }

    /// Hands out every due run that can go now; marks those its deployment holds back.
    fn pump(&mut self, now: Timestamp, out: &mut Vec<Effect<R>>) {
        if self.dispatch.waiting() == 0 {
            return;
        }
        let roster = &mut self.roster;
        let actions = self.dispatch.dispatch(|flow, queue| roster.pick(flow, queue));
        for action in actions {
            match action {
                Action::Place(p, node, marked) => {
                    // Handed out long after its time (a downtime of the control node, a busy
                    // cluster): it starts marked Late.
                    if !marked && now.saturating_since(p.due) > self.config.late_after {
                        Self::mark(now, p.run, State::named(StateName::Late, now), out);
                    }
                    self.handouts.handed(p.run, node.clone());
                    out.push(Effect::Start { node, placement: p });
                }
                Action::Await(run) => Self::mark(
                    now,
                    run,
                    State::named(StateName::AwaitingConcurrencySlot, now),
                    out,
                ),
                Action::Cancel(run) => Self::mark(
                    now,
                    run,
                    State::named(StateName::Cancelling, now).with_message(
                        "its deployment is at its concurrency limit (collision strategy cancel-new)",
                    ),
                    out,
                ),
            }
        }
    }

    /// Proposes a state for a run that has not started, under a transition id derived from the
    /// run, the state and the time (the same decision made again is one transition).
    fn mark(now: Timestamp, run: FlowRunId, state: State, out: &mut Vec<Effect<R>>) {
        let key = format!("mark/{run}/{}/{}", state.name, now.as_micros());
        let proposal = Proposal::new(state, TransitionId::from_uuid(derived_id(&key)));
        out.push(Effect::Append(Command::ProposeFlowRunState { run, proposal }));
    }

    /// A run ended: its node has a free slot again.
    fn ended(&mut self, run: FlowRunId) {
        if let Some(node) = self.dispatch.ended(run) {
            self.roster.freed(&node);
        }
    }

    /// The incarnation that stands for a node's unknown one: a value this start alone uses.
    fn unknown_incarnation(now: Timestamp) -> u64 {
        u64::try_from(now.as_micros()).unwrap_or(0) | (1 << 63)
    }

    fn restore(&mut self, now: Timestamp, running: Vec<Running>, out: &mut Vec<Effect<R>>) {
        // Started with runs under way and no complete record of who holds slots (a data
        // directory from before the record, or a restart soon after): new holders wait until
        // every lease that may be held was renewed or ran out.
        if !self.restored && !running.is_empty() && !self.holds_known {
            self.slots.restarted(now + self.config.lease_grace);
        }
        self.restored = true;
        self.complete_holds(now, out);
        self.dispatch.clear_active();
        // A node holding runs that this start has not heard from gets time to reconnect and
        // speak (its runs are crashed and resumed elsewhere if it never does: it may have died
        // while no control node was watching).
        let unknown = Self::unknown_incarnation(now);
        for node in running.iter().filter_map(|r| r.node.as_ref()) {
            self.roster.expect(now + RECONNECT_GRACE, node, unknown);
        }
        for r in running {
            self.dispatch
                .restore(r.run, r.queue.as_deref(), r.deployment, r.node);
        }
        self.pump(now, out);
    }

    fn renew(
        &mut self,
        now: Timestamp,
        holder: TaskRunId,
        node: NodeId,
        tags: &[String],
        reply: R,
        out: &mut Vec<Effect<R>>,
    ) {
        let had = self.slots.holds_all(holder, tags);
        let held = self.slots.renew(holder, node, tags, now);
        // One taken again after it lapsed is recorded before the holder hears it.
        match self.slots.holding(holder).filter(|_| held && !had) {
            Some((node, tags)) => out.push(Effect::Hold {
                holder,
                node,
                tags,
                reply,
                answer: SlotAnswer::Renewed(true),
            }),
            None => {
                if !held {
                    Self::free(vec![holder], None, out);
                }
                out.push(Effect::Answer {
                    reply,
                    answer: SlotAnswer::Renewed(held),
                });
            }
        }
    }

    /// Answers waiters that got their slots; a holding is recorded before its holder hears of
    /// it, so that a restart of the control node knows every holder that may run.
    fn grant(&self, served: Served<(TaskRunId, R)>, out: &mut Vec<Effect<R>>) {
        for ((holder, reply), grant) in served {
            let answer = SlotAnswer::Grant(grant);
            match self
                .slots
                .holding(holder)
                .filter(|_| grant != SlotGrant::Unlimited)
            {
                Some((node, tags)) => out.push(Effect::Hold {
                    holder,
                    node,
                    tags,
                    reply,
                    answer,
                }),
                None => out.push(Effect::Answer { reply, answer }),
            }
        }
    }

    /// After a start with no complete record of holdings, once every lease of before has been
    /// renewed (and taken again) or has lapsed: the record becomes what is held now, and is
    /// complete from then on.
    fn complete_holds(&mut self, now: Timestamp, out: &mut Vec<Effect<R>>) {
        if self.restored && !self.holds_known && !self.slots.waiting_after_restart(now) {
            self.holds_known = true;
            let holds = self.slots.holdings();
            out.push(Effect::Append(Command::Slots(SlotChange::Complete { holds })));
        }
    }

    /// Records that these holders hold no slot (of `tag` only, when given).
    fn free(holders: Vec<TaskRunId>, tag: Option<String>, out: &mut Vec<Effect<R>>) {
        if !holders.is_empty() {
            out.push(Effect::Append(Command::Slots(SlotChange::Free { holders, tag })));
        }
    }

    /// Lets lapsed leases go (recorded by tag) and serves the waiters that fit now.
    fn expire_slots(&mut self, now: Timestamp, out: &mut Vec<Effect<R>>) {
        let mut lapsed: BTreeMap<String, Vec<TaskRunId>> = BTreeMap::new();
        for (tag, holder) in self.slots.lapsed(now) {
            out.push(Effect::Notice(Notice::LeaseLapsed {
                tag: tag.clone(),
                holder,
            }));
            lapsed.entry(tag).or_default().push(holder);
        }
        for (tag, holders) in lapsed {
            Self::free(holders, Some(tag), out);
        }
        let served = self.slots.expire(now);
        self.grant(served, out);
    }
}
