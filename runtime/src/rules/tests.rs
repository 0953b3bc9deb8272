//! One test per orchestration rule.

use super::*;
use crate::ids::EventId;
use crate::retry::RetryDelay;
use crate::state::ResultRef;

fn t(s: i64) -> Timestamp {
    Timestamp::from_millis(1_800_000_000_000 + s * 1000)
}

fn tid(n: u8) -> TransitionId {
    TransitionId::from_bytes([n; 16])
}

fn node(s: &str) -> NodeId {
    s.parse().unwrap()
}

fn life(state: State) -> Lifecycle {
    Lifecycle::new(state)
}

fn in_state(name: StateName) -> Lifecycle {
    let mut s = State::named(name, t(0));
    s.details.transition_id = Some(tid(200));
    if name.state_type() == StateType::Scheduled {
        s.details.scheduled_time = Some(t(0));
    }
    life(s)
}

struct Ctx {
    kind: RunKind,
    now: Timestamp,
    epoch: Epoch,
    owner: Option<NodeId>,
    policy: RetryPolicy,
    flow_state: Option<StateType>,
    cached: Option<State>,
}

impl Ctx {
    fn flow() -> Self {
        Ctx {
            kind: RunKind::Flow,
            now: t(10),
            epoch: Epoch::FIRST,
            owner: None,
            policy: RetryPolicy::none(),
            flow_state: None,
            cached: None,
        }
    }
    fn owned() -> Self {
        Ctx {
            owner: Some(node("n1")),
            ..Ctx::flow()
        }
    }
    fn task() -> Self {
        Ctx {
            kind: RunKind::Task,
            owner: Some(node("n1")),
            flow_state: Some(StateType::Running),
            ..Ctx::flow()
        }
    }
    fn get(&self) -> RuleContext<'_> {
        RuleContext {
            kind: self.kind,
            now: self.now,
            epoch: self.epoch,
            owner: self.owner.as_ref(),
            retry_policy: &self.policy,
            flow_run_state: self.flow_state,
            cached: self.cached.as_ref(),
            jitter_seed: 9,
        }
    }
}

fn user(name: StateName, n: u8) -> Proposal {
    Proposal::new(State::named(name, t(0)), tid(n))
}

/// A worker's proposal, stamped at the context's `now` (t(10)).
fn worker(name: StateName, n: u8) -> Proposal {
    Proposal::from_worker(State::named(name, t(10)), tid(n), Epoch::FIRST, node("n1"))
}

fn decide(l: &Lifecycle, p: &Proposal, c: &Ctx) -> Decision {
    propose(l, p, &c.get())
}

fn accepted_name(d: &Decision) -> StateName {
    match d {
        Decision::Accept(s) => s.name,
        other => panic!("expected Accept, got {other:?}"),
    }
}

fn rejected_to(d: &Decision) -> &State {
    match d {
        Decision::Reject(s) => s,
        other => panic!("expected Reject, got {other:?}"),
    }
}

fn aborted(d: &Decision) -> &AbortReason {
    match d {
        Decision::Abort(r) => r,
        other => panic!("expected Abort, got {other:?}"),
    }
}

#[test]
fn a_resent_transition_is_idempotent() {
    let l = in_state(StateName::Running);
    let d = decide(&l, &worker(StateName::Completed, 200), &Ctx::owned());
    assert_eq!(
        d,
        Decision::Accept(l.state.clone()),
        "the current state's transition id"
    );
    let mut l2 = in_state(StateName::Cancelling);
    l2.remember(tid(5), PastDecision::Accepted);
    l2.remember(tid(6), PastDecision::Rejected);
    assert_eq!(
        decide(&l2, &worker(StateName::Running, 5), &Ctx::owned()),
        Decision::Accept(l2.state.clone())
    );
    assert_eq!(
        decide(&l2, &worker(StateName::Failed, 6), &Ctx::owned()),
        Decision::Reject(l2.state.clone())
    );
}

