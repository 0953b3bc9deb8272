//! The client of a cluster node over QUIC with mutual TLS: one bidirectional stream per request
//! (a frame each way), the connection dialled again when it was lost.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use flotilla_actors::persistence::RunFilter;
use flotilla_cluster::endpoint::{QuicEndpoint, TransportSettings};
use flotilla_cluster::frame;
use flotilla_cluster::tls::{ALPN_CLIENT, Identity};
use flotilla_cluster::wire::{
    ClusterStatus, Envelope, ErrorKind, PROTOCOL_VERSION, Request, Response, SchedulerStats, WAIT_MS_MAX,
    WireError,
};
use flotilla_runtime::{
    Deployment, DeploymentSpec, FlowRun, FlowRunId, LogCursor, LogLine, NodeId, State, TaskRun, Timestamp,
};
use tokio::sync::Mutex;

use crate::error::Error;

/// How long one request may take, the wait of a long poll aside.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Remote {
    endpoint: QuicEndpoint,
    /// The nodes to talk to (any node of the cluster answers), each with its server name.
    addrs: Vec<(SocketAddr, String)>,
    /// The connection in use, and which of `addrs` it goes to.
    conn: Mutex<(Option<quinn::Connection>, usize)>,
    /// Reads may be answered from the replica of the node asked.
    stale: bool,
}

/// Splits `host:port` (or `[v6]:port`) and resolves it.
async fn resolve(addr: &str) -> Result<(SocketAddr, String), Error> {
    let bad = || Error::Unreachable(format!("{addr:?} is not an address (expected host:port)"));
    let (host, _port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    if host.is_empty() {
        return Err(bad());
    }
    let mut found = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::Unreachable(format!("cannot resolve {addr}: {e}")))?;
    let first = found
        .next()
        .ok_or_else(|| Error::Unreachable(format!("{addr} resolves to no address")))?;
    Ok((first, host))
}

/// Items asked for per page when reading a whole listing.
const PAGE_ITEMS: u32 = 500;

fn wire_error(e: WireError, run: Option<FlowRunId>) -> Error {
    match (e.kind, run) {
        (ErrorKind::NotFound, Some(id)) if e.message.starts_with("no flow run") => Error::NotFound(id),
        (ErrorKind::Unavailable, _) => Error::Unavailable(e.message),
        (ErrorKind::Protocol, _) => Error::Protocol(e.message),
        (kind, _) => Error::Cluster {
            code: kind.code(),
            message: e.message,
        },
    }
}

fn unexpected(r: &Response) -> Error {
    let name = format!("{r:?}");
    Error::Protocol(format!(
        "unexpected answer {}",
        name.split(['(', ' ', '{']).next().unwrap_or("")
    ))
}

/// How long a client waits on a node's handshake before dialling the next one as well.
const DIAL_STAGGER: Duration = Duration::from_millis(300);

