//! `apply` of the record-keeping commands: pruning and remembered answers.

use super::*;

#[test]
fn pruning_forgets_runs_that_ended_before_the_cut_off_with_their_task_runs() {
    let mut w = World::new();
    for n in 1..=3 {
        w.apply(Command::CreateFlowRun(new_run(fid(n))));
    }
    // Run 1 ends first, with a task run; run 2 ends later; run 3 never ends.
    for (n, name) in [(1, StateName::Pending), (2, StateName::Running)] {
        let p = w.worker(fid(1), name, n, "n1");
        w.propose(fid(1), p);
    }
    let task = NewTaskRun {
        id: TaskRunId::from_bytes([9; 16]),
        key: TaskRunKey {
            flow_run: fid(1),
            task_key: "t".into(),
            call_index: 0,
        },
        epoch: w.run(fid(1)).epoch,
        retry_policy: RetryPolicy::none(),
        cache_key: None,
        cache_expiration: None,
        refresh_cache: false,
        called: None,
        tags: vec![],
    };
    assert!(matches!(
        w.apply(Command::CreateTaskRun(task)).reply,
        Ok(Reply::TaskRunCreated { created: true, .. })
    ));
    let p = w.worker(fid(1), StateName::Completed, 3, "n1");
    assert!(w.propose(fid(1), p).is_accept());
    let history = w.run(fid(1)).lifecycle.history.clone();
    let cut = w.now + Duration::from_millis(1);
    for (n, name) in [
        (4, StateName::Pending),
        (5, StateName::Running),
        (6, StateName::Failed),
    ] {
        let p = w.worker(fid(2), name, n, "n1");
        w.propose(fid(2), p);
    }
    let prune = |runs_max| {
        Command::Prune(crate::command::Prune {
            runs_before: cut,
            events_before: cut,
            logs_before: cut,
            runs_max,
        })
    };
    let out = w.apply(prune(10));
    assert_eq!(
        out.reply,
        Ok(Reply::Pruned {
            flow_runs: 1,
            task_runs: 1,
            more: false
        })
    );
    let pruned = out.writes.iter().find_map(|w| match w {
        Write::Pruned(p) => Some(p.clone()),
        _ => None,
    });
    let pruned = pruned.expect("a pruned run");
    assert_eq!(pruned.flow_run, fid(1));
    assert_eq!(pruned.task_runs, [TaskRunId::from_bytes([9; 16])]);
    assert!(history.iter().all(|e| pruned.events.contains(e)));
    assert!(w.state.hot.flow_run(&fid(1)).is_none());
    assert!(w.state.hot.task_run(&TaskRunId::from_bytes([9; 16])).is_none());
    assert!(w.state.hot.flow_run_by_key(&fid(1).to_string()).is_none());
    assert!(w.state.hot.flow_run(&fid(2)).is_some() && w.state.hot.flow_run(&fid(3)).is_some());
    // Again: nothing more is due.
    assert!(matches!(
        w.apply(prune(10)).reply,
        Ok(Reply::Pruned { flow_runs: 0, .. })
    ));
    // A later cut-off takes run 2, one run per command when asked so; run 3 is not terminal.
    let later = |runs_max| {
        Command::Prune(crate::command::Prune {
            runs_before: w.now + Duration::from_secs(1),
            events_before: cut,
            logs_before: cut,
            runs_max,
        })
    };
    let c = later(1);
    assert!(matches!(
        w.apply(c).reply,
        Ok(Reply::Pruned {
            flow_runs: 1,
            more: false,
            ..
        })
    ));
    assert!(w.state.hot.flow_run(&fid(2)).is_none());
    assert!(w.state.hot.flow_run(&fid(3)).is_some());
}

#[test]
fn answers_are_remembered_once_at_most_max_and_for_at_most_keep() {
    let mut w = World::new();
    let id = |n: u8| crate::control::RequestId::from_uuid(uuid::Uuid::from_bytes([n; 16]));
    let remember = |n: u8, answer: &[u8], max: u32| {
        Command::Remember(crate::command::RememberedOutcome {
            request_id: id(n),
            answer: answer.to_vec(),
            max,
            keep: Duration::from_secs(1),
        })
    };
    w.apply(remember(1, b"first", 2));
    // Sent again: the first answer stays.
    assert!(w.apply(remember(1, b"second", 2)).writes.is_empty());
    assert_eq!(w.state.hot.answer_to(&id(1), w.now).unwrap().answer, b"first");
    // The count bound: the oldest goes first.
    w.apply(remember(2, b"b", 2));
    w.apply(remember(3, b"c", 2));
    assert!(w.state.hot.answer_to(&id(1), w.now).is_none());
    assert_eq!(w.state.hot.answer_count(), 2);
    // The age bound: older than a second is forgotten (and not answered meanwhile).
    let later = w.now + Duration::from_secs(2);
    assert!(w.state.hot.answer_to(&id(2), later).is_none());
    w.now = later;
    w.apply(remember(4, b"d", 2));
    assert_eq!(w.state.hot.answer_count(), 1);
    assert!(w.state.hot.answer_to(&id(4), w.now).is_some());
}

#[test]
fn pruning_takes_the_runs_that_ended_first_and_says_when_more_are_due() {
    let mut w = World::new();
    // Ended in the order 3, 1, 2.
    for n in 1..=3 {
        w.apply(Command::CreateFlowRun(new_run(fid(n))));
    }
    for (i, n) in [3u8, 1, 2].into_iter().enumerate() {
        let p = w.worker(fid(n), StateName::Pending, 10 * i as u64 + 1, "n1");
        w.propose(fid(n), p);
        let p = w.worker(fid(n), StateName::Failed, 10 * i as u64 + 2, "n1");
        assert!(w.propose(fid(n), p).is_accept());
    }
    let prune = |w: &World| {
        Command::Prune(crate::command::Prune {
            runs_before: w.now + Duration::from_secs(1),
            events_before: w.now,
            logs_before: w.now,
            runs_max: 2,
        })
    };
    let c = prune(&w);
    assert_eq!(
        w.apply(c).reply,
        Ok(Reply::Pruned {
            flow_runs: 2,
            task_runs: 0,
            more: true
        })
    );
    assert!(w.state.hot.flow_run(&fid(3)).is_none() && w.state.hot.flow_run(&fid(1)).is_none());
    assert!(w.state.hot.flow_run(&fid(2)).is_some());
    let c = prune(&w);
    assert_eq!(
        w.apply(c).reply,
        Ok(Reply::Pruned {
            flow_runs: 1,
            task_runs: 0,
            more: false
        })
    );
}
