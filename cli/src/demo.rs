//! `flotilla demo`: a real pipeline on a node embedded in this process, with its store in a
//! temporary directory. It runs an ETL flow (extract → validate and transform each record
//! with `map`, one of them retried after a failure → aggregate → load to a file), prints every
//! task run with its state, attempts and timing, then runs the flow again to show the cache.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use flotilla::{Node, StateName, TaskError, flow, task};
use serde::{Deserialize, Serialize};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the data directory here instead of a temporary one.
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// How many records the pipeline handles.
    #[arg(long, default_value_t = 12)]
    records: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reading {
    sensor: u32,
    celsius: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Summary {
    readings: usize,
    mean_fahrenheit: f64,
    hottest: u32,
    report: String,
}

static FLAKED: AtomicBool = AtomicBool::new(false);

#[task(retries = 2)]
async fn extract(records: u32) -> Result<Vec<Reading>, String> {
    tracing::info!(records, "reading sensors");
    Ok((0..records)
        .map(|s| Reading {
            sensor: s,
            celsius: 15.0 + f64::from((s * 7) % 13),
        })
        .collect())
}

/// Checks one reading; the sensor 3 check fails once (a flaky network), then passes on retry.
#[task(retries = 3, retry_delay = "20ms", backoff = exponential(factor = 2, max = "1s"))]
async fn validate(r: Reading) -> Result<Reading, String> {
    if r.sensor == 3 && !FLAKED.swap(true, Ordering::SeqCst) {
        return Err("sensor 3: connection reset".into());
    }
    if !(-50.0..=60.0).contains(&r.celsius) {
        return Err(format!("sensor {}: implausible reading {}", r.sensor, r.celsius));
    }
    Ok(r)
}

#[task(cache_expiration = "1h")]
async fn to_fahrenheit(r: Reading) -> Result<(u32, f64), String> {
    Ok((r.sensor, r.celsius * 9.0 / 5.0 + 32.0))
}

#[task]
async fn aggregate(values: Vec<(u32, f64)>) -> Result<(f64, u32), String> {
    let mean = values.iter().map(|v| v.1).sum::<f64>() / values.len().max(1) as f64;
    let hottest = values
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(0, |v| v.0);
    Ok((mean, hottest))
}

#[task(retries = 1)]
async fn load(dir: String, values: Vec<(u32, f64)>) -> Result<String, String> {
    let path = std::path::Path::new(&dir).join("report.csv");
    let mut csv = String::from("sensor,fahrenheit\n");
    for (s, f) in &values {
        csv.push_str(&format!("{s},{f:.1}\n"));
    }
    std::fs::write(&path, csv).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path.display().to_string())
}

#[flow(retries = 1)]
async fn sensor_pipeline(records: u32, out_dir: String) -> Result<Summary, TaskError> {
    let readings = extract(records).await?;
    let mut valid = Vec::new();
    for h in validate.map(readings) {
        valid.push(h.await?);
    }
    let mut values = Vec::new();
    for h in to_fahrenheit.map(valid) {
        values.push(h.await?);
    }
    let (mean, hottest) = aggregate(values.clone()).await?;
    let report = load(out_dir, values.clone()).await?;
    Ok(Summary {
        readings: values.len(),
        mean_fahrenheit: mean,
        hottest,
        report,
    })
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let temp = tempfile::Builder::new().prefix("flotilla-demo-").tempdir()?;
    let dir = args.data.clone().unwrap_or_else(|| temp.path().join("data"));
    println!(
        "Flotilla demo — a node embedded in this process, its store in {}",
        dir.display()
    );
    let node = Node::builder()
        .data_dir(&dir)
        .flow(sensor_pipeline)
        .log_to_stderr(false)
        .start()
        .await
        .context("starting the node")?;
    let client = node.client();
    let params = serde_json::json!({ "records": args.records, "out_dir": temp.path().display().to_string() });
    for round in 1..=2 {
        let started = Instant::now();
        let run = client.run_and_wait("sensor_pipeline", params.clone()).await?;
        let took = started.elapsed();
        println!();
        println!(
            "run {round}: flow run {} of sensor_pipeline: {} in {:.1} ms",
            run.id,
            run.lifecycle.state,
            took.as_secs_f64() * 1e3
        );
        println!(
            "  {:<18} {:<26} {:>8} {:>11}",
            "task run", "state", "attempts", "run time"
        );
        let mut tasks = client.task_runs(run.id).await?;
        tasks.sort_by_key(|t| t.id);
        let mut cached = 0;
        for t in &tasks {
            if t.lifecycle.state.name == StateName::Cached {
                cached += 1;
            }
            println!(
                "  {:<18} {:<26} {:>8} {:>9.3} ms",
                format!("{}#{}", t.key.task_key, t.key.call_index),
                t.lifecycle.state.to_string(),
                t.lifecycle.run_count,
                t.lifecycle.total_run_time.as_secs_f64() * 1e3
            );
        }
        let summary: Summary = client.result(run.id).await?;
        println!(
            "  → {} readings, mean {:.1} °F, hottest sensor {}, report {} ({} task runs, {cached} from the cache)",
            summary.readings,
            summary.mean_fahrenheit,
            summary.hottest,
            summary.report,
            tasks.len()
        );
        let logs = client.logs(run.id).await?;
        if round == 1 {
            println!(
                "  {} log lines captured, e.g. \"{}\"",
                logs.len(),
                logs.first().map_or("", |l| l.message.as_str())
            );
            let retried = tasks.iter().find(|t| t.lifecycle.run_count > 1);
            if let Some(t) = retried {
                println!("  states of {}#{}:", t.key.task_key, t.key.call_index);
                for s in client.task_history(t.id).await? {
                    println!("    {s}");
                }
            }
        }
    }
    node.shutdown().await;
    Ok(())
}
