//! Work queues, deployment limits and cluster-wide tag limits across `flotilla node` processes:
//! a tag limit of 3 holds under 200 task runs on 3 nodes; the slots of a killed node come back
//! within the lease TTL; a deployment blocked on its limit does not delay another deployment in
//! the same queue; `cancel-new` cancels; a paused queue hands out nothing until resumed.

use std::time::{Duration, Instant};

use flotilla::{Client, FlowRunId, LimitChange, QueueChange, StateName, StateType};
use flotilla_runtime::{CollisionStrategy, DeploymentSpec, Timestamp};

mod common;
use common::*;

fn deployment(name: &str, flow: &str, params: serde_json::Value) -> DeploymentSpec {
    DeploymentSpec {
        name: name.into(),
        flow_name: flow.into(),
        parameters: params,
        schedules: vec![],
        work_queue: None,
        tags: vec![],
        concurrency_limit: None,
        collision: CollisionStrategy::Enqueue,
        paused: false,
        result_storage: None,
    }
}

async fn state(client: &Client, id: FlowRunId) -> (StateType, StateName) {
    let r = client.flow_run(id).await.expect("the run");
    (r.lifecycle.state.kind, r.lifecycle.state.name)
}

/// Cancels a run and waits (bounded) for it to end Cancelled.
async fn cancel(client: &Client, id: FlowRunId) {
    if client
        .flow_run(id)
        .await
        .expect("the run")
        .lifecycle
        .state
        .is_terminal()
    {
        return;
    }
    let s = tokio::time::timeout(Duration::from_secs(30), client.cancel(id))
        .await
        .expect("the run ends Cancelled in time")
        .expect("cancelled");
    assert!(s.is_terminal(), "{id} ended {s}");
}

async fn wait_end(client: &Client, id: FlowRunId) -> StateType {
    let r = tokio::time::timeout(Duration::from_secs(60), client.wait(id))
        .await
        .expect("the run ends in time")
        .expect("the run");
    r.lifecycle.state.kind
}