impl Remote {
    /// Connects to the first node of `addr` (`host:port`, or several separated by commas) that
    /// answers; later, a connection lost is made again to the next that answers.
    pub(crate) async fn connect(addr: &str, certs: &Path, identity: &str) -> Result<Remote, Error> {
        let mut addrs = Vec::new();
        for one in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            addrs.push(resolve(one).await?);
        }
        let Some(&(sock, _)) = addrs.first() else {
            return Err(Error::Unreachable(format!(
                "{addr:?} names no address (expected host:port)"
            )));
        };
        let identity = Identity::load(certs, identity)
            .map_err(|e| Error::Unreachable(format!("cannot load the client certificate: {e}")))?;
        let local: SocketAddr = if sock.is_ipv6() {
            ([0u16; 8], 0).into()
        } else {
            ([0, 0, 0, 0], 0).into()
        };
        let endpoint = QuicEndpoint::client_on(local, identity, TransportSettings::default())
            .map_err(|e| Error::Unreachable(e.to_string()))?;
        let remote = Remote {
            endpoint,
            addrs,
            conn: Mutex::new((None, 0)),
            stale: false,
        };
        remote.connection().await?;
        Ok(remote)
    }

    /// The same nodes, reads answered from the replica of the node asked.
    pub(crate) fn stale(&self) -> Remote {
        Remote {
            endpoint: self.endpoint.clone(),
            addrs: self.addrs.clone(),
            conn: Mutex::new((None, 0)),
            stale: true,
        }
    }

    /// The connection in use, or a new one: to the node of the last one first, then to each
    /// other in turn, the next dialled when the one before failed or has not answered within
    /// [`DIAL_STAGGER`] (a dead node costs that much, not its whole handshake timeout); the
    /// first that answers is kept.
    async fn connection(&self) -> Result<quinn::Connection, Error> {
        use futures::StreamExt as _;
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.0.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let n = self.addrs.len();
        let dial = |k: usize| {
            let i = (slot.1 + k) % n;
            let (sock, name) = self.addrs[i].clone();
            let endpoint = self.endpoint.clone();
            async move {
                endpoint
                    .connect(sock, &name, ALPN_CLIENT)
                    .await
                    .map(|c| (i, c))
                    .map_err(|e| format!("{sock}: {e}"))
            }
        };
        let mut dialling = futures::stream::FuturesUnordered::new();
        dialling.push(dial(0));
        let mut next = 1;
        let mut failures = Vec::new();
        loop {
            let answer = tokio::select! {
                a = dialling.next() => a,
                () = tokio::time::sleep(DIAL_STAGGER), if next < n => None,
            };
            let waited = answer.is_none();
            match answer {
                Some(Ok((i, c))) => {
                    *slot = (Some(c.clone()), i);
                    return Ok(c);
                }
                Some(Err(e)) => failures.push(e),
                None => {}
            }
            if next < n && (waited || dialling.is_empty()) {
                dialling.push(dial(next));
                next += 1;
            } else if dialling.is_empty() {
                return Err(Error::Unreachable(failures.join("; ")));
            }
        }
    }

    /// The address of the node in use.
    async fn addr(&self) -> SocketAddr {
        let i = self.conn.lock().await.1;
        self.addrs[i].0
    }

    /// One request, one answer; a request on a connection found dead is sent again on a fresh
    /// one (to the next node that answers, when there are several), with the same request id:
    /// a resent request gets its first answer.
    async fn ask(&self, request: Request, run: Option<FlowRunId>) -> Result<Response, Error> {
        let request_id = request.is_mutating().then(|| {
            let id = FlowRunId::new(crate::client::now(), &mut crate::client::rng());
            flotilla_runtime::control::RequestId::from_uuid(*id.as_uuid())
        });
        let envelope = Envelope {
            version: PROTOCOL_VERSION,
            stale: self.stale && !request.is_mutating(),
            request,
            request_id,
        };
        let mut tries = 0;
        loop {
            tries += 1;
            let conn = self.connection().await?;
            let exchange = async {
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                // No limit of our own: the node refuses an oversized request by its length
                // prefix, stops reading, and still answers why.
                let written = frame::write_limited(&mut send, &envelope, u32::MAX as usize).await;
                if written.is_ok() {
                    let _ = send.finish();
                }
                match frame::read::<Response, _>(&mut recv).await {
                    Ok(r) => Ok(r),
                    Err(e) => Err(written.err().map_or_else(|| e.to_string(), |w| w.to_string())),
                }
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok(Response::Error(e))) => return Err(wire_error(e, run)),
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) if tries > self.addrs.len() || conn.close_reason().is_none() => {
                    let why = conn.close_reason().map_or(e, |r| r.to_string());
                    return Err(Error::Unreachable(format!(
                        "lost the connection to {}: {why}",
                        self.addr().await
                    )));
                }
                Ok(Err(_)) => {
                    // The next try connects afresh, starting with the next node.
                    let mut slot = self.conn.lock().await;
                    slot.1 = (slot.1 + 1) % self.addrs.len();
                    continue;
                }
                Err(_) => {
                    return Err(Error::Unreachable(format!(
                        "{} did not answer in {REQUEST_TIMEOUT:?}",
                        self.addr().await
                    )));
                }
            }
        }
    }

    pub(crate) async fn run(
        &self,
        flow: &str,
        params: serde_json::Value,
        key: Option<&str>,
    ) -> Result<FlowRunId, Error> {
        // The run's id is chosen here, once: a resend of the request carries it again, and the
        // node returns the run the first one made.
        let request = Request::RunFlow {
            flow: flow.to_owned(),
            params,
            id: Some(FlowRunId::new(crate::client::now(), &mut crate::client::rng())),
            idempotency_key: key.map(str::to_owned),
        };
        match self.ask(request, None).await? {
            Response::Ran(id) => Ok(id),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn wait(&self, id: FlowRunId) -> Result<FlowRun, Error> {
        loop {
            match self
                .ask(
                    Request::Wait {
                        run: id,
                        timeout_ms: WAIT_MS_MAX,
                    },
                    Some(id),
                )
                .await?
            {
                // Crashed is not the end of a run that is about to resume elsewhere.
                Response::FlowRun(r) if r.still_going(Timestamp::from(chrono::Utc::now())).is_none() => {
                    return Ok(*r);
                }
                Response::FlowRun(_) => continue,
                other => return Err(unexpected(&other)),
            }
        }
    }

    pub(crate) async fn wait_for(&self, id: FlowRunId, max: Duration) -> Result<FlowRun, Error> {
        let timeout_ms = u32::try_from(max.as_millis())
            .unwrap_or(u32::MAX)
            .min(WAIT_MS_MAX);
        match self.ask(Request::Wait { run: id, timeout_ms }, Some(id)).await? {
            Response::FlowRun(r) => Ok(*r),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn flow_run(&self, id: FlowRunId) -> Result<FlowRun, Error> {
        match self.ask(Request::FlowRun(id), Some(id)).await? {
            Response::FlowRun(r) => Ok(*r),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn flow_runs(
        &self,
        filter: RunFilter,
        after: Option<FlowRunId>,
        limit: usize,
    ) -> Result<Vec<FlowRun>, Error> {
        let (state, deployment) = match filter {
            RunFilter::All => (None, None),
            RunFilter::State(s) => (Some(s), None),
            RunFilter::Deployment(d) => (None, Some(d)),
        };
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        let request = Request::FlowRuns {
            state,
            after,
            limit,
            deployment,
        };
        match self.ask(request, None).await? {
            Response::FlowRuns(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Every task run of a flow run, page by page (see [`Remote::all_pages`]).
    pub(crate) async fn task_runs(&self, id: FlowRunId) -> Result<Vec<TaskRun>, Error> {
        self.all_pages(
            id,
            |all: &[TaskRun], limit| Request::TaskRunsPage {
                run: id,
                after: all.last().map(|t| t.id),
                limit,
            },
            |r| match r {
                Response::TaskRuns(page) => Ok(page),
                other => Err(unexpected(&other)),
            },
        )
        .await
    }

    /// Every state of a flow run, page by page (see [`Remote::all_pages`]).
    pub(crate) async fn history(&self, id: FlowRunId) -> Result<Vec<State>, Error> {
        self.all_pages(
            id,
            |all: &[State], limit| Request::HistoryPage {
                run: id,
                offset: u32::try_from(all.len()).unwrap_or(u32::MAX),
                limit,
            },
            |r| match r {
                Response::History(page) => Ok(page),
                other => Err(unexpected(&other)),
            },
        )
        .await
    }

    /// A whole listing about run `id`, page by page: `ask` makes the request for the next page
    /// from what was read so far; each page is held to the node's message limit (a page over it
    /// is asked again at half the size).
    async fn all_pages<T>(
        &self,
        id: FlowRunId,
        ask: impl Fn(&[T], u32) -> Request,
        page_of: impl Fn(Response) -> Result<Vec<T>, Error>,
    ) -> Result<Vec<T>, Error> {
        let mut all: Vec<T> = Vec::new();
        let mut limit = PAGE_ITEMS;
        loop {
            match self.ask(ask(&all, limit), Some(id)).await.and_then(&page_of) {
                Ok(page) => {
                    let done = page.len() < limit as usize;
                    all.extend(page);
                    if done {
                        return Ok(all);
                    }
                }
                Err(e) if e.code() == "payload_too_large" && limit > 1 => limit /= 2,
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) async fn logs_page(
        &self,
        id: FlowRunId,
        after: Option<LogCursor>,
        limit: usize,
    ) -> Result<(Vec<LogLine>, Option<LogCursor>), Error> {
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        match self
            .ask(
                Request::Logs {
                    run: id,
                    after,
                    limit,
                },
                Some(id),
            )
            .await?
        {
            Response::Logs { lines, next } => Ok((lines, next)),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn result_bytes(&self, id: FlowRunId) -> Result<Vec<u8>, Error> {
        match self.ask(Request::Result(id), Some(id)).await {
            Ok(Response::Result(b)) => Ok(b),
            Ok(other) => Err(unexpected(&other)),
            Err(Error::Cluster { message: reason, .. } | Error::Unavailable(reason)) => {
                Err(Error::NoResult { run: id, reason })
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn cancel(&self, id: FlowRunId) -> Result<State, Error> {
        match self.ask(Request::Cancel(id), Some(id)).await? {
            Response::State(s) if s.is_terminal() => Ok(s),
            Response::State(_) => Ok(self.wait(id).await?.lifecycle.state),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn retry_with(&self, id: FlowRunId, force: bool) -> Result<State, Error> {
        match self.ask(Request::Retry { run: id, force }, Some(id)).await? {
            Response::State(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn cluster_status(&self) -> Result<ClusterStatus, Error> {
        match self.ask(Request::Status, None).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn remove_node(&self, node: &str) -> Result<(), Error> {
        let id: NodeId = node
            .parse()
            .map_err(|e: flotilla_runtime::ids::IdParseError| Error::Parameters(e.to_string()))?;
        match self.ask(Request::RemoveNode(id), None).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn change_voters(
        &self,
        change: flotilla_cluster::wire::VoterChange,
    ) -> Result<Option<flotilla_cluster::wire::ReplicationStatus>, Error> {
        match self.ask(Request::Voters(change), None).await? {
            Response::Status(s) => Ok(s.replication),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn put_deployment(&self, spec: DeploymentSpec) -> Result<Deployment, Error> {
        match self.ask(Request::PutDeployment(Box::new(spec)), None).await? {
            Response::Deployment(d) => Ok(*d),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn deployment(&self, name: &str) -> Result<Deployment, Error> {
        match self.ask(Request::Deployment(name.to_owned()), None).await? {
            Response::Deployment(d) => Ok(*d),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn deployments(&self) -> Result<Vec<Deployment>, Error> {
        match self.ask(Request::Deployments, None).await? {
            Response::Deployments(d) => Ok(d),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn delete_deployment(&self, name: &str) -> Result<(), Error> {
        match self.ask(Request::DeleteDeployment(name.to_owned()), None).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn run_deployment(
        &self,
        name: &str,
        params: serde_json::Value,
        key: Option<&str>,
    ) -> Result<FlowRunId, Error> {
        let request = Request::RunDeployment {
            name: name.to_owned(),
            params,
            id: Some(FlowRunId::new(crate::client::now(), &mut crate::client::rng())),
            idempotency_key: key.map(str::to_owned),
        };
        match self.ask(request, None).await? {
            Response::Ran(id) => Ok(id),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn work_queue(
        &self,
        name: &str,
        change: flotilla_cluster::wire::QueueChange,
    ) -> Result<Option<flotilla_cluster::wire::QueueInfo>, Error> {
        let request = Request::WorkQueue {
            name: name.to_owned(),
            change,
        };
        match self.ask(request, None).await? {
            Response::WorkQueues(mut q) => Ok(q.pop()),
            Response::Done => Ok(None),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn work_queues(&self) -> Result<Vec<flotilla_cluster::wire::QueueInfo>, Error> {
        match self.ask(Request::WorkQueues, None).await? {
            Response::WorkQueues(q) => Ok(q),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn concurrency_limit(
        &self,
        tag: &str,
        change: flotilla_cluster::wire::LimitChange,
    ) -> Result<Option<flotilla_runtime::ConcurrencyLimit>, Error> {
        let request = Request::ConcurrencyLimit {
            tag: tag.to_owned(),
            change,
        };
        match self.ask(request, None).await? {
            Response::ConcurrencyLimits(mut l) => Ok(l.pop()),
            Response::Done => Ok(None),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn concurrency_limits(&self) -> Result<Vec<flotilla_runtime::ConcurrencyLimit>, Error> {
        match self.ask(Request::ConcurrencyLimits, None).await? {
            Response::ConcurrencyLimits(l) => Ok(l),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn events(
        &self,
        after: Option<flotilla_runtime::EventId>,
        prefix: Option<String>,
        limit: u32,
        wait: std::time::Duration,
    ) -> Result<Vec<flotilla_runtime::Event>, Error> {
        let request = Request::Events {
            after,
            prefix,
            limit,
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
        };
        match self.ask(request, None).await? {
            Response::Events(e) => Ok(e),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn find_events(
        &self,
        after: Option<flotilla_runtime::EventId>,
        filter: flotilla_runtime::EventFilter,
        limit: u32,
        wait: std::time::Duration,
    ) -> Result<(Vec<flotilla_runtime::Event>, Option<flotilla_runtime::EventId>), Error> {
        let request = Request::FindEvents {
            after,
            filter: Box::new(filter),
            limit,
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
        };
        match self.ask(request, None).await? {
            Response::EventPage { events, next } => Ok((events, next)),
            other => Err(unexpected(&other)),
        }
    }

    pub(crate) async fn emit_event(
        &self,
        event: flotilla_runtime::Event,
    ) -> Result<flotilla_runtime::EventId, Error> {
        match self.ask(Request::EmitEvent(Box::new(event)), None).await? {
            Response::EventEmitted(id) => Ok(id),
            other => Err(unexpected(&other)),
        }
    }

    /// Any request, answered as sent (an error answer is an error).
    pub(crate) async fn request(&self, request: Request) -> Result<Response, Error> {
        self.ask(request, None).await
    }

    pub(crate) async fn scheduler_stats(&self) -> Result<SchedulerStats, Error> {
        match self.ask(Request::SchedulerStats, None).await? {
            Response::SchedulerStats(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }
}
