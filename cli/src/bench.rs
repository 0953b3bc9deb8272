//! `flotilla bench …`: benchmarks of this build on this machine.

mod automations;
mod cluster;
mod failover;
mod fsync;
mod persistence;
mod raft;
mod schedule;
mod tasks;

use clap::Subcommand;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Durable commands per second and acknowledgement latency of the persistence actor.
    Persistence(persistence::PersistenceArgs),
    /// Task runs and flow runs per second, and the engine's overhead for each.
    Tasks(tasks::TasksArgs),
    /// A local 3-node cluster: remote flow run latency, flow runs/s, failure detection time.
    Cluster(cluster::ClusterArgs),
    /// Losing a worker: false suspicions with both cores busy, time to notice a SIGKILLed
    /// worker and to resume its pipeline on another.
    Failover(failover::FailoverArgs),
    /// Deployments on schedules: how late runs start, and the scheduler's cost.
    Schedule(schedule::ScheduleArgs),
    /// Automations: 1,000 of them over a sustained stream of events; events/s, trigger to
    /// action latency, firings lost or repeated.
    Automations(automations::AutomationsArgs),
    /// Replication alone: voters in one process over QUIC, commands committed per second.
    Raft(raft::RaftArgs),
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Persistence(args) => persistence::run(args).await,
        BenchCmd::Tasks(args) => tasks::run(args).await,
        BenchCmd::Cluster(args) => cluster::run(args).await,
        BenchCmd::Schedule(args) => schedule::run(args).await,
        BenchCmd::Failover(args) => failover::run(args).await,
        BenchCmd::Raft(args) => raft::run(args).await,
        BenchCmd::Automations(args) => automations::run(args).await,
    }
}