fn nodes(dir: &std::path::Path) -> Nodes {
    Nodes {
        children: Vec::new(),
        dir: dir.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_limit_of_3_holds_under_200_task_runs_across_3_nodes() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1,n2,n3");
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let mut n = nodes(dir);
    let slots = ["--slots", "80"];
    n.children
        .push(("n1".into(), start_node(dir, "n1", ports[0], None, &slots)));
    for (i, name) in ["n2", "n3"].into_iter().enumerate() {
        n.children.push((
            name.into(),
            start_node(dir, name, ports[i + 1], Some(ports[0]), &slots),
        ));
    }
    let client = connect(dir, ports[0], 3).await;
    let set = LimitChange::Put {
        limit: 3,
        lease_ttl_ms: 10_000,
    };
    client.concurrency_limit("db", set).await.expect("the limit");

    let params = serde_json::json!({"command": ["sleep", "0.02"], "tags": ["db"]});
    let mut runs = Vec::new();
    for _ in 0..200 {
        runs.push(client.run("command", params.clone()).await.expect("a run"));
    }
    for id in &runs {
        assert_eq!(wait_end(&client, *id).await, StateType::Completed);
    }
    // Every task run's Running..end span, from the store: never more than 3 at once.
    let mut edges = Vec::new();
    let mut owners = std::collections::BTreeSet::new();
    for id in &runs {
        let run = client.flow_run(*id).await.expect("the run");
        owners.extend(run.owner.clone());
        let tasks = client.task_runs(*id).await.expect("its task runs");
        assert_eq!(tasks.len(), 1);
        let t = &tasks[0];
        assert_eq!(t.tags, vec!["db".to_owned()]);
        let (start, end) = (
            t.lifecycle.start_time.expect("started"),
            t.lifecycle.end_time.expect("ended"),
        );
        assert!(start <= end);
        edges.push((start, 1i32));
        edges.push((end, -1i32));
    }
    // Ends before starts at the same instant.
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    assert!(most <= 3, "{most} task runs tagged db ran at once");
    assert!(
        most >= 2,
        "the runs never overlapped ({most}): the test proves nothing"
    );
    assert!(owners.len() >= 2, "the runs ran on {owners:?} only");
    // Nothing is held once all ended.
    let l = client
        .concurrency_limit("db", LimitChange::Inspect)
        .await
        .expect("the limit")
        .expect("it exists");
    assert!(l.leases.is_empty(), "slots still held: {:?}", l.leases);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slots_of_a_killed_node_come_back_within_the_lease_ttl() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1,n2,n3");
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let mut n = nodes(dir);
    // The control node serves no queue the runs use: they go to the workers.
    n.children.push((
        "n1".into(),
        start_node(dir, "n1", ports[0], None, &["--queues", "elsewhere"]),
    ));
    n.children.push((
        "n2".into(),
        start_node(dir, "n2", ports[1], Some(ports[0]), &["--queues", "work"]),
    ));
    let client = connect(dir, ports[0], 2).await;
    let ttl = Duration::from_secs(2);
    let set = LimitChange::Put {
        limit: 1,
        lease_ttl_ms: ttl.as_millis() as u64,
    };
    client.concurrency_limit("db", set).await.expect("the limit");
    let mut hold = deployment(
        "hold",
        "command",
        // Not resumed once its node is lost: the slot is to come back.
        serde_json::json!({"command": ["sleep", "60"], "tags": ["db"], "resume": false}),
    );
    hold.work_queue = Some("work".into());
    client.put_deployment(hold).await.expect("a deployment");
    let held = client
        .run_deployment("hold", serde_json::Value::Null)
        .await
        .expect("a run");
    let lease = eventually("n2 holds the slot", Duration::from_secs(30), || async {
        let l = client
            .concurrency_limit("db", LimitChange::Inspect)
            .await
            .ok()??;
        l.leases.first().cloned()
    })
    .await;
    assert_eq!(lease.node.as_str(), "n2");
    assert_eq!(
        client
            .flow_run(held)
            .await
            .expect("run")
            .owner
            .as_ref()
            .map(|o| o.as_str()),
        Some("n2")
    );

    n.children[1].1.kill().expect("SIGKILL n2");
    let _ = n.children[1].1.wait();
    let killed = Instant::now();
    eventually("the slot comes back", ttl + Duration::from_secs(3), || async {
        let l = client
            .concurrency_limit("db", LimitChange::Inspect)
            .await
            .ok()??;
        l.leases.is_empty().then_some(())
    })
    .await;
    let back = killed.elapsed();
    // Within the TTL, give or take the control node's check (every 50 ms) on a loaded machine.
    assert!(
        back <= ttl + Duration::from_secs(1),
        "the slot came back after {back:?}"
    );

    // Another node takes it: a tagged run completes.
    n.children.push((
        "n3".into(),
        start_node(dir, "n3", ports[2], Some(ports[0]), &["--queues", "work"]),
    ));
    let mut quick = deployment(
        "quick",
        "command",
        serde_json::json!({"command": ["true"], "tags": ["db"]}),
    );
    quick.work_queue = Some("work".into());
    client.put_deployment(quick).await.expect("a deployment");
    let id = client
        .run_deployment("quick", serde_json::Value::Null)
        .await
        .expect("a run");
    assert_eq!(wait_end(&client, id).await, StateType::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_node_knows_who_holds_slots() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1,n2");
    let ports = [free_udp_port(), free_udp_port()];
    let mut n = nodes(dir);
    let n1_flags = ["--queues", "elsewhere"];
    n.children
        .push(("n1".into(), start_node(dir, "n1", ports[0], None, &n1_flags)));
    n.children.push((
        "n2".into(),
        start_node(dir, "n2", ports[1], Some(ports[0]), &["--queues", "work"]),
    ));
    let client = connect(dir, ports[0], 2).await;
    // A long TTL: a control node that forgot its holders would make a new one wait that long.
    let set = LimitChange::Put {
        limit: 1,
        lease_ttl_ms: 30_000,
    };
    client.concurrency_limit("db", set).await.expect("the limit");
    for (name, command) in [("hold", vec!["sleep", "3"]), ("quick", vec!["true"])] {
        let mut d = deployment(
            name,
            "command",
            serde_json::json!({"command": command, "tags": ["db"]}),
        );
        d.work_queue = Some("work".into());
        client.put_deployment(d).await.expect("a deployment");
    }
    let held = client
        .run_deployment("hold", serde_json::Value::Null)
        .await
        .expect("a run");
    let lease = eventually("n2 holds the slot", Duration::from_secs(30), || async {
        let l = client
            .concurrency_limit("db", LimitChange::Inspect)
            .await
            .ok()??;
        l.leases.first().cloned()
    })
    .await;

    // SIGKILL and restart the control node: it knows the holder at once, from its record.
    n.restart(0, || start_node(dir, "n1", ports[0], None, &n1_flags));
    let client = connect(dir, ports[0], 2).await;
    let l = client
        .concurrency_limit("db", LimitChange::Inspect)
        .await
        .expect("the limit")
        .expect("the limit exists");
    assert_eq!(
        l.leases.iter().map(|x| x.holder).collect::<Vec<_>>(),
        [lease.holder],
        "the holder is known after the restart"
    );

    // Another holder waits for the slot, and gets it when the first ends, not a TTL later.
    let quick = client
        .run_deployment("quick", serde_json::Value::Null)
        .await
        .expect("a run");
    assert_eq!(wait_end(&client, held).await, StateType::Completed);
    assert_eq!(wait_end(&client, quick).await, StateType::Completed);
    let task = |id| {
        let client = client.clone();
        async move {
            let t = client.task_runs(id).await.expect("task runs");
            t.into_iter().next().expect("a task run").lifecycle
        }
    };
    let (first, second) = (task(held).await, task(quick).await);
    let (ended, started) = (
        first.end_time.expect("the first task ended"),
        second.start_time.expect("the second task started"),
    );
    assert!(
        started >= ended,
        "both held the slot at once: {ended} / {started}"
    );
    assert!(
        started.saturating_since(ended) < Duration::from_secs(10),
        "the second waited {:?} after the first ended",
        started.saturating_since(ended)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_limits_and_paused_queues() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1");
    let port = free_udp_port();
    let mut n = nodes(dir);
    n.children
        .push(("n1".into(), start_node(dir, "n1", port, None, &[])));
    let client = connect(dir, port, 1).await;

    // A deployment limited to one run at a time; its runs wait in the default queue.
    let mut slow = deployment("slow", "command", serde_json::json!({"command": ["sleep", "60"]}));
    slow.concurrency_limit = Some(1);
    client.put_deployment(slow).await.expect("a deployment");
    client
        .put_deployment(deployment("fast", "noop", serde_json::json!({})))
        .await
        .expect("a deployment");
    let mut slow_runs = Vec::new();
    for _ in 0..3 {
        slow_runs.push(
            client
                .run_deployment("slow", serde_json::Value::Null)
                .await
                .expect("a run"),
        );
    }
    eventually(
        "one slow run runs, two wait for a slot",
        Duration::from_secs(30),
        || async {
            let mut running = 0;
            let mut awaiting = 0;
            for id in &slow_runs {
                match state(&client, *id).await {
                    (StateType::Running, _) => running += 1,
                    (StateType::Scheduled, StateName::AwaitingConcurrencySlot) => awaiting += 1,
                    _ => {}
                }
            }
            (running == 1 && awaiting == 2).then_some(())
        },
    )
    .await;
    // The blocked deployment does not hold back another in the same queue.
    let started = Instant::now();
    let fast = client
        .run_deployment("fast", serde_json::Value::Null)
        .await
        .expect("a run");
    assert_eq!(wait_end(&client, fast).await, StateType::Completed);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the fast run waited {:?}",
        started.elapsed()
    );
    // Its slot frees: the oldest waiting run starts.
    let running = {
        let mut r = None;
        for id in &slow_runs {
            if state(&client, *id).await.0 == StateType::Running {
                r = Some(*id);
            }
        }
        r.expect("a running slow run")
    };
    cancel(&client, running).await;
    eventually("the next slow run starts", Duration::from_secs(30), || async {
        let mut running = 0;
        for id in &slow_runs {
            if state(&client, *id).await.0 == StateType::Running {
                running += 1;
            }
        }
        (running == 1).then_some(())
    })
    .await;
    for id in &slow_runs {
        cancel(&client, *id).await;
    }

    // cancel-new: a second run while one runs is cancelled.
    let mut only = deployment("only", "command", serde_json::json!({"command": ["sleep", "60"]}));
    only.concurrency_limit = Some(1);
    only.collision = CollisionStrategy::CancelNew;
    client.put_deployment(only).await.expect("a deployment");
    let first = client
        .run_deployment("only", serde_json::Value::Null)
        .await
        .expect("a run");
    eventually("the first runs", Duration::from_secs(30), || async {
        (state(&client, first).await.0 == StateType::Running).then_some(())
    })
    .await;
    let second = client
        .run_deployment("only", serde_json::Value::Null)
        .await
        .expect("a run");
    assert_eq!(wait_end(&client, second).await, StateType::Cancelled);
    assert_eq!(state(&client, first).await.0, StateType::Running);
    cancel(&client, first).await;

    // A paused queue hands out nothing until resumed.
    let create = QueueChange::Edit(flotilla_runtime::QueueEdit::Create {
        priority: 2,
        concurrency_limit: None,
        paused: true,
    });
    client.work_queue("later", create).await.expect("a queue");
    let mut queued = deployment("queued", "noop", serde_json::json!({}));
    queued.work_queue = Some("later".into());
    client.put_deployment(queued).await.expect("a deployment");
    let id = client
        .run_deployment("queued", serde_json::Value::Null)
        .await
        .expect("a run");
    eventually(
        "the queue shows the run waiting",
        Duration::from_secs(10),
        || async {
            let q = client.work_queue("later", QueueChange::Inspect).await.ok()??;
            (q.waiting == 1).then_some(())
        },
    )
    .await;
    // The CLI sees the queue and its events.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(args)
            .env("FLOTILLA_ADDR", format!("127.0.0.1:{port}"))
            .env("FLOTILLA_CERTS", dir.join("certs"))
            .env_remove("FLOTILLA_CONFIG")
            .output()
            .expect("flotilla runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    // A request over the message limit (1 MiB) is refused with a code, the node stays up, and
    // `--json` prints the error as one object on stdout.
    let big = dir.join("big.json");
    std::fs::write(
        &big,
        serde_json::to_vec(&serde_json::json!({"command": ["true"], "blob": "x".repeat(3 << 20)}))
            .expect("json"),
    )
    .expect("written");
    let out = std::process::Command::new(BIN)
        .args(["flow-run", "create", "command", "--json", "--params-json"])
        .arg(format!("@{}", big.display()))
        .env("FLOTILLA_ADDR", format!("127.0.0.1:{port}"))
        .env("FLOTILLA_CERTS", dir.join("certs"))
        .env_remove("FLOTILLA_CONFIG")
        .output()
        .expect("flotilla runs");
    assert!(!out.status.success(), "a 3 MiB request was accepted");
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error on stdout");
    assert_eq!(err["error"]["code"], "payload_too_large", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("1048576")),
        "{err}"
    );
    // Listings are paged: a full page prints the next page's cursor on stderr, and the cursor
    // brings the page after it.
    let page = |extra: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(["flow-run", "ls", "--limit", "1", "--json"])
            .args(extra)
            .env("FLOTILLA_ADDR", format!("127.0.0.1:{port}"))
            .env("FLOTILLA_CERTS", dir.join("certs"))
            .env_remove("FLOTILLA_CONFIG")
            .output()
            .expect("flotilla runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let runs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("a bare JSON array");
        let stderr = String::from_utf8(out.stderr).expect("utf-8");
        let next = stderr
            .lines()
            .find_map(|l| l.strip_prefix("next cursor: "))
            .map(str::to_owned);
        (runs, next)
    };
    let (first, next) = page(&[]);
    assert_eq!(first.len(), 1);
    let next = next.expect("more than one run exists: a cursor");
    let (second, _) = page(&["--cursor", &next]);
    assert_eq!(second.len(), 1);
    assert_ne!(first[0]["id"], second[0]["id"], "the cursor moved on");
    // A read-only client reads, and anything else it asks is refused with `forbidden`.
    let added = std::process::Command::new(BIN)
        .args(["cluster", "add-client", "viewer", "--read-only", "--dir"])
        .arg(dir.join("certs"))
        .output()
        .expect("flotilla runs");
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let viewer = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .args(["--identity", "viewer", "--json"])
            .env("FLOTILLA_ADDR", format!("127.0.0.1:{port}"))
            .env("FLOTILLA_CERTS", dir.join("certs"))
            .env_remove("FLOTILLA_CONFIG")
            .output()
            .expect("flotilla runs")
    };
    let read = viewer(&["flow-run", "ls"]);
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stdout));
    let write = viewer(&["flow-run", "create", "noop"]);
    assert!(!write.status.success(), "a read-only client created a run");
    let err: serde_json::Value = serde_json::from_slice(&write.stdout).expect("a JSON error");
    assert_eq!(err["error"]["code"], "forbidden", "{err}");
    let ls: serde_json::Value = serde_json::from_str(&cli(&["work-queue", "ls", "--json"])).expect("json");
    let later = ls
        .as_array()
        .expect("an array")
        .iter()
        .find(|q| q["name"] == "later")
        .expect("the queue listed");
    assert_eq!(
        (later["paused"].as_bool(), later["waiting"].as_u64()),
        (Some(true), Some(1))
    );
    let events = cli(&["events", "tail", "--prefix", "flotilla.work-queue.", "--json"]);
    let names: Vec<String> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("one event per line"))
        .map(|e| {
            format!(
                "{} {}",
                e["event"].as_str().unwrap_or(""),
                e["resource"]["flotilla.resource.name"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(names, vec!["flotilla.work-queue.created later"]);

    std::thread::sleep(Duration::from_millis(1500)); // a span with the queue paused
    assert_eq!(
        state(&client, id).await.0,
        StateType::Scheduled,
        "a paused queue handed out a run"
    );
    let resumed = Timestamp::from(chrono::Utc::now());
    client
        .work_queue("later", QueueChange::Edit(flotilla_runtime::QueueEdit::Resume))
        .await
        .expect("resumed");
    assert_eq!(wait_end(&client, id).await, StateType::Completed);
    let run = client.flow_run(id).await.expect("the run");
    assert!(run.lifecycle.start_time.expect("started") >= resumed);
}
