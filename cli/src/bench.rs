//! `flotilla bench …`: benchmarks of this build on this machine.

mod fsync;
mod persistence;
mod tasks;

use clap::Subcommand;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Durable commands per second and acknowledgement latency of the persistence actor.
    Persistence(persistence::PersistenceArgs),
    /// Task runs and flow runs per second, and the engine's overhead for each.
    Tasks(tasks::TasksArgs),
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Persistence(args) => persistence::run(args).await,
        BenchCmd::Tasks(args) => tasks::run(args).await,
    }
}
