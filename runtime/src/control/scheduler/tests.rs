use super::*;
use crate::deployment::{CollisionStrategy, Schedule, ScheduleKind};

fn t(s: i64) -> Timestamp {
    Timestamp::from_micros(1_800_000_000_000_000 + s * 1_000_000)
}

/// A deployment firing every 10 s from t(0), changed last at `updated`.
fn every_10s(updated: i64, catchup: bool) -> Deployment {
    Deployment {
        id: DeploymentId::from_uuid(derived_id("deployment/nightly")),
        name: "nightly".into(),
        flow_name: "etl".into(),
        parameters: serde_json::json!({}),
        schedules: vec![Schedule {
            kind: ScheduleKind::Interval {
                every: Duration::from_secs(10),
                anchor: t(0),
            },
            active: true,
            parameters: serde_json::json!({}),
            catchup,
        }],
        work_queue: Some("etl".into()),
        tags: Vec::new(),
        concurrency_limit: Some(1),
        collision: CollisionStrategy::Enqueue,
        paused: false,
        result_storage: None,
        created: t(0),
        updated: t(updated),
    }
}

fn ahead() -> Ahead {
    Ahead {
        runs: 3,
        time: Duration::from_secs(25),
        max: 10,
    }
}

/// Gives the scheduler a deployment and its runs as the store has them.
fn load(s: &mut Scheduler, at: Timestamp, deployment: Deployment, runs: Vec<KnownRun>) -> Vec<Effect> {
    s.handle(at, Input::Loaded { deployment, runs })
}

/// The runs an effect list asks to make: (fire time, key).
fn made(out: &[Effect]) -> Vec<(Timestamp, String)> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Create { runs, .. } => Some(runs),
            _ => None,
        })
        .flatten()
        .map(|(at, new)| (*at, new.idempotency_key.clone().unwrap_or_default()))
        .collect()
}

/// The run ids an effect list asks to make.
fn ids(out: &[Effect]) -> Vec<FlowRunId> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Create { runs, .. } => Some(runs),
            _ => None,
        })
        .flatten()
        .map(|(_, new)| new.id)
        .collect()
}

fn handed_out(out: &[Effect]) -> Vec<FlowRunId> {
    out.iter()
        .filter_map(|e| match e {
            Effect::HandOut(p) => Some(p.run),
            _ => None,
        })
        .collect()
}

/// Answers every `Create` of `out` as the store would: each run made, waiting.
fn answer(s: &mut Scheduler, now: Timestamp, out: &[Effect]) -> Vec<Effect> {
    let mut next = Vec::new();
    for e in out {
        if let Effect::Create {
            deployment,
            generation,
            runs,
        } = e
        {
            next.extend(s.handle(
                now,
                Input::Created {
                    deployment: *deployment,
                    generation: *generation,
                    runs: runs.iter().map(|(at, new)| (*at, new.id)).collect(),
                },
            ));
        }
    }
    next
}

/// What the store would give back of the runs `out` made: each waiting.
fn known(out: &[Effect]) -> Vec<KnownRun> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Create { runs, .. } => Some(runs),
            _ => None,
        })
        .flatten()
        .map(|(at, new)| KnownRun {
            id: new.id,
            flow: new.flow_name.clone(),
            queue: new.work_queue.clone(),
            key: new.idempotency_key.clone(),
            due: *at,
            waiting: true,
        })
        .collect()
}

#[test]
fn a_deployment_gets_its_next_runs_and_each_is_handed_out_when_due() {
    let mut s = Scheduler::new(ahead());
    let d = every_10s(0, false);
    assert!(
        s.handle(
            t(1),
            Input::Loaded {
                deployment: d.clone(),
                runs: Vec::new()
            }
        )
        .is_empty()
    );
    let out = s.handle(t(1), Input::Started);
    // Three runs and at least 25 s ahead: 10, 20, 30.
    let times: Vec<Timestamp> = made(&out).into_iter().map(|(at, _)| at).collect();
    assert_eq!(times, vec![t(10), t(20), t(30)]);
    assert!(
        made(&out)
            .iter()
            .all(|(_, k)| k.starts_with(&format!("sched/{}/0/", d.id)))
    );
    let next = answer(&mut s, t(1), &out);
    assert_eq!(next, vec![Effect::WakeAt(t(10))]);
    assert_eq!(s.waiting(), 3);
    // At 10 s the first goes to placement with its deployment's queue and limit, and one more
    // is made to stay covered.
    let out = s.handle(t(10), Input::Wake);
    assert_eq!(handed_out(&out).len(), 1);
    let Some(Effect::HandOut(p)) = out.first() else {
        panic!("no hand-out first: {out:?}")
    };
    assert_eq!(p.queue.as_deref(), Some("etl"));
    assert_eq!(p.deployment, Some((d.id, Some((1, CollisionStrategy::Enqueue)))));
    assert_eq!(
        made(&out).into_iter().map(|(at, _)| at).collect::<Vec<_>>(),
        vec![t(40)]
    );
    assert_eq!(s.counts().handed_out, 1);
}

