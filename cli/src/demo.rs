//! `flotilla demo`: a short, real run on an embedded store in a temporary directory.
//!
//! It opens a data directory, drives a flow run and its task runs through the orchestration
//! rules as a worker would (a task fails once and is retried by its policy), prints every state
//! with its timing, then reopens the directory to show that everything acknowledged is there.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use flotilla_actors::persistence::{self, PersistenceConfig, PersistenceHandle};
use flotilla_runtime::{
    Command, Decision, Epoch, FlowRunId, NewFlowRun, NewTaskRun, NodeId, Proposal, Reply, RetryPolicy, State,
    StateName, TaskRunId, TaskRunKey, Timestamp, TransitionId,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the data directory here instead of a temporary one.
    #[arg(long)]
    data: Option<std::path::PathBuf>,
}

fn now() -> Timestamp {
    Timestamp::from(chrono::Utc::now())
}

struct Worker {
    h: PersistenceHandle,
    node: NodeId,
    rng: SmallRng,
    started: Instant,
}

impl Worker {
    fn tid(&mut self) -> TransitionId {
        TransitionId::new(now(), &mut self.rng)
    }

    fn print(&self, what: &str, d: &Decision) {
        let ms = self.started.elapsed().as_secs_f64() * 1e3;
        match d {
            Decision::Accept(s) => println!("{ms:>8.2} ms  {what:<28} {s}"),
            Decision::Reject(s) => println!("{ms:>8.2} ms  {what:<28} {s}  (the rules wrote this instead)"),
            Decision::Wait { delay, .. } => println!("{ms:>8.2} ms  {what:<28} wait {delay:?}"),
            Decision::Abort(r) => println!("{ms:>8.2} ms  {what:<28} aborted: {r}"),
        }
    }

    async fn flow(&mut self, run: FlowRunId, name: StateName, epoch: Epoch) -> anyhow::Result<Decision> {
        let p = Proposal::from_worker(State::named(name, now()), self.tid(), epoch, self.node.clone());
        match self
            .h
            .submit(Command::ProposeFlowRunState { run, proposal: p })
            .await??
        {
            Reply::FlowRunTransition { decision, .. } => {
                self.print("flow run etl", &decision);
                Ok(decision)
            }
            other => bail!("unexpected reply {other:?}"),
        }
    }

    async fn task(
        &mut self,
        run: TaskRunId,
        label: &str,
        state: State,
        epoch: Epoch,
    ) -> anyhow::Result<Decision> {
        let p = Proposal::from_worker(state, self.tid(), epoch, self.node.clone());
        match self
            .h
            .submit(Command::ProposeTaskRunState { run, proposal: p })
            .await??
        {
            Reply::TaskRunTransition { decision, .. } => {
                self.print(&format!("  task {label}"), &decision);
                Ok(decision)
            }
            other => bail!("unexpected reply {other:?}"),
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let temp = tempfile::Builder::new().prefix("flotilla-demo-").tempdir()?;
    let dir = args.data.unwrap_or_else(|| temp.path().join("data"));
    println!("Flotilla demo: an embedded store in {}", dir.display());
    let (h, join) = persistence::start(PersistenceConfig::new(&dir))
        .await
        .context("opening the data directory")?;
    let mut w = Worker {
        h: h.clone(),
        node: "demo".parse()?,
        rng: SmallRng::seed_from_u64(7),
        started: Instant::now(),
    };

    let run = FlowRunId::new(now(), &mut w.rng);
    let created = h
        .submit(Command::CreateFlowRun(NewFlowRun {
            id: run,
            flow_name: "etl".into(),
            parameters: serde_json::json!({"rows": 3}),
            deployment_id: None,
            parent_task_run: None,
            idempotency_key: None,
            tags: vec!["demo".into()],
            work_queue: None,
            retry_policy: RetryPolicy::none(),
            resume: true,
            scheduled_time: None,
        }))
        .await??;
    let Reply::FlowRunCreated { run: created, .. } = created else {
        bail!("unexpected reply")
    };
    println!(
        "    0.00 ms  flow run etl                 {} (id {run})",
        created.lifecycle.state
    );
    let epoch = created.epoch;
    w.flow(run, StateName::Pending, epoch).await?;
    w.flow(run, StateName::Running, epoch).await?;

    let mut total = 0i64;
    for (i, task) in ["extract", "transform", "load"].into_iter().enumerate() {
        let id = TaskRunId::new(now(), &mut w.rng);
        h.submit(Command::CreateTaskRun(NewTaskRun {
            id,
            key: TaskRunKey {
                flow_run: run,
                task_key: task.into(),
                call_index: 0,
            },
            epoch,
            retry_policy: RetryPolicy::fixed(2, Duration::from_millis(20)),
            cache_key: None,
            cache_expiration: None,
            refresh_cache: false,
            tags: vec![],
        }))
        .await??;
        w.task(id, task, State::named(StateName::Running, now()), epoch)
            .await?;
        if task == "transform" {
            // The first attempt fails: the retry policy turns Failed into AwaitingRetry.
            let failed = State::named(StateName::Failed, now()).with_message("connection reset");
            if let Decision::Reject(s) = w.task(id, task, failed, epoch).await?
                && let Some(at) = s.details.scheduled_time
            {
                tokio::time::sleep(Duration::from_micros(
                    at.saturating_since(now()).as_micros() as u64
                ))
                .await;
            }
            w.task(id, task, State::named(StateName::Running, now()), epoch)
                .await?;
        }
        total += (i as i64 + 1) * 10;
        let result = rmp_serde::to_vec_named(&total)?;
        let done = State::named(StateName::Completed, now())
            .with_result(flotilla_runtime::ResultRef::Inline(result));
        w.task(id, task, done, epoch).await?;
    }
    w.flow(run, StateName::Completed, epoch).await?;
    let events = h.events(None, 1000).await?.len();
    h.stop(join).await;

    // Reopen: everything acknowledged is there.
    let (h, join) = persistence::start(PersistenceConfig::new(&dir)).await?;
    let back = h
        .flow_run(run)
        .await?
        .context("the flow run is missing after reopening")?;
    let history = h.flow_run_history(run, 0, 100).await?.unwrap_or_default();
    let tasks = h.task_runs(run, None, 100).await?;
    println!();
    println!(
        "reopened {}: flow run {} with {} states, {} task runs, {events} events",
        dir.display(),
        back.lifecycle.state,
        history.len(),
        tasks.len()
    );
    for t in &tasks {
        println!(
            "  {:<10} {:<10} runs {}  {:?}",
            t.key.task_key,
            t.lifecycle.state.to_string(),
            t.lifecycle.run_count,
            t.lifecycle.total_run_time
        );
    }
    h.stop(join).await;
    Ok(())
}
