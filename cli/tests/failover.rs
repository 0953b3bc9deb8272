//! A worker lost in the middle of a pipeline: its run resumes on another node, the steps that
//! had completed are not run again, and the run completes there. A client given several
//! addresses goes on through the next node when the one it talks to dies.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Nodes, connect, eventually, free_udp_port, init_certs};
use flotilla::{FlowRunId, StateName, StateType};
use flotilla_runtime::{CollisionStrategy, DeploymentSpec, Timestamp};

const STEPS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_whose_worker_is_killed_finishes_on_another_node() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1,n2,n3");
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let mut nodes = Nodes::new(dir);
    // The control node serves only the `ops` queue: the pipeline runs on a worker.
    nodes.start("n1", ports[0], None, &["--queues", "ops"]);
    nodes.start("n2", ports[1], Some(ports[0]), &[]);
    nodes.start("n3", ports[2], Some(ports[0]), &[]);
    let client = connect(dir, ports[0], 3).await;

    // 20 steps of 100 ms, each noting its number in a file when it completes.
    let out = dir.join("steps.out");
    let steps: Vec<serde_json::Value> = (1..=STEPS)
        .map(|i| serde_json::json!(["sh", "-c", format!("sleep 0.1; echo {i} >> {}", out.display())]))
        .collect();
    let spec = DeploymentSpec {
        name: "pipeline".into(),
        flow_name: "command".into(),
        parameters: serde_json::json!({ "steps": steps }),
        schedules: vec![],
        work_queue: Some("work".into()),
        tags: vec![],
        concurrency_limit: None,
        collision: CollisionStrategy::Enqueue,
        paused: false,
        result_storage: None,
    };
    client.put_deployment(spec).await.expect("a deployment");
    let id: FlowRunId = client
        .run_deployment("pipeline", serde_json::Value::Null)
        .await
        .expect("a run of the pipeline");

    // Once a few steps completed on its worker, the worker is killed.
    let owner = eventually("three steps complete", Duration::from_secs(30), || async {
        let run = client.flow_run(id).await.ok()?;
        let done = client
            .task_runs(id)
            .await
            .ok()?
            .iter()
            .filter(|t| t.lifecycle.state.kind == StateType::Completed)
            .count();
        (done >= 3).then(|| run.owner.map(|o| o.to_string())).flatten()
    })
    .await;
    assert_ne!(owner, "n1", "the control node serves only ops");
    let victim = nodes
        .children
        .iter()
        .position(|(n, _)| *n == owner)
        .expect("the owner is one of the nodes");
    nodes.children[victim].1.kill().expect("the worker is killed");
    let killed_at = Timestamp::from(chrono::Utc::now());
    let _ = nodes.children[victim].1.wait();
    let before: BTreeMap<String, u32> = client
        .task_runs(id)
        .await
        .expect("the task runs")
        .iter()
        .filter(|t| t.lifecycle.state.kind == StateType::Completed)
        .map(|t| (t.key.task_key.clone(), t.lifecycle.run_count))
        .collect();

    // Crashed with its node is not its end: a waiter waits on while it goes on elsewhere.
    let run = tokio::time::timeout(Duration::from_secs(60), client.wait(id))
        .await
        .expect("the pipeline ends in time")
        .expect("the run");
    assert_eq!(
        run.lifecycle.state.kind,
        StateType::Completed,
        "{}",
        run.lifecycle.state
    );
    let survivor = run.owner.expect("an owner").to_string();
    assert!(survivor != owner && survivor != "n1", "finished on {survivor}");

    // Crashed with its node, resumed under the next epoch, running again within 2 s.
    let history = client.history(id).await.expect("the history");
    let names: Vec<StateName> = history.iter().map(|s| s.name).collect();
    let crashed = names
        .iter()
        .position(|n| *n == StateName::Crashed)
        .unwrap_or_else(|| panic!("no Crashed in {names:?}"));
    assert_eq!(names.get(crashed + 1), Some(&StateName::Resuming), "{names:?}");
    let running_again = history[crashed..]
        .iter()
        .find(|s| s.name == StateName::Running)
        .expect("Running again after the resume");
    let resumed_after = running_again.timestamp.saturating_since(killed_at);
    assert!(
        resumed_after <= Duration::from_secs(2),
        "resumed {resumed_after:?} after the kill"
    );

    // The steps that had completed ran once; every step ran.
    let task_runs = client.task_runs(id).await.expect("the task runs");
    assert_eq!(task_runs.len(), STEPS, "one task run per step");
    for t in &task_runs {
        assert_eq!(t.lifecycle.state.kind, StateType::Completed, "{}", t.key);
        if let Some(count) = before.get(&t.key.task_key) {
            assert_eq!(t.lifecycle.run_count, *count, "{} ran again", t.key);
        }
    }
    let written = std::fs::read_to_string(&out).expect("the steps' output");
    let mut times: BTreeMap<usize, usize> = BTreeMap::new();
    for line in written.lines() {
        *times
            .entry(line.trim().parse().expect("a step number"))
            .or_default() += 1;
    }
    for step in 1..=STEPS {
        let n = times.get(&step).copied().unwrap_or(0);
        let completed_before = before.contains_key(&format!("step-{step}"));
        assert!(n >= 1, "step {step} never ran: {times:?}");
        assert!(
            !completed_before || n == 1,
            "step {step} completed before the kill and ran {n} times"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_several_addresses_goes_on_through_another_node() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1,n2");
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let mut nodes = Nodes::new(dir);
    nodes.start("n1", ports[0], None, &[]);
    nodes.start("n2", ports[1], Some(ports[0]), &[]);
    // Both members up (through n1), then a client of "nobody, n2, n1": it talks to n2.
    let _ = connect(dir, ports[0], 2).await;
    let addrs = format!(
        "127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}",
        ports[2], ports[1], ports[0]
    );
    let certs = dir.join("certs");
    let client = flotilla::Client::connect(&addrs, &certs)
        .await
        .expect("connects to the first node that answers");
    let run = |client: flotilla::Client| async move {
        let id = client.run("noop", serde_json::Value::Null).await.expect("a run");
        tokio::time::timeout(Duration::from_secs(30), client.wait(id))
            .await
            .expect("in time")
            .expect("the run")
    };
    assert_eq!(
        run(client.clone()).await.lifecycle.state.kind,
        StateType::Completed
    );

    // n2 dies: the same client goes on through n1.
    nodes.children[1].1.kill().expect("SIGKILL n2");
    let _ = nodes.children[1].1.wait();
    let status = eventually("n1 answers the same client", Duration::from_secs(30), || async {
        client.cluster_status().await.ok()
    })
    .await;
    assert!(
        status
            .nodes
            .iter()
            .any(|m| m.name.as_str() == "n1" && m.reachable)
    );
    assert_eq!(
        run(client.clone()).await.lifecycle.state.kind,
        StateType::Completed
    );
}
