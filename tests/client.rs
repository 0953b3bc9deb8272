//! The embedded client as an application uses it: waiting for runs while the event stream
//! overflows; finished runs read from disk when memory holds none of them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on what they set up

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use flotilla::{Node, StateType, TaskError, flow, task};

use flotilla_tests::{WAIT, node};

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

// --- memory bounded by live work: finished runs read from disk

static KEPT_A: AtomicU32 = AtomicU32::new(0);
static KEPT_B: AtomicU32 = AtomicU32::new(0);

#[task]
async fn kept_a() -> Result<u32, String> {
    Ok(KEPT_A.fetch_add(1, Ordering::SeqCst) + 1)
}

#[task]
async fn kept_b() -> Result<u32, String> {
    match KEPT_B.fetch_add(1, Ordering::SeqCst) {
        0 => Err("not yet".into()),
        n => Ok(n + 1),
    }
}

#[flow]
async fn kept() -> Result<(u32, u32), TaskError> {
    Ok((kept_a().await?, kept_b().await?))
}

/// Waits (at most `WAIT`) until the node holds no run in memory.
async fn none_in_memory(node: &Node) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stats = node.store_stats().await.unwrap();
        if stats.resident_runs == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "runs stay in memory: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With no room for finished runs in memory, a finished run lives on disk alone: it is read,
/// listed and found by its idempotency key as before, a retry brings it back (its completed
/// task is not run again), and a restart leaves it on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_beyond_the_memory_budget_are_read_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        node(dir.path(), |b| {
            b.flow(kept)
                .persistence(flotilla_actors::persistence::PersistenceConfig {
                    memory_runs: 0,
                    ..flotilla_actors::persistence::PersistenceConfig::new(dir.path())
                })
        })
    };
    let node = start().await;
    let client = node.client();
    let id = client
        .run_with_key("kept", serde_json::json!({}), "nightly-1")
        .await
        .unwrap();
    let r = tokio::time::timeout(WAIT, client.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.lifecycle.state.kind, StateType::Failed);
    none_in_memory(&node).await;

    assert_eq!(client.flow_run(id).await.unwrap(), r);
    assert_eq!(client.task_runs(id).await.unwrap().len(), 2);
    assert!(!client.history(id).await.unwrap().is_empty());
    let failed = client
        .flow_runs(flotilla::RunFilter::State(StateType::Failed), None, 10)
        .await
        .unwrap();
    assert_eq!(failed.iter().map(|r| r.id).collect::<Vec<_>>(), vec![id]);
    let again = client
        .run_with_key("kept", serde_json::json!({}), "nightly-1")
        .await
        .unwrap();
    assert_eq!(again, id, "the key finds the run on disk");

    client.retry(id).await.unwrap();
    let r = tokio::time::timeout(WAIT, client.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        r.lifecycle.state.kind,
        StateType::Completed,
        "{}",
        r.lifecycle.state
    );
    assert_eq!(client.result::<(u32, u32)>(id).await.unwrap(), (1, 2));
    assert_eq!(
        KEPT_A.load(Ordering::SeqCst),
        1,
        "the completed task came back with its run"
    );
    none_in_memory(&node).await;
    node.shutdown().await;

    let node = start().await;
    assert_eq!(node.store_stats().await.unwrap().resident_runs, 0);
    assert_eq!(
        node.client().flow_run(id).await.unwrap().lifecycle.state.kind,
        StateType::Completed
    );
    node.shutdown().await;
}
