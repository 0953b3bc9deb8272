//! What task and flow calls return: futures of their results, and handles of submitted tasks.

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use flotilla_actors::engine::BoxFuture;
use flotilla_runtime::TaskRunKey;
use futures::FutureExt;
use futures::future::Shared;
use serde::de::DeserializeOwned;

use crate::error::TaskError;

/// A task call in progress (what calling a task returns): resolves to its result.
#[must_use = "a task call does nothing unless awaited; use `.submit(..)` to start one without waiting"]
pub struct TaskFuture<T>(pub(crate) BoxFuture<Result<T, TaskError>>);

impl<T> std::fmt::Debug for TaskFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaskFuture")
    }
}

impl<T> Future for TaskFuture<T> {
    type Output = Result<T, TaskError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

/// A flow call in progress (what calling a flow returns; inside a flow it is a subflow).
#[must_use = "a flow call does nothing unless awaited"]
pub struct FlowFuture<T>(pub(crate) BoxFuture<Result<T, TaskError>>);

impl<T> std::fmt::Debug for FlowFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlowFuture")
    }
}

impl<T> Future for FlowFuture<T> {
    type Output = Result<T, TaskError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

pub(crate) type SharedResult = Shared<BoxFuture<Result<Arc<Vec<u8>>, TaskError>>>;

/// A submitted task: it runs whether or not it is awaited. Await the handle for the result,
/// or take its [`Completion`] to make other tasks wait for it.
pub struct TaskHandle<T> {
    pub(crate) env: Option<flotilla_actors::engine::FlowEnv>,
    pub(crate) key: Option<TaskRunKey>,
    pub(crate) task: &'static str,
    pub(crate) shared: SharedResult,
    pub(crate) _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for TaskHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle")
            .field("task", &self.task)
            .field("key", &self.key)
            .finish()
    }
}

impl<T> TaskHandle<T> {
    /// The call's flow run, task key and call index (None outside a flow).
    pub fn key(&self) -> Option<&TaskRunKey> {
        self.key.as_ref()
    }

    /// Resolves when the task run finished, without its data: for `wait_for`.
    pub fn completion(&self) -> Completion {
        Completion(self.shared.clone())
    }

    /// Its task run's current state (None outside a flow, or before the run started).
    pub async fn state(&self) -> Option<flotilla_runtime::State> {
        match (&self.env, &self.key) {
            (Some(env), Some(key)) => env.task_state(key).await,
            _ => None,
        }
    }

    /// Whether it finished (successfully or not).
    pub fn is_finished(&self) -> bool {
        self.shared.peek().is_some()
    }

    /// Its outcome so far: None while running, else whether it succeeded.
    pub fn outcome(&self) -> Option<Result<(), TaskError>> {
        self.shared
            .peek()
            .map(|r| r.as_ref().map(|_| ()).map_err(Clone::clone))
    }
}

impl<T: DeserializeOwned + Send + 'static> IntoFuture for TaskHandle<T> {
    type Output = Result<T, TaskError>;
    type IntoFuture = TaskFuture<T>;
    fn into_future(self) -> Self::IntoFuture {
        let task = self.task;
        TaskFuture(Box::pin(
            self.shared.map(move |r| r.and_then(|bytes| decode(task, &bytes))),
        ))
    }
}

/// That a task finished: await it for success or failure, without the data.
#[derive(Clone)]
pub struct Completion(pub(crate) SharedResult);

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completion")
    }
}

impl Future for Completion {
    type Output = Result<(), TaskError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.map(|_| ()))
    }
}

pub(crate) fn decode<T: DeserializeOwned>(task: &str, bytes: &[u8]) -> Result<T, TaskError> {
    rmp_serde::from_slice(bytes).map_err(|e| TaskError::Codec {
        task: task.to_owned(),
        reason: format!("its result does not decode as the expected type: {e}"),
    })
}
