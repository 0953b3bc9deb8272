//! A flaky task retried with exponential backoff and jitter: the log shows each attempt and
//! the delay before the next.
//!
//! `cargo run --example retries`

use std::sync::atomic::{AtomicU32, Ordering};

use flotilla::{Node, StateName, flow, task};

static ATTEMPTS: AtomicU32 = AtomicU32::new(0);

#[task(retries = 4, retry_delay = "50ms", backoff = exponential(factor = 2, max = "1s"), jitter = 0.5)]
async fn flaky() -> Result<String, String> {
    let n = ATTEMPTS.fetch_add(1, Ordering::SeqCst) + 1;
    if n < 4 {
        tracing::warn!(attempt = n, "the service is unavailable");
        return Err(format!("attempt {n}: service unavailable"));
    }
    tracing::info!(attempt = n, "the service answered");
    Ok(format!("answered on attempt {n}"))
}

#[flow]
async fn retrying() -> Result<String, flotilla::TaskError> {
    flaky().await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::builder()
        .data_dir(dir.path())
        .flow(retrying)
        .start()
        .await?;
    let client = node.client();
    let run = client.run_and_wait("retrying", serde_json::json!({})).await?;
    let answer: String = client.result(run.id).await?;
    println!("flow run {}: {answer}", run.lifecycle.state);
    let task = client
        .task_runs(run.id)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no task run"))?;
    let history = client.task_history(task.id).await?;
    for s in &history {
        match s.name {
            StateName::AwaitingRetry => {
                let delay = s
                    .details
                    .scheduled_time
                    .map(|at| at.saturating_since(s.timestamp))
                    .unwrap_or_default();
                println!("  {:<60} next attempt in {delay:?}", s.to_string());
            }
            _ => println!("  {s}"),
        }
    }
    println!("{} attempts", task.lifecycle.run_count);
    node.shutdown().await;
    Ok(())
}
