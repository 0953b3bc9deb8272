//! Retention on a `flotilla node` process: a run that ended longer ago than `--retention-runs`
//! is forgotten with its history and logs (and stays forgotten after a restart); a run still
//! running is kept; a retention below one second is refused (and bad bounds on remembered
//! answers). And paging: a run's logs and the events with `--limit` and `--cursor`, a run's
//! task runs under the message limit.

use std::time::Duration;

use flotilla::StateType;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_are_forgotten_after_the_retention_window() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1");

    for (flag, value) in [
        ("--retention-runs", "10ms"),
        ("--request-answers-max", "0"),
        ("--request-answers-keep", "10ms"),
    ] {
        let refused = std::process::Command::new(BIN)
            .args(["node", "start", "--name", "n1", "--listen", "127.0.0.1:1"])
            .arg("--data")
            .arg(dir.join("refused"))
            .arg("--certs")
            .arg(dir.join("certs"))
            .args([flag, value])
            .env_remove("FLOTILLA_CONFIG")
            .output()
            .expect("flotilla runs");
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains(flag), "{err}");
    }

    let port = free_udp_port();
    let retention = [
        "--retention-runs",
        "1s",
        "--retention-events",
        "1s",
        "--retention-logs",
        "1s",
    ];
    let mut nodes = Nodes {
        children: vec![("n1".into(), start_node(dir, "n1", port, None, &retention))],
        dir: dir.to_owned(),
    };
    let client = connect(dir, port, 1).await;
    let done = client
        .run(
            "command",
            serde_json::json!({"command": ["sh", "-c", "echo hello"]}),
        )
        .await
        .expect("a run");
    let run = tokio::time::timeout(Duration::from_secs(60), client.wait(done))
        .await
        .expect("the run ends in time")
        .expect("the run");
    assert_eq!(run.lifecycle.state.kind, StateType::Completed);
    assert!(!client.logs(done).await.expect("its logs").is_empty());
    // A run still running is kept.
    let waiting = client
        .run("command", serde_json::json!({"command": ["sleep", "60"]}))
        .await
        .expect("a long run");

    let gone = |code: &str| code == "not_found";
    eventually(
        "the finished run is forgotten",
        Duration::from_secs(30),
        || async {
            match client.flow_run(done).await {
                Err(e) if gone(e.code()) => Some(()),
                _ => None,
            }
        },
    )
    .await;
    assert!(client.logs(done).await.map_or(true, |l| l.is_empty()));
    assert!(
        !client
            .flow_run(waiting)
            .await
            .expect("the running run")
            .lifecycle
            .state
            .is_terminal()
    );

    // Forgotten for good: a restart replays nothing back.
    nodes.restart(0, || start_node(dir, "n1", port, None, &retention));
    let client = connect(dir, port, 1).await;
    assert!(matches!(client.flow_run(done).await, Err(e) if gone(e.code())));
    assert!(client.flow_run(waiting).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_events_are_paged_with_a_cursor() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1");
    let port = free_udp_port();
    let _nodes = Nodes {
        children: vec![("n1".into(), start_node(dir, "n1", port, None, &[]))],
        dir: dir.to_owned(),
    };
    let client = connect(dir, port, 1).await;
    let id = client
        .run("command", serde_json::json!({"command": ["seq", "1", "250"]}))
        .await
        .expect("a run");
    let run = tokio::time::timeout(Duration::from_secs(60), client.wait(id))
        .await
        .expect("the run ends in time")
        .expect("the run");
    assert_eq!(run.lifecycle.state.kind, StateType::Completed);
    let addr = format!("127.0.0.1:{port}");
    let id = id.to_string();
    let cli = |args: &[&str]| flotilla_at(dir, &addr, &[&["flow-run", "logs", &id], args].concat());
    let (ok, all, _) = cli(&[]);
    assert!(ok);
    let all: Vec<&str> = all.lines().collect();
    assert!(all.len() >= 250, "{} lines", all.len());
    // Pages of 100, following the cursor printed on stderr, give the same lines.
    let paged = every_page(100, |cursor| {
        let mut args = vec!["--limit", "100"];
        if let Some(c) = cursor {
            args.extend(["--cursor", c]);
        }
        cli(&args)
    });
    assert_eq!(paged.lines().collect::<Vec<_>>(), all);
    let (ok, _, err) = cli(&["--cursor", "nonsense"]);
    assert!(!ok);
    assert!(err.contains("not a cursor"), "{err}");
    let (ok, _, err) = cli(&["--limit", "0"]);
    assert!(!ok);
    assert!(err.contains("--limit"), "{err}");

    // Events page the same way, from the start.
    let events = |args: &[&str]| flotilla_at(dir, &addr, &[&["events", "tail", "--json"], args].concat());
    let (ok, all, err) = events(&["--cursor", "start", "--limit", "1000"]);
    assert!(ok, "{err}");
    let all: Vec<&str> = all.lines().collect();
    assert!(all.len() >= 4, "{} events", all.len());
    let paged = every_page(3, |cursor| {
        events(&["--cursor", cursor.unwrap_or("start"), "--limit", "3"])
    });
    assert_eq!(paged.lines().collect::<Vec<_>>(), all);
}

