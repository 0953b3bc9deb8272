use super::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;

fn t(s: i64) -> Timestamp {
    Timestamp::from_micros(1_800_000_000_000_000 + s * 1_000_000)
}

struct World {
    rng: SmallRng,
    d: Dispatch,
}

impl World {
    fn new() -> Self {
        World {
            rng: SmallRng::seed_from_u64(7),
            d: Dispatch::default(),
        }
    }

    fn run(
        &mut self,
        due: i64,
        queue: Option<&str>,
        dep: Option<(DeploymentId, Option<(u32, CollisionStrategy)>)>,
    ) -> FlowRunId {
        let id = FlowRunId::new(t(due), &mut self.rng);
        let p = Placement {
            run: id,
            flow: "f".into(),
            due: t(due),
            queue: queue.map(str::to_owned),
            deployment: dep,
            known: None,
        };
        assert_eq!(self.d.add(p), None);
        id
    }

    fn dep(&mut self) -> DeploymentId {
        DeploymentId::new(t(0), &mut self.rng)
    }

    /// Dispatches with `room` slots on one node.
    fn go(&mut self, room: &mut u32) -> Vec<Action> {
        self.d.dispatch(|_, _| {
            if *room == 0 {
                None
            } else {
                *room -= 1;
                Some(node("n1"))
            }
        })
    }
}

fn placed(actions: &[Action]) -> Vec<FlowRunId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Place(p, _, _) => Some(p.run),
            _ => None,
        })
        .collect()
}

fn queue(name: &str, priority: u32, limit: Option<u32>, paused: bool) -> WorkQueue {
    let mut rng = SmallRng::seed_from_u64(1);
    WorkQueue {
        id: crate::ids::WorkQueueId::new(t(0), &mut rng),
        name: name.into(),
        priority,
        concurrency_limit: limit,
        paused,
    }
}

#[test]
fn highest_priority_first_then_oldest() {
    let mut w = World::new();
    w.d.set_queues([queue("low", 5, None, false), queue("high", 1, None, false)]);
    let l1 = w.run(1, Some("low"), None);
    let h2 = w.run(2, Some("high"), None);
    let h1 = w.run(1, Some("high"), None);
    let mut room = 2;
    assert_eq!(placed(&w.go(&mut room)), vec![h1, h2]);
    let mut room = 5;
    assert_eq!(placed(&w.go(&mut room)), vec![l1]);
}

#[test]
fn a_paused_queue_hands_out_nothing_until_resumed() {
    let mut w = World::new();
    w.d.set_queues([queue("q", 1, None, true)]);
    let r = w.run(1, Some("q"), None);
    let mut room = 10;
    assert!(w.go(&mut room).is_empty());
    assert_eq!(w.d.load("q").waiting, 1);
    w.d.put_queue(queue("q", 1, None, false));
    assert_eq!(placed(&w.go(&mut room)), vec![r]);
}

#[test]
fn a_queue_limit_holds_until_a_run_ends() {
    let mut w = World::new();
    w.d.set_queues([queue("q", 1, Some(2), false)]);
    let runs: Vec<_> = (0..4).map(|i| w.run(i, Some("q"), None)).collect();
    let mut room = 10;
    assert_eq!(placed(&w.go(&mut room)), runs[..2].to_vec());
    assert!(w.go(&mut room).is_empty());
    assert_eq!(w.d.ended(runs[0]), Some(node("n1")));
    assert_eq!(placed(&w.go(&mut room)), vec![runs[2]]);
}

#[test]
fn a_deployment_at_its_limit_does_not_hold_back_another_in_the_same_queue() {
    let mut w = World::new();
    let (a, b) = (w.dep(), w.dep());
    let limit = Some((1, CollisionStrategy::Enqueue));
    let a1 = w.run(1, None, Some((a, limit)));
    let a2 = w.run(2, None, Some((a, limit)));
    let a3 = w.run(3, None, Some((a, limit)));
    let b4 = w.run(4, None, Some((b, None)));
    let mut room = 10;
    let actions = w.go(&mut room);
    assert_eq!(placed(&actions), vec![a1, b4]);
    assert!(actions.contains(&Action::Await(a2)) && actions.contains(&Action::Await(a3)));
    assert_eq!(w.d.load(DEFAULT_QUEUE).waiting, 0);
    // a1 ends: a2 (the oldest held back) goes, a3 still waits.
    w.d.ended(a1);
    let actions = w.go(&mut room);
    assert_eq!(placed(&actions), vec![a2]);
    assert!(w.go(&mut room).is_empty());
    w.d.ended(a2);
    assert_eq!(placed(&w.go(&mut room)), vec![a3]);
}

#[test]
fn cancel_new_cancels_instead_of_waiting() {
    let mut w = World::new();
    let a = w.dep();
    let limit = Some((1, CollisionStrategy::CancelNew));
    let a1 = w.run(1, None, Some((a, limit)));
    let a2 = w.run(2, None, Some((a, limit)));
    let mut room = 10;
    let actions = w.go(&mut room);
    assert_eq!(placed(&actions), vec![a1]);
    assert!(actions.contains(&Action::Cancel(a2)));
    assert_eq!(w.d.waiting(), 0);
}

#[test]
fn runs_no_node_can_take_wait_and_the_others_go() {
    let mut w = World::new();
    let r1 = w.run(1, None, None);
    let id = FlowRunId::new(t(2), &mut w.rng);
    w.d.add(Placement::plain(id, "other".into(), t(2)));
    let actions = w.d.dispatch(|flow, _| (flow == "other").then(|| node("n2")));
    assert_eq!(placed(&actions), vec![id]);
    assert_eq!(w.d.waiting(), 1);
    // Marked Late once.
    assert_eq!(w.d.late(t(100), std::time::Duration::from_secs(15)), vec![r1]);
    assert!(w.d.late(t(200), std::time::Duration::from_secs(15)).is_empty());
    // Cancelled while waiting: gone.
    assert_eq!(w.d.ended(r1), None);
    assert_eq!(w.d.waiting(), 0);
}

#[test]
fn restored_runs_count_against_limits_and_nothing_is_added_twice() {
    let mut w = World::new();
    w.d.set_queues([queue("q", 1, Some(1), false)]);
    let old = FlowRunId::new(t(0), &mut w.rng);
    w.d.restore(old, Some("q"), None, Some(node("n1")));
    let r = w.run(1, Some("q"), None);
    let again = Placement {
        run: r,
        flow: "f".into(),
        due: t(1),
        queue: Some("q".into()),
        deployment: None,
        known: None,
    };
    assert_eq!(w.d.add(again), None);
    assert_eq!(w.d.waiting(), 1);
    let mut room = 10;
    assert!(w.go(&mut room).is_empty());
    w.d.ended(old);
    assert_eq!(placed(&w.go(&mut room)), vec![r]);
}

fn node(name: &str) -> NodeId {
    name.parse().expect("a node name")
}
