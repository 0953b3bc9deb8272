//! Orchestration rules: whether a proposed state transition is accepted, rejected (another
//! state is written instead), told to wait, or aborted — for flow runs and task runs.
//!
//! Pure: the rules see the run's lifecycle, the proposal and a context, and return a
//! [`Decision`]. `apply` carries the decision out. One rule per function below, each with its
//! own test in `rules/tests.rs`.

use std::fmt;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, NodeId, TransitionId};
use crate::lifecycle::{Lifecycle, PastDecision};
use crate::retry::RetryPolicy;
use crate::state::{State, StateName, StateType};
use crate::time::Timestamp;

#[cfg(test)]
mod tests;

/// Whether the run is a flow run or a task run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunKind {
    /// A flow run.
    Flow,
    /// A task run.
    Task,
}

/// A proposed transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// The state proposed (its timestamp is replaced by the control plane's `now`).
    pub state: State,
    /// The proposer's id for this transition; a resend carries the same one.
    pub transition_id: TransitionId,
    /// The ownership epoch the proposer holds (workers always send it; users and the control
    /// plane send none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Epoch>,
    /// The proposing node (required for a flow run's Pending claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeId>,
}

impl Proposal {
    /// A proposal from a user or the control plane (no epoch, no node).
    pub fn new(state: State, transition_id: TransitionId) -> Self {
        Proposal {
            state,
            transition_id,
            epoch: None,
            node: None,
        }
    }

    /// A proposal from a worker holding `epoch` on `node`.
    pub fn from_worker(state: State, transition_id: TransitionId, epoch: Epoch, node: NodeId) -> Self {
        Proposal {
            state,
            transition_id,
            epoch: Some(epoch),
            node: Some(node),
        }
    }
}

/// What the rules see besides the lifecycle and the proposal.
#[derive(Clone, Debug)]
pub struct RuleContext<'a> {
    /// Flow run or task run.
    pub kind: RunKind,
    /// The control plane's time.
    pub now: Timestamp,
    /// The flow run's current ownership epoch (for a task run: its flow run's).
    pub epoch: Epoch,
    /// The flow run's owner (for a task run: its flow run's).
    pub owner: Option<&'a NodeId>,
    /// The run's retry policy.
    pub retry_policy: &'a RetryPolicy,
    /// For a task run: its flow run's state type.
    pub flow_run_state: Option<StateType>,
    /// For a task run: an unexpired cached Completed state for its cache key.
    pub cached: Option<&'a State>,
    /// The seed of the retry jitter (derived from the transition, so replay is deterministic).
    pub jitter_seed: u64,
}

/// Why a proposal must wait.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitReason {
    /// The run is not due yet.
    NotDue {
        /// When it is due.
        scheduled_time: Timestamp,
    },
}

