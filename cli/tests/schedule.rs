//! Deployments on schedules across `flotilla node` processes: a deployment every second runs
//! once per second across a restart of the control node (no duplicate, no gap outside the
//! downtime); pausing stops its runs and cancels those not started; resuming brings them back.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla::{Client, FlowRun, RunFilter, StateName, StateType};
use flotilla_runtime::{DeploymentSpec, Schedule, ScheduleKind, Timestamp};

mod common;
use common::*;

fn every_second(name: &str) -> DeploymentSpec {
    DeploymentSpec {
        name: name.into(),
        flow_name: "noop".into(),
        parameters: serde_json::json!({}),
        schedules: vec![Schedule {
            kind: ScheduleKind::Interval {
                every: Duration::from_secs(1),
                anchor: "2026-01-01T00:00:00Z".parse().expect("a time"),
            },
            active: true,
            parameters: serde_json::Value::Null,
            catchup: false,
        }],
        work_queue: None,
        tags: vec![],
        concurrency_limit: None,
        collision: Default::default(),
        paused: false,
        result_storage: None,
    }
}

/// Every run of the deployment, by scheduled time.
async fn runs_of(client: &Client, deployment: &str) -> Vec<FlowRun> {
    let d = client.deployment(deployment).await.expect("the deployment");
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = client
            .flow_runs(RunFilter::Deployment(d.id), after, 1000)
            .await
            .expect("runs");
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        all.extend(page);
    }
    all.sort_by_key(|r| r.expected_start_time);
    all
}

fn completed(runs: &[FlowRun]) -> Vec<Timestamp> {
    runs.iter()
        .filter(|r| r.lifecycle.state.kind == StateType::Completed)
        .map(|r| r.expected_start_time)
        .collect()
}

fn now() -> Timestamp {
    Timestamp::from(chrono::Utc::now())
}

