#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::ids::DeploymentId;

const T0: Timestamp = Timestamp::from_micros(1_800_000_000_000_000);

fn node(n: &str) -> NodeId {
    n.parse().expect("a node name")
}

fn run(n: u8) -> FlowRunId {
    FlowRunId::from_bytes([n; 16])
}

fn member(name: &str, slots_total: u32, incarnation: u64) -> MemberStatus {
    MemberStatus {
        name: node(name),
        addr: String::new(),
        role: "worker".into(),
        reachable: true,
        slots_used: 0,
        slots_total,
        flows: vec!["f".into()],
        queues: Vec::new(),
        last_heartbeat: None,
        incarnation,
        holds: Vec::new(),
        flow_options: Default::default(),
    }
}

fn at(ms: u64) -> Timestamp {
    T0 + Duration::from_millis(ms)
}

fn starts(effects: &[Effect<u32>]) -> Vec<(NodeId, FlowRunId)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Start { node, placement } => Some((node.clone(), placement.run)),
            _ => None,
        })
        .collect()
}

/// The commands appended (a node's death among them).
fn appended(effects: &[Effect<u32>]) -> Vec<&Command> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Append(c) | Effect::DeclareDead { command: c, .. } => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn due_runs_go_to_the_least_loaded_member_and_one_placed_late_is_marked_late() {
    let mut c: ControlMachine<u32> = ControlMachine::new(ControlConfig::default());
    c.handle(T0, Input::Heartbeat(member("a", 2, 1)));
    c.handle(T0, Input::Heartbeat(member("b", 2, 1)));
    let mut placed = Vec::new();
    for n in 1..=4 {
        let effects = c.handle(T0, Input::Due(Placement::plain(run(n), "f".into(), T0)));
        placed.extend(starts(&effects));
        assert!(appended(&effects).is_empty(), "a run due now is not late");
    }
    let on_a = placed.iter().filter(|(n, _)| *n == node("a")).count();
    assert_eq!((placed.len(), on_a), (4, 2), "spread over both: {placed:?}");
    // Both full: the fifth waits, and is placed marked Late once a slot frees long after.
    let effects = c.handle(T0, Input::Due(Placement::plain(run(5), "f".into(), T0)));
    assert!(starts(&effects).is_empty());
    let later = at(20_000);
    for name in ["a", "b"] {
        let full = MemberStatus {
            slots_used: 2,
            ..member(name, 2, 1)
        };
        assert!(starts(&c.handle(later, Input::Heartbeat(full))).is_empty());
    }
    let effects = c.handle(later, Input::Ended(run(1)));
    assert_eq!(starts(&effects).len(), 1, "{effects:?}");
    assert!(
        matches!(appended(&effects)[..], [Command::ProposeFlowRunState { run: r, proposal }]
            if *r == run(5) && proposal.state.name == StateName::Late),
        "{effects:?}"
    );
}

#[test]
fn a_silent_member_is_declared_dead_once_by_its_incarnation_and_its_claims_are_refused() {
    let mut c: ControlMachine<u32> = ControlMachine::new(ControlConfig::default());
    c.handle(T0, Input::Heartbeat(member("a", 2, 7)));
    let effects = c.handle(T0, Input::Due(Placement::plain(run(1), "f".into(), T0)));
    assert_eq!(starts(&effects), vec![(node("a"), run(1))]);
    assert!(appended(&c.handle(at(900), Input::Tick)).is_empty());
    let effects = c.handle(at(1_100), Input::Tick);
    let crash: Vec<&Command> = appended(&effects);
    assert!(
        matches!(crash[..], [Command::MarkNodeCrashed { node: n, key, .. }] if *n == node("a") && key == "crash/a/7"),
        "{effects:?}"
    );
    // The run handed to it and never started is read back to be placed again.
    assert!(
        effects.iter().any(
            |e| matches!(e, Effect::Recheck { node: n, runs } if *n == node("a") && *runs == vec![run(1)])
        )
    );
    assert!(
        appended(&c.handle(at(1_200), Input::Tick)).is_empty(),
        "declared once"
    );
    let claim = Command::ProposeFlowRunState {
        run: run(2),
        proposal: Proposal::from_worker(
            State::named(StateName::Pending, at(1_200)),
            TransitionId::from_uuid(derived_id("t")),
            crate::ids::Epoch::FIRST,
            node("a"),
        ),
    };
    assert!(c.admit(&claim).is_err());
    c.handle(at(1_300), Input::Heartbeat(member("a", 2, 8)));
    assert!(c.admit(&claim).is_ok(), "heard from again");
}