/// Why a proposal was aborted: nothing was written and the proposer must not go on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AbortReason {
    /// The proposer's epoch is older than the run's: another worker owns it now.
    StaleEpoch {
        /// The proposer's.
        proposed: Epoch,
        /// The run's.
        current: Epoch,
    },
    /// The proposer's epoch is newer than the run's: it was never issued.
    UnknownEpoch {
        /// The proposer's.
        proposed: Epoch,
        /// The run's.
        current: Epoch,
    },
    /// A flow run's claim (Pending) came without an epoch or a node.
    ClaimNeedsEpochAndNode,
    /// A state only the run's node sets (Running, Completed, Failed, Crashed…) came without
    /// the epoch the node holds: a node's proposals are always fenced.
    EpochRequired(StateType),
    /// The proposer is not the node that owns the run.
    NotOwner {
        /// The owner.
        owner: NodeId,
    },
    /// The run is terminal; only a retry command leaves a terminal state.
    Terminal(StateType),
    /// The run is already claimed (Pending, Running or Cancelling).
    AlreadyClaimed(StateType),
    /// The run is being cancelled: it may only end as Cancelled.
    Cancelling,
    /// A task run cannot start while its flow run is not Running.
    FlowRunNotRunning(Option<StateType>),
    /// Only a Scheduled run can be marked Late.
    NotScheduled(StateType),
    /// The transition is not allowed.
    Invalid {
        /// From.
        from: StateName,
        /// To.
        to: StateName,
    },
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AbortReason::StaleEpoch { proposed, current } => write!(
                f,
                "stale epoch {proposed}: the run is now at {current} and owned by another worker"
            ),
            AbortReason::UnknownEpoch { proposed, current } => {
                write!(f, "epoch {proposed} was never issued (the run is at {current})")
            }
            AbortReason::ClaimNeedsEpochAndNode => {
                f.write_str("a claim (Pending) must carry the run's epoch and the claiming node")
            }
            AbortReason::EpochRequired(t) => write!(
                f,
                "{t} is set by the run's node, which sends the epoch it holds; a proposal without one is refused"
            ),
            AbortReason::NotOwner { owner } => write!(f, "the run is owned by node {owner}"),
            AbortReason::Terminal(t) => write!(f, "the run is {t}, a terminal state; only a retry leaves it"),
            AbortReason::AlreadyClaimed(t) => write!(f, "the run is already claimed ({t})"),
            AbortReason::Cancelling => f.write_str("the run is being cancelled"),
            AbortReason::FlowRunNotRunning(t) => match t {
                Some(t) => write!(f, "the flow run is {t}, not Running"),
                None => f.write_str("the flow run is not Running"),
            },
            AbortReason::NotScheduled(t) => {
                write!(f, "only a Scheduled run can be marked Late (the run is {t})")
            }
            AbortReason::Invalid { from, to } => write!(f, "{from} → {to} is not allowed"),
        }
    }
}

/// The verdict on a proposal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Decision {
    /// The proposed state is written (stamped with `now`; a claim gets the scheduled time).
    Accept(State),
    /// A different state is written and returned.
    Reject(State),
    /// Nothing is written; propose again after `delay`.
    Wait {
        /// How long to wait.
        delay: Duration,
        /// Why.
        reason: WaitReason,
    },
    /// Nothing is written; the proposer must stop.
    Abort(AbortReason),
}

impl Decision {
    /// The state this decision leaves the run in, when it writes or returns one.
    pub fn state(&self) -> Option<&State> {
        match self {
            Decision::Accept(s) | Decision::Reject(s) => Some(s),
            Decision::Wait { .. } | Decision::Abort(_) => None,
        }
    }

    /// Whether the proposal was written as proposed.
    pub fn is_accept(&self) -> bool {
        matches!(self, Decision::Accept(_))
    }
}

/// Decides a proposed transition of a run.
pub fn propose(current: &Lifecycle, proposed: &Proposal, ctx: &RuleContext<'_>) -> Decision {
    if let Some(d) = resent(current, proposed) {
        return d;
    }
    if let Err(reason) = check_epoch(proposed, ctx) {
        return Decision::Abort(reason);
    }
    if current.state.is_terminal() {
        return Decision::Abort(AbortReason::Terminal(current.state.kind));
    }
    let cur = &current.state;
    // A worker's state keeps the worker's time (its transitions may be written behind, several
    // at once), within [the current state's time, now]; anyone else's gets now.
    let at = if proposed.epoch.is_some() {
        proposed
            .state
            .timestamp
            .max(cur.timestamp)
            .min(ctx.now.max(cur.timestamp))
    } else {
        ctx.now
    };
    let next = stamp(&proposed.state, proposed.transition_id, at);
    match proposed.state.kind {
        StateType::Scheduled => to_scheduled(cur, next, ctx),
        StateType::Pending => to_pending(cur, next, proposed, ctx),
        StateType::Running => to_running(cur, next, ctx),
        StateType::Paused => match cur.kind {
            StateType::Running | StateType::Pending => Decision::Accept(next),
            StateType::Paused => Decision::Reject(cur.clone()),
            _ => invalid(cur, &next),
        },
        StateType::Cancelling => to_cancelling(cur, next, ctx),
        StateType::Cancelled => Decision::Accept(next),
        StateType::Completed => match cur.kind {
            StateType::Running => Decision::Accept(next),
            StateType::Cancelling => cancelling_ends_cancelled(next),
            _ => invalid(cur, &next),
        },
        StateType::Failed => to_failed(current, next, ctx),
        StateType::Crashed => match cur.kind {
            StateType::Cancelling => cancelling_ends_cancelled(next),
            _ => Decision::Accept(next),
        },
    }
}

