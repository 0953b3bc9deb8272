//! What the macros expand to. Not a public API: it may change in any release.

use std::marker::PhantomData;
use std::sync::Arc;

pub use flotilla_actors::engine::{BoxFuture, FlowOptions};
pub use flotilla_runtime as runtime;
pub use serde;

use flotilla_actors::engine::{FlowEnv, FlowFn, TaskBody, TaskSpec};
use futures::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::{FlowContext, context};
use crate::error::TaskError;
use crate::handle::{Completion, FlowFuture, SharedResult, TaskFuture, TaskHandle, decode};

/// What task and flow arguments and results must be: serializable, so that they can be stored,
/// sent and hashed.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a task or flow argument or result: it must implement `Serialize` and `DeserializeOwned`",
    label = "not serializable",
    note = "derive `serde::Serialize` and `serde::Deserialize` for it (task and flow arguments and results are stored and sent)"
)]
pub trait TaskArg: Serialize + DeserializeOwned + Send + 'static {}

impl<T: Serialize + DeserializeOwned + Send + 'static> TaskArg for T {}

/// A task's options, from its attribute.
#[derive(Clone, Debug, Default)]
pub struct TaskOptions {
    /// Retries.
    pub retry: runtime::RetryPolicy,
    /// Per-attempt timeout.
    pub timeout: Option<std::time::Duration>,
    /// Whether results are cached.
    pub cache: bool,
    /// How long a cached result stays valid.
    pub cache_expiration: Option<std::time::Duration>,
    /// Run even when a cached result exists.
    pub refresh_cache: bool,
    /// Tags.
    pub tags: Vec<String>,
}

/// A task, as `#[task]` declares it.
pub trait TaskDef: Send + Sync + 'static {
    /// The arguments, as a tuple.
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// The result.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// The registered name.
    const NAME: &'static str;
    /// The options.
    fn options() -> TaskOptions;
    /// The user's cache key for these arguments, when the task has a `cache_key` function.
    fn cache_key(args: &Self::Args) -> Option<String>;
    /// The body.
    fn run(args: Self::Args) -> BoxFuture<Result<Self::Output, String>>;
}

/// A flow, as `#[flow]` declares it.
pub trait FlowDef: Send + Sync + 'static {
    /// The parameters, as a struct with one field per argument.
    type Params: Serialize + DeserializeOwned + Send + 'static;
    /// The result.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// The registered name.
    const NAME: &'static str;
    /// The options.
    fn options() -> FlowOptions;
    /// The body.
    fn run(params: Self::Params) -> BoxFuture<Result<Self::Output, String>>;
}

fn codec_err(task: &str, what: &str, e: impl std::fmt::Display) -> TaskError {
    TaskError::Codec {
        task: task.to_owned(),
        reason: format!("{what}: {e}"),
    }
}

/// The cache key of a call: the user's, or the task's name plus a hash of its inputs.
fn cache_key<D: TaskDef>(args: &D::Args, encoded: &[u8]) -> Option<String> {
    let o = D::options();
    if !o.cache {
        return None;
    }
    Some(match D::cache_key(args) {
        Some(k) => format!("{}:{k}", D::NAME),
        None => format!("{}:{}", D::NAME, blake3::hash(encoded).to_hex()),
    })
}

fn start<D: TaskDef>(
    env: &FlowEnv,
    args: D::Args,
    deps: Vec<Completion>,
) -> (Option<runtime::TaskRunKey>, SharedResult) {
    let encoded = match rmp_serde::to_vec_named(&args) {
        Ok(b) => b,
        Err(e) => {
            let err = codec_err(D::NAME, "its arguments cannot be encoded", e);
            let fut: BoxFuture<Result<Arc<Vec<u8>>, TaskError>> = Box::pin(async move { Err(err) });
            return (None, fut.shared());
        }
    };
    let o = D::options();
    let spec = TaskSpec {
        name: D::NAME.to_owned(),
        retry: o.retry,
        timeout: o.timeout,
        cache_key: cache_key::<D>(&args, &encoded),
        cache_expiration: o.cache_expiration,
        refresh_cache: o.refresh_cache,
        tags: o.tags,
    };
    let encoded = Arc::new(encoded);
    let body: TaskBody = Arc::new(move |_attempt| {
        let encoded = encoded.clone();
        Box::pin(async move {
            let args: D::Args =
                rmp_serde::from_slice(&encoded).map_err(|e| format!("its arguments do not decode: {e}"))?;
            let out = D::run(args).await?;
            rmp_serde::to_vec_named(&out).map_err(|e| format!("its result cannot be encoded: {e}"))
        })
    });
    if deps.is_empty() {
        let call = env.task(spec, body);
        let key = call.key().clone();
        let fut: BoxFuture<Result<Arc<Vec<u8>>, TaskError>> =
            Box::pin(call.map(|r| r.map(Arc::new).map_err(TaskError::from_failure)));
        return (Some(key), fut.shared());
    }
    // The call index is fixed now; the call is made once the dependencies completed.
    let key = env.reserve(D::NAME);
    let env = env.clone();
    let k = key.clone();
    let fut: BoxFuture<Result<Arc<Vec<u8>>, TaskError>> = Box::pin(async move {
        for d in deps {
            if let Err(e) = d.await {
                return Err(TaskError::UpstreamFailed {
                    task: D::NAME.to_owned(),
                    upstream: e.to_string(),
                });
            }
        }
        env.call_with_key(k, spec, body)
            .await
            .map(Arc::new)
            .map_err(TaskError::from_failure)
    });
    (Some(key), fut.shared())
}

