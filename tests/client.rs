//! The embedded client as an application uses it: waiting for runs while the event stream
//! overflows.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on what they set up

use std::time::Duration;

use flotilla::{Node, StateType, TaskError, flow, task};

const WAIT: Duration = Duration::from_secs(30);

#[task]
async fn tick(i: u32) -> Result<u32, String> {
    Ok(i)
}

#[flow]
async fn busy(n: u32) -> Result<u64, TaskError> {
    let mut sum = 0;
    for h in tick.map(0..n) {
        sum += u64::from(h.await?);
    }
    Ok(sum)
}

/// A waiter that falls behind the event stream (here it holds one event) may miss the event
/// that ends its run: it reads the run again rather than wait for an end it already missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_misses_events_still_sees_its_run_end() {
    let dir = tempfile::tempdir().unwrap();
    let config = flotilla_actors::persistence::PersistenceConfig {
        event_channel_capacity: 1,
        ..flotilla_actors::persistence::PersistenceConfig::new(dir.path())
    };
    let node = tokio::time::timeout(
        WAIT,
        Node::builder()
            .data_dir(dir.path())
            .log_to_stderr(false)
            .persistence(config)
            .slots(8)
            .flow(busy)
            .start(),
    )
    .await
    .expect("start timed out")
    .expect("start failed");
    let client = node.client();
    // Runs that end while other runs keep the stream busy: some waiter misses its end.
    let mut waits = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let client = client.clone();
        waits.spawn(async move { client.run_and_wait("busy", serde_json::json!({ "n": 300 })).await });
    }
    let all = tokio::time::timeout(WAIT, async {
        let mut ends = Vec::new();
        while let Some(r) = waits.join_next().await {
            ends.push(r.unwrap().unwrap().lifecycle.state.kind);
        }
        ends
    })
    .await
    .expect("a waiter never saw its run end");
    assert_eq!(all, vec![StateType::Completed; 6]);
    node.shutdown().await;
}