/// Runs are Late 500 ms after their time (15 s by default), so the downtime makes some.
const LATE: &[&str] = &["--late-after", "500ms"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_every_second_survives_a_control_node_restart() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1,n2");
    let ports = [free_udp_port(), free_udp_port()];
    let mut nodes = Nodes {
        children: Vec::new(),
        dir: dir.to_owned(),
    };
    nodes
        .children
        .push(("n1".into(), start_node(dir, "n1", ports[0], None, LATE)));
    nodes
        .children
        .push(("n2".into(), start_node(dir, "n2", ports[1], Some(ports[0]), &[])));
    let client = connect(dir, ports[0], 2).await;
    client
        .put_deployment(every_second("tick"))
        .await
        .expect("deployment created");

    eventually("5 runs completed", Duration::from_secs(30), || async {
        (completed(&runs_of(&client, "tick").await).len() >= 5).then_some(())
    })
    .await;

    // The control node dies and comes back on its data directory.
    let down_from = now();
    nodes.children[0].1.kill().expect("SIGKILL n1");
    let _ = nodes.children[0].1.wait();
    std::thread::sleep(Duration::from_millis(2500)); // the downtime itself, not a synchronisation
    let restart_at = now();
    nodes.restart(0, || start_node(dir, "n1", ports[0], None, LATE));
    let client = connect(dir, ports[0], 2).await;
    let back_at = now();

    eventually(
        "5 more runs completed after the restart",
        Duration::from_secs(30),
        || async {
            let done = completed(&runs_of(&client, "tick").await);
            (done.iter().filter(|t| **t > back_at).count() >= 5).then_some(())
        },
    )
    .await;

    let runs = runs_of(&client, "tick").await;
    // No fire time has two runs (a change of the deployment cancels its runs not started and
    // makes new ones; there was none so far).
    let mut per_time: BTreeMap<Timestamp, usize> = BTreeMap::new();
    for r in &runs {
        *per_time.entry(r.expected_start_time).or_default() += 1;
    }
    assert!(
        per_time.values().all(|n| *n == 1),
        "a fire time has two runs: {per_time:?}"
    );
    // Every second from the first run to the last completed one has a completed run, except
    // seconds inside the downtime that had no run created ahead.
    // The downtime ends when the restarted scheduler makes its first run (however long the
    // node took to start): the fire time of that run, not a window of wall-clock time.
    let resumed = runs
        .iter()
        .filter(|r| r.created > restart_at)
        .map(|r| r.expected_start_time)
        .min()
        .expect("runs made after the restart");
    let done = completed(&runs);
    for w in done.windows(2) {
        let gap = w[1].saturating_since(w[0]);
        if gap > Duration::from_secs(1) {
            assert!(
                w[0] >= down_from - Duration::from_secs(5) && w[1] <= resumed,
                "a gap from {} to {} outside the downtime {down_from}..{resumed}",
                w[0],
                w[1]
            );
        }
    }
    // Runs created before the downtime and due during it still ran (Late or not).
    let due_in_downtime = runs
        .iter()
        .filter(|r| r.expected_start_time > down_from && r.expected_start_time < back_at);
    for r in due_in_downtime {
        assert!(
            matches!(
                r.lifecycle.state.kind,
                StateType::Completed | StateType::Running | StateType::Pending
            ),
            "{} due in the downtime ended {}",
            r.expected_start_time,
            r.lifecycle.state
        );
    }

    // Those due well inside the downtime were handed out late, after the restart: Late first.
    let mut late = 0;
    for r in runs.iter().filter(|r| {
        r.expected_start_time > down_from + Duration::from_millis(100)
            && r.expected_start_time + Duration::from_millis(600) < restart_at
    }) {
        let history = client.history(r.id).await.expect("its history");
        assert!(
            history.iter().any(|s| s.name == StateName::Late),
            "{} was due in the downtime and is not marked Late: {history:?}",
            r.expected_start_time
        );
        late += 1;
    }
    assert!(late >= 1, "no run was due well inside the downtime");

    // Pause: runs not started are cancelled and no new ones come.
    let mut spec = every_second("tick");
    spec.paused = true;
    client.put_deployment(spec.clone()).await.expect("paused");
    let paused_at = now();
    eventually(
        "the runs not started are cancelled",
        Duration::from_secs(10),
        || async {
            let runs = runs_of(&client, "tick").await;
            runs.iter()
                .all(|r| r.lifecycle.state.kind != StateType::Scheduled)
                .then_some(())
        },
    )
    .await;
    let count = runs_of(&client, "tick").await.len();
    std::thread::sleep(Duration::from_millis(2500)); // a span with the deployment paused
    let runs = runs_of(&client, "tick").await;
    assert_eq!(runs.len(), count, "a paused deployment made runs");
    // Whatever completed was due before the pause: nothing new was handed out.
    assert!(
        runs.iter()
            .filter(|r| r.lifecycle.state.kind == StateType::Completed)
            .all(|r| r.expected_start_time <= paused_at),
        "a run due after the pause completed"
    );

    // Resume: runs again.
    spec.paused = false;
    client.put_deployment(spec).await.expect("resumed");
    let resumed_at = now();
    eventually("runs after resuming", Duration::from_secs(20), || async {
        let done = completed(&runs_of(&client, "tick").await);
        (done.iter().filter(|t| **t > resumed_at).count() >= 2).then_some(())
    })
    .await;

    // Pausing cancelled the runs made ahead; resuming made new ones: never two live runs for a
    // fire time.
    let mut live: BTreeMap<Timestamp, usize> = BTreeMap::new();
    for r in runs_of(&client, "tick").await {
        if r.lifecycle.state.kind != StateType::Cancelled {
            *live.entry(r.expected_start_time).or_default() += 1;
        }
    }
    assert!(
        live.values().all(|n| *n == 1),
        "two live runs for a fire time: {live:?}"
    );

    // An ad-hoc run, and the deployment deleted: nothing scheduled is left.
    let id = client
        .run_deployment("tick", serde_json::Value::Null)
        .await
        .expect("an ad-hoc run");
    let run = tokio::time::timeout(Duration::from_secs(30), client.wait(id))
        .await
        .expect("in time")
        .expect("readable");
    assert_eq!(run.lifecycle.state.kind, StateType::Completed);
    let tick = client.deployment("tick").await.expect("exists");
    client.delete_deployment("tick").await.expect("deleted");
    assert!(client.deployment("tick").await.is_err());
    eventually("no scheduled run left", Duration::from_secs(10), || async {
        let mut left = 0;
        let mut after = None;
        loop {
            let page = client
                .flow_runs(RunFilter::Deployment(tick.id), after, 1000)
                .await
                .ok()?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            left += page
                .iter()
                .filter(|r| r.lifecycle.state.kind == StateType::Scheduled)
                .count();
        }
        (left == 0).then_some(())
    })
    .await;
}

#[test]
fn schedule_preview_prints_fire_times_and_names_bad_fields() {
    let out = std::process::Command::new(BIN)
        .args([
            "schedule",
            "preview",
            "30 2 * * *",
            "--timezone",
            "America/New_York",
        ])
        .args(["--after", "2026-03-07T12:00:00Z", "--count", "2", "--json"])
        .output()
        .expect("runs");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(
        v["next"],
        serde_json::json!(["2026-03-08T03:30:00-04:00", "2026-03-09T02:30:00-04:00"])
    );
    let bad = std::process::Command::new(BIN)
        .args(["schedule", "preview", "0 25 * * *"])
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("hour field") && err.contains("out of range"),
        "{err}"
    );
}