/// Calls a task: a task run inside a flow; the body itself elsewhere.
pub fn call_task<D: TaskDef>(args: D::Args) -> TaskFuture<D::Output> {
    match context() {
        Some(ctx) => {
            let (_, shared) = start::<D>(ctx.env(), args, Vec::new());
            TaskFuture(Box::pin(shared.map(|r| r.and_then(|b| decode(D::NAME, &b)))))
        }
        None => TaskFuture(Box::pin(async move {
            D::run(args).await.map_err(|message| TaskError::Failed {
                task: D::NAME.to_owned(),
                message,
            })
        })),
    }
}

/// Submits a task: it starts now (after `deps`); the handle gives its result.
pub fn submit_task<D: TaskDef>(args: D::Args, deps: Vec<Completion>) -> TaskHandle<D::Output> {
    let env = context().map(|c| c.env().clone());
    let (key, shared) = match &env {
        Some(env) => start::<D>(env, args, deps),
        None => {
            // Outside a flow: run the body at once, on its own task.
            let fut = tokio::spawn(async move {
                for d in deps {
                    if let Err(e) = d.await {
                        return Err(TaskError::UpstreamFailed {
                            task: D::NAME.to_owned(),
                            upstream: e.to_string(),
                        });
                    }
                }
                let out = D::run(args).await.map_err(|message| TaskError::Failed {
                    task: D::NAME.to_owned(),
                    message,
                })?;
                rmp_serde::to_vec_named(&out)
                    .map(Arc::new)
                    .map_err(|e| codec_err(D::NAME, "its result cannot be encoded", e))
            });
            let fut: BoxFuture<Result<Arc<Vec<u8>>, TaskError>> =
                Box::pin(fut.map(|r| r.unwrap_or_else(|e| Err(TaskError::Aborted(e.to_string())))));
            (None, fut.shared())
        }
    };
    TaskHandle {
        env,
        key,
        task: D::NAME,
        shared,
        _t: PhantomData,
    }
}

/// A flow as the engine sees it.
pub struct FlowAdapter<D>(PhantomData<fn() -> D>);

impl<D> Default for FlowAdapter<D> {
    fn default() -> Self {
        FlowAdapter(PhantomData)
    }
}

impl<D> std::fmt::Debug for FlowAdapter<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlowAdapter")
    }
}

impl<D: FlowDef> FlowFn for FlowAdapter<D> {
    fn name(&self) -> &str {
        D::NAME
    }

    fn options(&self) -> FlowOptions {
        D::options()
    }

    fn check_params(&self, params: &serde_json::Value) -> Result<(), String> {
        serde_json::from_value::<D::Params>(params.clone())
            .map(|_| ())
            .map_err(|e| format!("flow {}: {e}", D::NAME))
    }

    fn run(&self, env: FlowEnv, params: serde_json::Value) -> BoxFuture<Result<Vec<u8>, String>> {
        Box::pin(async move {
            let params: D::Params = serde_json::from_value(params)
                .map_err(|e| format!("invalid parameters for flow {}: {e}", D::NAME))?;
            let out = FlowContext::new(env).scope(D::run(params)).await?;
            rmp_serde::to_vec_named(&out).map_err(|e| format!("the flow's result cannot be encoded: {e}"))
        })
    }
}

/// Calls a flow: a subflow inside a flow; the body itself elsewhere.
pub fn call_flow<D: FlowDef>(params: D::Params) -> FlowFuture<D::Output> {
    match context() {
        Some(ctx) => {
            let json = match serde_json::to_value(&params) {
                Ok(v) => v,
                Err(e) => {
                    let err = codec_err(D::NAME, "its parameters cannot be encoded", e);
                    return FlowFuture(Box::pin(async move { Err(err) }));
                }
            };
            let call = ctx.env().subflow(Arc::new(FlowAdapter::<D>::default()), json);
            FlowFuture(Box::pin(call.map(|r| {
                r.map_err(TaskError::from_failure)
                    .and_then(|b| decode(D::NAME, &b))
            })))
        }
        None => FlowFuture(Box::pin(async move {
            D::run(params).await.map_err(|message| TaskError::Failed {
                task: D::NAME.to_owned(),
                message,
            })
        })),
    }
}
