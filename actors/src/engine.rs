//! The execution engine of a node: a `Worker` actor that runs flow runs, one `FlowRun` actor per
//! flow run, supervising one `TaskRun` actor per task attempt. Retries are supervision: a task
//! that fails or panics reports to its flow run, which asks the runtime's retry policy for the
//! next delay and starts it again, or fails it for good.
//!
//! Flows and tasks reach the engine as erased bodies ([`FlowFn`], [`TaskBody`]); the SDK's
//! macros produce them from plain async functions.

pub mod env;
pub mod flow_run;
pub mod limits;
pub mod logs;
pub mod object_results;
pub mod results;
pub mod task_run;
pub mod worker;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_runtime::control::FlowDefaults;
use flotilla_runtime::{FlowRunId, NodeId, RetryPolicy, TaskRunId};

pub use env::{FlowEnv, TaskCall};
pub use worker::{EngineHandle, RunOutcome, Worker, WorkerMsg};

/// A boxed future that can move between threads.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a crash may cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Task transitions are written behind (group commit, flushed within milliseconds; the
    /// transitions of one task run inside one flush window are coalesced into one record).
    /// Events are published only once durable, and a flow run's terminal state is acknowledged
    /// only after every earlier write of that run is durable. After a crash, at most the task
    /// completions of the last flush window run again.
    #[default]
    Default,
    /// Each task run's final state is durable before the flow goes on (one `fdatasync` per
    /// task, its Running record riding in the same batch). After a crash, no completed task
    /// runs again.
    Strict,
}

/// How a node's engine runs flows.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This node's name.
    pub node: NodeId,
    /// How many flow runs may run at once (subflows do not count).
    pub slots: usize,
    /// What a crash may cost.
    pub durability: Durability,
    /// Results up to this size are stored inline; larger ones go to `results_dir`.
    pub result_inline_bytes_max: usize,
    /// Where large results go.
    pub results_dir: PathBuf,
    /// At most this many task attempts of one flow run are under way at once; more wait
    /// (Pending) for a slot. Bounds the memory and the actors a flow that submits many
    /// tasks at once can take.
    pub task_attempts_in_flight_max: usize,
    /// At most this many running task runs carry each tag.
    pub tag_limits: BTreeMap<String, usize>,
    /// Log lines of a run are written in batches of at most this many...
    pub log_batch_lines_max: usize,
    /// ...or after this long, whichever comes first.
    pub log_flush_interval: Duration,
    /// Whether log lines from flows and tasks are also printed to stderr.
    pub log_to_stderr: bool,
    /// Large results are also shipped with this (a worker: to the control node).
    pub result_shipper: Option<Arc<dyn results::ResultShipper>>,
    /// The object stores of `s3` blocks, for runs whose flow or deployment names one.
    pub result_blocks: Option<Arc<dyn results::BlockStores>>,
    /// Cluster-wide tag limits (a node of a cluster: the control node's).
    pub cluster_slots: Option<Arc<dyn limits::SlotService>>,
}

impl EngineConfig {
    /// Defaults for a node keeping its data in `data_dir`.
    pub fn new(node: NodeId, data_dir: &std::path::Path) -> Self {
        EngineConfig {
            node,
            slots: 64,
            durability: Durability::Default,
            result_inline_bytes_max: 64 * 1024,
            results_dir: data_dir.join("results"),
            tag_limits: BTreeMap::new(),
            task_attempts_in_flight_max: 256,
            log_batch_lines_max: 1000,
            log_flush_interval: Duration::from_millis(50),
            log_to_stderr: true,
            result_shipper: None,
            result_blocks: None,
            cluster_slots: None,
        }
    }
}

/// How a flow runs. By default a run whose node died resumes, as with `#[flow]`.
#[derive(Clone, Debug)]
pub struct FlowOptions {
    /// Flow-level retries: the flow function runs again as a resume.
    pub retry: RetryPolicy,
    /// The longest a run may take; past it, it fails named TimedOut.
    pub timeout: Option<Duration>,
    /// The flow's version, recorded on its runs' events.
    pub version: Option<String>,
    /// Whether a run whose node died is resumed automatically.
    pub resume: bool,
    /// Whether a boolean `resume` parameter of a run decides that for the run (the built-in
    /// `command` flow's `"resume": false`).
    pub resume_param: bool,
    /// Where its large results go: `s3/NAME`, an `s3` block's object store (a deployment's
    /// choice wins); the node's result store when absent.
    pub result_storage: Option<String>,
}

impl Default for FlowOptions {
    fn default() -> Self {
        FlowOptions {
            retry: RetryPolicy::default(),
            timeout: None,
            version: None,
            resume: true,
            resume_param: false,
            result_storage: None,
        }
    }
}

impl FlowOptions {
    /// What runs of the flow made on another node take from it.
    pub fn defaults(&self) -> FlowDefaults {
        FlowDefaults {
            retry: self.retry.clone(),
            resume: self.resume,
            resume_param: self.resume_param,
        }
    }
}

/// The options of the flows a node knows, by name: what a run created on the control node
/// (by a client, a deployment or the scheduler) takes from its flow. Its own flows first; those
/// only other nodes run are learned from their heartbeats.
#[derive(Clone, Debug, Default)]
pub struct FlowCatalog {
    own: std::sync::Arc<std::collections::HashMap<String, FlowDefaults>>,
    learned: std::sync::Arc<std::sync::RwLock<std::collections::HashMap<String, FlowDefaults>>>,
}

