//! `flotilla bench schedule`: a local 3-node cluster per case (child processes, a temporary
//! directory), the scheduler creating 3 runs ahead; deployments of the empty `noop` flow.
//! `spread`: N deployments every 10 s, anchors spread evenly (N/10 runs/s); `aligned`: 1,000
//! deployments on `*/10 * * * * *` (a burst of 1,000 runs every 10 s). For each: the lateness of
//! each run (its Running time minus its scheduled time), the runs started, and the scheduler's
//! CPU time per 1,000 deployments over the measured window.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use flotilla::{FlowRun, NOOP_FLOW, RunFilter};
use flotilla_runtime::{DeploymentSpec, Schedule, ScheduleKind, Timestamp};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cluster_cmd::LocalCluster;

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Print one JSON object on one line instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds measured per case.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Only these cases: spread-1000, spread-10000, aligned-1000.
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
}

#[derive(Debug, Serialize)]
struct CaseResult {
    mode: &'static str,
    deployments: u32,
    runs: u64,
    missed: u64,
    lateness_p50_ms: f64,
    lateness_p99_ms: f64,
    lateness_max_ms: f64,
    scheduler_cpu_ms_per_1000: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    results: Vec<CaseResult>,
}

fn free_ports() -> anyhow::Result<u16> {
    for _ in 0..200 {
        let base = 20_000 + (rand::random::<u16>() % 30_000);
        if (0..3).all(|i| std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok()) {
            return Ok(base);
        }
    }
    anyhow::bail!("cannot find 3 free consecutive UDP ports")
}

fn ms(us: u64) -> f64 {
    (us as f64).round() / 1000.0
}

pub async fn run(args: ScheduleArgs) -> anyhow::Result<()> {
    let all = [("spread", 1000u32), ("spread", 10_000), ("aligned", 1000)];
    let mut results = Vec::new();
    for (mode, n) in all {
        let name = format!("{mode}-{n}");
        if !args.cases.is_empty() && !args.cases.contains(&name) {
            continue;
        }
        if !args.json {
            eprintln!("{name}: starting 3 nodes…");
        }
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let port = free_ports()?;
        let extra = [
            "--quiet-runs",
            "--schedule-ahead-runs",
            "3",
            "--schedule-ahead",
            "0s",
        ];
        let cluster = LocalCluster::start(3, dir.path(), port, &extra).await?;
        let r = case(&args, &cluster.client, mode, n).await;
        cluster.stop().await;
        let r = r?;
        if !args.json {
            eprintln!(
                "{name}: {} runs, lateness p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, {} missed, scheduler CPU {:.1} ms per 1,000 deployments over {} s",
                r.runs,
                r.lateness_p50_ms,
                r.lateness_p99_ms,
                r.lateness_max_ms,
                r.missed,
                r.scheduler_cpu_ms_per_1000,
                args.seconds
            );
        }
        results.push(r);
    }
    let report = Report {
        scenario: "schedule",
        results,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

async fn case(
    args: &ScheduleArgs,
    client: &flotilla::Client,
    mode: &'static str,
    n: u32,
) -> anyhow::Result<CaseResult> {
    let period = Duration::from_secs(10);
    let base = Timestamp::from(chrono::Utc::now());
    let specs: Vec<DeploymentSpec> = (0..n)
        .map(|i| {
            let kind = match mode {
                "aligned" => ScheduleKind::Cron {
                    expression: "*/10 * * * * *".into(),
                    timezone: None,
                },
                _ => ScheduleKind::Interval {
                    every: period,
                    anchor: base + period.mul_f64(f64::from(i) / f64::from(n)),
                },
            };
            DeploymentSpec {
                name: format!("bench-{mode}-{i:05}"),
                flow_name: NOOP_FLOW.into(),
                parameters: serde_json::json!({}),
                schedules: vec![Schedule {
                    kind,
                    active: true,
                    parameters: serde_json::Value::Null,
                    catchup: false,
                }],
                work_queue: None,
                tags: vec![],
                concurrency_limit: None,
                collision: Default::default(),
                paused: false,
                result_storage: None,
            }
        })
        .collect();
    // Create them from 32 clients at once.
    let specs = Arc::new(std::sync::Mutex::new(specs));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (client, specs) = (client.clone(), specs.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let next = specs.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pop();
                let Some(spec) = next else { return anyhow::Ok(()) };
                client.put_deployment(spec).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    // Let every deployment get its runs ahead, then measure.
    tokio::time::sleep(period + Duration::from_secs(2)).await;
    let before = client.scheduler_stats().await?;
    let from = Timestamp::from(chrono::Utc::now());
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let to = Timestamp::from(chrono::Utc::now());
    let after = client.scheduler_stats().await?;
    let busy = started.elapsed();
    // Give the last runs of the window time to start.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut hist = Histogram::<u64>::new(3)?;
    let mut missed = 0u64;
    let mut cursor = None;
    loop {
        let page: Vec<FlowRun> = client.flow_runs(RunFilter::All, cursor, 1000).await?;
        let Some(last) = page.last() else { break };
        cursor = Some(last.id);
        for r in &page {
            if r.deployment_id.is_none() || r.expected_start_time < from || r.expected_start_time >= to {
                continue;
            }
            match r.lifecycle.start_time {
                Some(s) => {
                    let late = s.as_micros() - r.expected_start_time.as_micros();
                    hist.record(late.max(0) as u64)?;
                }
                None => missed += 1,
            }
        }
    }
    let cpu_ms = (after.busy_us - before.busy_us) as f64 / 1000.0;
    let _ = busy;
    Ok(CaseResult {
        mode,
        deployments: n,
        runs: hist.len(),
        missed,
        lateness_p50_ms: ms(hist.value_at_quantile(0.5)),
        lateness_p99_ms: ms(hist.value_at_quantile(0.99)),
        lateness_max_ms: ms(hist.max()),
        scheduler_cpu_ms_per_1000: (cpu_ms / (f64::from(n) / 1000.0) * 10.0).round() / 10.0,
    })
}