/// Rule: a resent proposal (its transition id is the current state's, or one the run
/// remembers) changes nothing and returns the current state as it was decided then.
fn resent(current: &Lifecycle, proposed: &Proposal) -> Option<Decision> {
    if current.state.transition_id() == Some(proposed.transition_id) {
        return Some(Decision::Accept(current.state.clone()));
    }
    match current.past(proposed.transition_id)? {
        PastDecision::Accepted => Some(Decision::Accept(current.state.clone())),
        PastDecision::Rejected => Some(Decision::Reject(current.state.clone())),
    }
}

/// Rule: a proposal from a worker carries the run's current epoch; a stale one is refused so
/// that a node declared dead cannot overwrite its successor's work. A claim must carry one.
fn check_epoch(proposed: &Proposal, ctx: &RuleContext<'_>) -> Result<(), AbortReason> {
    match proposed.epoch {
        // Users and the control plane wait, pause or cancel a run; every other state is a
        // node's, and a node always says which epoch it holds (fix 5: a proposal without one
        // could overwrite the run's current owner).
        None if !matches!(
            proposed.state.kind,
            StateType::Scheduled
                | StateType::Pending
                | StateType::Cancelling
                | StateType::Cancelled
                | StateType::Paused
        ) =>
        {
            Err(AbortReason::EpochRequired(proposed.state.kind))
        }
        Some(e) if e < ctx.epoch => Err(AbortReason::StaleEpoch {
            proposed: e,
            current: ctx.epoch,
        }),
        Some(e) if e > ctx.epoch => Err(AbortReason::UnknownEpoch {
            proposed: e,
            current: ctx.epoch,
        }),
        _ => {
            if let (Some(node), Some(owner)) = (&proposed.node, ctx.owner)
                && node != owner
                && proposed.state.kind != StateType::Pending
            {
                return Err(AbortReason::NotOwner { owner: owner.clone() });
            }
            Ok(())
        }
    }
}

fn stamp(state: &State, transition_id: TransitionId, at: Timestamp) -> State {
    let mut s = state.clone();
    s.timestamp = at;
    s.details.transition_id = Some(transition_id);
    s
}

fn invalid(cur: &State, next: &State) -> Decision {
    Decision::Abort(AbortReason::Invalid {
        from: cur.name,
        to: next.name,
    })
}

/// Rule: Cancelling ends only as Cancelled (a result it carried is kept).
fn cancelling_ends_cancelled(next: State) -> Decision {
    let mut cancelled = State::named(StateName::Cancelled, next.timestamp);
    cancelled.details.transition_id = next.details.transition_id;
    cancelled.result = next.result;
    cancelled.message = Some(match next.message {
        Some(m) => format!("cancelled while finishing as {}: {m}", next.kind),
        None => format!("cancelled while finishing as {}", next.kind),
    });
    Decision::Reject(cancelled)
}

