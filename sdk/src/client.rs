//! The client of a node: run flows, wait for them, read runs, task runs, histories and logs,
//! follow a run's events, cancel and retry.

use std::sync::Arc;

use flotilla_actors::engine::worker::EngineHandle;
use flotilla_actors::node::plane::ControlPlane;
use flotilla_actors::persistence::{LogCursor, PAGE_MAX, Read, ReadReply, RunFilter};
use flotilla_runtime::{
    Command, Decision, Event, FlowRun, FlowRunId, LogLine, NewFlowRun, Proposal, Reply, RetryRequest, State,
    StateName, TaskRun, Timestamp, TransitionId,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;

use crate::error::Error;

mod settings;

pub(crate) fn now() -> Timestamp {
    Timestamp::from(chrono::Utc::now())
}

pub(crate) fn rng() -> SmallRng {
    // Seeded by the OS, never by the clock: two requests made in the same tick on two threads
    // once got the same request id, and the second was answered as a retry of the first (its
    // event never recorded). Found by `bench automations`.
    SmallRng::from_rng(&mut rand::rng())
}

/// A client of a node: of the node embedded in this process ([`crate::Node::client`]), or of a
/// cluster node reached over QUIC with mutual TLS ([`Client::connect`]).
#[derive(Clone)]
pub struct Client {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Embedded(Local),
    Remote(Arc<crate::remote::Remote>),
}

/// The client of the embedded node.
#[derive(Clone)]
struct Local {
    persistence: ControlPlane,
    engine: EngineHandle,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.inner {
            Inner::Embedded(_) => "embedded",
            Inner::Remote(_) => "remote",
        };
        f.debug_struct("Client")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

/// The events of one flow run (and its task runs), as they become durable.
#[derive(Debug)]
pub struct RunEvents {
    rx: broadcast::Receiver<Arc<Event>>,
    resource: String,
}

impl RunEvents {
    /// The next event of the run; None when the node stopped. A subscriber that falls too far
    /// behind skips what it missed (read [`Client::history`] to catch up).
    pub async fn next(&mut self) -> Option<Arc<Event>> {
        loop {
            match self.next_or_missed().await {
                Heard::Event(e) => return Some(e),
                Heard::Missed => continue,
                Heard::Closed => return None,
            }
        }
    }

    /// The next event of the run, or word that some events were missed (the subscriber fell
    /// too far behind): whoever waits on a change must then read the run again.
    async fn next_or_missed(&mut self) -> Heard {
        loop {
            match self.rx.recv().await {
                Ok(e) => {
                    let mine = e.resource.id() == Some(&self.resource)
                        || e.related.iter().any(|r| r.id() == Some(&self.resource));
                    if mine {
                        return Heard::Event(e);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => return Heard::Missed,
                Err(broadcast::error::RecvError::Closed) => return Heard::Closed,
            }
        }
    }
}

/// What [`RunEvents::next_or_missed`] heard.
enum Heard {
    Event(Arc<Event>),
    Missed,
    Closed,
}

macro_rules! dispatch {
    ($self:ident, $m:ident ( $($a:expr),* )) => {
        match &$self.inner {
            Inner::Embedded(l) => l.$m($($a),*).await,
            Inner::Remote(r) => r.$m($($a),*).await,
        }
    };
}

impl Client {
    pub(crate) fn new(persistence: ControlPlane, engine: EngineHandle) -> Self {
        Client {
            inner: Inner::Embedded(Local { persistence, engine }),
        }
    }

    /// Connects to a cluster node at `addr` (`host:port`) with the certificates in `certs`
    /// (`ca.pem`, `admin.pem`, `admin.key`): the same API as the embedded client.
    pub async fn connect(addr: &str, certs: &std::path::Path) -> Result<Client, Error> {
        Client::connect_as(addr, certs, flotilla_cluster::certs::ADMIN).await
    }

    /// As [`Client::connect`], with the client certificate `identity` (`identity.pem` and
    /// `identity.key` in `certs`, as `flotilla cluster add-client` writes them).
    pub async fn connect_as(addr: &str, certs: &std::path::Path, identity: &str) -> Result<Client, Error> {
        let remote = crate::remote::Remote::connect(addr, certs, identity).await?;
        Ok(Client {
            inner: Inner::Remote(Arc::new(remote)),
        })
    }

    /// The members of the cluster (a remote client; an embedded node is a cluster of one).
    pub async fn cluster_status(&self) -> Result<flotilla_cluster::wire::ClusterStatus, Error> {
        match &self.inner {
            Inner::Embedded(_) => Ok(flotilla_cluster::wire::ClusterStatus::default()),
            Inner::Remote(r) => r.cluster_status().await,
        }
    }

    /// Forgets an unreachable member of the cluster (a remote client).
    pub async fn remove_node(&self, node: &str) -> Result<(), Error> {
        match &self.inner {
            Inner::Embedded(_) => Err(Error::Parameters("an embedded node has no other members".into())),
            Inner::Remote(r) => r.remove_node(node).await,
        }
    }

    /// The same client, its reads (listings, runs, histories, logs) answered from the replica
    /// of the node it talks to, without asking the leader: faster, and possibly behind the
    /// leader by what it has not applied yet. Reads are linearizable otherwise. An embedded
    /// node's client reads its own state either way.
    pub fn stale_reads(&self) -> Client {
        match &self.inner {
            Inner::Remote(r) => Client {
                inner: Inner::Remote(Arc::new(r.stale())),
            },
            Inner::Embedded(_) => self.clone(),
        }
    }

    /// Changes the voters of the replicated control state (a remote client): adds one
    /// (joint consensus, once it has caught up), removes one, or hands the lead to one. Answers
    /// the replication's status after.
    pub async fn change_voters(
        &self,
        change: flotilla_cluster::wire::VoterChange,
    ) -> Result<Option<flotilla_cluster::wire::ReplicationStatus>, Error> {
        match &self.inner {
            Inner::Embedded(_) => Err(Error::Parameters(
                "an embedded node has no voters to change".into(),
            )),
            Inner::Remote(r) => r.change_voters(change).await,
        }
    }

    /// Creates or replaces (by name) a deployment; returns it as stored. Deployments and their
    /// schedules live on a cluster's control node (a remote client).
    pub async fn put_deployment(
        &self,
        spec: flotilla_runtime::DeploymentSpec,
    ) -> Result<flotilla_runtime::Deployment, Error> {
        self.remote_only()?.put_deployment(spec).await
    }

    /// A deployment, by name.
    pub async fn deployment(&self, name: &str) -> Result<flotilla_runtime::Deployment, Error> {
        self.remote_only()?.deployment(name).await
    }

    /// Every deployment, in name order.
    pub async fn deployments(&self) -> Result<Vec<flotilla_runtime::Deployment>, Error> {
        self.remote_only()?.deployments().await
    }

    /// Deletes a deployment; its runs that have not started are cancelled.
    pub async fn delete_deployment(&self, name: &str) -> Result<(), Error> {
        self.remote_only()?.delete_deployment(name).await
    }

    /// An ad-hoc run of a deployment, `params` over its parameters.
    pub async fn run_deployment(&self, name: &str, params: serde_json::Value) -> Result<FlowRunId, Error> {
        self.remote_only()?.run_deployment(name, params, None).await
    }

    /// As [`Client::run_deployment`], under the user's idempotency key: a key already used
    /// returns the existing run.
    pub async fn run_deployment_with_key(
        &self,
        name: &str,
        params: serde_json::Value,
        key: &str,
    ) -> Result<FlowRunId, Error> {
        self.remote_only()?.run_deployment(name, params, Some(key)).await
    }

    /// The scheduler's figures.
    pub async fn scheduler_stats(&self) -> Result<flotilla_cluster::wire::SchedulerStats, Error> {
        self.remote_only()?.scheduler_stats().await
    }

    /// Creates, changes, inspects or deletes a work queue; the queue as it is after the change
    /// (None after a deletion).
    pub async fn work_queue(
        &self,
        name: &str,
        change: flotilla_cluster::wire::QueueChange,
    ) -> Result<Option<flotilla_cluster::wire::QueueInfo>, Error> {
        self.remote_only()?.work_queue(name, change).await
    }

    /// Every work queue with its figures, by priority.
    pub async fn work_queues(&self) -> Result<Vec<flotilla_cluster::wire::QueueInfo>, Error> {
        self.remote_only()?.work_queues().await
    }

    /// Creates, changes, resets, inspects or deletes a cluster-wide tag limit; the limit as it
    /// is after the change, with its leases (None after a deletion).
    pub async fn concurrency_limit(
        &self,
        tag: &str,
        change: flotilla_cluster::wire::LimitChange,
    ) -> Result<Option<flotilla_runtime::ConcurrencyLimit>, Error> {
        self.remote_only()?.concurrency_limit(tag, change).await
    }

    /// Every tag limit with the slots held now.
    pub async fn concurrency_limits(&self) -> Result<Vec<flotilla_runtime::ConcurrencyLimit>, Error> {
        self.remote_only()?.concurrency_limits().await
    }

    /// The cluster's events after `after` whose names start with `prefix`, oldest first (at
    /// most `limit`); when there is none yet, waits up to `wait` (at most 5 s) for one.
    pub async fn events_page(
        &self,
        after: Option<flotilla_runtime::EventId>,
        prefix: Option<String>,
        limit: u32,
        wait: std::time::Duration,
    ) -> Result<Vec<flotilla_runtime::Event>, Error> {
        self.remote_only()?.events(after, prefix, limit, wait).await
    }

    /// The cluster's events after `after` (None: from the filter's `since`, or the oldest
    /// kept) that match `filter`, oldest first, at most `limit` (≤ 1,000); when there is none
    /// yet, waits up to `wait` (at most 5 s) for one. Also answers where to go on from (None:
    /// the filter's window is over): a filter that matches few of many events takes several
    /// pages, some of them empty.
    pub async fn find_events(
        &self,
        after: Option<flotilla_runtime::EventId>,
        filter: flotilla_runtime::EventFilter,
        limit: u32,
        wait: std::time::Duration,
    ) -> Result<(Vec<flotilla_runtime::Event>, Option<flotilla_runtime::EventId>), Error> {
        self.remote_only()?.find_events(after, filter, limit, wait).await
    }

    /// Records an event named `name` about `resource` (which needs a `flotilla.resource.id`
    /// label), with related resources and a JSON payload; answered once it is durable, with its
    /// id. Bounded: a name of at most 1,024 bytes, 64 related resources of 64 labels, and the
    /// protocol's frame limit.
    pub async fn emit_event(
        &self,
        name: &str,
        resource: flotilla_runtime::Resource,
        related: Vec<flotilla_runtime::Resource>,
        payload: serde_json::Value,
    ) -> Result<flotilla_runtime::EventId, Error> {
        let event = flotilla_runtime::Event::user(name, now(), resource, related, payload);
        self.remote_only()?.emit_event(event).await
    }

    /// Records an event as built (its time kept; its id given by the log): see
    /// [`Client::emit_event`].
    pub async fn emit(&self, event: flotilla_runtime::Event) -> Result<flotilla_runtime::EventId, Error> {
        self.remote_only()?.emit_event(event).await
    }

    fn remote_only(&self) -> Result<&crate::remote::Remote, Error> {
        match &self.inner {
            Inner::Remote(r) => Ok(r),
            Inner::Embedded(_) => Err(Error::Unavailable(
                "deployments and schedules live on a cluster node: start one with `flotilla node start` and use Client::connect".into(),
            )),
        }
    }

    /// Creates a run of the flow `flow` with JSON `params` (an object of the flow's arguments
    /// by name) and has a node run it. Returns at once with the run's id.
    pub async fn run(&self, flow: &str, params: serde_json::Value) -> Result<FlowRunId, Error> {
        dispatch!(self, run(flow, params, None))
    }

    /// As [`Client::run`], under the user's idempotency key: a run created with a key already
    /// used is the existing run (its id is returned, nothing new runs). A key is remembered as
    /// long as its run exists.
    pub async fn run_with_key(
        &self,
        flow: &str,
        params: serde_json::Value,
        key: &str,
    ) -> Result<FlowRunId, Error> {
        dispatch!(self, run(flow, params, Some(key)))
    }

    /// Runs a flow and waits for it to finish; returns the finished run.
    pub async fn run_and_wait(&self, flow: &str, params: serde_json::Value) -> Result<FlowRun, Error> {
        let id = self.run(flow, params).await?;
        self.wait(id).await
    }

    /// Waits until the run is in a terminal state (Completed, Failed, Cancelled, Crashed) and
    /// returns it. Wrap it in `tokio::time::timeout` to bound the wait.
    pub async fn wait(&self, id: FlowRunId) -> Result<FlowRun, Error> {
        dispatch!(self, wait(id))
    }

    /// The run once it is in a terminal state, or as it is after `max` (at most 5 s for a
    /// remote client): for a display that follows a run.
    pub async fn wait_for(&self, id: FlowRunId, max: std::time::Duration) -> Result<FlowRun, Error> {
        match &self.inner {
            Inner::Embedded(l) => match tokio::time::timeout(max, l.wait(id)).await {
                Ok(r) => r,
                Err(_) => l.flow_run(id).await,
            },
            Inner::Remote(r) => r.wait_for(id, max).await,
        }
    }

    /// A flow run.
    pub async fn flow_run(&self, id: FlowRunId) -> Result<FlowRun, Error> {
        dispatch!(self, flow_run(id))
    }

    /// A page of flow runs (at most 1,000), after `after` (by id).
    pub async fn flow_runs(
        &self,
        filter: RunFilter,
        after: Option<FlowRunId>,
        limit: usize,
    ) -> Result<Vec<FlowRun>, Error> {
        dispatch!(self, flow_runs(filter, after, limit))
    }

    /// Every task run of a flow run, in creation order.
    pub async fn task_runs(&self, id: FlowRunId) -> Result<Vec<TaskRun>, Error> {
        dispatch!(self, task_runs(id))
    }

    /// A flow run's states, oldest first.
    pub async fn history(&self, id: FlowRunId) -> Result<Vec<State>, Error> {
        dispatch!(self, history(id))
    }

    /// A page of a flow run's log lines after `after`, and where the next page starts.
    pub async fn logs_page(
        &self,
        id: FlowRunId,
        after: Option<LogCursor>,
        limit: usize,
    ) -> Result<(Vec<LogLine>, Option<LogCursor>), Error> {
        dispatch!(self, logs_page(id, after, limit))
    }

    /// A flow run's log lines (its flow's and its tasks'), in order.
    pub async fn logs(&self, id: FlowRunId) -> Result<Vec<LogLine>, Error> {
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let (lines, next) = self.logs_page(id, cursor, PAGE_MAX).await?;
            if lines.is_empty() {
                break;
            }
            all.extend(lines);
            cursor = next;
        }
        Ok(all)
    }

    /// The result of a completed flow run.
    pub async fn result<T: DeserializeOwned>(&self, id: FlowRunId) -> Result<T, Error> {
        let bytes = dispatch!(self, result_bytes(id))?;
        rmp_serde::from_slice(&bytes).map_err(|e| Error::NoResult {
            run: id,
            reason: format!("it does not decode as the asked type: {e}"),
        })
    }

    /// Cancels a flow run: one not yet running ends Cancelled at once; a running one stops its
    /// tasks and ends Cancelled. Returns the state it ends in.
    pub async fn cancel(&self, id: FlowRunId) -> Result<State, Error> {
        dispatch!(self, cancel(id))
    }

    /// Runs a finished (Failed, Crashed or Cancelled) flow run again: its task calls that
    /// completed return their recorded results, the others run again.
    pub async fn retry(&self, id: FlowRunId) -> Result<State, Error> {
        dispatch!(self, retry_with(id, false))
    }

    /// Like [`Client::retry`], also for a Completed run (its old result stays in the history).
    pub async fn retry_completed(&self, id: FlowRunId) -> Result<State, Error> {
        dispatch!(self, retry_with(id, true))
    }

    /// A task run's states, oldest first (embedded client).
    pub async fn task_history(&self, id: flotilla_runtime::TaskRunId) -> Result<Vec<State>, Error> {
        match &self.inner {
            Inner::Embedded(l) => l.task_history(id).await,
            Inner::Remote(_) => Err(Error::Parameters(
                "task histories are read on the node itself".into(),
            )),
        }
    }

    /// Follows a flow run's events (its own and its task runs') from now on. A remote client
    /// long-polls the node's events while the stream is held.
    pub fn events(&self, id: FlowRunId) -> RunEvents {
        match &self.inner {
            Inner::Embedded(l) => l.events(id),
            Inner::Remote(r) => {
                // Long polls of the node's events, from a little before now (the node's clock
                // may run behind this one), handed on while anyone listens.
                let (tx, rx) = broadcast::channel(1024);
                let remote = r.clone();
                tokio::spawn(async move {
                    let start = now() - std::time::Duration::from_secs(2);
                    let mut after = Some(flotilla_runtime::EventId::at(
                        start,
                        flotilla_runtime::LogIndex::ZERO,
                        0,
                    ));
                    while tx.receiver_count() > 0 {
                        let page = match remote
                            .events(after, None, 1000, std::time::Duration::from_secs(5))
                            .await
                        {
                            Ok(page) => page,
                            // The node is gone: the stream ends.
                            Err(_) => return,
                        };
                        for e in page {
                            after = Some(e.id);
                            if tx.send(Arc::new(e)).is_err() {
                                return;
                            }
                        }
                    }
                });
                RunEvents {
                    rx,
                    resource: format!("flotilla.flow-run.{id}"),
                }
            }
        }
    }
}

impl Local {
    /// Creates a run of the flow `flow` with JSON `params` (an object of the flow's arguments
    /// by name) and has this node run it. Returns at once with the run's id.
    async fn run(
        &self,
        flow: &str,
        params: serde_json::Value,
        key: Option<&str>,
    ) -> Result<FlowRunId, Error> {
        let Some(f) = self.engine.flow(flow) else {
            return Err(Error::UnknownFlow {
                name: flow.to_owned(),
                registered: self.engine.flow_names().join(", "),
            });
        };
        let params = if params.is_null() {
            serde_json::json!({})
        } else {
            params
        };
        f.check_params(&params).map_err(Error::Parameters)?;
        let options = f.options();
        let id = FlowRunId::new(now(), &mut rng());
        let new = NewFlowRun::new(id, flow, params)
            .with_options(options.retry, options.resume)
            .with_key(key.map(str::to_owned));
        let reply = self.persistence.submit(Command::CreateFlowRun(new)).await??;
        let Reply::FlowRunCreated { run, created } = reply else {
            return Err(Error::NoResult {
                run: id,
                reason: format!("unexpected answer {reply:?}"),
            });
        };
        // A run that existed under the key was started when it was made.
        if created {
            self.engine.run(run.id)?;
        }
        Ok(run.id)
    }

    /// Waits until the run is in a terminal state (Completed, Failed, Cancelled, Crashed) and
    /// returns it. Wrap it in `tokio::time::timeout` to bound the wait.
    async fn wait(&self, id: FlowRunId) -> Result<FlowRun, Error> {
        let mut events = self.events(id);
        loop {
            let run = self.flow_run(id).await?;
            if run.lifecycle.state.is_terminal() {
                return Ok(run);
            }
            loop {
                match events.next_or_missed().await {
                    Heard::Event(e) => {
                        if e.resource.id() == Some(&events.resource)
                            && e.state().is_some_and(State::is_terminal)
                        {
                            break;
                        }
                    }
                    // The end may have been among the missed events: read the run again.
                    Heard::Missed => break,
                    Heard::Closed => return Err(Error::Timeout(id)),
                }
            }
        }
    }

    /// A flow run.
    async fn flow_run(&self, id: FlowRunId) -> Result<FlowRun, Error> {
        self.persistence.flow_run(id).await?.ok_or(Error::NotFound(id))
    }

    /// A page of flow runs (at most 1,000), after `after` (by id).
    async fn flow_runs(
        &self,
        filter: RunFilter,
        after: Option<FlowRunId>,
        limit: usize,
    ) -> Result<Vec<FlowRun>, Error> {
        Ok(self.persistence.flow_runs(filter, after, limit).await?)
    }

    /// Every task run of a flow run, in creation order.
    async fn task_runs(&self, id: FlowRunId) -> Result<Vec<TaskRun>, Error> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self.persistence.task_runs(id, after, PAGE_MAX).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            all.extend(page);
        }
        Ok(all)
    }

    /// A flow run's states, oldest first.
    async fn history(&self, id: FlowRunId) -> Result<Vec<State>, Error> {
        let mut all = Vec::new();
        loop {
            let page = self
                .persistence
                .flow_run_history(id, all.len(), PAGE_MAX)
                .await?
                .ok_or(Error::NotFound(id))?;
            if page.is_empty() {
                break;
            }
            all.extend(page);
        }
        Ok(all)
    }

    /// A task run's states, oldest first.
    async fn task_history(&self, id: flotilla_runtime::TaskRunId) -> Result<Vec<State>, Error> {
        let mut all = Vec::new();
        loop {
            let reply = self
                .persistence
                .read(Read::TaskRunHistory {
                    run: id,
                    offset: all.len(),
                    limit: PAGE_MAX,
                })
                .await?;
            let ReadReply::History(Some(page)) = reply else {
                break;
            };
            if page.is_empty() {
                break;
            }
            all.extend(page);
        }
        Ok(all)
    }

    async fn logs_page(
        &self,
        id: FlowRunId,
        after: Option<LogCursor>,
        limit: usize,
    ) -> Result<(Vec<LogLine>, Option<LogCursor>), Error> {
        match self
            .persistence
            .read(Read::Logs {
                flow_run: id,
                after,
                limit,
            })
            .await?
        {
            ReadReply::Logs { lines, next } => Ok((lines, next)),
            other => Err(Error::NoResult {
                run: id,
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Follows a flow run's events (its own and its task runs') from now on.
    fn events(&self, id: FlowRunId) -> RunEvents {
        RunEvents {
            rx: self.persistence.subscribe(),
            resource: format!("flotilla.flow-run.{id}"),
        }
    }

    async fn result_bytes(&self, id: FlowRunId) -> Result<Vec<u8>, Error> {
        let run = self.flow_run(id).await?;
        let no = |reason: String| Error::NoResult { run: id, reason };
        let r = run
            .lifecycle
            .state
            .result
            .as_ref()
            .ok_or_else(|| no(format!("it is {}", run.lifecycle.state)))?;
        self.engine
            .ctx()
            .results
            .load_async(r)
            .await
            .map_err(|e| no(e.to_string()))
    }

    /// Cancels a flow run: one not yet running ends Cancelled at once; a running one stops its
    /// tasks and ends Cancelled. Returns the state it ends in.
    async fn cancel(&self, id: FlowRunId) -> Result<State, Error> {
        let p = Proposal::new(
            State::named(StateName::Cancelling, now()),
            TransitionId::new(now(), &mut rng()),
        );
        let reply = self
            .persistence
            .submit(Command::ProposeFlowRunState { run: id, proposal: p })
            .await??;
        match reply {
            Reply::FlowRunTransition {
                decision: Decision::Accept(s),
                ..
            } if s.name == StateName::Cancelling => {
                self.engine.cancel(id)?;
                Ok(self.wait(id).await?.lifecycle.state)
            }
            Reply::FlowRunTransition {
                decision: Decision::Accept(s) | Decision::Reject(s),
                ..
            } => {
                self.engine.cancel(id)?;
                Ok(s)
            }
            Reply::FlowRunTransition {
                decision: Decision::Abort(reason),
                ..
            } => Err(Error::Refused(flotilla_runtime::Refusal::Invalid(
                reason.to_string(),
            ))),
            other => Err(Error::NoResult {
                run: id,
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }

    async fn retry_with(&self, id: FlowRunId, force: bool) -> Result<State, Error> {
        let request = RetryRequest {
            transition_id: TransitionId::new(now(), &mut rng()),
            resume: false,
            force,
            message: None,
        };
        match self
            .persistence
            .submit(Command::RetryFlowRun { run: id, request })
            .await??
        {
            Reply::Retried { state, .. } => {
                self.engine.run(id)?;
                Ok(state)
            }
            other => Err(Error::NoResult {
                run: id,
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }
}
