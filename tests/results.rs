//! Results through the SDK on an embedded node: large ones in files, read back rather than
//! made again, made again when damaged or lost; a flow's own object store named by an `s3`
//! block.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on what they set up

use std::sync::atomic::{AtomicU32, Ordering};

use flotilla::{StateType, TaskError, flow, task};
use serde::{Deserialize, Serialize};

use flotilla_tests::{WAIT, node, run};

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Big {
    data: Vec<u8>,
}

static MADE_BIG: AtomicU32 = AtomicU32::new(0);

#[task]
async fn make_big(n: usize) -> Result<Big, String> {
    MADE_BIG.fetch_add(1, Ordering::SeqCst);
    Ok(Big { data: vec![7; n] })
}

#[flow]
async fn big_results(n: usize) -> Result<usize, TaskError> {
    Ok(make_big(n).await?.data.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_go_to_files_and_one_that_cannot_be_read_is_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |b| b.flow(big_results).result_inline_bytes_max(1024)).await;
    let client = node.client();
    let r = run(&node, "big_results", serde_json::json!({"n": 100_000})).await;
    assert_eq!(client.result::<usize>(r.id).await.unwrap(), 100_000);
    let t = &client.task_runs(r.id).await.unwrap()[0];
    let Some(flotilla::runtime::ResultRef::Stored { key, .. }) = &t.lifecycle.state.result else {
        panic!("the large result is inline: {:?}", t.lifecycle.state.result)
    };
    assert_eq!(MADE_BIG.load(Ordering::SeqCst), 1);
    // A run again reads the recorded result back: the task does not run again.
    client.retry_completed(r.id).await.unwrap();
    let again = tokio::time::timeout(WAIT, client.wait(r.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.lifecycle.state.kind, StateType::Completed);
    assert_eq!(MADE_BIG.load(Ordering::SeqCst), 1);
    // Damaged, then lost: never taken as done — the task runs again each time, and the run
    // completes with the value made afresh (before, it failed: "cannot be read").
    let path = dir.path().join("results").join(key);
    assert!(path.exists());
    std::fs::write(&path, b"damaged").unwrap();
    for (made, spoil) in [(2, false), (3, true)] {
        if spoil {
            // The result made again has a key of its own: lose that one.
            let t = &client.task_runs(r.id).await.unwrap()[0];
            let Some(flotilla::runtime::ResultRef::Stored { key, .. }) = &t.lifecycle.state.result else {
                panic!("the large result is inline: {:?}", t.lifecycle.state.result)
            };
            std::fs::remove_file(dir.path().join("results").join(key)).unwrap();
        }
        client.retry_completed(r.id).await.unwrap();
        let again = tokio::time::timeout(WAIT, client.wait(r.id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            again.lifecycle.state.kind,
            StateType::Completed,
            "{}",
            again.lifecycle.state
        );
        assert_eq!(client.result::<usize>(r.id).await.unwrap(), 100_000);
        assert_eq!(MADE_BIG.load(Ordering::SeqCst), made);
    }
    node.shutdown().await;
}

/// As `make_big`, counted nowhere (the tests run at once).
#[task]
async fn make_bytes(n: usize) -> Result<Big, String> {
    Ok(Big { data: vec![7; n] })
}

#[flow(result_storage = "s3/missing")]
async fn stored_elsewhere(n: usize) -> Result<usize, TaskError> {
    Ok(make_bytes(n).await?.data.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_sends_its_large_results_to_the_s3_block_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path(), |b| {
        b.flow(stored_elsewhere).result_inline_bytes_max(1024)
    })
    .await;
    let client = node.client();
    // Small results stay inline: the flow completes without the block.
    let r = run(&node, "stored_elsewhere", serde_json::json!({"n": 10})).await;
    assert_eq!(r.lifecycle.state.kind, StateType::Completed);
    // A large one goes to the block's object store: with no such block, the task fails
    // saying so, never falling back to the node's own store.
    let r = run(&node, "stored_elsewhere", serde_json::json!({"n": 100_000})).await;
    assert_eq!(r.lifecycle.state.kind, StateType::Failed, "{}", r.lifecycle.state);
    let t = &client.task_runs(r.id).await.unwrap()[0];
    let message = t.lifecycle.state.message.clone().unwrap_or_default();
    assert!(
        message.contains("s3/missing") || message.contains("\"missing\""),
        "{message}"
    );
    node.shutdown().await;
}
