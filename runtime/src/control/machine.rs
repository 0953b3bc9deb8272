//! The control machine: reads the applied state, decides, and says what to do.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::ControlConfig;
use super::command::{ClientReply, ControlCommand, ControlOutcome, ControlReply, LeaseCommand};
use super::effect::{Effect, ToNodeMsg};
use super::ids::{Incarnation, RequestId};
use super::input::{ClientRequest, Input, NodeMsg, TimerKind};
use super::membership::Membership;
use super::state::ControlState;
use crate::command::{Command, NewFlowRun};
use crate::ids::{Epoch, FlowRunId, NodeId, TaskRunId, TransitionId};
use crate::rules::Proposal;
use crate::state::{State, StateName, StateType};
use crate::time::Timestamp;
use crate::view::StateView;

mod leasing;
mod placement;

/// A command appended and not applied yet, so that it is not appended again meanwhile.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Flight {
    Assign(FlowRunId),
    Reclaim(FlowRunId),
    Resume(FlowRunId),
    NodeDead(NodeId, Incarnation),
    Expire,
}

/// A lease request waiting for room.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Waiter {
    holder: TaskRunId,
    node: NodeId,
    incarnation: Incarnation,
    tags: Vec<String>,
    sent_at: Timestamp,
}

/// Where a Scheduled, unowned run waits: its queue's priority (1 first), when it is due.
type WaitKey = (u32, Timestamp, FlowRunId);

/// The control machine (see the module docs of [`crate::control`]).
#[derive(Clone, Debug)]
pub struct ControlMachine {
    config: ControlConfig,
    members: Membership,
    /// Client requests appended and not applied yet.
    pending: BTreeSet<RequestId>,
    in_flight: BTreeSet<Flight>,
    waiters: VecDeque<Waiter>,
    /// Acquires appended and not applied yet: their limited tags.
    acquiring: BTreeMap<TaskRunId, Vec<String>>,
    /// The runs waiting to be placed, in placement order, and each one's key.
    queue: BTreeSet<WaitKey>,
    queued: BTreeMap<FlowRunId, WaitKey>,
}