#[test]
fn a_deployment_at_its_limit_holds_its_next_run_back_until_one_ends() {
    let mut c: ControlMachine<u32> = ControlMachine::new(ControlConfig::default());
    c.handle(T0, Input::Heartbeat(member("a", 4, 1)));
    let d = DeploymentId::from_uuid(derived_id("d"));
    let p = |n| Placement {
        deployment: Some((d, Some((1, crate::deployment::CollisionStrategy::Enqueue)))),
        ..Placement::plain(run(n), "f".into(), T0)
    };
    assert_eq!(starts(&c.handle(T0, Input::Due(p(1)))).len(), 1);
    let effects = c.handle(T0, Input::Due(p(2)));
    assert!(starts(&effects).is_empty());
    assert!(
        matches!(appended(&effects)[..], [Command::ProposeFlowRunState { proposal, .. }]
        if proposal.state.name == StateName::AwaitingConcurrencySlot)
    );
    assert_eq!(
        starts(&c.handle(at(10), Input::Ended(run(1)))),
        vec![(node("a"), run(2))]
    );
}

#[test]
fn a_holding_is_recorded_before_its_holder_hears_of_it() {
    let mut c: ControlMachine<u32> = ControlMachine::new(ControlConfig::default());
    let limit = ConcurrencyLimit {
        tag: "db".into(),
        limit: 1,
        lease_ttl: Duration::from_secs(2),
        leases: Vec::new(),
    };
    c.handle(T0, Input::Limits(vec![limit]));
    let holder = |n: u8| TaskRunId::from_bytes([n; 16]);
    let acquire = |n: u8| Input::Acquire {
        holder: holder(n),
        node: node("a"),
        tags: vec!["db".into(), "free".into()],
        reply: u32::from(n),
    };
    let effects = c.handle(T0, acquire(1));
    assert!(
        matches!(&effects[..], [Effect::Hold { holder: h, tags, reply: 1, .. }] if *h == holder(1) && *tags == vec!["db".to_owned()]),
        "{effects:?}"
    );
    assert!(c.handle(T0, acquire(2)).is_empty(), "the second waits");
    // The first never renews: its lease lapses, is recorded free, and the waiter gets it.
    let effects = c.handle(at(2_100), Input::Tick);
    assert!(effects.iter().any(|e| matches!(e, Effect::Append(Command::Slots(SlotChange::Free { holders, .. })) if *holders == vec![holder(1)])));
    assert!(effects.iter().any(|e| matches!(e, Effect::Hold { reply: 2, .. })));
    // A tag with no limit is answered at once, with nothing to record.
    let effects = c.handle(
        at(2_200),
        Input::Acquire {
            holder: holder(3),
            node: node("a"),
            tags: vec!["free".into()],
            reply: 3,
        },
    );
    assert!(matches!(
        effects[..],
        [Effect::Answer {
            reply: 3,
            answer: SlotAnswer::Grant(SlotGrant::Unlimited)
        }]
    ));
}

/// Found by reasoning about a leader change: the deposed leader went on renewing a holder
/// it knew of (answers it sends without logging) while its successor, which restored the
/// holding from the log, counted the lease from its own start and gave the slot to another
/// once it lapsed. A machine started with a grace counts restored leases that much longer.
#[test]
fn a_restored_lease_outlasts_the_grace_a_deposed_leader_may_renew_it_in() {
    let holder = |n: u8| TaskRunId::from_bytes([n; 16]);
    let limit = ConcurrencyLimit {
        tag: "gpu".into(),
        limit: 1,
        lease_ttl: Duration::from_millis(500),
        leases: Vec::new(),
    };
    // When the second holder gets the slot, after a start at T0 that restored the first.
    let granted_after = |grace: Duration| {
        let mut c: ControlMachine<u32> = ControlMachine::new(ControlConfig {
            lease_grace: grace,
            ..ControlConfig::default()
        });
        c.handle(T0, Input::Limits(vec![limit.clone()]));
        c.handle(T0, Input::Holds(Some(vec![("gpu".into(), holder(1), node("a"))])));
        c.handle(T0, Input::Restore(Vec::new()));
        let waits = c.handle(
            T0,
            Input::Acquire {
                holder: holder(2),
                node: node("b"),
                tags: vec!["gpu".into()],
                reply: 2,
            },
        );
        assert!(waits.is_empty(), "the slot is held: {waits:?}");
        (1..=100u64)
            .map(|i| i * 50)
            .find(|ms| {
                c.handle(at(*ms), Input::Tick)
                    .iter()
                    .any(|e| matches!(e, Effect::Hold { reply: 2, .. }))
            })
            .expect("granted within 5 s")
    };
    // Without a grace the slot goes to the other once the lease runs out from the start; the
    // holder, renewed by the deposed leader until up to the grace after the start, would still
    // believe it holds it.
    assert_eq!(granted_after(Duration::ZERO), 500);
    assert_eq!(granted_after(Duration::from_secs(2)), 2_500);
}

