//! Plain tests of the control machine: one per defect it must get right, driven by a tiny
//! synchronous driver (every append applied at once).

use std::time::Duration;

use super::*;
use crate::apply::ApplyContext;
use crate::concurrency::ConcurrencyLimit;
use crate::ids::{Epoch, FlowRunId, LogIndex, NodeId, TaskRunId, TransitionId};
use crate::state::{State, StateName, StateType};
use crate::time::Timestamp;
use crate::work_queue::Setting;

struct Driver {
    machine: ControlMachine,
    state: ControlState,
    now: Timestamp,
    log: Vec<ControlCommand>,
    sent: Vec<(NodeId, ToNodeMsg)>,
    replies: Vec<(RequestId, ClientResult)>,
}

fn node(n: &str) -> NodeId {
    n.parse().expect("a node name")
}

fn req(n: u32) -> RequestId {
    RequestId::from_uuid(derived_id(&format!("request/{n}")))
}

fn holder(n: u32) -> TaskRunId {
    TaskRunId::from_uuid(derived_id(&format!("holder/{n}")))
}

impl Driver {
    fn new() -> Driver {
        let config = ControlConfig::for_tests();
        let mut d = Driver {
            machine: ControlMachine::new(config.clone()),
            state: ControlState::new(&config),
            now: Timestamp::from_millis(1_700_000_000_000),
            log: Vec::new(),
            sent: Vec::new(),
            replies: Vec::new(),
        };
        d.input(Input::Started);
        d
    }

    /// Handles an input and applies every append at once, in order.
    fn input(&mut self, input: Input) {
        let mut queue = std::collections::VecDeque::from([input]);
        while let Some(input) = queue.pop_front() {
            for e in self.machine.handle(self.now, &self.state, input) {
                match e {
                    Effect::Append(command) => {
                        self.log.push(command.clone());
                        let index = LogIndex::new(self.log.len() as u64);
                        let outcome = self
                            .state
                            .apply(command.clone(), ApplyContext { index, now: self.now });
                        queue.push_back(Input::Applied {
                            index,
                            command,
                            outcome,
                        });
                    }
                    Effect::Send { node, msg, .. } => self.sent.push((node, msg)),
                    Effect::Reply { request_id, result } => self.replies.push((request_id, result)),
                    Effect::SetTimer { .. } => {}
                }
            }
        }
    }

    fn restart(&mut self) {
        self.machine = ControlMachine::new(ControlConfig::for_tests());
        self.input(Input::Started);
    }

    fn advance(&mut self, d: Duration) {
        self.now = self.now + d;
        self.input(Input::Timer(TimerKind::Tick));
    }

    fn msg(&mut self, n: &str, msg: NodeMsg) {
        self.input(Input::Node { node: node(n), msg });
    }

    fn join(&mut self, n: &str) {
        let msg = NodeMsg::Join {
            incarnation: Incarnation::new(1),
            slots: 2,
            flows: vec!["f".into()],
        };
        self.msg(n, msg);
    }

    fn heartbeat(&mut self, n: &str, seq: u64, running: Vec<(FlowRunId, Epoch)>) {
        let msg = NodeMsg::Heartbeat {
            incarnation: Incarnation::new(1),
            seq,
            running,
        };
        self.msg(n, msg);
    }

    fn client(&mut self, id: RequestId, request: ClientRequest) -> ClientResult {
        self.replies.clear();
        self.input(Input::Client {
            request_id: id,
            request,
        });
        self.replies.pop().map(|(_, r)| r).expect("a reply")
    }

    fn create(&mut self, id: RequestId, key: Option<&str>) -> (FlowRunId, bool) {
        let mut c = CreateRun::of("f");
        c.idempotency_key = key.map(str::to_owned);
        c.resume = true;
        match self.client(id, ClientRequest::CreateRun(c)) {
            Ok(ClientReply::RunCreated { run, created }) => (run, created),
            other => panic!("not created: {other:?}"),
        }
    }

    fn take_sent(&mut self) -> Vec<(NodeId, ToNodeMsg)> {
        std::mem::take(&mut self.sent)
    }

    fn started(&mut self) -> Vec<(NodeId, FlowRunId, Epoch)> {
        self.take_sent()
            .into_iter()
            .filter_map(|(n, m)| match m {
                ToNodeMsg::StartRun { run, epoch } => Some((n, run, epoch)),
                _ => None,
            })
            .collect()
    }