impl ControlMachine {
    /// A machine that knows nothing yet: give it [`Input::Started`] first.
    pub fn new(config: ControlConfig) -> Self {
        ControlMachine {
            config,
            members: Membership::default(),
            pending: BTreeSet::new(),
            in_flight: BTreeSet::new(),
            waiters: VecDeque::new(),
            acquiring: BTreeMap::new(),
            queue: BTreeSet::new(),
            queued: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ControlConfig {
        &self.config
    }

    /// The live membership.
    pub fn members(&self) -> &Membership {
        &self.members
    }

    /// How many runs wait to be placed.
    pub fn waiting_runs(&self) -> usize {
        self.queue.len()
    }

    /// Handles one input at `now`, reading the applied `state`; returns what to do, in order.
    pub fn handle<V: StateView>(
        &mut self,
        now: Timestamp,
        state: &ControlState<V>,
        input: Input,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        match input {
            Input::Started => self.start(now, state, &mut out),
            Input::Client { request_id, request } => self.client(now, state, request_id, request, &mut out),
            Input::Node { node, msg } => self.node(now, state, node, msg, &mut out),
            Input::Timer(TimerKind::Tick) => self.tick(now, state, &mut out),
            Input::Applied { command, outcome, .. } => self.applied(now, state, command, outcome, &mut out),
        }
        out
    }

    fn start<V: StateView>(&mut self, now: Timestamp, state: &ControlState<V>, out: &mut Vec<Effect>) {
        *self = ControlMachine::new(self.config.clone());
        for (_, h) in state.holders() {
            self.members.recovered(h.node.clone(), h.incarnation, now);
        }
        for kind in [StateType::Scheduled, StateType::Crashed] {
            let mut after = None;
            loop {
                let page: Vec<(FlowRunId, Epoch, bool)> = state
                    .view()
                    .hot()
                    .flow_runs_in_state(kind, after, 1_000)
                    .into_iter()
                    .map(|r| (r.id, r.epoch, r.resume))
                    .collect();
                let Some(last) = page.last() else { break };
                after = Some(last.0);
                for (run, epoch, resume) in page {
                    if kind == StateType::Scheduled {
                        self.index_run(state, run);
                    } else if resume {
                        // Crashed before the restart and not resumed yet.
                        self.append_once(Flight::Resume(run), ControlCommand::Resume { run, epoch }, out);
                    }
                }
            }
        }
        self.place(now, state, out);
        out.push(Effect::SetTimer {
            at: now + self.config.tick_interval,
            timer: TimerKind::Tick,
        });
    }

    fn append_once(&mut self, flight: Flight, command: ControlCommand, out: &mut Vec<Effect>) {
        if self.in_flight.insert(flight) {
            out.push(Effect::Append(command));
        }
    }

    fn send(out: &mut Vec<Effect>, node: &NodeId, incarnation: Incarnation, msg: ToNodeMsg) {
        out.push(Effect::Send {
            node: node.clone(),
            incarnation,
            msg,
        });
    }

    fn client<V: StateView>(
        &mut self,
        now: Timestamp,
        state: &ControlState<V>,
        request_id: RequestId,
        request: ClientRequest,
        out: &mut Vec<Effect>,
    ) {
        if self.pending.contains(&request_id) {
            return; // its reply comes when it is applied
        }
        // fix 4: a resent request gets the first outcome, and a created run's id is the request's.
        if let Some(result) = state.requests().get(&request_id) {
            out.push(Effect::Reply {
                request_id,
                result: result.clone(),
            });
            return;
        }
        if self.pending.len() >= self.config.pending_requests_max {
            out.push(Effect::Reply {
                request_id,
                result: Err(crate::apply::Refusal::Invalid(
                    "too many requests in flight: retry later".into(),
                )),
            });
            return;
        }
        let command = match request {
            ClientRequest::CreateRun(c) => Command::CreateFlowRun(NewFlowRun {
                tags: c.tags,
                work_queue: c.work_queue,
                scheduled_time: c.scheduled_time,
                // fix 4: the run's id is derived from the request's, never fresh.
                ..NewFlowRun::new(
                    FlowRunId::from_uuid(*request_id.as_uuid()),
                    c.flow_name,
                    c.parameters,
                )
                .with_options(Default::default(), c.resume)
                .with_key(c.idempotency_key)
            }),
            ClientRequest::CancelRun { run } => Command::ProposeFlowRunState {
                run,
                proposal: Proposal::new(
                    State::named(StateName::Cancelling, now),
                    TransitionId::from_uuid(*request_id.as_uuid()),
                ),
            },
            ClientRequest::PutSetting(setting) => Command::PutSetting { setting, at: now },
        };
        self.pending.insert(request_id);
        out.push(Effect::Append(ControlCommand::Client { request_id, command }));
    }

    fn declare_dead(&mut self, node: &NodeId, incarnation: Incarnation, out: &mut Vec<Effect>) {
        if let Some(m) = self.members.get_mut(node)
            && m.incarnation == incarnation
        {
            m.alive = false;
        }
        let command = ControlCommand::NodeDead {
            node: node.clone(),
            incarnation,
        };
        self.append_once(Flight::NodeDead(node.clone(), incarnation), command, out);
    }

    fn node<V: StateView>(
        &mut self,
        now: Timestamp,
        state: &ControlState<V>,
        node: NodeId,
        msg: NodeMsg,
        out: &mut Vec<Effect>,
    ) {
        let inc = msg.incarnation();
        if state.is_dead(&node, inc) {
            Self::send(out, &node, inc, ToNodeMsg::Dead);
            return;
        }
        let known = self.members.get(&node).map(|m| (m.incarnation, m.alive));
        match msg {
            NodeMsg::Join { slots, flows, .. } => {
                match known {
                    Some((i, _)) if i > inc => return, // from an earlier life, delayed
                    Some((i, false)) if i == inc => return Self::send(out, &node, inc, ToNodeMsg::Dead),
                    Some((i, _)) if i < inc => self.declare_dead(&node, i, out),
                    _ => {}
                }
                // Runs still held by an earlier incarnation (known from the applied state only).
                let earlier: BTreeSet<Incarnation> = state
                    .held_by(&node)
                    .map(|(_, h)| h.incarnation)
                    .filter(|i| *i < inc)
                    .collect();
                for i in earlier {
                    self.declare_dead(&node, i, out);
                }
                self.members.join(node, inc, slots, flows, now);
                self.place(now, state, out);
            }
            NodeMsg::Heartbeat { seq, running, .. } => {
                match known {
                    None => return Self::send(out, &node, inc, ToNodeMsg::Rejoin),
                    Some((i, _)) if i > inc => return,
                    Some((i, _)) if i < inc => return Self::send(out, &node, inc, ToNodeMsg::Rejoin),
                    Some((_, false)) => return Self::send(out, &node, inc, ToNodeMsg::Dead),
                    _ => {}
                }
                self.heartbeat(now, state, &node, inc, seq, &running, out);
            }
            NodeMsg::StateProposal {
                run,
                epoch,
                state: proposed,
                transition,
                ..
            } => out.push(Effect::Append(ControlCommand::Propose {
                run,
                node,
                incarnation: inc,
                epoch,
                state: proposed,
                transition,
            })),
            NodeMsg::Acquire {
                holder,
                tags,
                sent_at,
                ..
            } => {
                let waiter = Waiter {
                    holder,
                    node,
                    incarnation: inc,
                    tags,
                    sent_at,
                };
                self.acquire(now, state, waiter, out);
            }
            NodeMsg::Renew {
                holder,
                tags,
                sent_at,
                ..
            } => out.push(Effect::Append(ControlCommand::Lease(LeaseCommand::Renew {
                holder,
                node,
                incarnation: inc,
                tags,
                sent_at,
            }))),
            NodeMsg::Release { holders, .. } => {
                self.waiters.retain(|w| !holders.contains(&w.holder));
                out.push(Effect::Append(ControlCommand::Lease(LeaseCommand::Release {
                    holders,
                    node,
                })));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn heartbeat<V: StateView>(
        &mut self,
        now: Timestamp,
        state: &ControlState<V>,
        node: &NodeId,
        inc: Incarnation,
        seq: u64,
        running: &[(FlowRunId, Epoch)],
        out: &mut Vec<Effect>,
    ) {
        let Some(m) = self.members.get_mut(node) else {
            return;
        };
        if m.last_seq.is_some_and(|s| s >= seq) {
            return; // a repeated or overtaken heartbeat says nothing new
        }
        m.last_heard = now;
        m.last_seq = Some(seq);
        if !m.joined {
            Self::send(out, node, inc, ToNodeMsg::Rejoin);
        }
        for &(run, epoch) in running {
            match state.holder(&run) {
                Some(h) if h.node == *node && h.incarnation == inc && h.epoch == epoch => {
                    if state
                        .run(&run)
                        .is_some_and(|r| r.lifecycle.state.kind == StateType::Cancelling)
                    {
                        Self::send(out, node, inc, ToNodeMsg::CancelRun { run, epoch });
                    }
                }
                // fix 8: a copy the node does not hold (an old epoch, a run taken back or
                // ended) is stopped. (Fix 5's stop on a refused proposal catches most of them
                // too: this one also catches copies that propose nothing.)
                _ => Self::send(
                    out,
                    node,
                    inc,
                    ToNodeMsg::StopRun {
                        run,
                        epoch: Some(epoch),
                    },
                ),
            }
        }
        let held: Vec<(FlowRunId, Epoch)> = state
            .held_by(node)
            .filter(|(_, h)| h.incarnation == inc)
            .map(|(r, h)| (r, h.epoch))
            .collect();
        for &(run, epoch) in &held {
            let missed = self.members.missed(node, run, running.contains(&(run, epoch)));
            // fix 8: a run its holder leaves out of consecutive heartbeats was never started
            // (its start was lost) or was lost: it is taken back and placed again.
            if missed >= self.config.missed_heartbeats_max {
                let command = ControlCommand::Reclaim {
                    run,
                    node: node.clone(),
                    incarnation: inc,
                    epoch,
                };
                self.append_once(Flight::Reclaim(run), command, out);
            }
        }
        let runs: Vec<FlowRunId> = held.iter().map(|(r, _)| *r).collect();
        self.members.keep_runs(node, &runs);
    }

    fn tick<V: StateView>(&mut self, now: Timestamp, state: &ControlState<V>, out: &mut Vec<Effect>) {
        for (node, inc) in self.members.silent(now, self.config.unreachable_after) {
            self.declare_dead(&node, inc, out);
        }
        let expired = state.leases().expired(now, self.config.lease_waiters_max);
        if !expired.is_empty() {
            let command = ControlCommand::Lease(LeaseCommand::Expire { leases: expired });
            self.append_once(Flight::Expire, command, out);
        }
        self.serve_waiters(now, state, out);
        self.place(now, state, out);
        out.push(Effect::SetTimer {
            at: now + self.config.tick_interval,
            timer: TimerKind::Tick,
        });
    }

    fn applied<V: StateView>(
        &mut self,
        now: Timestamp,
        state: &ControlState<V>,
        command: ControlCommand,
        outcome: ControlOutcome,
        out: &mut Vec<Effect>,
    ) {
        match (command, &outcome.reply) {
            (ControlCommand::Client { request_id, .. }, ControlReply::Client(result)) => {
                self.pending.remove(&request_id);
                out.push(Effect::Reply {
                    request_id,
                    result: result.clone(),
                });
                if let Ok(ClientReply::RunState {
                    run,
                    state: StateType::Cancelling,
                }) = result
                    && let Some(h) = state.holder(run)
                {
                    let msg = ToNodeMsg::CancelRun {
                        run: *run,
                        epoch: h.epoch,
                    };
                    Self::send(out, &h.node, h.incarnation, msg);
                }
            }
            (
                ControlCommand::Assign {
                    run,
                    node,
                    incarnation,
                    ..
                },
                ControlReply::Assigned(result),
            ) => {
                self.in_flight.remove(&Flight::Assign(run));
                if let Some(m) = self.members.get_mut(&node)
                    && m.incarnation == incarnation
                {
                    m.placing = m.placing.saturating_sub(1);
                }
                if let Ok(epoch) = result {
                    Self::send(
                        out,
                        &node,
                        incarnation,
                        ToNodeMsg::StartRun { run, epoch: *epoch },
                    );
                }
            }
            (
                ControlCommand::Propose {
                    run,
                    node,
                    incarnation,
                    epoch,
                    transition,
                    ..
                },
                ControlReply::Proposed {
                    decision,
                    state: now_is,
                },
            ) => match (decision, epoch) {
                (Ok(_), Some(epoch)) => {
                    let state = now_is.unwrap_or(StateType::Crashed);
                    let msg = ToNodeMsg::Decided {
                        run,
                        epoch,
                        transition,
                        state,
                    };
                    Self::send(out, &node, incarnation, msg);
                }
                // fix 5: a refused proposal means the copy is not the node's: it stops it.
                _ => Self::send(out, &node, incarnation, ToNodeMsg::StopRun { run, epoch }),
            },
            (
                ControlCommand::Reclaim {
                    run,
                    node,
                    incarnation,
                    epoch,
                },
                ControlReply::Reclaimed(now_is),
            ) => {
                self.in_flight.remove(&Flight::Reclaim(run));
                self.members.keep_runs(&node, &[]);
                Self::send(
                    out,
                    &node,
                    incarnation,
                    ToNodeMsg::StopRun {
                        run,
                        epoch: Some(epoch),
                    },
                );
                if *now_is == Some(StateType::Crashed) {
                    self.resume(state, run, out);
                }
            }
            (ControlCommand::NodeDead { node, incarnation }, ControlReply::NodeDead { crashed, .. }) => {
                self.in_flight
                    .remove(&Flight::NodeDead(node.clone(), incarnation));
                if self
                    .members
                    .get(&node)
                    .is_some_and(|m| m.incarnation == incarnation)
                {
                    self.members.remove(&node);
                }
                for run in crashed {
                    self.resume(state, *run, out);
                }
            }
            (ControlCommand::Resume { run, .. }, _) => {
                self.in_flight.remove(&Flight::Resume(run));
            }
            (ControlCommand::Lease(cmd), ControlReply::Lease(reply)) => {
                self.lease_applied(now, state, cmd, reply, out)
            }
            _ => {}
        }
        for run in outcome.flow_runs() {
            self.index_run(state, run);
        }
        self.place(now, state, out);
    }

    /// Resumes a crashed run if it may be.
    fn resume<V: StateView>(&mut self, state: &ControlState<V>, run: FlowRunId, out: &mut Vec<Effect>) {
        if let Some(r) = state.run(&run)
            && r.resume
            && r.lifecycle.state.kind == StateType::Crashed
        {
            let command = ControlCommand::Resume { run, epoch: r.epoch };
            self.append_once(Flight::Resume(run), command, out);
        }
    }
}
