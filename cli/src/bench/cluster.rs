//! `flotilla bench cluster`: a local 3-node cluster started as child processes in a temporary
//! directory (`FLOTILLA_ADDR` is ignored): latency of an empty flow run from the client's
//! request to its completion, flow runs per second through the cluster, and the time the
//! control node takes to notice a node killed with SIGKILL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use flotilla::{NOOP_FLOW, StateType};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cluster_cmd::LocalCluster;

#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Print one JSON object on one line instead of a table.
    #[arg(long)]
    json: bool,
    /// Sequential flow runs measured for latency.
    #[arg(long, default_value_t = 2000)]
    latency_runs: u32,
    /// Flow runs for the throughput figure.
    #[arg(long, default_value_t = 20_000)]
    throughput_runs: u32,
    /// Clients submitting at once for the throughput figure.
    #[arg(long, default_value_t = 128)]
    concurrency: u32,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    remote_flow_p50_ms: f64,
    remote_flow_p99_ms: f64,
    flows_per_s: f64,
    detect_s: f64,
    false_alarms: u64,
    nodes: u32,
}

/// Three consecutive free UDP ports on 127.0.0.1.
pub(super) fn free_ports() -> anyhow::Result<u16> {
    for _ in 0..200 {
        let base = 20_000 + (rand::random::<u16>() % 30_000);
        let ok = (0..3).all(|i| std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return Ok(base);
        }
    }
    anyhow::bail!("cannot find 3 free consecutive UDP ports")
}

fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let port = free_ports()?;
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    say("starting 3 nodes…");
    let mut cluster = LocalCluster::start(3, dir.path(), port, &["--quiet-runs"]).await?;
    let result = measure(&args, &mut cluster, &say).await;
    cluster.stop().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("cluster of {} nodes on 127.0.0.1 (release build)", report.nodes);
        println!(
            "  remote empty flow run, request → completion: p50 {:.3} ms, p99 {:.3} ms",
            report.remote_flow_p50_ms, report.remote_flow_p99_ms
        );
        println!("  flow runs through the cluster: {:.0}/s", report.flows_per_s);
        println!(
            "  a SIGKILLed node noticed after {:.3} s ({} false alarms under load)",
            report.detect_s, report.false_alarms
        );
    }
    Ok(())
}

async fn measure(
    args: &ClusterArgs,
    cluster: &mut LocalCluster,
    say: &impl Fn(&str),
) -> anyhow::Result<Report> {
    let client = cluster.client.clone();
    // Warm up: connections, placement on every node.
    for _ in 0..100 {
        let id = client.run(NOOP_FLOW, serde_json::Value::Null).await?;
        client.wait(id).await?;
    }

    say(&format!(
        "latency: {} sequential empty flow runs…",
        args.latency_runs
    ));
    let mut hist = Histogram::<u64>::new(3)?;
    let mut by_node: std::collections::BTreeMap<String, Histogram<u64>> = Default::default();
    for _ in 0..args.latency_runs {
        let t = Instant::now();
        let id = client.run(NOOP_FLOW, serde_json::Value::Null).await?;
        let run = client.wait(id).await?;
        let us = t.elapsed().as_micros() as u64;
        hist.record(us)?;
        let node = run
            .owner
            .as_ref()
            .map_or_else(|| "?".to_owned(), |n| n.to_string());
        by_node.entry(node).or_insert(Histogram::new(3)?).record(us)?;
        anyhow::ensure!(
            run.lifecycle.state.kind == StateType::Completed,
            "flow run {id} ended {}",
            run.lifecycle.state
        );
    }
    for (node, h) in &by_node {
        say(&format!(
            "  on {node}: {} runs, p50 {:.3} ms, p99 {:.3} ms",
            h.len(),
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99))
        ));
    }

    say(&format!(
        "throughput: {} flow runs from {} clients…",
        args.throughput_runs, args.concurrency
    ));
    // Watch membership while the cores are loaded: any member marked unreachable is a false alarm.
    let stop = Arc::new(AtomicBool::new(false));
    let false_alarms = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (client, stop, alarms) = (client.clone(), stop.clone(), false_alarms.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = client.cluster_status().await {
                    alarms.fetch_add(
                        s.nodes.iter().filter(|m| !m.reachable).count() as u64,
                        Ordering::Relaxed,
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let left = Arc::new(AtomicU64::new(u64::from(args.throughput_runs)));
    let t = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (client, left) = (client.clone(), left.clone());
        workers.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let id = client.run(NOOP_FLOW, serde_json::Value::Null).await?;
                let run = client.wait(id).await?;
                anyhow::ensure!(
                    run.lifecycle.state.kind == StateType::Completed,
                    "flow run {id} ended {}",
                    run.lifecycle.state
                );
            }
            anyhow::Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    let flows_per_s = f64::from(args.throughput_runs) / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    watcher.await?;

    say("detection: killing n3…");
    cluster.kill("n3").await?;
    let t = Instant::now();
    let deadline = t + Duration::from_secs(30);
    let detect = loop {
        let s = client.cluster_status().await?;
        if s.nodes.iter().any(|m| m.name.as_str() == "n3" && !m.reachable) {
            break t.elapsed();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the killed node was not noticed within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    Ok(Report {
        scenario: "cluster",
        remote_flow_p50_ms: ms(hist.value_at_quantile(0.5)),
        remote_flow_p99_ms: ms(hist.value_at_quantile(0.99)),
        flows_per_s: flows_per_s.round(),
        detect_s: (detect.as_secs_f64() * 1000.0).round() / 1000.0,
        false_alarms: false_alarms.load(Ordering::Relaxed),
        nodes: 3,
    })
}
