//! An embedded node: the persistence actor and the engine in the user's binary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_actors::engine::worker::{self, EngineHandle};
use flotilla_actors::engine::{Durability, EngineConfig, FlowFn};
use flotilla_actors::persistence::{self, PersistenceConfig, PersistenceHandle};
use flotilla_runtime::{FlowRunId, NodeId};

use crate::client::Client;
use crate::error::NodeError;
use crate::private::{FlowAdapter, FlowDef};

/// Builds a [`Node`].
#[derive(Default)]
pub struct NodeBuilder {
    data_dir: Option<PathBuf>,
    name: Option<String>,
    flows: Vec<Arc<dyn FlowFn>>,
    slots: Option<usize>,
    durability: Durability,
    limits: BTreeMap<String, usize>,
    result_inline_bytes_max: Option<usize>,
    log_to_stderr: Option<bool>,
    persistence: Option<PersistenceConfig>,
    retention: Option<flotilla_actors::persistence::Retention>,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("data_dir", &self.data_dir)
            .field("name", &self.name)
            .field(
                "flows",
                &self.flows.iter().map(|f| f.name().to_owned()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// Where the node keeps its state (required).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// The node's name (default `local`): a node restarted on the same data directory with the
    /// same name resumes the runs it left.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Registers the built-in flows: `command` (runs a program as a task) and `noop`.
    pub fn builtin_flows(mut self) -> Self {
        self.flows.extend(crate::command::builtin_flows());
        self
    }

    /// Registers a flow (a `#[flow]` function).
    pub fn flow<D: FlowDef>(mut self, _flow: D) -> Self {
        self.flows.push(Arc::new(FlowAdapter::<D>::default()));
        self
    }

    /// How many flow runs run at once (default 64; subflows do not count).
    pub fn slots(mut self, n: usize) -> Self {
        self.slots = Some(n);
        self
    }

    /// What a crash may cost (default [`Durability::Default`]).
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// At most `n` running task runs carry `tag` on this node.
    pub fn concurrency_limit(mut self, tag: impl Into<String>, n: usize) -> Self {
        self.limits.insert(tag.into(), n);
        self
    }

    /// Results up to this size are stored inline (default 64 KiB); larger ones in files.
    pub fn result_inline_bytes_max(mut self, n: usize) -> Self {
        self.result_inline_bytes_max = Some(n);
        self
    }

    /// Whether flow and task logs are also printed to stderr (default yes).
    pub fn log_to_stderr(mut self, yes: bool) -> Self {
        self.log_to_stderr = Some(yes);
        self
    }

    /// How long events, logs and terminal runs are kept (default: 7, 7 and 30 days).
    pub fn retention(mut self, retention: flotilla_actors::persistence::Retention) -> Self {
        self.retention = Some(retention);
        self
    }

    /// Replaces the persistence settings (batching, lag and checkpoint bounds).
    pub fn persistence(mut self, config: PersistenceConfig) -> Self {
        self.persistence = Some(config);
        self
    }

    /// Opens the data directory, starts the node and resumes what a previous run of this node
    /// left unfinished.
    pub async fn start(self) -> Result<Node, NodeError> {
        let dir = self
            .data_dir
            .ok_or_else(|| NodeError::Config("a data directory is required: .data_dir(...)".into()))?;
        let name = self.name.unwrap_or_else(|| "local".to_owned());
        let node: NodeId = name.parse().map_err(|e| NodeError::Config(format!("{e}")))?;
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.flows {
            if !seen.insert(f.name().to_owned()) {
                return Err(NodeError::Config(format!("two flows are named {:?}", f.name())));
            }
        }
        if self.slots == Some(0) {
            return Err(NodeError::Config("slots must be at least 1".into()));
        }
        let mut pconfig = self.persistence.unwrap_or_else(|| PersistenceConfig::new(&dir));
        pconfig.data_dir = dir.clone();
        if let Some(r) = self.retention {
            pconfig.retention = r;
        }
        let (persistence, pjoin) = persistence::start(pconfig).await?;
        let mut config = EngineConfig::new(node, &dir);
        config.durability = self.durability;
        config.tag_limits = self.limits;
        if let Some(n) = self.slots {
            config.slots = n;
        }
        if let Some(n) = self.result_inline_bytes_max {
            config.result_inline_bytes_max = n;
        }
        if let Some(b) = self.log_to_stderr {
            config.log_to_stderr = b;
        }
        let (engine, ejoin) = match worker::start(config, persistence.clone().into(), self.flows).await {
            Ok(x) => x,
            Err(e) => {
                persistence.stop(pjoin).await;
                return Err(e.into());
            }
        };
        // This start of the node (an embedded node's life, as a cluster node's incarnation).
        let incarnation = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0);
        let resumed = match engine.recover(incarnation, false).await {
            Ok(r) => r,
            Err(e) => {
                engine.stop(ejoin).await;
                persistence.stop(pjoin).await;
                return Err(e.into());
            }
        };
        Ok(Node {
            persistence,
            engine,
            joins: Some((pjoin, ejoin)),
            resumed,
        })
    }
}

/// A running node.
pub struct Node {
    persistence: PersistenceHandle,
    engine: EngineHandle,
    joins: Option<(
        ractor::concurrency::JoinHandle<()>,
        ractor::concurrency::JoinHandle<()>,
    )>,
    resumed: Vec<FlowRunId>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A builder.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// A client of this node.
    pub fn client(&self) -> Client {
        Client::new(self.persistence.clone().into(), self.engine.clone())
    }

