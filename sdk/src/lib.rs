//! # flotilla
//!
//! The Rust SDK of Flotilla: write flows and tasks as plain async functions, run them on a node
//! embedded in your binary, and drive them with a [`Client`].
//!
//! ```no_run
//! use flotilla::{flow, task, Node};
//!
//! #[task(retries = 3, retry_delay = "1s")]
//! async fn fetch(n: u32) -> Result<u32, std::io::Error> {
//!     Ok(n * 10)
//! }
//!
//! #[flow]
//! async fn pipeline(count: u32) -> Result<u32, flotilla::TaskError> {
//!     let handles = fetch.map(0..count);          // many task runs at once
//!     let mut total = 0;
//!     for h in handles {
//!         total += h.await?;
//!     }
//!     Ok(total + fetch(1).await?)                 // one task run, awaited
//! }
//!
//! # async fn main_() -> Result<(), Box<dyn std::error::Error>> {
//! let node = Node::builder().data_dir("/tmp/flotilla").flow(pipeline).start().await?;
//! let run = node.client().run_and_wait("pipeline", serde_json::json!({"count": 4})).await?;
//! println!("{}", run.lifecycle.state);
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! - `#[task(name = "…", retries = 3, retry_delay = "2s" | retry_delays = ["1s", "10s"],
//!   backoff = exponential(factor = 2, max = "1m"), jitter = 0.5, timeout = "30s",
//!   cache_key = path::to_fn, cache_expiration = "1h", refresh_cache = true, tags = ["db"])]`
//!   on an `async fn` whose arguments are `Serialize + DeserializeOwned` and which returns
//!   `Result<T, E>` (`E: Display`). Inside a flow, calling it runs a task run; `.submit(..)`
//!   starts one and returns a [`TaskHandle`]; `.map(items)` starts one per item;
//!   `.wait_for([handle.completion()])` starts one after others finished. Outside a flow,
//!   calling it runs the body directly.
//! - `#[flow(name = "…", retries = 1, retry_delay = "10s", timeout = "1h", version = "…",
//!   resume = true)]` on an `async fn`: a flow, registered on a node with
//!   `NodeBuilder::flow`. Called from another flow, it runs as a subflow.
//!
//! Every task call is identified by its flow run, its task's name and its call index (the count
//! of earlier calls of that task in the run, fixed when it is called or submitted). When a flow
//! run runs again — a flow retry, a manual retry, or a resume after its node crashed — calls
//! whose task run completed return their recorded result instead of running again.

mod client;
mod command;
mod context;
mod error;
mod handle;
mod node;
#[doc(hidden)]
pub mod __private {
    //! What the macros expand to; not a public API.
    pub use crate::private::*;
}
mod private;
mod remote;

pub use client::{Client, RunEvents};
pub use command::{COMMAND_FLOW, CommandOutput, NOOP_FLOW, builtin_flows, command_flow};
pub use context::{FlowContext, context};
pub use error::{Error, NodeError, TaskError};
pub use flotilla_actors::engine::Durability;
pub use flotilla_actors::persistence::{Retention, RunFilter};
pub use flotilla_cluster::wire::{
    ClusterStatus, LimitChange, MemberStatus, QueueChange, QueueInfo, ReplicationStatus, VoterChange,
};
pub use flotilla_macros::{flow, task};
pub use flotilla_runtime::block::{S3Block, SecretBlock, WebhookBlock};
pub use flotilla_runtime::{
    Event, FlowRun, FlowRunId, LogLevel, LogLine, QueueEdit, State, StateName, StateType, TaskRun, TaskRunId,
    TaskRunKey,
};
pub use handle::{Completion, FlowFuture, TaskFuture, TaskHandle};
pub use node::{Node, NodeBuilder};

/// The domain model, for advanced use.
pub use flotilla_runtime as runtime;