#[test]
fn a_stale_or_unknown_epoch_is_refused() {
    let l = in_state(StateName::Running);
    let mut c = Ctx::owned();
    c.epoch = Epoch::new(3);
    let stale = Proposal::from_worker(
        State::of(StateType::Completed, t(0)),
        tid(1),
        Epoch::new(2),
        node("n1"),
    );
    assert_eq!(
        aborted(&decide(&l, &stale, &c)),
        &AbortReason::StaleEpoch {
            proposed: Epoch::new(2),
            current: Epoch::new(3)
        }
    );
    let future = Proposal::from_worker(
        State::of(StateType::Completed, t(0)),
        tid(1),
        Epoch::new(4),
        node("n1"),
    );
    assert!(matches!(
        aborted(&decide(&l, &future, &c)),
        AbortReason::UnknownEpoch { .. }
    ));
    let other = Proposal::from_worker(
        State::of(StateType::Completed, t(0)),
        tid(1),
        Epoch::new(3),
        node("n2"),
    );
    assert_eq!(
        aborted(&decide(&l, &other, &c)),
        &AbortReason::NotOwner { owner: node("n1") }
    );
}

#[test]
fn a_terminal_state_is_left_only_through_a_retry() {
    for name in [
        StateName::Completed,
        StateName::Failed,
        StateName::Cancelled,
        StateName::Crashed,
    ] {
        let l = in_state(name);
        for to in [
            StateName::Scheduled,
            StateName::Pending,
            StateName::Running,
            StateName::Completed,
            StateName::Cancelling,
            StateName::Crashed,
        ] {
            let d = decide(&l, &worker(to, 1), &Ctx::owned());
            assert_eq!(
                aborted(&d),
                &AbortReason::Terminal(name.state_type()),
                "{name} → {to}"
            );
        }
    }
    for name in [StateName::Failed, StateName::Crashed, StateName::Cancelled] {
        let s = retry(&in_state(name), false, false, t(20)).unwrap();
        assert_eq!(
            (s.name, s.details.scheduled_time),
            (StateName::AwaitingRetry, Some(t(20)))
        );
        let s = retry(&in_state(name), true, false, t(20)).unwrap();
        assert_eq!(s.name, StateName::Resuming);
    }
    assert_eq!(
        retry(&in_state(StateName::Completed), false, false, t(20)),
        Err(RetryRefusal::CompletedNeedsForce)
    );
    assert_eq!(
        retry(&in_state(StateName::Completed), false, true, t(20))
            .unwrap()
            .name,
        StateName::AwaitingRetry
    );
    assert_eq!(
        retry(&in_state(StateName::Running), false, true, t(20)),
        Err(RetryRefusal::NotTerminal(StateType::Running))
    );
}

#[test]
fn a_completed_result_is_never_dropped() {
    let mut done = State::named(StateName::Completed, t(1)).with_result(ResultRef::Inline(vec![1, 2]));
    done.details.transition_id = Some(tid(100));
    let l = life(done.clone());
    let mut over = worker(StateName::Completed, 2);
    over.state.result = Some(ResultRef::Inline(vec![9]));
    assert!(matches!(
        decide(&l, &over, &Ctx::owned()),
        Decision::Abort(AbortReason::Terminal(_))
    ));
    // Finishing while being cancelled: Cancelled, with the result kept.
    let mut fin = worker(StateName::Completed, 3);
    fin.state.result = Some(ResultRef::Inline(vec![7]));
    let d = decide(&in_state(StateName::Cancelling), &fin, &Ctx::owned());
    assert_eq!(rejected_to(&d).result, Some(ResultRef::Inline(vec![7])));
}

