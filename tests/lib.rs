//! Cross-crate integration tests of Flotilla that run in one process (see the `[[test]]`
//! targets of this package). Tests that drive the `flotilla` binary live in `cli/tests/`.

#![allow(clippy::expect_used)] // a test helper may panic on what it sets up

use std::time::Duration;

use flotilla::Node;

/// How long a test waits for anything.
pub const WAIT: Duration = Duration::from_secs(30);

/// An embedded node in `dir`, built further by `build`, started within [`WAIT`].
pub async fn node(
    dir: &std::path::Path,
    build: impl FnOnce(flotilla::NodeBuilder) -> flotilla::NodeBuilder,
) -> Node {
    let b = Node::builder().data_dir(dir).log_to_stderr(false);
    tokio::time::timeout(WAIT, build(b).start())
        .await
        .expect("start timed out")
        .expect("start failed")
}

/// Runs `flow` on `node` and waits for its end (within [`WAIT`]).
pub async fn run(node: &Node, flow: &str, params: serde_json::Value) -> flotilla::FlowRun {
    tokio::time::timeout(WAIT, node.client().run_and_wait(flow, params))
        .await
        .expect("run timed out")
        .expect("run failed")
}
