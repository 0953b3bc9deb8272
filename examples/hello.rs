//! A flow with two tasks, on a node embedded in this program.
//!
//! `cargo run --example hello`

use flotilla::{Node, flow, task};

#[task]
async fn greet(name: String) -> Result<String, std::io::Error> {
    tracing::info!("greeting {name}");
    Ok(format!("Hello, {name}!"))
}

#[task]
async fn shout(text: String) -> Result<String, std::io::Error> {
    Ok(text.to_uppercase())
}

#[flow]
async fn hello(name: String) -> Result<String, flotilla::TaskError> {
    let greeting = greet(name).await?;
    shout(greeting).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::builder().data_dir(dir.path()).flow(hello).start().await?;
    let client = node.client();
    let run = client
        .run_and_wait("hello", serde_json::json!({"name": "Flotilla"}))
        .await?;
    let result: String = client.result(run.id).await?;
    println!("flow run {} {}: {result}", run.id, run.lifecycle.state);
    for t in client.task_runs(run.id).await? {
        println!("  task {:<6} {}", t.key.task_key, t.lifecycle.state);
    }
    for line in client.logs(run.id).await? {
        println!("  log  {} {}", line.level, line.message);
    }
    node.shutdown().await;
    Ok(())
}