    /// The runs this node resumed when it started (left unfinished by its previous process).
    pub fn resumed(&self) -> &[FlowRunId] {
        &self.resumed
    }

    /// The store's figures: what is applied, what the store holds, how far it lags.
    pub async fn store_stats(&self) -> Result<flotilla_actors::persistence::StoreStats, crate::Error> {
        Ok(self.persistence.stats().await?)
    }

    /// Stops the node: its flow runs stop where they are (they resume when it starts again),
    /// and the store is checkpointed.
    pub async fn shutdown(mut self) {
        if let Some((pjoin, ejoin)) = self.joins.take() {
            self.engine.stop(ejoin).await;
            // Let written-behind work reach the store before it stops.
            tokio::time::timeout(Duration::from_secs(5), async {
                let _ = self.persistence.stats().await;
            })
            .await
            .ok();
            self.persistence.stop(pjoin).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const WAIT: Duration = Duration::from_secs(20);

    /// Regression (fix 2): a flow-run actor whose claim was refused stayed alive and kept its
    /// slot among the worker's running runs, so with one slot nothing ran again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_claim_gives_its_slot_back() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::builder()
            .data_dir(dir.path())
            .builtin_flows()
            .slots(1)
            .log_to_stderr(false)
            .start()
            .await
            .unwrap();
        let client = node.client();
        let first = tokio::time::timeout(WAIT, client.run_and_wait("noop", serde_json::json!({})))
            .await
            .expect("the first run timed out")
            .unwrap();
        // Once the worker has let the first run go, it is started again: its claim is refused
        // (it is Completed), and its actor must leave the slot.
        let idle = || async {
            while node.engine.load().await.unwrap() != (0, 0) {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(WAIT, idle())
            .await
            .expect("the worker never went idle");
        node.engine.run(first.id).unwrap();
        // The worker takes the start before this question (its mailbox keeps order): the slot
        // must come free again.
        tokio::time::timeout(WAIT, idle())
            .await
            .expect("the actor of a refused claim kept its slot");
        let second = tokio::time::timeout(WAIT, client.run_and_wait("noop", serde_json::json!({})))
            .await
            .expect("a run after a refused claim never got the node's one slot")
            .unwrap();
        assert_eq!(
            second.lifecycle.state.kind,
            flotilla_runtime::StateType::Completed
        );
        node.shutdown().await;
    }
}
