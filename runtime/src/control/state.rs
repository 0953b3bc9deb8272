//! The durable control state and its deterministic `apply`: the runs (changed by
//! [`crate::apply::apply`]), who holds which run under which epoch, the tag-limit leases, the
//! outcomes of client requests, and the node incarnations declared dead. Replaying the command
//! log through [`ControlState::apply`] into a fresh state rebuilds it exactly.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::command::{ClientReply, ClientResult, ControlCommand, ControlOutcome, ControlReply, LeaseReply};
use super::ids::{Incarnation, RequestId, derived_id};
use super::leases::{Leases, TagLimit};
use super::requests::RequestOutcomes;
use crate::apply::{ApplyContext, Outcome, Refusal, Reply, apply};
use crate::command::{Command, RetryRequest};
use crate::flow_run::FlowRun;
use crate::ids::{Epoch, FlowRunId, NodeId, TransitionId};
use crate::rules::Proposal;
use crate::state::{State, StateName, StateType};
use crate::view::{MemState, StateView};
use crate::work_queue::{Setting, limit_key};

/// Which node incarnation holds a run, under which epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The node.
    pub node: NodeId,
    /// Its incarnation.
    pub incarnation: Incarnation,
    /// The run's epoch it holds.
    pub epoch: Epoch,
}

/// The durable control state (see the module docs).
#[derive(Clone, Debug)]
pub struct ControlState<V = MemState> {
    view: V,
    holders: BTreeMap<FlowRunId, Holder>,
    by_node: BTreeMap<NodeId, BTreeSet<FlowRunId>>,
    leases: Leases,
    requests: RequestOutcomes,
    /// Per node, the highest incarnation declared dead (it and those below are dead).
    dead: BTreeMap<NodeId, Incarnation>,
}

impl ControlState<MemState> {
    /// An empty state in memory, remembering request outcomes as `config` says.
    pub fn new(config: &super::ControlConfig) -> Self {
        ControlState::with_view(MemState::new(), config)
    }
}

impl<V: StateView> ControlState<V> {
    /// A state over `view` (runs), remembering request outcomes as `config` says.
    pub fn with_view(view: V, config: &super::ControlConfig) -> Self {
        ControlState {
            view,
            holders: BTreeMap::new(),
            by_node: BTreeMap::new(),
            leases: Leases::default(),
            requests: RequestOutcomes::new(config.request_outcomes_max, config.request_outcome_retention),
            dead: BTreeMap::new(),
        }
    }

    /// The runs.
    pub fn view(&self) -> &V {
        &self.view
    }

    /// The runs, to store an outcome's writes (events, logs) the way the view wants.
    pub fn view_mut(&mut self) -> &mut V {
        &mut self.view
    }

    /// A flow run.
    pub fn run(&self, id: &FlowRunId) -> Option<&FlowRun> {
        self.view.hot().flow_run(id)
    }

    /// Who holds a run.
    pub fn holder(&self, run: &FlowRunId) -> Option<&Holder> {
        self.holders.get(run)
    }

    /// Every run held, with its holder.
    pub fn holders(&self) -> impl Iterator<Item = (&FlowRunId, &Holder)> {
        self.holders.iter()
    }

