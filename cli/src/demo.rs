//! `flotilla demo`: a short, real run on an embedded store in a temporary directory.

use clap::Args;

#[derive(Debug, Args)]
pub struct DemoArgs {}

pub async fn run(_args: DemoArgs) -> anyhow::Result<()> {
    Ok(())
}
