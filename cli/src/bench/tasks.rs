//! `flotilla bench tasks`: the engine's overhead per task run and per flow run, each case on a
//! fresh embedded node in a temporary directory, in both durability modes.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use flotilla::{Durability, Node, Retention, RunFilter, StateType, flow, task};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::fsync::fdatasync_p50_ms;

#[derive(Debug, Args)]
pub struct TasksArgs {
    /// Print one JSON object on one line instead of a table.
    #[arg(long)]
    json: bool,
    /// Scale every case's size by this factor (1 = the standard sizes).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Only these cases (sequential, concurrent, retry, empty_flows, empty_flows_sequential,
    /// memory, memory_kept).
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Only this durability (default, strict).
    #[arg(long)]
    durability: Option<String>,
}

#[derive(Debug, Serialize)]
struct CaseResult {
    case: &'static str,
    durability: &'static str,
    count: u64,
    per_s: f64,
    overhead_us: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// The memory case: the resident set after the first flows, in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_mib_first: Option<f64>,
    /// ...and after all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_mib_last: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    fdatasync_p50_ms: f64,
    results: Vec<CaseResult>,
}

#[task]
async fn noop(i: u32) -> Result<u32, String> {
    Ok(i)
}

fn first_attempts() -> &'static Mutex<HashSet<u32>> {
    static SEEN: OnceLock<Mutex<HashSet<u32>>> = OnceLock::new();
    SEEN.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Fails the first time it is called with a given number, succeeds after.
#[task(retries = 1)]
async fn fails_once(i: u32) -> Result<u32, String> {
    let first = first_attempts().lock().map(|mut s| s.insert(i)).unwrap_or(false);
    if first {
        Err(format!("{i}: first attempt fails"))
    } else {
        Ok(i)
    }
}

/// Calls `noop` `n` times one after another; returns each call's latency in microseconds.
#[flow]
async fn bench_sequential(n: u32) -> Result<(u64, u64), flotilla::TaskError> {
    let mut hist = Histogram::<u64>::new(3).map_err(|e| flotilla::TaskError::Aborted(e.to_string()))?;
    for i in 0..n {
        let t = Instant::now();
        noop(i).await?;
        let _ = hist.record(t.elapsed().as_micros() as u64);
    }
    Ok((hist.value_at_quantile(0.5), hist.value_at_quantile(0.99)))
}

#[flow]
async fn bench_concurrent(n: u32) -> Result<u64, flotilla::TaskError> {
    let mut sum = 0;
    for h in noop.map(0..n) {
        sum += u64::from(h.await?);
    }
    Ok(sum)
}

#[flow]
async fn bench_retry(n: u32) -> Result<u64, flotilla::TaskError> {
    let mut sum = 0;
    for h in fails_once.map(0..n) {
        sum += u64::from(h.await?);
    }
    Ok(sum)
}

#[flow]
async fn bench_empty() -> Result<(), flotilla::TaskError> {
    Ok(())
}

async fn node(
    dir: &std::path::Path,
    durability: Durability,
    retention: Option<Retention>,
) -> anyhow::Result<Node> {
    let builder = match retention {
        Some(r) => Node::builder().retention(r),
        None => Node::builder(),
    };
    Ok(builder
        .data_dir(dir)
        .durability(durability)
        .log_to_stderr(false)
        .slots(256)
        .flow(bench_sequential)
        .flow(bench_concurrent)
        .flow(bench_retry)
        .flow(bench_empty)
        .start()
        .await?)
}

fn scaled(n: u64, scale: f64) -> u64 {
    ((n as f64 * scale).round() as u64).max(1)
}

async fn one_flow(
    client: &flotilla::Client,
    flow: &str,
    n: u64,
) -> anyhow::Result<(Duration, flotilla::FlowRunId)> {
    let started = Instant::now();
    let run = client.run_and_wait(flow, serde_json::json!({ "n": n })).await?;
    if run.lifecycle.state.kind != StateType::Completed {
        bail!("{flow} ended {}", run.lifecycle.state);
    }
    Ok((started.elapsed(), run.id))
}