#[test]
fn cancelling_ends_only_as_cancelled() {
    let l = in_state(StateName::Cancelling);
    for to in [
        StateName::Completed,
        StateName::Failed,
        StateName::TimedOut,
        StateName::Crashed,
    ] {
        let d = decide(&l, &worker(to, 1), &Ctx::owned());
        assert_eq!(rejected_to(&d).kind, StateType::Cancelled, "{to}");
    }
    assert_eq!(
        accepted_name(&decide(&l, &worker(StateName::Cancelled, 1), &Ctx::owned())),
        StateName::Cancelled
    );
    for to in [StateName::Running, StateName::Scheduled] {
        assert_eq!(
            aborted(&decide(&l, &worker(to, 1), &Ctx::owned())),
            &AbortReason::Cancelling
        );
    }
    assert_eq!(
        aborted(&decide(&l, &worker(StateName::Pending, 1), &Ctx::owned())),
        &AbortReason::AlreadyClaimed(StateType::Cancelling)
    );
    // Also when its owner dies.
    assert_eq!(
        owner_died(&l.state, t(5), "node n1 died").map(|s| s.kind),
        Some(StateType::Cancelled)
    );
}

#[test]
fn a_run_whose_owner_dies_crashes_unless_terminal() {
    for name in [
        StateName::Pending,
        StateName::Running,
        StateName::Paused,
        StateName::AwaitingRetry,
    ] {
        let s = owner_died(&in_state(name).state, t(5), "node n1 died").unwrap();
        assert_eq!(
            (s.kind, s.message.as_deref()),
            (StateType::Crashed, Some("node n1 died"))
        );
    }
    for name in [
        StateName::Completed,
        StateName::Failed,
        StateName::Cancelled,
        StateName::Crashed,
    ] {
        assert_eq!(owner_died(&in_state(name).state, t(5), "x"), None, "{name}");
    }
}

#[test]
fn cancelling_a_run_with_no_running_owner_cancels_it_at_once() {
    for name in [StateName::Scheduled, StateName::Late, StateName::Paused] {
        let d = decide(&in_state(name), &user(StateName::Cancelling, 1), &Ctx::flow());
        assert_eq!(rejected_to(&d).kind, StateType::Cancelled, "{name}");
    }
    // With an owner that is running it (or waiting in place), it goes through Cancelling.
    for name in [StateName::Pending, StateName::Running] {
        let d = decide(&in_state(name), &user(StateName::Cancelling, 1), &Ctx::owned());
        assert_eq!(accepted_name(&d), StateName::Cancelling, "{name}");
    }
    let d = decide(
        &in_state(StateName::Paused),
        &user(StateName::Cancelling, 1),
        &Ctx::owned(),
    );
    assert_eq!(accepted_name(&d), StateName::Cancelling);
}

#[test]
fn a_claimed_run_cannot_be_claimed_again() {
    for name in [StateName::Pending, StateName::Running, StateName::Cancelling] {
        let d = decide(&in_state(name), &worker(StateName::Pending, 1), &Ctx::owned());
        assert_eq!(aborted(&d), &AbortReason::AlreadyClaimed(name.state_type()));
    }
    // A run waiting in place for a retry still belongs to its owner.
    let d = decide(
        &in_state(StateName::AwaitingRetry),
        &worker(StateName::Pending, 1),
        &Ctx::owned(),
    );
    assert!(matches!(aborted(&d), AbortReason::AlreadyClaimed(_)));
    // A claim must say who claims, under which epoch.
    let d = decide(
        &in_state(StateName::Scheduled),
        &user(StateName::Pending, 1),
        &Ctx::flow(),
    );
    assert_eq!(aborted(&d), &AbortReason::ClaimNeedsEpochAndNode);
}

#[test]
fn a_claim_copies_the_scheduled_time_and_waits_if_early() {
    let mut l = in_state(StateName::Scheduled);
    l.state.details.scheduled_time = Some(t(4));
    let d = decide(&l, &worker(StateName::Pending, 1), &Ctx::flow());
    match d {
        Decision::Accept(s) => {
            assert_eq!(s.details.scheduled_time, Some(t(4)));
            assert_eq!(s.timestamp, t(10));
            assert_eq!(s.transition_id(), Some(tid(1)));
        }
        other => panic!("{other:?}"),
    }
    l.state.details.scheduled_time = Some(t(15));
    assert_eq!(
        decide(&l, &worker(StateName::Pending, 1), &Ctx::flow()),
        Decision::Wait {
            delay: Duration::from_secs(5),
            reason: WaitReason::NotDue {
                scheduled_time: t(15)
            }
        }
    );
}