impl FlowCatalog {
    /// The catalog of these flows.
    pub fn of(flows: &[std::sync::Arc<dyn FlowFn>]) -> Self {
        FlowCatalog {
            own: std::sync::Arc::new(
                flows
                    .iter()
                    .map(|f| (f.name().to_owned(), f.options().defaults()))
                    .collect(),
            ),
            learned: Default::default(),
        }
    }

    /// Learns the options of a flow another node runs (its own flows are not overridden).
    pub fn learn(&self, flow: &str, defaults: &FlowDefaults) {
        if self.own.contains_key(flow) {
            return;
        }
        let mut learned = self.learned.write().unwrap_or_else(|e| e.into_inner());
        if learned.get(flow) != Some(defaults) {
            learned.insert(flow.to_owned(), defaults.clone());
        }
    }

    /// A new run of `flow` with the flow's retry policy and resume option (the defaults and no
    /// automatic resume for a flow no node has told of).
    pub fn apply(&self, new: flotilla_runtime::NewFlowRun) -> flotilla_runtime::NewFlowRun {
        let found = self.own.get(&new.flow_name).cloned().or_else(|| {
            self.learned
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&new.flow_name)
                .cloned()
        });
        match found {
            Some(d) => {
                let asked = new.parameters.get("resume").and_then(serde_json::Value::as_bool);
                let resume = asked.filter(|_| d.resume_param).unwrap_or(d.resume);
                new.with_options(d.retry, resume)
            }
            None => new.with_options(RetryPolicy::default(), false),
        }
    }
}

/// A registered flow: its name, options and body.
pub trait FlowFn: Send + Sync + 'static {
    /// The registered name.
    fn name(&self) -> &str;
    /// How it runs.
    fn options(&self) -> FlowOptions;
    /// Runs the body with the given parameters (JSON); returns its result (rmp-serde) or the
    /// error's text.
    fn run(&self, env: FlowEnv, params: serde_json::Value) -> BoxFuture<Result<Vec<u8>, String>>;
    /// Whether `params` fit the flow's arguments (checked when a run is created).
    fn check_params(&self, params: &serde_json::Value) -> Result<(), String> {
        let _ = params;
        Ok(())
    }
}

/// Which attempt of which task run a body is running as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskAttempt {
    /// The flow run.
    pub flow_run: FlowRunId,
    /// The task run.
    pub task_run: TaskRunId,
    /// The attempt, from 1.
    pub attempt: u32,
}

/// One task call's body, bound to its arguments: each call of it is one attempt, returning the
/// result (rmp-serde) or the error's text.
pub type TaskBody = Arc<dyn Fn(TaskAttempt) -> BoxFuture<Result<Vec<u8>, String>> + Send + Sync>;

/// How a task call runs.
#[derive(Clone, Debug, Default)]
pub struct TaskSpec {
    /// The task's registered name (its task key).
    pub name: String,
    /// Retries.
    pub retry: RetryPolicy,
    /// The longest one attempt may take.
    pub timeout: Option<Duration>,
    /// The cache key of this call (already computed from the inputs or the user's function).
    pub cache_key: Option<String>,
    /// How long a cached result stays valid.
    pub cache_expiration: Option<Duration>,
    /// Run even if a cached result exists.
    pub refresh_cache: bool,
    /// Tags (concurrency limits apply by tag).
    pub tags: Vec<String>,
}

/// Why a task call did not produce a result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskFailure {
    /// It failed (for good: no retries left, or the retry condition declined).
    #[error("task {task} failed: {message}")]
    Failed {
        /// The task.
        task: String,
        /// The error's text (a panic's message for a panic).
        message: String,
    },
    /// Its last attempt ran past the timeout.
    #[error("task {task} timed out after {after:?}")]
    TimedOut {
        /// The task.
        task: String,
        /// The timeout.
        after: Duration,
    },
    /// It was cancelled with its flow run.
    #[error("task {task} was cancelled")]
    Cancelled {
        /// The task.
        task: String,
    },
    /// Its recorded result cannot be read back.
    #[error("the result of task run {run} cannot be read: {reason}")]
    ResultUnreadable {
        /// The task run.
        run: TaskRunId,
        /// Why.
        reason: String,
    },
    /// The flow run is no longer running here (cancelled, crashed, or taken over).
    #[error("the flow run stopped: {0}")]
    Aborted(String),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Regression (fix 7): runs made on the control node (deployments, the scheduler, clients)
    /// took the default options, whatever their flow declares. A flow only another node runs is
    /// learned from that node's heartbeats.
    #[test]
    fn runs_take_the_options_of_their_flow_learned_from_the_nodes_that_run_it() {
        let catalog = FlowCatalog::default();
        let new = || {
            flotilla_runtime::NewFlowRun::new(FlowRunId::from_bytes([1; 16]), "etl", serde_json::json!({}))
        };
        let unknown = catalog.apply(new());
        assert_eq!(unknown.retry_policy, RetryPolicy::default());
        assert!(!unknown.resume);
        let retry = RetryPolicy {
            retries: 3,
            ..RetryPolicy::default()
        };
        let learned = |retry: &RetryPolicy, resume| FlowDefaults {
            retry: retry.clone(),
            resume,
            resume_param: false,
        };
        catalog.learn("etl", &learned(&retry, true));
        let known = catalog.apply(new());
        assert_eq!(known.retry_policy, retry);
        assert!(known.resume);
        // The catalog is shared: a clone (the scheduler's) sees what the control actor learned.
        let other = catalog.clone();
        catalog.learn("etl", &learned(&RetryPolicy::default(), false));
        assert!(!other.apply(new()).resume);
    }
}