async fn case(name: &'static str, durability: Durability, scale: f64) -> anyhow::Result<CaseResult> {
    let dir = tempfile::Builder::new().prefix("flotilla-bench-").tempdir()?;
    // The memory case keeps runs for a second, so that what stays in memory is live work.
    let retention = (name == "memory").then_some(Retention {
        events: Duration::from_secs(1),
        logs: Duration::from_secs(1),
        runs: Duration::from_secs(1),
    });
    let node = node(dir.path(), durability, retention).await?;
    let client = node.client();
    let dname = match durability {
        Durability::Default => "default",
        Durability::Strict => "strict",
    };
    let result = match name {
        "sequential" | "concurrent" | "retry" => {
            let (flow, n) = match name {
                "sequential" => ("bench_sequential", scaled(10_000, scale)),
                "concurrent" => ("bench_concurrent", scaled(10_000, scale)),
                _ => ("bench_retry", scaled(1_000, scale)),
            };
            if name == "retry" {
                first_attempts().lock().map(|mut s| s.clear()).ok();
            }
            let (elapsed, id) = one_flow(&client, flow, n).await?;
            let (p50, p99) = if name == "sequential" {
                let (a, b): (u64, u64) = client.result(id).await?;
                (a as f64 / 1e3, b as f64 / 1e3)
            } else {
                (0.0, 0.0)
            };
            CaseResult {
                case: name,
                durability: dname,
                count: n,
                per_s: n as f64 / elapsed.as_secs_f64(),
                overhead_us: elapsed.as_secs_f64() * 1e6 / n as f64,
                p50_ms: p50,
                p99_ms: p99,
                rss_mib_first: None,
                rss_mib_last: None,
            }
        }
        "empty_flows" | "empty_flows_sequential" => {
            let (n, in_flight) = if name == "empty_flows" {
                (scaled(10_000, scale), 64)
            } else {
                (scaled(1_000, scale), 1)
            };
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..in_flight {
                let client = client.clone();
                let share = n / in_flight + u64::from(w < n % in_flight);
                tasks.spawn(async move {
                    let mut hist = Histogram::<u64>::new(3)?;
                    for _ in 0..share {
                        let t = Instant::now();
                        let run = client.run_and_wait("bench_empty", serde_json::json!({})).await?;
                        if run.lifecycle.state.kind != StateType::Completed {
                            bail!("an empty flow ended {}", run.lifecycle.state);
                        }
                        hist.record(t.elapsed().as_micros() as u64)?;
                    }
                    anyhow::Ok(hist)
                });
            }
            let mut hist = Histogram::<u64>::new(3)?;
            while let Some(h) = tasks.join_next().await {
                hist.add(h??)?;
            }
            let elapsed = started.elapsed();
            CaseResult {
                case: name,
                durability: dname,
                count: n,
                per_s: n as f64 / elapsed.as_secs_f64(),
                overhead_us: elapsed.as_secs_f64() * 1e6 / n as f64 * in_flight as f64,
                p50_ms: hist.value_at_quantile(0.5) as f64 / 1e3,
                p99_ms: hist.value_at_quantile(0.99) as f64 / 1e3,
                rss_mib_first: None,
                rss_mib_last: None,
            }
        }
        "memory" | "memory_kept" => {
            let (first, all) = (scaled(10, scale), scaled(1_000, scale));
            let tasks = 1_000;
            let pruned = name == "memory";
            let started = Instant::now();
            flows_of(&client, first, tasks).await?;
            let rss_first = settled_rss(&node, &client, pruned).await?;
            flows_of(&client, all - first, tasks).await?;
            let rss_last = settled_rss(&node, &client, pruned).await?;
            let elapsed = started.elapsed();
            CaseResult {
                case: name,
                durability: dname,
                count: all * tasks,
                per_s: (all * tasks) as f64 / elapsed.as_secs_f64(),
                overhead_us: elapsed.as_secs_f64() * 1e6 / (all * tasks) as f64,
                p50_ms: 0.0,
                p99_ms: 0.0,
                rss_mib_first: Some(rss_first),
                rss_mib_last: Some(rss_last),
            }
        }
        other => bail!("unknown case {other:?}"),
    };
    node.shutdown().await;
    Ok(result)
}