#[test]
fn a_failure_with_retries_left_awaits_a_retry() {
    let mut c = Ctx::owned();
    c.policy = RetryPolicy::fixed(2, Duration::from_secs(30));
    let mut l = in_state(StateName::Running);
    l.run_count = 1;
    let mut p = worker(StateName::Failed, 1);
    p.state.message = Some("boom".into());
    let s = rejected_to(&decide(&l, &p, &c)).clone();
    assert_eq!(
        (s.name, s.details.scheduled_time),
        (StateName::AwaitingRetry, Some(t(40)))
    );
    assert_eq!(s.message.as_deref(), Some("boom"));
    assert_eq!(s.transition_id(), Some(tid(1)));
    // Exponential backoff: the second retry waits longer.
    c.policy.delay = RetryDelay::Exponential {
        base: Duration::from_secs(1),
        factor: 2.0,
        max: Duration::from_secs(60),
    };
    l.run_count = 2;
    assert_eq!(
        rejected_to(&decide(&l, &p, &c)).details.scheduled_time,
        Some(t(12))
    );
    // Out of retries, or declined by the retry condition: Failed.
    l.run_count = 3;
    assert_eq!(accepted_name(&decide(&l, &p, &c)), StateName::Failed);
    l.run_count = 1;
    p.state.details.retriable = Some(false);
    assert_eq!(accepted_name(&decide(&l, &p, &c)), StateName::Failed);
    // A timeout is a failure like any other.
    let mut to = worker(StateName::TimedOut, 2);
    to.state.message = Some("timed out".into());
    assert_eq!(rejected_to(&decide(&l, &to, &c)).name, StateName::AwaitingRetry);
}

#[test]
fn a_rerun_is_named_retrying_and_waits_for_its_time() {
    let mut l = in_state(StateName::AwaitingRetry);
    l.state.details.scheduled_time = Some(t(10));
    assert_eq!(
        accepted_name(&decide(&l, &worker(StateName::Running, 1), &Ctx::owned())),
        StateName::Retrying
    );
    assert_eq!(
        accepted_name(&decide(&l, &worker(StateName::Running, 1), &Ctx::task())),
        StateName::Retrying
    );
    l.state.details.scheduled_time = Some(t(12));
    assert!(matches!(
        decide(&l, &worker(StateName::Running, 1), &Ctx::owned()),
        Decision::Wait { .. }
    ));
    // Without an owner waiting in place, a retry goes through a claim.
    let d = decide(
        &in_state(StateName::AwaitingRetry),
        &worker(StateName::Running, 1),
        &Ctx::flow(),
    );
    assert!(matches!(aborted(&d), AbortReason::Invalid { .. }));
}

#[test]
fn a_cache_hit_completes_the_task_as_cached() {
    let mut c = Ctx::task();
    let mut cached = State::named(StateName::Completed, t(-100)).with_result(ResultRef::Inline(vec![4]));
    cached.details.cache_key = Some("k".into());
    c.cached = Some(cached);
    let d = decide(&in_state(StateName::Pending), &worker(StateName::Running, 1), &c);
    let s = rejected_to(&d);
    assert_eq!((s.kind, s.name), (StateType::Completed, StateName::Cached));
    assert_eq!(s.result, Some(ResultRef::Inline(vec![4])));
    assert_eq!(s.details.cache_key.as_deref(), Some("k"));
    assert_eq!(s.timestamp, t(10));
}