    fn propose(&mut self, n: &str, run: FlowRunId, epoch: Option<Epoch>, name: StateName) {
        let msg = NodeMsg::StateProposal {
            incarnation: Incarnation::new(1),
            run,
            epoch,
            state: State::named(name, self.now),
            transition: TransitionId::from_uuid(derived_id(&format!("{run}/{epoch:?}/{name}"))),
        };
        self.msg(n, msg);
    }

    fn state_of(&self, run: &FlowRunId) -> (StateType, Epoch) {
        let r = self.state.run(run).expect("the run");
        (r.lifecycle.state.kind, r.epoch)
    }
}

#[test]
fn fix4_a_resent_create_makes_one_run() {
    let mut d = Driver::new();
    let (run, created) = d.create(req(1), None);
    assert!(created);
    assert_eq!(
        d.create(req(1), None),
        (run, true),
        "a resend gets the first outcome"
    );
    d.restart();
    assert_eq!(d.create(req(1), None), (run, true), "also after a restart");
    let (keyed, _) = d.create(req(2), Some("nightly"));
    assert_eq!(
        d.create(req(3), Some("nightly")),
        (keyed, false),
        "one run per user key"
    );
    assert_eq!(d.state.view().hot.flow_run_count(), 2);
    let creates = d.log.iter().filter(|c| c.kind() == "create-flow-run").count();
    assert_eq!(
        creates, 3,
        "the resends of request 1 were answered without a command"
    );
}

#[test]
fn fix5_a_stale_or_missing_epoch_is_refused_and_the_node_told_to_stop() {
    let mut d = Driver::new();
    d.join("n1");
    let (run, _) = d.create(req(1), None);
    let e1 = Epoch::FIRST;
    assert_eq!(d.started(), vec![(node("n1"), run, e1)]);
    for epoch in [None, Some(Epoch::new(2)), Some(Epoch::new(0))] {
        d.propose("n1", run, epoch, StateName::Running);
        let sent = d.take_sent();
        assert!(
            sent.contains(&(node("n1"), ToNodeMsg::StopRun { run, epoch })),
            "{epoch:?}: {sent:?}"
        );
        assert_eq!(d.state_of(&run).0, StateType::Pending, "nothing written");
    }
    d.propose("n2", run, Some(e1), StateName::Running);
    assert_eq!(
        d.state_of(&run).0,
        StateType::Pending,
        "another node cannot write it"
    );
    d.propose("n1", run, Some(e1), StateName::Running);
    assert_eq!(d.state_of(&run).0, StateType::Running);
}

fn limit(d: &mut Driver, tag: &str, slots: u32, ttl: Duration) {
    let setting = Setting::ConcurrencyLimit(ConcurrencyLimit {
        tag: tag.into(),
        limit: slots,
        lease_ttl: ttl,
        leases: Vec::new(),
    });
    assert!(d.client(req(900), ClientRequest::PutSetting(setting)).is_ok());
}

fn lease(d: &mut Driver, n: &str, h: TaskRunId, renew: bool) -> Option<bool> {
    let (tags, incarnation, sent_at) = (vec!["gpu".to_owned()], Incarnation::new(1), d.now);
    let msg = if renew {
        NodeMsg::Renew {
            incarnation,
            holder: h,
            tags,
            sent_at,
        }
    } else {
        NodeMsg::Acquire {
            incarnation,
            holder: h,
            tags,
            sent_at,
        }
    };
    d.msg(n, msg);
    d.take_sent().into_iter().find_map(|(_, m)| match m {
        ToNodeMsg::LeaseGranted { holder, .. } if holder == h => Some(true),
        ToNodeMsg::LeaseLost { holder } if holder == h => Some(false),
        _ => None,
    })
}

