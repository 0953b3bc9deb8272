//! `flotilla`: run nodes, administer clusters, benchmark.

/// jemalloc: fast for the many small, short-lived allocations of a busy node, and it keeps
/// freed pages for reuse instead of returning them to the system at once.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod automation_cmd;
mod bench;
mod cluster_cmd;
mod config;
mod demo;
mod deployment_cmd;
mod events_cmd;
mod flow_run;
mod node_cmd;
mod output;
mod queue_cmd;
mod schedule_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Flotilla: workflow orchestration as a cluster of supervised actors.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a demonstration on an embedded store in a temporary directory, then exit.
    Demo(demo::DemoArgs),
    /// Run a cluster node.
    #[command(subcommand)]
    Node(node_cmd::NodeCmd),
    /// Cluster certificates, membership, and a local cluster in one command.
    #[command(subcommand)]
    Cluster(cluster_cmd::ClusterCmd),
    /// Create, list, inspect, follow, cancel and retry flow runs on a cluster.
    #[command(subcommand, name = "flow-run")]
    FlowRun(flow_run::FlowRunCmd),
    /// Deployments: a flow with parameters and schedules.
    #[command(subcommand)]
    Deployment(deployment_cmd::DeploymentCmd),
    /// Create or update the deployments of a TOML file.
    Deploy(deployment_cmd::DeployArgs),
    /// Schedules: preview a cron expression's next fire times.
    #[command(subcommand)]
    Schedule(schedule_cmd::ScheduleCmd),
    /// Work queues: priorities, limits, pause and resume.
    #[command(subcommand, name = "work-queue")]
    WorkQueue(queue_cmd::WorkQueueCmd),
    /// Cluster-wide limits on running task runs by tag.
    #[command(subcommand, name = "concurrency-limit")]
    ConcurrencyLimit(queue_cmd::LimitCmd),
    /// The cluster's events: state changes, deployments, queues and limits.
    #[command(subcommand)]
    Events(events_cmd::EventsCmd),
    /// Automations: triggers over the event stream, and actions.
    #[command(subcommand)]
    Automation(automation_cmd::AutomationCmd),
    /// Blocks: typed configuration and credentials (secret fields sealed).
    #[command(subcommand)]
    Block(automation_cmd::BlockCmd),
    /// Measure Flotilla on this machine (release builds).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = std::env::args().any(|a| a == "--json");
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Cmd::Demo(args) => demo::run(args).await.map(|()| true),
            Cmd::Node(cmd) => node_cmd::run(cmd).await.map(|()| true),
            Cmd::Cluster(cmd) => cluster_cmd::run(cmd).await.map(|()| true),
            Cmd::FlowRun(cmd) => flow_run::run(cmd).await,
            Cmd::Deployment(cmd) => deployment_cmd::run(cmd).await,
            Cmd::Deploy(args) => deployment_cmd::deploy(args).await.map(|()| true),
            Cmd::Schedule(cmd) => schedule_cmd::run(cmd).map(|()| true),
            Cmd::WorkQueue(cmd) => queue_cmd::work_queue(cmd).await,
            Cmd::ConcurrencyLimit(cmd) => queue_cmd::limit(cmd).await,
            Cmd::Events(cmd) => events_cmd::events(cmd).await,
            Cmd::Automation(cmd) => automation_cmd::automation(cmd).await,
            Cmd::Block(cmd) => automation_cmd::block(cmd).await,
            Cmd::Bench(cmd) => bench::run(cmd).await.map(|()| true),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) if json => {
            // Scripts read one JSON object on stdout, the same shape for every failure.
            let out = output::ErrorOut {
                error: output::ErrorBody {
                    code: config::error_code(&e),
                    message: format!("{e:#}"),
                },
            };
            println!("{}", serde_json::to_string(&out).unwrap_or_default());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