#[test]
fn a_task_cannot_start_unless_its_flow_run_is_running() {
    for fs in [
        Some(StateType::Pending),
        Some(StateType::Cancelling),
        Some(StateType::Completed),
        None,
    ] {
        let mut c = Ctx::task();
        c.flow_state = fs;
        let d = decide(&in_state(StateName::Pending), &worker(StateName::Running, 1), &c);
        assert_eq!(aborted(&d), &AbortReason::FlowRunNotRunning(fs));
    }
    assert_eq!(
        accepted_name(&decide(
            &in_state(StateName::Pending),
            &worker(StateName::Running, 1),
            &Ctx::task()
        )),
        StateName::Running
    );
}

#[test]
fn only_a_scheduled_run_can_be_marked_late() {
    let late = user(StateName::Late, 1);
    let mut l = in_state(StateName::Scheduled);
    l.state.details.scheduled_time = Some(t(3));
    let d = decide(&l, &late, &Ctx::flow());
    match d {
        Decision::Accept(s) => assert_eq!((s.name, s.details.scheduled_time), (StateName::Late, Some(t(3)))),
        other => panic!("{other:?}"),
    }
    for name in [StateName::Pending, StateName::Running, StateName::Paused] {
        assert_eq!(
            aborted(&decide(&in_state(name), &late, &Ctx::flow())),
            &AbortReason::NotScheduled(name.state_type())
        );
    }
    // Already late: nothing changes.
    let l = in_state(StateName::Late);
    assert_eq!(decide(&l, &late, &Ctx::flow()), Decision::Reject(l.state.clone()));
}

#[test]
fn run_count_and_timing_follow_the_states() {
    // The rules stamp every written state with the control plane's time.
    let d = decide(
        &in_state(StateName::Pending),
        &worker(StateName::Running, 1),
        &Ctx::owned(),
    );
    let s = d.state().unwrap().clone();
    assert_eq!(s.timestamp, t(10));
    let mut l = in_state(StateName::Pending);
    let _ = l.enter(s, EventId::from_bytes([1; 16]));
    assert_eq!((l.run_count, l.start_time), (1, Some(t(10))));
}

#[test]
fn a_workers_time_is_kept_within_the_current_state_and_now() {
    let l = in_state(StateName::Pending); // at t(0)
    let at = |ts: Timestamp| {
        let p = Proposal::from_worker(
            State::named(StateName::Running, ts),
            tid(1),
            Epoch::FIRST,
            node("n1"),
        );
        decide(&l, &p, &Ctx::owned()).state().unwrap().timestamp
    };
    assert_eq!(at(t(7)), t(7), "written behind: the worker's time is kept");
    assert_eq!(at(t(20)), t(10), "never after the control plane's now");
    assert_eq!(at(t(-5)), t(0), "never before the current state");
    // Anyone else's proposal is stamped now.
    let p = Proposal::new(State::named(StateName::Cancelling, t(3)), tid(2));
    assert_eq!(
        decide(&in_state(StateName::Running), &p, &Ctx::owned())
            .state()
            .unwrap()
            .timestamp,
        t(10)
    );
}

/// Regression (fix 5): a node's proposal without an epoch was accepted, so a worker's Crashed
/// with no epoch could overwrite the work of the run's new owner. A node's states need the
/// epoch; users and the control plane may still wait, pause and cancel without one.
#[test]
fn a_nodes_state_without_an_epoch_is_refused() {
    for name in [
        StateName::Running,
        StateName::Completed,
        StateName::Failed,
        StateName::Crashed,
    ] {
        let d = decide(&in_state(StateName::Running), &user(name, 1), &Ctx::owned());
        assert_eq!(
            aborted(&d),
            &AbortReason::EpochRequired(name.state_type()),
            "{name}"
        );
    }
    let d = decide(
        &in_state(StateName::Running),
        &user(StateName::Cancelling, 1),
        &Ctx::owned(),
    );
    assert!(d.is_accept(), "{d:?}");
    let d = decide(
        &in_state(StateName::Scheduled),
        &user(StateName::Late, 2),
        &Ctx::flow(),
    );
    assert!(d.is_accept(), "{d:?}");
}
