//! A data directory written by the release before the control machine (format 1) opens with
//! this build: its runs, work queues, tag limits and deployments are all there, and it takes
//! new work. The fixture was made by that release: a control node given a work queue, a tag
//! limit, a deployment and three command runs, then SIGKILLed (so opening it replays its log).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on what they set up

mod common;

use std::time::Duration;

use common::*;
use flotilla::{LimitChange, QueueChange, StateType};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_the_previous_release_opens_and_takes_new_work() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cluster-0.1-before-control-machine.tar.gz");
    let untar = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(dir)
        .output()
        .expect("tar runs");
    assert!(
        untar.status.success(),
        "{}",
        String::from_utf8_lossy(&untar.stderr)
    );
    std::fs::rename(dir.join("data"), dir.join("n1")).expect("the data directory in place");

    // Its certificates predate the secrets key: the node refuses to start, naming the file,
    // until `cluster secrets-key` writes one.
    let port = free_udp_port();
    let refused = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::process::Command::new(BIN)
            .args(["node", "start", "--name", "n1", "--role", "control", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data")
            .arg(dir.join("n1"))
            .arg("--certs")
            .arg(dir.join("certs"))
            .env_remove("FLOTILLA_CONFIG")
            .output()
            .await
            .expect("flotilla node runs")
    })
    .await
    .expect("the node stops at once");
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("secrets.key"), "{why}");
    let key = std::process::Command::new(BIN)
        .args(["cluster", "secrets-key", "--dir"])
        .arg(dir.join("certs"))
        .output()
        .expect("cluster secrets-key runs");
    assert!(key.status.success(), "{}", String::from_utf8_lossy(&key.stderr));
    let again = std::process::Command::new(BIN)
        .args(["cluster", "secrets-key", "--dir"])
        .arg(dir.join("certs"))
        .output()
        .expect("cluster secrets-key runs");
    assert!(!again.status.success(), "a second key overwrote the first");

    let _nodes = Nodes {
        children: vec![("n1".into(), start_node(dir, "n1", port, None, &[]))],
        dir: dir.to_owned(),
    };
    // The old data directory opens, and the node is a member again (its flows known).
    let client = connect(dir, port, 1).await;

    let runs = client
        .flow_runs(flotilla::RunFilter::State(StateType::Completed), None, 100)
        .await
        .expect("the runs");
    // The deployment's run, due when the old release was killed, may have completed since.
    let runs: Vec<_> = runs.into_iter().filter(|r| r.deployment_id.is_none()).collect();
    assert_eq!(runs.len(), 3, "the three completed runs of the old release");
    for r in &runs {
        assert_eq!(r.flow_name, "command");
        let history = client.history(r.id).await.expect("its history");
        assert!(history.len() >= 4, "{history:?}");
    }
    let q = client
        .work_queue("upgrade-q", QueueChange::Inspect)
        .await
        .expect("the queue")
        .expect("listed");
    assert_eq!((q.queue.priority, q.queue.concurrency_limit), (3, Some(2)));
    let db = client
        .concurrency_limit("db", LimitChange::Inspect)
        .await
        .expect("the tag limit")
        .expect("listed");
    assert_eq!(db.limit, 2);
    let d = client.deployment("nightly").await.expect("the deployment");
    assert_eq!(d.work_queue.as_deref(), Some("upgrade-q"));

    // And it takes new work, in the new format's commands too.
    let id = client
        .run_with_key(
            "command",
            serde_json::json!({"command": ["true"]}),
            "after-upgrade",
        )
        .await
        .expect("a new run");
    let run = tokio::time::timeout(Duration::from_secs(30), client.wait(id))
        .await
        .expect("in time")
        .expect("readable");
    assert_eq!(run.lifecycle.state.kind, StateType::Completed);
    client
        .work_queue(
            "upgrade-q",
            QueueChange::Edit(flotilla_runtime::QueueEdit::SetPriority(4)),
        )
        .await
        .expect("changed");
}
