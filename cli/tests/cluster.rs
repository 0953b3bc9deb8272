//! Three `flotilla node` processes on 127.0.0.1: 100 flow runs spread over them, a worker
//! killed with SIGKILL. It is marked unreachable in time, its running runs become Crashed, the
//! runs acknowledged Completed stay Completed, and the cluster goes on accepting runs.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use flotilla::{Client, FlowRunId, StateName, StateType};

mod common;
use common::*;

/// The configured silence after which a member is unreachable.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(1);
/// What the test allows on a loaded CI machine on top of it (the heartbeat period, the
/// control node's check interval, and scheduling).
const DETECT_SLACK: Duration = Duration::from_secs(2);

/// A command that runs until its node dies (it watches its parent), so a killed node leaves
/// no program behind; not resumed elsewhere (it would run forever there).
fn long_command() -> serde_json::Value {
    serde_json::json!({
        "command": ["sh", "-c", "while kill -0 $PPID 2>/dev/null; do sleep 0.1; done"],
        "resume": false,
    })
}

async fn state_of(client: &Client, id: FlowRunId) -> flotilla::FlowRun {
    client.flow_run(id).await.expect("the run is readable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_detected_its_runs_crash_and_the_cluster_goes_on() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1,n2,n3");

    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let mut nodes = Nodes {
        children: Vec::new(),
        dir: dir.to_owned(),
    };
    nodes
        .children
        .push(("n1".into(), start_node(dir, "n1", ports[0], None, &[])));
    nodes
        .children
        .push(("n2".into(), start_node(dir, "n2", ports[1], Some(ports[0]), &[])));
    nodes
        .children
        .push(("n3".into(), start_node(dir, "n3", ports[2], Some(ports[0]), &[])));

    let addr = format!("127.0.0.1:{}", ports[0]);
    let certs = dir.join("certs");
    let client = eventually("a client connects to n1", Duration::from_secs(30), || async {
        Client::connect(&addr, &certs).await.ok()
    })
    .await;
    eventually("3 reachable members", Duration::from_secs(30), || async {
        let s = client.cluster_status().await.ok()?;
        (s.nodes.iter().filter(|m| m.reachable).count() == 3).then_some(())
    })
    .await;

    // Long runs first, until n3 holds a few of them running, then quick ones: 100 in all.
    let mut long = Vec::new();
    let mut owners: BTreeMap<FlowRunId, String> = BTreeMap::new();
    while owners.values().filter(|o| *o == "n3").count() < 3 {
        assert!(
            long.len() < 30,
            "n3 was given none of {} long runs: {owners:?}",
            long.len()
        );
        let id = client
            .run("command", long_command())
            .await
            .expect("a long run is accepted");
        long.push(id);
        let run = eventually("the long run starts", Duration::from_secs(30), || async {
            let r = state_of(&client, id).await;
            (r.lifecycle.state.name == StateName::Running).then_some(r)
        })
        .await;
        owners.insert(id, run.owner.expect("a running run has an owner").to_string());
    }
    let quick: Vec<FlowRunId> = {
        let mut v = Vec::new();
        for i in 0..(100 - long.len()) {
            let id = if i % 2 == 0 {
                client.run("noop", serde_json::Value::Null).await
            } else {
                client
                    .run("command", serde_json::json!({"command": ["true"]}))
                    .await
            };
            v.push(id.expect("a quick run is accepted"));
        }
        v
    };
    let mut completed = BTreeSet::new();
    let mut placed_on = BTreeSet::new();
    for &id in &quick {
        let run = tokio::time::timeout(Duration::from_secs(60), client.wait(id))
            .await
            .expect("a quick run ends in time")
            .expect("it is readable");
        assert_eq!(
            run.lifecycle.state.kind,
            StateType::Completed,
            "{id}: {}",
            run.lifecycle.state
        );
        placed_on.insert(run.owner.expect("owner").to_string());
        completed.insert(id);
    }
    assert_eq!(
        placed_on.len(),
        3,
        "the quick runs went to every node: {placed_on:?}"
    );

    // A remote client follows a run's events (regression: its stream ended at once), and one
    // idempotency key makes one run.
    {
        let id = client
            .run_with_key("noop", serde_json::json!({}), "cluster-test-key")
            .await
            .expect("accepted");
        let mut events = client.events(id);
        let terminal = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(e) = events.next().await {
                if e.state().is_some_and(|s| s.is_terminal()) {
                    return Some(e);
                }
            }
            None
        })
        .await
        .expect("the run's events came in time");
        assert!(
            terminal.is_some(),
            "the remote event stream ended before the run did"
        );
        let again = client
            .run_with_key("noop", serde_json::json!({}), "cluster-test-key")
            .await
            .expect("accepted again");
        assert_eq!(again, id, "one key, one run");
    }

    // Large results (above the 64 KiB kept inline) made on a worker are shipped to the control
    // node: readable through it, also once the worker is gone.
    const BIG: usize = 300_000;
    let mut big_on_n3 = None;
    // Several at once, so that they spread over the nodes (an idle cluster gives a lone run to
    // the first of its least loaded nodes), enough to fill the others up to n3's long runs
    // (it may hold more of them than the others). Until one lands on n3, within a bound.
    let n3_long = owners.values().filter(|o| *o == "n3").count();
    let mut batch = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if batch.is_empty() {
            let mut asked = tokio::task::JoinSet::new();
            for n in 0..3 + 2 * n3_long {
                let client = client.clone();
                asked.spawn(async move {
                    let id = client.run("noop", serde_json::json!({"result_bytes": BIG})).await;
                    (n, id.expect("accepted"))
                });
            }
            let mut ids = asked.join_all().await;
            ids.sort();
            batch.extend(ids.into_iter().map(|(_, id)| id));
        }
        let id = batch.remove(0);
        let run = tokio::time::timeout(Duration::from_secs(30), client.wait(id))
            .await
            .expect("in time")
            .expect("readable");
        assert_eq!(
            run.lifecycle.state.kind,
            StateType::Completed,
            "{}",
            run.lifecycle.state
        );
        let bytes: serde_bytes::ByteBuf = client.result(id).await.expect("the large result is readable");
        assert_eq!(bytes.len(), BIG);
        assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        if run.owner.as_ref().is_some_and(|o| o.as_str() == "n3") {
            big_on_n3 = Some(id);
            break;
        }
    }
    let big_on_n3 = big_on_n3.expect("a large result was made on n3");

    // Kill n3.
    // How fast is measured by `bench cluster`; here only that it happens, within a bound.
    nodes.children[2].1.kill().expect("SIGKILL n3");
    eventually(
        "n3 unreachable",
        UNREACHABLE_AFTER + DETECT_SLACK + Duration::from_secs(5),
        || async {
            let s = client.cluster_status().await.ok()?;
            s.nodes
                .iter()
                .any(|m| m.name.as_str() == "n3" && !m.reachable)
                .then_some(())
        },
    )
    .await;
    let status = client.cluster_status().await.expect("status");
    assert_eq!(status.nodes.len(), 3, "a dead member stays listed");
    assert!(
        status
            .nodes
            .iter()
            .filter(|m| m.name.as_str() != "n3")
            .all(|m| m.reachable),
        "{status:?}"
    );

    // n3's running runs become Crashed; the others run on.
    for &id in &long {
        let on_n3 = owners[&id] == "n3";
        let run = eventually(
            "the long run's state settles",
            Duration::from_secs(10),
            || async {
                let r = state_of(&client, id).await;
                let want = if on_n3 {
                    StateName::Crashed
                } else {
                    StateName::Running
                };
                (r.lifecycle.state.name == want).then_some(r)
            },
        )
        .await;
        if on_n3 {
            assert!(
                run.lifecycle
                    .state
                    .message
                    .as_deref()
                    .unwrap_or("")
                    .contains("n3"),
                "{}",
                run.lifecycle.state
            );
        }
    }
    // The result n3 made outlives it.
    let bytes: serde_bytes::ByteBuf = client.result(big_on_n3).await.expect("readable after n3 died");
    assert_eq!(bytes.len(), BIG);

    // Every run acknowledged Completed stays Completed.
    for &id in &completed {
        assert_eq!(
            state_of(&client, id).await.lifecycle.state.kind,
            StateType::Completed,
            "{id}"
        );
    }

    // The cluster goes on: new runs complete, none on the dead node.
    for _ in 0..10 {
        let id = client
            .run("command", serde_json::json!({"command": ["echo", "after"]}))
            .await
            .expect("accepted");
        let run = tokio::time::timeout(Duration::from_secs(30), client.wait(id))
            .await
            .expect("in time")
            .expect("readable");
        assert_eq!(
            run.lifecycle.state.kind,
            StateType::Completed,
            "{}",
            run.lifecycle.state
        );
        assert_ne!(run.owner.expect("owner").as_str(), "n3");
    }

    // n3 comes back on its data directory: it redials, is reachable again and takes runs.
    nodes.restart(2, || start_node(dir, "n3", ports[2], Some(ports[0]), &[]));
    eventually("n3 reachable again", Duration::from_secs(30), || async {
        let s = client.cluster_status().await.ok()?;
        s.nodes
            .iter()
            .any(|m| m.name.as_str() == "n3" && m.reachable)
            .then_some(())
    })
    .await;
    let mut back_on_n3 = false;
    for _ in 0..30 {
        let id = client
            .run("noop", serde_json::Value::Null)
            .await
            .expect("accepted");
        let run = tokio::time::timeout(Duration::from_secs(30), client.wait(id))
            .await
            .expect("in time")
            .expect("readable");
        assert_eq!(
            run.lifecycle.state.kind,
            StateType::Completed,
            "{}",
            run.lifecycle.state
        );
        if run.owner.as_ref().is_some_and(|o| o.as_str() == "n3") {
            back_on_n3 = true;
            break;
        }
    }
    assert!(back_on_n3, "the restarted n3 was given no run");

    // A dead member can be removed; a live one cannot.
    assert!(client.remove_node("n3").await.is_err(), "n3 is reachable");
    nodes.children[2].1.kill().expect("SIGKILL n3 again");
    eventually("n3 unreachable again", Duration::from_secs(10), || async {
        let s = client.cluster_status().await.ok()?;
        s.nodes
            .iter()
            .any(|m| m.name.as_str() == "n3" && !m.reachable)
            .then_some(())
    })
    .await;
    client.remove_node("n3").await.expect("n3 is removed");
    let s = client.cluster_status().await.expect("status");
    assert_eq!(s.nodes.len(), 2);

    // Cancel the long runs that still run, so their programs end before the nodes do.
    for &id in &long {
        if owners[&id] != "n3" {
            let st = client.cancel(id).await.expect("cancel");
            assert_eq!(st.name, StateName::Cancelled);
        }
    }
}