/// Runs `count` flows of `tasks` concurrent tasks each, four at a time.
async fn flows_of(client: &flotilla::Client, count: u64, tasks: u64) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..4u64 {
        let client = client.clone();
        let share = count / 4 + u64::from(w < count % 4);
        set.spawn(async move {
            for _ in 0..share {
                one_flow(&client, "bench_concurrent", tasks).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// The resident set in MiB once every finished run is pruned (when `pruned`), the store has
/// caught up with the log and the allocator has given back what was freed (the resident set
/// stopped falling), so that both measures are taken with the node at rest (at most 30 s).
async fn settled_rss(node: &flotilla::Node, client: &flotilla::Client, pruned: bool) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pruned && !client.flow_runs(RunFilter::All, None, 10).await?.is_empty() {
        if Instant::now() > deadline {
            bail!("finished runs were not pruned within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let stats = node.store_stats().await?;
        if stats.lag_bytes == 0 && stats.stored == stats.applied {
            break;
        }
        if Instant::now() > deadline {
            bail!("the store did not catch up with the log within 30 s: {stats:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Freed memory goes back to the system over about a second (jemalloc's decay): at most
    // 10 s more, until a half-second passes with less than 1 MiB given back.
    let mut rss = rss_mib()?;
    let settle = Instant::now() + Duration::from_secs(10);
    while Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_mib()?;
        let fell = rss - now;
        rss = now;
        if fell < 1.0 {
            break;
        }
    }
    Ok(rss)
}

/// This process's resident set, in MiB.
fn rss_mib() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kib / 1024.0)
}

pub async fn run(args: TasksArgs) -> anyhow::Result<()> {
    if args.scale.is_nan() || args.scale <= 0.0 {
        bail!("--scale must be positive");
    }
    let all = [
        "sequential",
        "concurrent",
        "retry",
        "empty_flows",
        "empty_flows_sequential",
        "memory",
        "memory_kept",
    ];
    for c in &args.cases {
        if !all.contains(&c.as_str()) {
            bail!("unknown case {c:?}; the cases are {}", all.join(", "));
        }
    }
    let modes: Vec<Durability> = match args.durability.as_deref() {
        None => vec![Durability::Default, Durability::Strict],
        Some("default") => vec![Durability::Default],
        Some("strict") => vec![Durability::Strict],
        Some(other) => bail!("unknown durability {other:?}; use default or strict"),
    };
    let probe = tempfile::Builder::new().prefix("flotilla-bench-").tempdir()?;
    let fsync = fdatasync_p50_ms(probe.path(), 200).context("measuring fdatasync")?;
    eprintln!("fdatasync p50: {fsync:.3} ms");
    let mut results = Vec::new();
    for mode in modes {
        for name in all {
            if !args.cases.is_empty() && !args.cases.iter().any(|c| c == name) {
                continue;
            }
            // Memory does not depend on the durability: measured once.
            if name.starts_with("memory") && matches!(mode, Durability::Strict) && args.durability.is_none() {
                continue;
            }
            let r = case(name, mode, args.scale)
                .await
                .with_context(|| format!("case {name}"))?;
            eprintln!(
                "{:<24} {:<8} {:>8} runs  {:>10.0}/s  {:>8.1} µs each  p50 {:.3} ms  p99 {:.3} ms",
                r.case, r.durability, r.count, r.per_s, r.overhead_us, r.p50_ms, r.p99_ms
            );
            if let (Some(a), Some(b)) = (r.rss_mib_first, r.rss_mib_last) {
                eprintln!(
                    "{:<24} rss {a:.1} MiB after the first flows, {b:.1} MiB after all",
                    ""
                );
            }
            results.push(r);
        }
    }
    let report = Report {
        scenario: "tasks",
        fdatasync_p50_ms: fsync,
        results,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "tasks: engine overhead (fdatasync p50 {:.3} ms)",
            report.fdatasync_p50_ms
        );
        println!(
            "{:<24} {:<9} {:>8} {:>12} {:>12} {:>9} {:>9}",
            "case", "durability", "count", "per s", "µs each", "p50 ms", "p99 ms"
        );
        for r in &report.results {
            println!(
                "{:<24} {:<9} {:>8} {:>12.0} {:>12.1} {:>9.3} {:>9.3}",
                r.case, r.durability, r.count, r.per_s, r.overhead_us, r.p50_ms, r.p99_ms
            );
        }
    }
    Ok(())
}