#[test]
fn fix6_a_lapsed_lease_is_retaken_only_when_a_slot_is_free() {
    let mut d = Driver::new();
    let ttl = Duration::from_secs(1);
    limit(&mut d, "gpu", 1, ttl);
    assert_eq!(lease(&mut d, "n1", holder(1), false), Some(true));
    assert_eq!(lease(&mut d, "n2", holder(2), false), None, "full: it waits");
    d.now = d.now + Duration::from_millis(500);
    assert_eq!(
        lease(&mut d, "n1", holder(1), true),
        Some(true),
        "a live lease renews"
    );
    // The renewals stop (lost): the lease lapses and the waiter gets the slot.
    d.advance(ttl + Duration::from_millis(1));
    assert!(d.state.leases().holds("gpu", &holder(2), d.now));
    assert_eq!(
        lease(&mut d, "n1", holder(1), true),
        Some(false),
        "taken: the holder lost it"
    );
    assert_eq!(d.state.leases().live("gpu", d.now), 1);
    // Lapsed with the slot free: re-taken.
    d.msg(
        "n2",
        NodeMsg::Release {
            incarnation: Incarnation::new(1),
            holders: vec![holder(2)],
        },
    );
    d.now = d.now + ttl * 2;
    assert_eq!(lease(&mut d, "n3", holder(3), false), Some(true));
    d.now = d.now + ttl * 2;
    assert_eq!(
        lease(&mut d, "n3", holder(3), true),
        Some(true),
        "lapsed but free: re-taken"
    );
    // Across a restart the leases stay: nobody else gets the slot.
    d.restart();
    assert_eq!(lease(&mut d, "n1", holder(4), false), None);
}

#[test]
fn fix8_a_run_left_out_of_two_heartbeats_is_placed_again_and_old_copies_stopped() {
    let mut d = Driver::new();
    d.join("n1");
    let (run, _) = d.create(req(1), None);
    assert_eq!(d.started(), vec![(node("n1"), run, Epoch::FIRST)]);
    d.heartbeat("n1", 1, Vec::new()); // the start was lost
    assert_eq!(
        d.state_of(&run),
        (StateType::Pending, Epoch::FIRST),
        "one miss is not enough"
    );
    d.heartbeat("n1", 1, Vec::new());
    assert_eq!(
        d.state_of(&run).0,
        StateType::Pending,
        "a repeated heartbeat counts once"
    );
    d.heartbeat("n1", 2, Vec::new());
    let e2 = Epoch::new(2);
    assert_eq!(
        d.state_of(&run),
        (StateType::Pending, e2),
        "taken back and placed again"
    );
    assert!(d.started().contains(&(node("n1"), run, e2)));
    // The lost start arrives late: the node reports the old epoch and is told to stop it.
    d.heartbeat("n1", 3, vec![(run, Epoch::FIRST), (run, e2)]);
    let sent = d.take_sent();
    assert!(sent.contains(&(
        node("n1"),
        ToNodeMsg::StopRun {
            run,
            epoch: Some(Epoch::FIRST)
        }
    )));
    assert!(
        !sent
            .iter()
            .any(|(_, m)| matches!(m, ToNodeMsg::StopRun { epoch: Some(e), .. } if *e == e2))
    );
}

#[test]
fn a_silent_node_is_declared_dead_and_its_runs_crash_and_resume() {
    let mut d = Driver::new();
    d.join("n1");
    let (run, _) = d.create(req(1), None);
    d.propose("n1", run, Some(Epoch::FIRST), StateName::Running);
    d.advance(Duration::from_millis(300));
    assert!(!d.log.iter().any(|c| c.kind() == "node-dead"));
    d.advance(Duration::from_millis(300));
    let dead = ControlCommand::NodeDead {
        node: node("n1"),
        incarnation: Incarnation::new(1),
    };
    assert!(d.log.contains(&dead));
    assert_eq!(
        d.state_of(&run),
        (StateType::Scheduled, Epoch::new(2)),
        "crashed, resumed"
    );
    assert!(d.state.is_dead(&node("n1"), Incarnation::new(1)));
    d.take_sent();
    d.heartbeat("n1", 9, vec![(run, Epoch::FIRST)]);
    assert_eq!(d.take_sent(), vec![(node("n1"), ToNodeMsg::Dead)]);
    // Applying the death again (a replay, a resend) changes nothing.
    let before = d.state.run(&run).cloned();
    let at = ApplyContext {
        index: LogIndex::new(99),
        now: d.now,
    };
    let again = d.state.apply(dead, at);
    assert!(again.writes.is_empty());
    assert_eq!(d.state.run(&run).cloned(), before);
}
