//! The `TaskRun` actor: one attempt of one task. It runs the body (with the attempt's timeout),
//! stores the result, reports to its flow run and stops. A panic in the body fails the actor,
//! and its supervisor (the flow run) hears of it as a supervision event: a panic never takes
//! the node down.

use std::time::Duration;

use flotilla_runtime::{ResultRef, RunId};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::flow_run::FlowRunMsg;
use super::logs::LogCapture;
use super::results::ResultStore;
use super::{TaskAttempt, TaskBody};

/// How an attempt ended.
#[derive(Debug)]
pub enum AttemptOutcome {
    /// It returned a value: its stored reference and its bytes.
    Done(ResultRef, Vec<u8>),
    /// It returned an error (its text).
    Failed(String),
    /// It ran past its timeout.
    TimedOut(Duration),
    /// Its concurrency slot's lease was lost: it was stopped.
    LeaseLost,
    /// Its result could not be stored.
    ResultNotStored(String),
}

/// The attempt's actor.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskRunActor;

/// Messages: none from outside (the attempt runs on its own and stops).
#[derive(Debug)]
pub enum TaskRunMsg {}

impl ractor::Message for TaskRunMsg {}

/// What an attempt needs.
pub struct TaskRunArgs {
    /// Its flow run, to report to.
    pub parent: ActorRef<FlowRunMsg>,
    /// Which attempt of which task run.
    pub attempt: TaskAttempt,
    /// The task's name.
    pub name: String,
    /// The body.
    pub body: TaskBody,
    /// The attempt's timeout.
    pub timeout: Option<Duration>,
    /// Where results go.
    pub results: ResultStore,
    /// Log capture.
    pub logs: LogCapture,
    /// Set when the lease of its concurrency slots is lost (cluster tag limits).
    pub lease_lost: Option<tokio::sync::watch::Receiver<bool>>,
}

impl std::fmt::Debug for TaskRunArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskRunArgs")
            .field("attempt", &self.attempt)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Actor for TaskRunActor {
    type Msg = TaskRunMsg;
    type State = TaskRunArgs;
    type Arguments = TaskRunArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let a = s.attempt;
        let fut = s
            .logs
            .instrument((s.body)(a), a.flow_run, Some(a.task_run), &s.name);
        let timed = async {
            match s.timeout {
                Some(t) => tokio::time::timeout(t, fut).await.ok(),
                None => Some(fut.await),
            }
        };
        // No task runs on a slot it no longer holds: a lost lease stops the body.
        let finished = tokio::select! {
            f = timed => Some(f),
            () = super::limits::lease_lost(s.lease_lost.take()) => None,
        };
        let outcome = match finished {
            Some(Some(Ok(bytes))) => store(&s.results, a, bytes).await,
            Some(Some(Err(message))) => AttemptOutcome::Failed(message),
            Some(None) => AttemptOutcome::TimedOut(s.timeout.unwrap_or_default()),
            None => AttemptOutcome::LeaseLost,
        };
        let _ = s.parent.cast(FlowRunMsg::TaskDone {
            task: a.task_run,
            attempt: a.attempt,
            outcome,
        });
        myself.stop(None);
        Ok(())
    }
}

async fn store(results: &ResultStore, a: TaskAttempt, bytes: Vec<u8>) -> AttemptOutcome {
    let owner = RunId::Task(a.task_run);
    if !results.goes_to_file(bytes.len()) {
        return AttemptOutcome::Done(ResultRef::Inline(bytes.clone()), bytes);
    }
    let store = results.clone();
    let copy = bytes.clone();
    match tokio::task::spawn_blocking(move || store.store(owner, a.attempt, copy)).await {
        Ok(Ok(r)) => AttemptOutcome::Done(r, bytes),
        Ok(Err(e)) => AttemptOutcome::ResultNotStored(e.to_string()),
        Err(e) => AttemptOutcome::ResultNotStored(e.to_string()),
    }
}

/// Starts task-run actors off the flow run actor's path: the flow run asks, the spawner
/// starts the actor (linked to the flow run, its supervisor) and tells the flow run which
/// actor it is. Spawning costs more than everything else a flow run does per task.
#[derive(Debug, Clone)]
pub struct Spawner {
    tx: tokio::sync::mpsc::UnboundedSender<(TaskRunArgs, ractor::ActorCell)>,
}

impl Spawner {
    /// Starts the spawner's loop (inside a tokio runtime).
    pub fn start() -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(TaskRunArgs, ractor::ActorCell)>();
        tokio::spawn(async move {
            while let Some((args, supervisor)) = rx.recv().await {
                let parent = args.parent.clone();
                let a = args.attempt;
                match ractor::ActorRuntime::spawn_linked_instant(None, TaskRunActor, args, supervisor) {
                    Ok((child, _)) => {
                        let _ = parent.cast(FlowRunMsg::Spawned {
                            task: a.task_run,
                            attempt: a.attempt,
                            child: child.get_cell(),
                        });
                    }
                    Err(e) => {
                        let outcome =
                            AttemptOutcome::Failed(format!("the task run's actor could not start: {e}"));
                        let _ = parent.cast(FlowRunMsg::TaskDone {
                            task: a.task_run,
                            attempt: a.attempt,
                            outcome,
                        });
                    }
                }
            }
        });
        Spawner { tx }
    }

    /// Asks for an attempt's actor, supervised by `supervisor`.
    pub fn spawn(&self, args: TaskRunArgs, supervisor: ractor::ActorCell) {
        let parent = args.parent.clone();
        let a = args.attempt;
        if self.tx.send((args, supervisor)).is_err() {
            let outcome = AttemptOutcome::Failed("the engine is stopping".into());
            let _ = parent.cast(FlowRunMsg::TaskDone {
                task: a.task_run,
                attempt: a.attempt,
                outcome,
            });
        }
    }
}