/// Runs `flotilla ARGS --addr ADDR` with the test's certificates: (success, stdout, stderr).
fn flotilla_at(dir: &std::path::Path, addr: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .args(["--addr", addr])
        .env("FLOTILLA_CERTS", dir.join("certs"))
        .env_remove("FLOTILLA_CONFIG")
        .output()
        .expect("flotilla runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every page a command prints, following the `next cursor:` it prints on stderr (at most 100
/// pages, each of at most `limit` lines).
fn every_page(limit: usize, mut page: impl FnMut(Option<&str>) -> (bool, String, String)) -> String {
    let mut paged = String::new();
    let mut cursor: Option<String> = None;
    for n in 0.. {
        assert!(n < 100, "the pages never end");
        let (ok, out, err) = page(cursor.as_deref());
        assert!(ok, "{err}");
        assert!(out.lines().count() <= limit);
        paged.push_str(&out);
        match err.lines().find_map(|l| l.strip_prefix("next cursor: ")) {
            Some(c) => cursor = Some(c.to_owned()),
            None => return paged,
        }
    }
    unreachable!("the loop returns or fails")
}

#[flotilla::task]
async fn step(i: u32) -> Result<u32, String> {
    Ok(i)
}

/// Calls `step` `n` times at once.
#[flotilla::flow]
async fn many(n: u32) -> Result<u64, flotilla::TaskError> {
    let mut sum = 0;
    for h in step.map(0..n) {
        sum += u64::from(h.await?);
    }
    Ok(sum)
}

fn flow_fn<D: flotilla::__private::FlowDef>(_: D) -> std::sync::Arc<dyn flotilla_actors::engine::FlowFn> {
    std::sync::Arc::new(flotilla::__private::FlowAdapter::<D>::default())
}

/// The task runs of a flow run read by a remote client come in pages, each under the node's
/// message limit: 400 task runs are far over a 64 KiB limit altogether.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_runs_are_read_in_pages_under_the_message_limit() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1");
    let port = free_udp_port();
    let mut config = flotilla_actors::node::NodeConfig::new(
        "n1".parse().expect("a name"),
        ([127, 0, 0, 1], port).into(),
        dir.join("n1"),
        dir.join("certs"),
    );
    config.message_bytes_max = 64 * 1024;
    config.log_to_stderr = false;
    let node = flotilla_actors::node::start(config, vec![flow_fn(many)])
        .await
        .expect("the node starts");
    let client = connect(dir, port, 1).await;
    let id = client
        .run("many", serde_json::json!({"n": 400}))
        .await
        .expect("a run");
    let run = tokio::time::timeout(Duration::from_secs(60), client.wait(id))
        .await
        .expect("the run ends in time")
        .expect("the run");
    assert_eq!(run.lifecycle.state.kind, StateType::Completed);
    let tasks = client.task_runs(id).await.expect("the task runs");
    assert_eq!(tasks.len(), 400);
    let distinct: std::collections::BTreeSet<_> = tasks.iter().map(|t| t.id).collect();
    assert_eq!(distinct.len(), 400);
    let history = client.history(id).await.expect("the history");
    assert_eq!(
        history.last().map(|s| s.kind),
        Some(StateType::Completed),
        "{history:?}"
    );
    node.stop().await;
}