#[test]
fn cli_errors_are_one_line_with_a_non_zero_exit() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let certs = tmp.path().join("certs");
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("FLOTILLA_CERTS", &certs)
            .env_remove("FLOTILLA_ADDR")
            .env_remove("FLOTILLA_CONFIG")
            .output()
            .expect("the binary runs")
    };
    let init = run(&[
        "cluster",
        "init",
        "--nodes",
        "n1",
        "--dir",
        certs.to_str().expect("utf-8"),
    ]);
    assert!(init.status.success());
    // Re-running over the directory refuses.
    let again = run(&[
        "cluster",
        "init",
        "--nodes",
        "n1",
        "--dir",
        certs.to_str().expect("utf-8"),
    ]);
    assert!(!again.status.success());
    // No node listens there.
    let port = free_udp_port().to_string();
    let down = run(&["cluster", "status", "--addr", &format!("127.0.0.1:{port}")]);
    assert!(!down.status.success());
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(err.contains("cannot reach node"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Bad input.
    let bad = run(&["flow-run", "inspect", "not-an-id"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a flow run id"));
    let bad = run(&["flow-run", "create", "command", "--params-json", "[1]"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("JSON object"));
}

/// A node must be the node its certificate names: one claiming another name (n2's certificate
/// presented as n3) is refused and never becomes a member, while the real n2 joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_claiming_another_name_than_its_certificates_is_refused() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1,n2");
    let certs = dir.join("certs");
    std::fs::copy(certs.join("n2.pem"), certs.join("n3.pem")).expect("copied");
    std::fs::copy(certs.join("n2.key"), certs.join("n3.key")).expect("copied");
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let mut nodes = Nodes {
        children: Vec::new(),
        dir: dir.to_owned(),
    };
    nodes
        .children
        .push(("n1".into(), start_node(dir, "n1", ports[0], None, &[])));
    nodes.children.push((
        "n3".into(),
        start_node(dir, "n3", ports[2], Some(ports[0]), &["--join-timeout", "3s"]),
    ));
    nodes
        .children
        .push(("n2".into(), start_node(dir, "n2", ports[1], Some(ports[0]), &[])));
    let addr = format!("127.0.0.1:{}", ports[0]);
    let client = eventually("a client connects to n1", Duration::from_secs(30), || async {
        Client::connect(&addr, &certs).await.ok()
    })
    .await;
    eventually("n2 joins", Duration::from_secs(30), || async {
        let s = client.cluster_status().await.ok()?;
        s.nodes.iter().any(|m| m.name.as_str() == "n2").then_some(())
    })
    .await;
    // The impostor gives up when its join time runs out, refused at every try.
    let impostor = &mut nodes.children[1].1;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exited = loop {
        if let Some(status) = impostor.try_wait().expect("its status") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the impostor neither joined nor gave up in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling a process, bounded above
    };
    assert!(!exited.success(), "a node with another's certificate started");
    let s = client.cluster_status().await.expect("status");
    assert!(
        s.nodes.iter().all(|m| m.name.as_str() != "n3"),
        "the impostor became a member: {s:?}"
    );
}

/// Sends one request with the given request id on a fresh connection, as the SDK does.
async fn ask_with_id(
    dir: &std::path::Path,
    port: u16,
    request: flotilla_cluster::wire::Request,
    id: flotilla_runtime::control::RequestId,
) -> flotilla_cluster::wire::Response {
    let (_endpoint, conn) = client_connection(dir, port).await;
    ask_on(&conn, request, id).await
}

/// A client connection as the admin (with its endpoint, to keep while it is used).
async fn client_connection(
    dir: &std::path::Path,
    port: u16,
) -> (flotilla_cluster::QuicEndpoint, quinn::Connection) {
    use flotilla_cluster::endpoint::{QuicEndpoint, TransportSettings};
    use flotilla_cluster::tls::{ALPN_CLIENT, Identity};
    let identity = Identity::load(&dir.join("certs"), "admin").expect("the admin certificate");
    let endpoint =
        QuicEndpoint::client_on(([127, 0, 0, 1], 0).into(), identity, TransportSettings::default())
            .expect("a client endpoint");
    let conn = endpoint
        .connect(([127, 0, 0, 1], port).into(), "127.0.0.1", ALPN_CLIENT)
        .await
        .expect("a connection");
    (endpoint, conn)
}

/// Sends one request with this id on `conn` and reads the answer.
async fn ask_on(
    conn: &quinn::Connection,
    request: flotilla_cluster::wire::Request,
    id: flotilla_runtime::control::RequestId,
) -> flotilla_cluster::wire::Response {
    use flotilla_cluster::wire::{Envelope, PROTOCOL_VERSION};
    let (mut send, mut recv) = conn.open_bi().await.expect("a stream");
    let envelope = Envelope {
        version: PROTOCOL_VERSION,
        request,
        request_id: Some(id),
        stale: false,
    };
    flotilla_cluster::frame::write_limited(&mut send, &envelope, u32::MAX as usize)
        .await
        .expect("the request is sent");
    let _ = send.finish();
    tokio::time::timeout(Duration::from_secs(30), flotilla_cluster::frame::read(&mut recv))
        .await
        .expect("an answer in time")
        .expect("an answer")
}

/// A deployment of `command` running `true`, unscheduled.
fn true_deployment(name: &str) -> flotilla_runtime::DeploymentSpec {
    flotilla_runtime::DeploymentSpec {
        name: name.into(),
        flow_name: "command".into(),
        parameters: serde_json::json!({"command": ["true"]}),
        schedules: vec![],
        work_queue: None,
        tags: vec![],
        concurrency_limit: None,
        collision: flotilla_runtime::CollisionStrategy::Enqueue,
        paused: false,
        result_storage: None,
    }
}

/// A request sent again with its id gets its first answer, even after a SIGKILL and restart of
/// the control node: deleting a deployment twice is `Done` twice, not `not_found` the second
/// time; the same request with a new id is a new request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_request_gets_its_first_answer_across_a_control_restart() {
    use flotilla_cluster::wire::{Request, Response};
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1");
    let port = free_udp_port();
    let mut nodes = Nodes {
        children: vec![("n1".into(), start_node(dir, "n1", port, None, &[]))],
        dir: dir.to_owned(),
    };
    let client = connect(dir, port, 1).await;
    client
        .put_deployment(true_deployment("once"))
        .await
        .expect("a deployment");
    let id = |n: u8| flotilla_runtime::control::RequestId::from_uuid(uuid::Uuid::from_bytes([n; 16]));
    let delete = || Request::DeleteDeployment("once".into());
    let first = ask_with_id(dir, port, delete(), id(1)).await;
    assert!(matches!(first, Response::Done), "{first:?}");

    nodes.restart(0, || start_node(dir, "n1", port, None, &[]));
    let _client = connect(dir, port, 1).await;
    let again = ask_with_id(dir, port, delete(), id(1)).await;
    assert_eq!(again, first, "the resent request got another answer");
    let new = ask_with_id(dir, port, delete(), id(2)).await;
    assert!(
        matches!(&new, Response::Error(e) if e.kind == flotilla_cluster::wire::ErrorKind::NotFound),
        "{new:?}"
    );
}

/// A request sent twice at once with one id (a client that retried on another connection while
/// the first try was still being answered, here to another node) is carried out once: both get
/// the first answer.
/// Deleting a deployment twice at once is `Done` twice, never `Done` and `not_found`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_twice_at_once_is_carried_out_once() {
    use flotilla_cluster::wire::{Request, Response};
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1,n2");
    let ports = [free_udp_port(), free_udp_port()];
    let _nodes = Nodes {
        children: vec![
            ("n1".into(), start_node(dir, "n1", ports[0], None, &[])),
            ("n2".into(), start_node(dir, "n2", ports[1], Some(ports[0]), &[])),
        ],
        dir: dir.to_owned(),
    };
    let client = connect(dir, ports[0], 2).await;
    // One try to the control node, the other to the worker, which forwards it.
    let ((_ea, a), (_eb, b)) = (
        client_connection(dir, ports[0]).await,
        client_connection(dir, ports[1]).await,
    );
    for n in 0..20u8 {
        let name = format!("twice-{n}");
        client
            .put_deployment(true_deployment(&name))
            .await
            .expect("a deployment");
        let id = flotilla_runtime::control::RequestId::from_uuid(uuid::Uuid::from_bytes([n + 1; 16]));
        let (first, second) = tokio::join!(
            ask_on(&a, Request::DeleteDeployment(name.clone()), id),
            ask_on(&b, Request::DeleteDeployment(name.clone()), id)
        );
        assert!(
            matches!(first, Response::Done) && matches!(second, Response::Done),
            "request {n}, sent twice at once, was carried out twice: {first:?} and {second:?}"
        );
    }
}