    /// The runs a node holds (any incarnation).
    pub fn held_by(&self, node: &NodeId) -> impl Iterator<Item = (FlowRunId, &Holder)> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|r| self.holders.get(r).map(|h| (*r, h)))
    }

    /// Whether this node incarnation was declared dead.
    pub fn is_dead(&self, node: &NodeId, incarnation: Incarnation) -> bool {
        self.dead.get(node).is_some_and(|d| incarnation <= *d)
    }

    /// Per node, the highest incarnation declared dead.
    pub fn dead(&self) -> impl Iterator<Item = (&NodeId, &Incarnation)> {
        self.dead.iter()
    }

    /// The tag-limit leases.
    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// The remembered request outcomes.
    pub fn requests(&self) -> &RequestOutcomes {
        &self.requests
    }

    /// A tag's limit and lease TTL, if it is limited.
    pub fn tag_limit(&self, tag: &str) -> Option<TagLimit> {
        tag_limit(&self.view, tag)
    }

    /// Applies one command at its log index and time.
    pub fn apply(&mut self, command: ControlCommand, at: ApplyContext) -> ControlOutcome {
        match command {
            ControlCommand::Client { request_id, command } => self.client(request_id, command, at),
            ControlCommand::Assign {
                run,
                node,
                incarnation,
                epoch,
            } => self.assign(run, node, incarnation, epoch, at),
            ControlCommand::Propose {
                run,
                node,
                incarnation,
                epoch,
                state,
                transition,
            } => self.propose(run, node, incarnation, epoch, state, transition, at),
            ControlCommand::Reclaim {
                run,
                node,
                incarnation,
                epoch,
            } => self.reclaim(run, node, incarnation, epoch, at),
            ControlCommand::NodeDead { node, incarnation } => self.node_dead(node, incarnation, at),
            ControlCommand::Resume { run, epoch } => self.resume(run, epoch, at),
            ControlCommand::Lease(cmd) => {
                let dead = match &cmd {
                    super::LeaseCommand::Acquire {
                        node, incarnation, ..
                    }
                    | super::LeaseCommand::Renew {
                        node, incarnation, ..
                    } => self.is_dead(node, *incarnation),
                    _ => false,
                };
                let reply = if dead {
                    LeaseReply::Lost
                } else {
                    let view = &self.view;
                    let limits = |tag: &str| tag_limit(view, tag);
                    self.leases.apply(cmd, &limits, at.now)
                };
                ControlOutcome::reply(ControlReply::Lease(reply))
            }
        }
    }

    /// Applies a run command, then forgets the holders of the runs it ended or gave back.
    fn run_command(&mut self, command: Command, at: ApplyContext) -> Outcome {
        let out = apply(&mut self.view, command, at);
        let changed: Vec<FlowRunId> = out
            .writes
            .iter()
            .filter_map(|w| match w {
                crate::apply::Write::FlowRun(id) => Some(*id),
                _ => None,
            })
            .collect();
        for id in changed {
            let keep = self.run(&id).is_some_and(|r| {
                !r.lifecycle.state.is_terminal()
                    && r.owner.is_some()
                    && self
                        .holders
                        .get(&id)
                        .is_some_and(|h| h.epoch == r.epoch && Some(&h.node) == r.owner.as_ref())
            });
            if !keep {
                self.unhold(&id);
            }
        }
        out
    }

    fn unhold(&mut self, run: &FlowRunId) {
        if let Some(h) = self.holders.remove(run)
            && let Some(set) = self.by_node.get_mut(&h.node)
        {
            set.remove(run);
            if set.is_empty() {
                self.by_node.remove(&h.node);
            }
        }
    }

    fn client(&mut self, request_id: RequestId, command: Command, at: ApplyContext) -> ControlOutcome {
        // fix 4: a request applies once; a resend (even one the machine let through after a
        // restart) gets the first outcome.
        if let Some(result) = self.requests.get(&request_id) {
            return ControlOutcome::reply(ControlReply::Client(result.clone()));
        }
        let subject = match &command {
            Command::ProposeFlowRunState { run, .. } => Some(*run),
            _ => None,
        };
        let out = self.run_command(command, at);
        let result: ClientResult = out.reply.map(|r| match (r, subject) {
            (Reply::FlowRunCreated { run, created }, _) => ClientReply::RunCreated { run: run.id, created },
            (_, Some(run)) => ClientReply::RunState {
                run,
                state: self
                    .run(&run)
                    .map_or(StateType::Scheduled, |r| r.lifecycle.state.kind),
            },
            _ => ClientReply::SettingPut,
        });
        self.requests.remember(request_id, at.now, result.clone());
        ControlOutcome {
            reply: ControlReply::Client(result),
            writes: out.writes,
        }
    }

    fn assign(
        &mut self,
        run: FlowRunId,
        node: NodeId,
        incarnation: Incarnation,
        epoch: Epoch,
        at: ApplyContext,
    ) -> ControlOutcome {
        let refuse = |why: String| ControlOutcome::reply(ControlReply::Assigned(Err(Refusal::Invalid(why))));
        if self.is_dead(&node, incarnation) {
            return refuse(format!("node {node} {incarnation} was declared dead"));
        }
        // One incarnation of a node holds runs at a time: a crash of the node crashes them all.
        if self.held_by(&node).any(|(_, h)| h.incarnation != incarnation) {
            return refuse(format!("an earlier incarnation of node {node} still holds runs"));
        }
        let Some(r) = self.run(&run) else {
            return refuse(format!("no flow run {run}"));
        };
        if r.epoch != epoch || r.owner.is_some() || r.lifecycle.state.kind != StateType::Scheduled {
            return refuse(format!(
                "flow run {run} is {} under {}, not Scheduled and free under {epoch}",
                r.lifecycle.state.kind, r.epoch
            ));
        }
        let tid = TransitionId::from_uuid(derived_id(&format!("assign/{run}/{epoch}")));
        let proposal = Proposal::from_worker(State::of(StateType::Pending, at.now), tid, epoch, node.clone());
        let out = self.run_command(Command::ProposeFlowRunState { run, proposal }, at);
        let accepted =
            matches!(&out.reply, Ok(Reply::FlowRunTransition { decision, .. }) if decision.is_accept());
        let reply = if accepted {
            self.by_node.entry(node.clone()).or_default().insert(run);
            self.holders.insert(
                run,
                Holder {
                    node,
                    incarnation,
                    epoch,
                },
            );
            Ok(epoch)
        } else {
            Err(out
                .reply
                .err()
                .unwrap_or(Refusal::Invalid(format!("flow run {run} was not claimed"))))
        };
        ControlOutcome {
            reply: ControlReply::Assigned(reply),
            writes: out.writes,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn propose(
        &mut self,
        run: FlowRunId,
        node: NodeId,
        incarnation: Incarnation,
        epoch: Option<Epoch>,
        state: State,
        transition: TransitionId,
        at: ApplyContext,
    ) -> ControlOutcome {
        let current = self.run(&run).map(|r| r.epoch);
        let state_now = |s: &Self| s.run(&run).map(|r| r.lifecycle.state.kind);
        // fix 5: a node's proposal counts only from the holder, under the epoch it holds; a
        // missing or stale epoch is refused (and the machine tells the node to stop its copy).
        // `crate::apply`'s own epoch rule fences again below; to watch the simulation fail,
        // drop this check *and* forward the proposal under the run's current epoch and owner
        // (the machine trusting the node's claim).
        let holds = epoch.is_some_and(|e| {
            self.holders
                .get(&run)
                .is_some_and(|h| h.node == node && h.incarnation == incarnation && h.epoch == e)
        });
        let Some(epoch) = epoch.filter(|_| holds) else {
            let refusal = match (epoch, current) {
                (_, None) => Refusal::FlowRunNotFound(run),
                (None, Some(_)) => {
                    Refusal::Invalid(format!("a proposal for flow run {run} without an epoch"))
                }
                (Some(proposed), Some(current)) => Refusal::StaleEpoch {
                    run,
                    proposed,
                    current,
                },
            };
            return ControlOutcome::reply(ControlReply::Proposed {
                decision: Err(refusal),
                state: state_now(self),
            });
        };
        let proposal = Proposal::from_worker(state, transition, epoch, node);
        let out = self.run_command(Command::ProposeFlowRunState { run, proposal }, at);
        let decision = out.reply.map(|r| match r {
            Reply::FlowRunTransition { decision, .. } => decision,
            _ => crate::rules::Decision::Abort(crate::rules::AbortReason::Cancelling),
        });
        ControlOutcome {
            reply: ControlReply::Proposed {
                decision,
                state: state_now(self),
            },
            writes: out.writes,
        }
    }

    fn reclaim(
        &mut self,
        run: FlowRunId,
        node: NodeId,
        incarnation: Incarnation,
        epoch: Epoch,
        at: ApplyContext,
    ) -> ControlOutcome {
        let held = self
            .holders
            .get(&run)
            .is_some_and(|h| h.node == node && h.incarnation == incarnation && h.epoch == epoch);
        let Some(kind) = self.run(&run).map(|r| r.lifecycle.state.kind).filter(|_| held) else {
            return ControlOutcome::reply(ControlReply::Reclaimed(None));
        };
        let tid = TransitionId::from_uuid(derived_id(&format!("reclaim/{run}/{epoch}")));
        let message = format!("node {node} {incarnation} does not run it");
        let node = node.clone();
        let state = match kind {
            // Never started: given back, it is claimed again under the next epoch.
            StateType::Pending => State::scheduled(at.now, at.now).with_message(message),
            StateType::Cancelling => State::named(StateName::Cancelled, at.now).with_message(message),
            _ => State::named(StateName::Crashed, at.now).with_message(message),
        };
        let out = self.run_command(
            Command::ProposeFlowRunState {
                run,
                // On the holder's behalf: under its epoch, as its node.
                proposal: Proposal::from_worker(state, tid, epoch, node),
            },
            at,
        );
        ControlOutcome {
            reply: ControlReply::Reclaimed(self.run(&run).map(|r| r.lifecycle.state.kind)),
            writes: out.writes,
        }
    }

    fn node_dead(&mut self, node: NodeId, incarnation: Incarnation, at: ApplyContext) -> ControlOutcome {
        let empty = ControlReply::NodeDead {
            crashed: Vec::new(),
            cancelled: Vec::new(),
        };
        if self.is_dead(&node, incarnation) {
            return ControlOutcome::reply(empty);
        }
        self.dead.insert(node.clone(), incarnation);
        // Runs of a later incarnation are not this one's to crash (this one held none).
        if self.held_by(&node).any(|(_, h)| h.incarnation > incarnation) {
            return ControlOutcome::reply(empty);
        }
        let key = format!("crash/{node}/{incarnation}");
        let command = Command::MarkNodeCrashed {
            message: format!("node {node} {incarnation} died"),
            node: node.clone(),
            key,
        };
        let out = self.run_command(command, at);
        let held: Vec<FlowRunId> = self.held_by(&node).map(|(r, _)| r).collect();
        for r in held {
            self.unhold(&r);
        }
        let reply = match out.reply {
            Ok(Reply::NodeCrashed { crashed, cancelled }) => ControlReply::NodeDead { crashed, cancelled },
            _ => empty,
        };
        ControlOutcome {
            reply,
            writes: out.writes,
        }
    }

    fn resume(&mut self, run: FlowRunId, epoch: Epoch, at: ApplyContext) -> ControlOutcome {
        let refuse =
            |why: String| ControlOutcome::reply(ControlReply::Resumed(Err(Refusal::NotRetriable(why))));
        let Some(r) = self.run(&run) else {
            return refuse(format!("no flow run {run}"));
        };
        if r.epoch != epoch || r.lifecycle.state.kind != StateType::Crashed || !r.resume {
            return refuse(format!("flow run {run} is not a resumable crash under {epoch}"));
        }
        let request = RetryRequest {
            transition_id: TransitionId::from_uuid(derived_id(&format!("resume/{run}/{epoch}"))),
            resume: true,
            force: false,
            message: Some(format!("resumed after a crash under {epoch}")),
        };
        let out = self.run_command(Command::RetryFlowRun { run, request }, at);
        let reply = match out.reply {
            Ok(Reply::Retried { epoch, .. }) => Ok(epoch),
            Ok(_) => Err(Refusal::NotRetriable(format!("flow run {run} was not resumed"))),
            Err(r) => Err(r),
        };
        ControlOutcome {
            reply: ControlReply::Resumed(reply),
            writes: out.writes,
        }
    }
}

fn tag_limit(view: &impl StateView, tag: &str) -> Option<TagLimit> {
    match view.hot().setting(&limit_key(tag)) {
        Some(Setting::ConcurrencyLimit(l)) => Some((l.limit, l.lease_ttl)),
        _ => None,
    }
}