#[test]
fn a_run_claimed_while_it_is_read_back_is_not_taken_back() {
    let (mut c, p) = placed_then_read_back();
    // Its late start is claimed before the read's take-back arrives: the take-back is dropped.
    assert!(c.admit(&claim(1, "a", 210)).is_ok());
    assert!(c.handle(at(220), Input::TakeBack(p.clone())).is_empty());
    // Another node asking for the run is refused: it is placed on a.
    assert!(c.admit(&claim(1, "b", 230)).is_err());
}

/// A machine that placed run 1 on node a, which then left it out of two heartbeats: it is
/// being read back.
fn placed_then_read_back() -> (ControlMachine<u32>, Placement) {
    let mut c: ControlMachine<u32> = ControlMachine::new(ControlConfig::default());
    c.handle(T0, Input::Heartbeat(member("a", 2, 1)));
    let p = Placement::plain(run(1), "f".into(), T0);
    assert_eq!(
        starts(&c.handle(T0, Input::Due(p.clone()))),
        vec![(node("a"), run(1))]
    );
    c.handle(at(100), Input::Heartbeat(member("a", 2, 1)));
    let effects = c.handle(at(200), Input::Heartbeat(member("a", 2, 1)));
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Recheck { runs, .. } if *runs == vec![run(1)]))
    );
    (c, p)
}

/// A node's claim of `run` at `ms`.
fn claim(n: u8, by: &str, ms: u64) -> Command {
    Command::ProposeFlowRunState {
        run: run(n),
        proposal: Proposal::from_worker(
            State::named(StateName::Pending, at(ms)),
            TransitionId::from_uuid(derived_id(&format!("claim/{n}/{by}/{ms}"))),
            crate::ids::Epoch::FIRST,
            node(by),
        ),
    }
}

#[test]
fn a_run_handed_out_twice_is_still_taken_back_when_its_start_was_lost() {
    // Found by the simulation (seed 531): the scheduler handed out a run the control machine
    // had placed already; the second hand-out cancelled the read-back of its lost start, and
    // the run stayed placed on a node that never ran it.
    let (mut c, p) = placed_then_read_back();
    // Handed out again meanwhile: nothing changes, the read-back still counts.
    assert!(starts(&c.handle(at(210), Input::Due(p.clone()))).is_empty());
    assert_eq!(
        starts(&c.handle(at(220), Input::TakeBack(p))),
        vec![(node("a"), run(1))],
        "taken back and placed again"
    );
}

#[test]
fn after_a_restart_a_stale_start_of_a_run_held_for_the_scheduler_is_refused() {
    // Found by the simulation (seed 28): after a restart of the control node, a start sent
    // before it let a node claim a deployment's run that the new machine did not know yet (the
    // scheduler hands such runs out), and the run ran beside its deployment's limit.
    let mut c: ControlMachine<u32> = ControlMachine::new(ControlConfig::default());
    c.handle(T0, Input::Heartbeat(member("a", 2, 1)));
    c.handle(T0, Input::Restore(Vec::new()));
    c.handle(T0, Input::Held(vec![run(1)]));
    assert!(c.admit(&claim(1, "a", 10)).is_err(), "held: not placed yet");
    // Handed out by the scheduler: placed, and its claim by that node is admitted.
    let d = DeploymentId::from_uuid(derived_id("d"));
    let p = Placement {
        deployment: Some((d, Some((1, crate::deployment::CollisionStrategy::Enqueue)))),
        ..Placement::plain(run(1), "f".into(), T0)
    };
    assert_eq!(
        starts(&c.handle(at(20), Input::Due(p))),
        vec![(node("a"), run(1))]
    );
    assert!(c.admit(&claim(1, "a", 30)).is_ok());
}

/// A run made without a deployment or a queue is in the `default` work queue: a node serving
/// other queues only never takes it; one serving `default` (or every queue) does.
#[test]
fn a_run_of_no_queue_goes_only_to_a_node_that_serves_the_default_queue() {
    let mut c: ControlMachine<u32> = ControlMachine::new(ControlConfig::default());
    let ops_only = MemberStatus {
        queues: vec!["ops".into()],
        ..member("a", 4, 1)
    };
    c.handle(T0, Input::Heartbeat(ops_only));
    let effects = c.handle(T0, Input::Due(Placement::plain(run(1), "f".into(), T0)));
    assert!(
        starts(&effects).is_empty(),
        "placed on a node serving only ops: {effects:?}"
    );
    let default_too = MemberStatus {
        queues: vec!["ops".into(), crate::work_queue::DEFAULT_QUEUE.into()],
        ..member("b", 4, 1)
    };
    let effects = c.handle(T0, Input::Heartbeat(default_too));
    assert_eq!(starts(&effects), vec![(node("b"), run(1))]);
}