#[test]
fn a_restarted_scheduler_makes_no_fire_time_twice_and_hands_out_what_waits() {
    let d = every_10s(0, true);
    let mut first = Scheduler::new(ahead());
    load(&mut first, t(1), d.clone(), Vec::new());
    let out = first.handle(t(1), Input::Started);
    let before = made(&out);
    // The control node restarts at 15 s: the store has the three runs, the one of 10 s never
    // handed out.
    let mut second = Scheduler::new(ahead());
    load(&mut second, t(15), d.clone(), known(&out));
    let out2 = second.handle(t(15), Input::Started);
    assert_eq!(
        handed_out(&out2).len(),
        1,
        "the run due at 10 s goes at once: {out2:?}"
    );
    let again = made(&out2);
    assert!(
        again.iter().all(|m| !before.contains(m)),
        "{again:?} repeats {before:?}"
    );
    assert_eq!(again.first().map(|(at, _)| *at), Some(t(40)));
    // The same key gives the same run id: a second scheduler's run is the first's, whenever it
    // makes it.
    let mut other = Scheduler::new(ahead());
    load(&mut other, t(1), d, Vec::new());
    let out3 = other.handle(t(2), Input::Started);
    assert_eq!(made(&out3), before);
    assert_eq!(ids(&out3), ids(&out));
}

#[test]
fn fire_times_missed_while_down_are_skipped_unless_the_schedule_catches_up() {
    for catchup in [false, true] {
        let d = every_10s(0, catchup);
        let mut s = Scheduler::new(ahead());
        load(&mut s, t(1), d.clone(), Vec::new());
        let out = s.handle(t(1), Input::Started);
        // Down from 5 s to 95 s: the runs of 10, 20 and 30 s are there, handed out; 40..90 fell.
        let mut runs = known(&out);
        for r in &mut runs {
            r.waiting = false;
        }
        let mut s = Scheduler::new(ahead());
        s.handle(t(95), Input::Loaded { deployment: d, runs });
        let next = made(&s.handle(t(95), Input::Started));
        let first = next.first().map(|(at, _)| *at);
        if catchup {
            assert_eq!(first, Some(t(40)));
        } else {
            assert_eq!(first, Some(t(100)));
        }
    }
}

#[test]
fn a_changed_deployment_cancels_what_it_made_and_schedules_afresh() {
    let d = every_10s(0, false);
    let mut s = Scheduler::new(ahead());
    load(&mut s, t(1), d.clone(), Vec::new());
    let out = s.handle(t(1), Input::Started);
    answer(&mut s, t(1), &out);
    // The same spec saved again: nothing happens.
    let mut same = d.clone();
    same.updated = t(3);
    assert!(
        s.handle(
            t(3),
            Input::Changed {
                id: d.id,
                deployment: Some(same)
            }
        )
        .is_empty()
    );
    // A new parameter: the three waiting runs are cancelled, three new ones made.
    let mut changed = d.clone();
    changed.parameters = serde_json::json!({"day": "monday"});
    changed.updated = t(4);
    let out = s.handle(
        t(4),
        Input::Changed {
            id: d.id,
            deployment: Some(changed),
        },
    );
    let cancelled = out.iter().filter(|e| matches!(e, Effect::Append(_))).count();
    assert_eq!(cancelled, 3);
    let fresh = made(&out);
    assert_eq!(fresh.len(), 3);
    assert!(
        fresh
            .iter()
            .all(|(_, k)| k.contains(&format!("/{}/", t(4).as_micros())))
    );
    // An answer for the deployment as it was: its run is cancelled, nothing handed out.
    let late = s.handle(
        t(5),
        Input::Created {
            deployment: d.id,
            generation: 0,
            runs: vec![(t(10), FlowRunId::from_uuid(derived_id("late")))],
        },
    );
    let late_run = FlowRunId::from_uuid(derived_id("late"));
    assert!(
        matches!(&late[..], [Effect::Append(c)] if matches!(&**c, Command::ProposeFlowRunState { run, .. } if *run == late_run)),
        "{late:?}"
    );
    // Deleted: what waits is cancelled, nothing more is made.
    answer(&mut s, t(5), &out);
    let out = s.handle(
        t(6),
        Input::Changed {
            id: d.id,
            deployment: None,
        },
    );
    assert_eq!(out.iter().filter(|e| matches!(e, Effect::Append(_))).count(), 3);
    assert!(made(&out).is_empty());
    assert_eq!(s.counts().deployments, 0);
}

#[test]
fn runs_of_an_older_version_left_by_a_crash_are_cancelled_at_start() {
    let old = every_10s(0, false);
    let mut s = Scheduler::new(ahead());
    load(&mut s, t(1), old.clone(), Vec::new());
    let out = s.handle(t(1), Input::Started);
    let mut newer = old;
    newer.updated = t(2);
    let mut s = Scheduler::new(ahead());
    let out = load(&mut s, t(3), newer, known(&out));
    assert_eq!(out.iter().filter(|e| matches!(e, Effect::Append(_))).count(), 3);
}

#[test]
fn a_paused_deployment_makes_nothing_but_its_waiting_ad_hoc_runs_go() {
    let mut d = every_10s(0, false);
    d.paused = true;
    let mut s = Scheduler::new(ahead());
    let adhoc = KnownRun {
        id: FlowRunId::from_uuid(derived_id("adhoc")),
        flow: "etl".into(),
        queue: Some("urgent".into()),
        key: None,
        due: t(0),
        waiting: true,
    };
    load(&mut s, t(1), d, vec![adhoc.clone()]);
    let out = s.handle(t(1), Input::Started);
    assert!(made(&out).is_empty());
    assert_eq!(handed_out(&out), vec![adhoc.id]);
    // It goes in its own queue, with its own flow.
    let Some(Effect::HandOut(p)) = out.iter().find(|e| matches!(e, Effect::HandOut(_))) else {
        panic!("not handed out: {out:?}")
    };
    assert_eq!((p.flow.as_str(), p.queue.as_deref()), ("etl", Some("urgent")));
}