/// Rules: only a Scheduled run (a flow run nobody owns) can be marked Late; a run can be
/// rescheduled from Scheduled, Paused, or given back from Pending.
fn to_scheduled(cur: &State, mut next: State, ctx: &RuleContext<'_>) -> Decision {
    if next.name == StateName::Late {
        if ctx.kind == RunKind::Task || ctx.owner.is_some() {
            return Decision::Abort(AbortReason::NotScheduled(cur.kind));
        }
        return match cur.kind {
            StateType::Scheduled if cur.name == StateName::Late => Decision::Reject(cur.clone()),
            StateType::Scheduled => {
                next.details.scheduled_time = cur.details.scheduled_time;
                Decision::Accept(next)
            }
            other => Decision::Abort(AbortReason::NotScheduled(other)),
        };
    }
    match cur.kind {
        StateType::Scheduled | StateType::Paused | StateType::Pending => {
            if next.details.scheduled_time.is_none() {
                next.details.scheduled_time = Some(next.timestamp);
            }
            Decision::Accept(next)
        }
        StateType::Cancelling => Decision::Abort(AbortReason::Cancelling),
        _ => invalid(cur, &next),
    }
}

/// Rules: a run already Pending, Running or Cancelling cannot be claimed again; a flow run's
/// claim carries its epoch and node; the scheduled time is copied to Pending; a run that is
/// too early is told to wait.
fn to_pending(cur: &State, mut next: State, proposed: &Proposal, ctx: &RuleContext<'_>) -> Decision {
    if cur.kind.is_claimed() {
        return Decision::Abort(AbortReason::AlreadyClaimed(cur.kind));
    }
    if cur.kind != StateType::Scheduled {
        return invalid(cur, &next);
    }
    if ctx.kind == RunKind::Flow {
        if proposed.epoch.is_none() || proposed.node.is_none() {
            return Decision::Abort(AbortReason::ClaimNeedsEpochAndNode);
        }
        if ctx.owner.is_some() {
            // Waiting in place for a retry: its owner still holds it.
            return Decision::Abort(AbortReason::AlreadyClaimed(cur.kind));
        }
    }
    if let Some(at) = cur.details.scheduled_time {
        if at > ctx.now {
            return Decision::Wait {
                delay: at.saturating_since(ctx.now),
                reason: WaitReason::NotDue { scheduled_time: at },
            };
        }
        next.details.scheduled_time = Some(at);
    }
    Decision::Accept(next)
}

/// Rules: a task run cannot start while its flow run is not Running; a cache hit makes the
/// task run Completed named Cached; a rerun after AwaitingRetry is named Retrying and waits
/// for its time; Cancelling never goes back to Running.
fn to_running(cur: &State, mut next: State, ctx: &RuleContext<'_>) -> Decision {
    if ctx.kind == RunKind::Task && ctx.flow_run_state != Some(StateType::Running) {
        return Decision::Abort(AbortReason::FlowRunNotRunning(ctx.flow_run_state));
    }
    match cur.kind {
        StateType::Pending | StateType::Paused => {}
        StateType::Scheduled => {
            let in_place_retry =
                cur.name == StateName::AwaitingRetry && (ctx.kind == RunKind::Task || ctx.owner.is_some());
            if !in_place_retry {
                return invalid(cur, &next);
            }
            // A flow run waits for its retry time here; a task run's owner keeps the time itself
            // (its proposals are written behind, so they may reach the control plane early).
            if ctx.kind == RunKind::Flow
                && let Some(at) = cur.details.scheduled_time
                && at > ctx.now
            {
                return Decision::Wait {
                    delay: at.saturating_since(ctx.now),
                    reason: WaitReason::NotDue { scheduled_time: at },
                };
            }
            next.name = StateName::Retrying;
        }
        StateType::Cancelling => return Decision::Abort(AbortReason::Cancelling),
        StateType::Running => return Decision::Abort(AbortReason::AlreadyClaimed(cur.kind)),
        _ => return invalid(cur, &next),
    }
    if ctx.kind == RunKind::Task
        && let Some(cached) = ctx.cached
    {
        let mut hit = State::named(StateName::Cached, next.timestamp);
        hit.details.transition_id = next.details.transition_id;
        hit.details.cache_key = cached.details.cache_key.clone();
        hit.details.cache_expiration = cached.details.cache_expiration;
        hit.result = cached.result.clone();
        return Decision::Reject(hit);
    }
    Decision::Accept(next)
}

