//! What a flow body sees of its run: the run's id and parameters, and the way to call tasks and
//! subflows. Task calls are numbered per task key when they are made (called or submitted),
//! not when they start, so that a resumed run finds each call's recorded result again.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use flotilla_runtime::{Epoch, FlowRunId, TaskRunKey};
use ractor::ActorRef;
use tokio::sync::oneshot;

use super::flow_run::FlowRunMsg;
use super::worker::EngineHandle;
use super::{FlowFn, TaskBody, TaskFailure, TaskSpec};

struct Inner {
    flow_run: FlowRunId,
    flow_name: String,
    epoch: Epoch,
    actor: ActorRef<FlowRunMsg>,
    counters: Mutex<HashMap<String, u32>>,
    params: serde_json::Value,
    engine: EngineHandle,
}

/// A flow body's handle on its run.
#[derive(Clone)]
pub struct FlowEnv {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FlowEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowEnv")
            .field("flow_run", &self.inner.flow_run)
            .field("flow_name", &self.inner.flow_name)
            .finish_non_exhaustive()
    }
}

/// A task call in progress: await it for the result (rmp-serde bytes) or the failure.
#[derive(Debug)]
pub struct TaskCall {
    key: TaskRunKey,
    rx: oneshot::Receiver<Result<Vec<u8>, TaskFailure>>,
}

impl TaskCall {
    /// The call's task key and call index.
    pub fn key(&self) -> &TaskRunKey {
        &self.key
    }
}

impl Future for TaskCall {
    type Output = Result<Vec<u8>, TaskFailure>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            Poll::Ready(Err(_)) => {
                Poll::Ready(Err(TaskFailure::Aborted("the flow run's actor stopped".into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl FlowEnv {
    pub(crate) fn new(
        flow_run: FlowRunId,
        flow_name: String,
        epoch: Epoch,
        actor: ActorRef<FlowRunMsg>,
        params: serde_json::Value,
        engine: EngineHandle,
    ) -> Self {
        FlowEnv {
            inner: Arc::new(Inner {
                flow_run,
                flow_name,
                epoch,
                actor,
                counters: Mutex::new(HashMap::new()),
                params,
                engine,
            }),
        }
    }

    /// The flow run.
    pub fn flow_run(&self) -> FlowRunId {
        self.inner.flow_run
    }

    /// The flow's name.
    pub fn flow_name(&self) -> &str {
        &self.inner.flow_name
    }

    /// The run's ownership epoch.
    pub fn epoch(&self) -> Epoch {
        self.inner.epoch
    }

    /// The run's parameters.
    pub fn parameters(&self) -> &serde_json::Value {
        &self.inner.params
    }

    /// Records a user's event, with this flow run among its related resources (role
    /// `flow-run`): durable once answered, with its id (given in log order), or refused.
    pub async fn emit_event(&self, mut event: flotilla_runtime::Event) -> crate::persistence::SubmitResult {
        event.id = flotilla_runtime::EventId::from_bytes([0; 16]);
        event.related.push(
            flotilla_runtime::Resource::new(
                format!("flotilla.flow-run.{}", self.inner.flow_run),
                Some(&self.inner.flow_name),
            )
            .with(flotilla_runtime::event::RESOURCE_ROLE, "flow-run"),
        );
        self.inner
            .engine
            .control()
            .submit(flotilla_runtime::Command::AppendEvent(event))
            .await
    }

    /// The blocks named (`TYPE/NAME` each), unsealed: the control node gives them only while
    /// this run runs under this node's epoch, over the cluster's mutual TLS. Keep them in
    /// memory only.
    pub async fn resolve_blocks(
        &self,
        refs: Vec<String>,
    ) -> Result<Vec<(String, serde_json::Value)>, String> {
        use flotilla_cluster::wire::{Request, Response};
        let request = Request::ResolveBlocks {
            flow_run: self.inner.flow_run,
            epoch: self.inner.epoch,
            refs,
        };
        match crate::node::plane::request(request).await? {
            Response::Resolved(blocks) => Ok(blocks),
            Response::Error(e) => Err(e.message),
            _ => Err("an unexpected answer to a request for blocks".into()),
        }
    }

    /// The key of the next call of a task: its index is fixed now (for a call made later,
    /// with [`FlowEnv::call_with_key`]).
    pub fn reserve(&self, task: &str) -> TaskRunKey {
        let mut counters = self.inner.counters.lock().unwrap_or_else(|e| e.into_inner());
        let n = counters.entry(task.to_owned()).or_insert(0);
        let call_index = *n;
        *n += 1;
        TaskRunKey {
            flow_run: self.inner.flow_run,
            task_key: task.to_owned(),
            call_index,
        }
    }

    /// Calls a task under a key reserved earlier.
    pub fn call_with_key(&self, key: TaskRunKey, spec: TaskSpec, body: TaskBody) -> TaskCall {
        let (tx, rx) = oneshot::channel();
        // When the actor is gone the sender is dropped and the call ends as Aborted.
        let _ = self.inner.actor.cast(FlowRunMsg::Call {
            key: key.clone(),
            spec,
            body,
            reply: tx,
        });
        TaskCall { key, rx }
    }

    /// The state of a task call, as this node sees it (None when it has not started yet).
    pub async fn task_state(&self, key: &TaskRunKey) -> Option<flotilla_runtime::State> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .actor
            .cast(FlowRunMsg::TaskState(key.clone(), tx))
            .ok()?;
        rx.await.ok().flatten()
    }

    /// Calls a task: a task run starts (or its recorded result is returned) and the call
    /// resolves with its result.
    pub fn task(&self, spec: TaskSpec, body: TaskBody) -> TaskCall {
        let key = self.reserve(&spec.name);
        self.call_with_key(key, spec, body)
    }

    /// Calls a flow as a subflow: a child flow run linked to this one, run on this node. The
    /// call is recorded as a task run of this flow, so a resumed parent finds its result.
    pub fn subflow(&self, flow: Arc<dyn FlowFn>, params: serde_json::Value) -> TaskCall {
        let name = format!("subflow:{}", flow.name());
        let key = self.reserve(&name);
        let engine = self.inner.engine.clone();
        let idempotency = format!("subflow/{}/{}/{}", key.flow_run, flow.name(), key.call_index);
        let body: TaskBody = Arc::new(move |attempt| {
            let engine = engine.clone();
            let flow = flow.clone();
            let params = params.clone();
            let idempotency = idempotency.clone();
            Box::pin(async move {
                engine
                    .run_subflow(flow, params, attempt.task_run, idempotency)
                    .await
            })
        });
        self.call_with_key(
            key,
            TaskSpec {
                name,
                ..TaskSpec::default()
            },
            body,
        )
    }
}
