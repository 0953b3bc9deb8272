//! `flotilla bench …`: benchmarks of this build on this machine.

mod fsync;
mod persistence;

use clap::Subcommand;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Durable commands per second and acknowledgement latency of the persistence actor.
    Persistence(persistence::PersistenceArgs),
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Persistence(args) => persistence::run(args).await,
    }
}