/// Rule: Scheduled or Paused with no running owner goes straight to Cancelled.
fn to_cancelling(cur: &State, next: State, ctx: &RuleContext<'_>) -> Decision {
    match cur.kind {
        StateType::Cancelling => Decision::Reject(cur.clone()),
        StateType::Scheduled | StateType::Paused if ctx.kind == RunKind::Task || ctx.owner.is_none() => {
            let mut cancelled = State::named(StateName::Cancelled, next.timestamp);
            cancelled.details.transition_id = next.details.transition_id;
            cancelled.message = next.message;
            Decision::Reject(cancelled)
        }
        _ => Decision::Accept(next),
    }
}

/// Rule: Running → Failed with retries left becomes AwaitingRetry at now + the policy's delay.
fn to_failed(current: &Lifecycle, next: State, ctx: &RuleContext<'_>) -> Decision {
    let cur = &current.state;
    if cur.kind == StateType::Cancelling {
        return cancelling_ends_cancelled(next);
    }
    if cur.kind != StateType::Running {
        return Decision::Accept(next);
    }
    let policy = ctx.retry_policy;
    if !policy.should_retry(current.run_count, next.message.as_deref(), next.details.retriable) {
        return Decision::Accept(next);
    }
    let mut rng = SmallRng::seed_from_u64(ctx.jitter_seed);
    let delay = policy.delay(current.run_count, &mut rng);
    let mut retry =
        State::named(StateName::AwaitingRetry, next.timestamp).with_scheduled_time(next.timestamp + delay);
    retry.details.transition_id = next.details.transition_id;
    retry.message = next.message;
    Decision::Reject(retry)
}

/// Why a retry command was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RetryRefusal {
    /// The run is not in a terminal state.
    NotTerminal(StateType),
    /// The run completed; retrying it needs `force`.
    CompletedNeedsForce,
}

impl fmt::Display for RetryRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryRefusal::NotTerminal(t) => {
                write!(f, "the run is {t}; only a finished run can be retried")
            }
            RetryRefusal::CompletedNeedsForce => {
                f.write_str("the run completed; retrying it needs force (its result stays in the history)")
            }
        }
    }
}

/// Rule: a terminal state is left only through a retry command — Failed, Crashed or Cancelled
/// (and Completed with `force`) → Scheduled named AwaitingRetry, or Resuming for an automatic
/// resume after a crash. The caller gives the run a new epoch; the run is then claimed
/// (Pending) as any other.
pub fn retry(current: &Lifecycle, resume: bool, force: bool, now: Timestamp) -> Result<State, RetryRefusal> {
    match current.state.kind {
        StateType::Failed | StateType::Crashed | StateType::Cancelled => {}
        StateType::Completed if force => {}
        StateType::Completed => return Err(RetryRefusal::CompletedNeedsForce),
        other => return Err(RetryRefusal::NotTerminal(other)),
    }
    let name = if resume {
        StateName::Resuming
    } else {
        StateName::AwaitingRetry
    };
    Ok(State::named(name, now).with_scheduled_time(now))
}

/// Rule: when a run's owner dies, a non-terminal run becomes Crashed, one being cancelled
/// becomes Cancelled, and a terminal one is never touched (`None`).
pub fn owner_died(current: &State, now: Timestamp, message: &str) -> Option<State> {
    match current.kind {
        k if k.is_terminal() => None,
        StateType::Cancelling => {
            Some(State::named(StateName::Cancelled, now).with_message(format!("cancelled: {message}")))
        }
        _ => Some(State::named(StateName::Crashed, now).with_message(message.to_owned())),
    }
}