#[test]
fn a_node_holding_runs_never_heard_after_a_start_is_declared_dead_after_the_window() {
    // A new leader (or a restarted control node) reads back runs held by nodes it never heard
    // from: one that died while no control node watched is declared dead after the same
    // window as a member gone silent, and its runs are crashed (and resumed elsewhere).
    let mut c: ControlMachine<u32> = ControlMachine::new(ControlConfig::default());
    c.handle(T0, Input::Heartbeat(member("a", 2, 1)));
    let held = |run_n: u8, n: &str| Running {
        run: run(run_n),
        queue: None,
        deployment: None,
        node: Some(node(n)),
    };
    c.handle(T0, Input::Restore(vec![held(1, "a"), held(2, "gone")]));
    let window = ControlConfig::default().unreachable_after + Duration::from_secs(4);
    // "a" keeps speaking; "gone" never does.
    let mut dead = Vec::new();
    for k in 1..=((window.as_millis() as u64) / 100 + 3) {
        let now = at(k * 100);
        c.handle(now, Input::Heartbeat(member("a", 2, 1)));
        for e in c.handle(now, Input::Tick) {
            if let Effect::DeclareDead { node, .. } = e {
                dead.push(node);
            }
        }
    }
    assert_eq!(
        dead,
        vec![node("gone")],
        "only the node never heard from is declared dead"
    );
}

#[test]
fn a_node_holding_runs_that_reconnects_after_a_start_is_not_declared_dead() {
    let mut c: ControlMachine<u32> = ControlMachine::new(ControlConfig::default());
    let held = Running {
        run: run(1),
        queue: None,
        deployment: None,
        node: Some(node("a")),
    };
    c.handle(T0, Input::Restore(vec![held]));
    // Its redial took 3 s: it speaks, late but within the grace, and lives.
    let mut dead = Vec::new();
    for k in 1..=100u64 {
        let now = at(k * 100);
        if k >= 30 {
            c.handle(now, Input::Heartbeat(member("a", 2, 7)));
        }
        for e in c.handle(now, Input::Tick) {
            if let Effect::DeclareDead { node, .. } = e {
                dead.push(node);
            }
        }
    }
    assert!(dead.is_empty(), "declared dead: {dead:?}");
}

#[test]
fn a_new_leader_declares_dead_a_replica_it_never_hears_from_and_keeps_one_that_speaks() {
    // Found by killing the leader of three voters: its successor had never heard from it, so
    // it was not listed at all (not unreachable, not removable) and never declared dead.
    let mut c: ControlMachine<u32> = ControlMachine::new(ControlConfig::default());
    c.handle(T0, Input::Expect(vec![node("a"), node("b")]));
    c.handle(T0, Input::Restore(Vec::new()));
    let listed = |c: &ControlMachine<u32>, n: &str| c.members().into_iter().find(|m| m.name == node(n));
    // Listed, shown unreachable (never heard from), not yet declared dead: not removable.
    assert!(listed(&c, "a").is_some_and(|m| !m.reachable && m.last_heartbeat.is_none()));
    assert_eq!(c.remove_member(&node("a")), Err(RemoveRefused::Reachable));
    // "b" speaks; "a" never does.
    c.handle(at(3_000), Input::Heartbeat(member("b", 2, 1)));
    assert!(
        starts(&c.handle(
            at(3_000),
            Input::Due(Placement::plain(run(1), "f".into(), at(3_000)))
        )) == vec![(node("b"), run(1))],
        "an expected member that never spoke takes no run"
    );
    // Within the grace, nobody is declared dead.
    c.handle(at(4_000), Input::Heartbeat(member("b", 2, 1)));
    assert!(appended(&c.handle(at(4_500), Input::Tick)).is_empty());
    c.handle(at(4_800), Input::Heartbeat(member("b", 2, 1)));
    let effects = c.handle(at(5_200), Input::Tick);
    let dead: Vec<_> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::DeclareDead { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(dead, vec![node("a")], "{effects:?}");
    assert!(listed(&c, "a").is_some_and(|m| !m.reachable));
    assert!(listed(&c, "b").is_some_and(|m| m.reachable));
    assert_eq!(c.remove_member(&node("a")), Ok(()));
}
