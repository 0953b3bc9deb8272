//! Extract, transform 100 items with `map`, load — with retries and caching: the second run
//! of the flow finds every transform in the cache.
//!
//! `cargo run --example etl`

use std::time::Instant;

use flotilla::{Node, StateName, flow, task};

#[task(retries = 2, retry_delay = "100ms")]
async fn extract(rows: u32) -> Result<Vec<u32>, std::io::Error> {
    tracing::info!(rows, "extracting");
    Ok((1..=rows).collect())
}

#[task(cache_expiration = "1h", tags = ["cpu"])]
async fn transform(row: u32) -> Result<u64, std::io::Error> {
    Ok(u64::from(row) * u64::from(row))
}

#[task(retries = 3, retry_delay = "50ms")]
async fn load(values: Vec<u64>) -> Result<u64, std::io::Error> {
    let total = values.iter().sum();
    tracing::info!(total, "loaded {} values", values.len());
    Ok(total)
}

#[flow(retries = 1)]
async fn etl(rows: u32) -> Result<u64, flotilla::TaskError> {
    let data = extract(rows).await?;
    let mut values = Vec::with_capacity(data.len());
    for handle in transform.map(data) {
        values.push(handle.await?);
    }
    load(values).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::builder()
        .data_dir(dir.path())
        .flow(etl)
        .concurrency_limit("cpu", 8)
        .start()
        .await?;
    let client = node.client();
    for round in 1..=2 {
        let started = Instant::now();
        let run = client
            .run_and_wait("etl", serde_json::json!({"rows": 100}))
            .await?;
        let total: u64 = client.result(run.id).await?;
        let tasks = client.task_runs(run.id).await?;
        let cached = tasks
            .iter()
            .filter(|t| t.lifecycle.state.name == StateName::Cached)
            .count();
        println!(
            "run {round}: {} in {:.1} ms, total {total}; {} task runs, {cached} from the cache",
            run.lifecycle.state,
            started.elapsed().as_secs_f64() * 1e3,
            tasks.len()
        );
    }
    node.shutdown().await;
    Ok(())
}
