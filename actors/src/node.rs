//! A cluster node: one QUIC endpoint (mutual TLS), a ractor_cluster node server whose sessions
//! ride on QUIC streams, the engine, an agent, and on the control node the persistence actor
//! and the control actor. Workers join through seeds (redialled with backoff) and reach the
//! control state through the control actor.

pub mod agent;
pub mod automations;
pub mod control;
mod lead;
pub mod link;
pub mod plane;
pub mod replies;
pub mod scheduler;
pub mod typed;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flotilla_cluster::bidi::QuicBidi;
use flotilla_cluster::wire::{
    ClusterStatus, Envelope, ErrorKind, PROTOCOL_VERSION, Request, Response, WireError,
};
use flotilla_cluster::{ALPN_CLIENT, ALPN_NODE, Identity, QuicEndpoint, TransportSettings, certs, frame};
use flotilla_runtime::NodeId;
use ractor::{Actor, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};

use crate::engine::results::ResultStore;
use crate::engine::worker::{self, EngineHandle};
use crate::engine::{EngineConfig, FlowFn};
use crate::persistence::{self, PersistenceConfig, PersistenceHandle};
use crate::replication::voter::{self as voting, Greet, Voter};
use agent::{Agent, AgentArgs};
use control::{Control, ControlArgs, ControlMsg, MembershipSettings};
use lead::{Singletons, follow_leadership, keep_greeting, keep_link};
use plane::{ControlPlane, RemoteControl, control_actor};
use typed::Wire;

/// What a node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Holds the control state (and runs work).
    Control,
    /// Runs work.
    Worker,
}

impl Role {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::Worker => "worker",
        }
    }
}

/// A node to join through: its address, and the host name it was given by (the TLS server
/// name its certificate must be valid for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    /// The resolved address.
    pub addr: SocketAddr,
    /// The host as given (a name or an IP).
    pub host: String,
}

/// How a node runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Its name (its certificate's).
    pub name: NodeId,
    /// Where it listens (QUIC).
    pub listen: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The cluster's certificates directory.
    pub certs_dir: PathBuf,
    /// Seeds to join.
    pub join: Vec<Seed>,
    /// Control or worker.
    pub role: Role,
    /// Flow runs it runs at once.
    pub slots: usize,
    /// How often it reports to the control node.
    pub heartbeat_every: Duration,
    /// A member silent this long is unreachable (control node).
    pub unreachable_after: Duration,
    /// A run not started this long after its scheduled time is marked Late (control node).
    pub late_after: Duration,
    /// How long a worker tries its seeds before giving up.
    pub join_timeout: Duration,
    /// QUIC keep-alive and idle timeout.
    pub transport: TransportSettings,
    /// Whether flow and task logs are printed to stderr.
    pub log_to_stderr: bool,
    /// How far ahead the scheduler creates runs (control node).
    pub schedule: scheduler::ScheduleSettings,
    /// The work queues this node's worker serves (empty: all).
    pub queues: Vec<String>,
    /// The largest request or reply it takes or sends (bulk data aside).
    pub message_bytes_max: usize,
    /// How long the control node keeps events, logs and terminal runs.
    pub retention: persistence::Retention,
    /// How many flow and task runs the control node holds in memory (live ones always are).
    pub memory_runs: usize,
    /// How many answers to mutating requests are remembered (to answer a request sent again
    /// with its first answer), and how long.
    pub answers: replies::AnswerBounds,
    /// The voters of a replicated control state, by name (empty: one control node, as `role`
    /// says). A voter holds a replica and may lead; every node runs work.
    pub voters: Vec<String>,
    /// A voter's snapshots: how often, and how much log it keeps behind one.
    pub snapshots: crate::replication::voter::Snapshots,
    /// Where large results go, every node reading them (`file:///PATH`, `s3://BUCKET/PREFIX`);
    /// none: to the control node's result store.
    pub result_store: Option<crate::engine::object_results::ResultStoreUrl>,
}

impl NodeConfig {
    /// Defaults for a node.
    pub fn new(name: NodeId, listen: SocketAddr, data_dir: PathBuf, certs_dir: PathBuf) -> Self {
        NodeConfig {
            name,
            listen,
            data_dir,
            certs_dir,
            join: Vec::new(),
            role: Role::Control,
            slots: 64,
            heartbeat_every: Duration::from_millis(250),
            unreachable_after: Duration::from_secs(1),
            late_after: control::LATE_AFTER,
            join_timeout: Duration::from_secs(60),
            transport: TransportSettings::default(),
            log_to_stderr: true,
            schedule: scheduler::ScheduleSettings::default(),
            queues: Vec::new(),
            message_bytes_max: frame::MESSAGE_BYTES_DEFAULT,
            retention: persistence::Retention::default(),
            memory_runs: persistence::store::MEMORY_RUNS_DEFAULT,
            answers: replies::AnswerBounds::default(),
            voters: Vec::new(),
            snapshots: crate::replication::voter::Snapshots::default(),
            result_store: None,
        }
    }
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The certificates could not be used.
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    /// TLS or QUIC could not be set up.
    #[error(transparent)]
    Transport(#[from] flotilla_cluster::ConnectError),
    /// The certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] flotilla_cluster::TlsError),
    /// A node holding the control state has no secrets key.
    #[error(transparent)]
    Secrets(#[from] flotilla_cluster::secrets::SecretsError),
    /// The data directory could not be opened.
    #[error(transparent)]
    Storage(#[from] persistence::StartError),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] worker::EngineError),
    /// No seed answered in time.
    #[error("cannot join the cluster: no control node answered through {seeds} within {timeout:?}")]
    Join {
        /// The seeds tried.
        seeds: String,
        /// How long.
        timeout: Duration,
    },
    /// An actor could not start.
    #[error("cannot start the node: {0}")]
    Spawn(String),
    /// It could not take its place in the replicated control state.
    #[error(transparent)]
    Replication(#[from] crate::replication::voter::VoterError),
}

/// A running node.
pub struct ClusterNode {
    /// Its QUIC endpoint.
    pub endpoint: QuicEndpoint,
    /// Its engine.
    pub engine: EngineHandle,
    /// Its view of the control plane.
    pub plane: ControlPlane,
    /// The latest membership it learned.
    pub view: Arc<RwLock<ClusterStatus>>,
    persistence: Option<(PersistenceHandle, ractor::concurrency::JoinHandle<()>)>,
    engine_join: ractor::concurrency::JoinHandle<()>,
    /// A voter's replication.
    pub voter: Option<Voter>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("endpoint", &self.endpoint.local_addr())
            .finish_non_exhaustive()
    }
}

impl ClusterNode {
    /// Stops the node: its engine, then its store.
    pub async fn stop(self) {
        if let Some(v) = &self.voter {
            let _ = v.raft.shutdown().await;
        }
        self.endpoint.close();
        self.engine.stop(self.engine_join).await;
        if let Some((p, j)) = self.persistence {
            p.stop(j).await;
        }
    }
}

/// Carries one incoming node connection's streams to the node server as ractor_cluster sessions.
async fn serve_node_connection(
    conn: quinn::Connection,
    server: ActorRef<NodeServerMessage>,
    local: String,
    certs: flotilla_cluster::identity::PeerCerts,
) {
    let peer = conn.remote_address().to_string();
    if !flotilla_cluster::role::CertRole::of_peer(&conn).may_join() {
        tracing::warn!(%peer, "refused a node session from a client's certificate");
        conn.close(
            1u32.into(),
            b"forbidden: a client certificate cannot join the cluster",
        );
        return;
    }
    // Its sessions carry a label under which its certificate is kept: the name a session
    // claims is checked against it.
    let label = certs.label(&conn);
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (stream, ended) = QuicBidi::new(send, recv, label.clone(), local.clone());
        let stream = Box::new(stream);
        // A session that ends (refused, or closed by either side) takes its connection with it,
        // so the node at the other end dials again rather than wait on a dead link.
        let c = conn.clone();
        tokio::spawn(async move {
            let _ = ended.await;
            c.close(0u32.into(), b"the cluster session ended");
        });
        if server
            .cast(NodeServerMessage::ConnectionOpenedExternal {
                stream,
                is_server: true,
            })
            .is_err()
        {
            break;
        }
    }
    certs.forget(&label);
}

/// Serves one client connection: each stream is one request, answered by the control actor
/// (a shipped result, by the control node's result store). A request or reply over the message
/// limit is answered with `payload_too_large`; the connection stays up.
async fn serve_client_connection(
    conn: quinn::Connection,
    results: Option<ResultStore>,
    message_bytes_max: usize,
    replies: replies::Replies,
    replica: Option<PersistenceHandle>,
) {
    let role = flotilla_cluster::role::CertRole::of_peer(&conn);
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let (results, replies, replica) = (results.clone(), replies.clone(), replica.clone());
        tokio::spawn(async move {
            let response = match read_request(&mut recv, message_bytes_max).await {
                Err(e) => Response::Error(e),
                // A stale read of runs, histories or logs: from this voter's replica.
                Ok(env) if env.stale && stale_read(&env.request) && env.version == PROTOCOL_VERSION => {
                    match (&replica, &results) {
                        (Some(p), Some(r)) => control::read_request(p, r, env.request).await,
                        _ => answer(env, role, results).await,
                    }
                }
                // A resent request gets its first answer.
                Ok(env) => match env.request_id {
                    Some(id) if env.request.is_mutating() => {
                        replies.once(id, answer(env, role, results)).await
                    }
                    _ => answer(env, role, results).await,
                },
            };
            let encoded = match frame::encode_frame(&response) {
                // Bulk data (a result's bytes) may use the whole frame; other replies are held
                // to the message limit.
                Ok(f) if f.len() - 4 > message_bytes_max && !matches!(response, Response::Result(_)) => {
                    frame::encode_frame(&Response::Error(WireError::too_large(
                        "the reply",
                        f.len() - 4,
                        message_bytes_max,
                    )))
                }
                other => other,
            };
            match encoded {
                Ok(f) => {
                    if let Err(e) = frame::write_frame(&mut send, &f, frame::FRAME_BYTES_MAX).await {
                        tracing::warn!(error = %e, "cannot send a reply");
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot encode a reply"),
            }
            let _ = send.finish();
        });
    }
}

/// Whether a request is a read a replica may answer (`--stale`).
fn stale_read(request: &Request) -> bool {
    matches!(
        request,
        Request::FlowRun(_)
            | Request::FlowRuns { .. }
            | Request::TaskRuns(_)
            | Request::TaskRunsPage { .. }
            | Request::HistoryPage { .. }
            | Request::History(_)
            | Request::Logs { .. }
    )
}

/// Answers one request of a peer whose certificate has `role`.
async fn answer(
    env: Envelope,
    role: flotilla_cluster::role::CertRole,
    results: Option<ResultStore>,
) -> Response {
    if env.version != PROTOCOL_VERSION {
        return Response::Error(WireError::new(
            ErrorKind::Protocol,
            format!(
                "protocol version {} is not spoken here (this node speaks {PROTOCOL_VERSION})",
                env.version
            ),
        ));
    }
    if let Some(e) = env.request.forbidden_for(role) {
        return Response::Error(e);
    }
    match env.request {
        Request::PutResult { key, bytes } => put_result(results, key, bytes).await,
        Request::GetResult { key } => get_result(results, key).await,
        request => ask_control(env.request_id, &request).await,
    }
}

/// Reads one request, held to the message limit (a shipped result, bulk data, to the frame
/// limit). An oversized request is refused by its length prefix, before its bytes are read: the
/// stream's receiving side is stopped, and the reply still goes out.
async fn read_request(recv: &mut quinn::RecvStream, message_bytes_max: usize) -> Result<Envelope, WireError> {
    let bad = |e: frame::FrameError| WireError::new(ErrorKind::Protocol, format!("a bad request: {e}"));
    let len = frame::read_len(recv).await.map_err(bad)?;
    if len > message_bytes_max.max(frame::FRAME_BYTES_MAX) {
        let _ = recv.stop(0u32.into());
        return Err(WireError::too_large("a request", len, message_bytes_max));
    }
    let env: Envelope = frame::read_payload(recv, len).await.map_err(bad)?;
    if len > message_bytes_max && !matches!(env.request, Request::PutResult { .. }) {
        return Err(WireError::too_large("a request", len, message_bytes_max));
    }
    Ok(env)
}

/// Keeps a shipped result in this (control) node's result store.
async fn put_result(results: Option<ResultStore>, key: String, bytes: Vec<u8>) -> Response {
    let Some(results) = results else {
        return Response::Error(WireError::new(
            ErrorKind::Unavailable,
            "this node does not hold the control state",
        ));
    };
    if !crate::engine::results::valid_key(&key) {
        return Response::Error(WireError::new(
            ErrorKind::Refused,
            format!("{key:?} is not a result key"),
        ));
    }
    match tokio::task::spawn_blocking(move || results.put(&key, &bytes)).await {
        Ok(Ok(())) => Response::Done,
        Ok(Err(e)) => Response::Error(WireError::new(ErrorKind::Unavailable, e.to_string())),
        Err(e) => Response::Error(WireError::new(ErrorKind::Unavailable, e.to_string())),
    }
}

/// Reads a result from this (control) node's result store, by its key.
async fn get_result(results: Option<ResultStore>, key: String) -> Response {
    let Some(results) = results else {
        return Response::Error(WireError::new(
            ErrorKind::Unavailable,
            "this node does not hold the control state",
        ));
    };
    match tokio::task::spawn_blocking(move || results.get(&key)).await {
        Ok(Ok(bytes)) => Response::Result(bytes),
        Ok(Err(e)) => Response::Error(WireError::new(ErrorKind::NotFound, e.to_string())),
        Err(e) => Response::Error(WireError::new(ErrorKind::Unavailable, e.to_string())),
    }
}

/// Ships a worker's large results to the control node over a QUIC connection of their own
/// (the client protocol, with the node's certificate).
#[derive(Debug)]
struct QuicShipper(link::ControlLink);

impl QuicShipper {
    async fn ship_async(&self, key: &str, bytes: &[u8]) -> Result<(), String> {
        let request = Request::PutResult {
            key: key.to_owned(),
            bytes: bytes.to_vec(),
        };
        match self.0.ask(request).await? {
            Response::Done => Ok(()),
            Response::Error(e) => Err(e.message),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }
}

impl crate::engine::results::ResultShipper for QuicShipper {
    fn fetch(&self, key: &str) -> Result<Vec<u8>, String> {
        let handle = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
        let request = Request::GetResult { key: key.to_owned() };
        handle.block_on(async {
            match tokio::time::timeout(plane::CALL_TIMEOUT * 6, self.0.ask(request)).await {
                Err(_) => Err("the control node did not answer in time".to_owned()),
                Ok(Err(e)) => Err(e),
                Ok(Ok(Response::Result(bytes))) => Ok(bytes),
                Ok(Ok(Response::Error(e))) => Err(e.message),
                Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
            }
        })
    }

    fn ship(&self, key: &str, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() + 1024 > frame::FRAME_BYTES_MAX {
            return Err(format!(
                "a result of {} bytes is over the {} a node ships to the control node",
                bytes.len(),
                frame::FRAME_BYTES_MAX - 1024
            ));
        }
        let handle = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
        handle.block_on(async {
            tokio::time::timeout(plane::CALL_TIMEOUT * 6, self.ship_async(key, bytes))
                .await
                .map_err(|_| "the control node did not answer in time".to_owned())?
        })
    }
}

/// Asks the control actor (local or remote) a client request.
pub async fn ask_control(
    request_id: Option<flotilla_runtime::control::RequestId>,
    request: &flotilla_cluster::wire::Request,
) -> Response {
    let Some(control) = control_actor() else {
        return Response::Error(WireError::new(
            ErrorKind::Unavailable,
            "no control node is connected to this node",
        ));
    };
    // A mutating request with an id is answered once by the control node, its answer kept in
    // the log; runs are not (they are made once by their id or key already).
    let once = request_id.filter(|_| {
        request.is_mutating()
            && !matches!(
                request,
                Request::RunFlow { .. }
                    | Request::RunDeployment { .. }
                    | Request::Heartbeat(_)
                    // The leader may change with it: its answer is not written to the log.
                    | Request::Voters(_)
            )
    });
    let request = request.clone();
    match control
        .call(
            |port| match once {
                Some(id) => ControlMsg::Asked(Wire::new((id, request)), port),
                None => ControlMsg::Request(Wire::new(request), port),
            },
            Some(plane::CALL_TIMEOUT),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(reply)) => reply.get().unwrap_or_else(|e| {
            Response::Error(WireError::new(
                ErrorKind::Protocol,
                format!("an undecodable answer: {e}"),
            ))
        }),
        _ => Response::Error(WireError::new(
            ErrorKind::Unavailable,
            "the control node did not answer",
        )),
    }
}

/// Starts a node.
pub async fn start(config: NodeConfig, flows: Vec<Arc<dyn FlowFn>>) -> Result<ClusterNode, NodeError> {
    let identity = Identity::load(&config.certs_dir, config.name.as_str())?;
    let cookie = certs::cookie(&config.certs_dir)?;
    let endpoint = QuicEndpoint::bind(config.listen, identity, config.transport)?;
    let local = endpoint
        .local_addr()
        .map_or_else(|| config.listen.to_string(), |a| a.to_string());
    // ractor_cluster's own TCP listener is never used for peers: keep it on loopback.
    let server = NodeServer::new(
        0,
        cookie,
        config.name.to_string(),
        "localhost".to_owned(),
        None,
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    )
    .with_listen_addr(std::net::IpAddr::from([127, 0, 0, 1]));
    let (node_server, _) = Actor::spawn(None, server, ())
        .await
        .map_err(|e| NodeError::Spawn(e.to_string()))?;
    let peer_certs = flotilla_cluster::identity::PeerCerts::default();
    node_server
        .cast(NodeServerMessage::SubscribeToEvents {
            id: "flotilla.check-names".to_owned(),
            subscription: Box::new(flotilla_cluster::identity::CheckNames(peer_certs.clone())),
        })
        .map_err(|e| NodeError::Spawn(e.to_string()))?;

    let catalog = crate::engine::FlowCatalog::of(&flows);
    let voting = !config.voters.is_empty();
    let is_voter = config.voters.iter().any(|v| v == config.name.as_str());
    let me = crate::replication::Member {
        name: config.name.to_string(),
        addr: local.clone(),
    };
    let seeds: Vec<Greet> = config
        .join
        .iter()
        .map(|s| Greet {
            addr: s.addr,
            host: s.host.clone(),
        })
        .collect();
    // A node that holds the control state needs the key that seals blocks' secrets: refused
    // now, naming the file, rather than when it first leads.
    if (voting && is_voter) || (!voting && config.role == Role::Control) {
        flotilla_cluster::secrets::SecretsKey::load(&config.certs_dir)?;
    }
    let mut voter = None;
    let (plane, persistence) = match config.role {
        _ if voting && is_voter => {
            let pconfig = PersistenceConfig {
                retention: config.retention,
                memory_runs: config.memory_runs,
                ..PersistenceConfig::new(&config.data_dir)
            };
            let opened = tokio::task::spawn_blocking(move || persistence::open_replica(pconfig))
                .await
                .map_err(|e| NodeError::Spawn(e.to_string()))?
                .map_err(persistence::StartError::from)?;
            let record = crate::replication::machine::AppliedRecord::decode(opened.store().replication())
                .map_err(|e| {
                    crate::replication::voter::VoterError::Raft(format!(
                        "the store's record of what it applied: {e}"
                    ))
                })?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (p, join) = persistence::start_replica(opened, tx).await?;
            voter = Some(
                voting::start(
                    &me,
                    &config.data_dir,
                    Arc::new(endpoint.clone()),
                    &p,
                    record,
                    rx,
                    config.snapshots,
                )
                .await?,
            );
            (ControlPlane::Remote(RemoteControl::start()), Some((p, join)))
        }
        _ if voting => (ControlPlane::Remote(RemoteControl::start()), None),
        Role::Control => {
            let pconfig = PersistenceConfig {
                retention: config.retention,
                memory_runs: config.memory_runs,
                ..PersistenceConfig::new(&config.data_dir)
            };
            let (p, join) = persistence::start(pconfig).await?;
            // One control node: its singletons run for as long as it does.
            let _ = Singletons::start(&p, &config, &flows, &catalog, None).await?;
            (ControlPlane::Local(p.clone()), Some((p, join)))
        }
        Role::Worker => (ControlPlane::Remote(RemoteControl::start()), None),
    };

    // Connections in: node sessions and clients.
    {
        let endpoint = endpoint.clone();
        let server = node_server.clone();
        let local = local.clone();
        let results = (if voting {
            is_voter
        } else {
            config.role == Role::Control
        })
        .then(|| ResultStore::new(config.data_dir.join("results"), usize::MAX));
        let voter = voter.clone();
        let replica = voter.as_ref().and(persistence.as_ref()).map(|(p, _)| p.clone());
        let message_bytes_max = config.message_bytes_max;
        let replies = replies::Replies::new(config.answers.max, config.answers.keep);
        tokio::spawn(async move {
            // Each handshake on a task of its own: a slow client never stalls the others.
            while let Some(incoming) = endpoint.accept_incoming().await {
                let (server, local, results, certs, replies, voter, replica) = (
                    server.clone(),
                    local.clone(),
                    results.clone(),
                    peer_certs.clone(),
                    replies.clone(),
                    voter.clone(),
                    replica.clone(),
                );
                tokio::spawn(async move {
                    let Some((conn, alpn)) = flotilla_cluster::endpoint::handshake(incoming).await else {
                        return;
                    };
                    if alpn == ALPN_NODE {
                        serve_node_connection(conn, server, local, certs).await;
                    } else if alpn == ALPN_CLIENT {
                        serve_client_connection(conn, results, message_bytes_max, replies, replica).await;
                    } else if alpn == crate::replication::network::ALPN_RAFT
                        && let Some(v) = voter
                    {
                        crate::replication::serve_with(conn, v.raft, v.peers).await;
                    }
                });
            }
        });
    }
    let peers = voter.as_ref().map(|v| v.peers.clone()).unwrap_or_default();
    if voting {
        peers.book.put(&me.name, &me.addr);
        if let Some(v) = &voter {
            voting::form(&endpoint, &me, &seeds, &config.voters, v, config.join_timeout).await?;
        }
        tokio::spawn(keep_greeting(
            endpoint.clone(),
            me.clone(),
            seeds.clone(),
            config.voters.clone(),
            peers.clone(),
            voter.clone(),
            node_server.clone(),
            local.clone(),
        ));
        if let (Some(v), Some((p, _))) = (&voter, &persistence) {
            tokio::spawn(follow_leadership(
                v.clone(),
                p.clone(),
                config.clone(),
                flows.clone(),
                catalog.clone(),
            ));
        }
    } else {
        for seed in &config.join {
            tokio::spawn(keep_link(
                endpoint.clone(),
                seed.clone(),
                node_server.clone(),
                local.clone(),
            ));
        }
    }
    if (voting && !is_voter) || (!voting && config.role == Role::Worker) {
        let deadline = tokio::time::Instant::now() + config.join_timeout;
        while control_actor().is_none() {
            if tokio::time::Instant::now() >= deadline {
                return Err(NodeError::Join {
                    seeds: config
                        .join
                        .iter()
                        .map(|s| s.addr.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    timeout: config.join_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let mut ec = EngineConfig::new(config.name.clone(), &config.data_dir);
    let object_results = config
        .result_store
        .clone()
        .map(crate::engine::object_results::for_node);
    ec.slots = config.slots.max(1);
    ec.log_to_stderr = config.log_to_stderr;
    let view = Arc::new(RwLock::new(ClusterStatus::default()));
    ec.cluster_slots = Some(Arc::new(plane::ControlSlots::new(config.name.clone())));
    if voting {
        ec.result_shipper = Some(Arc::new(QuicShipper(link::ControlLink::to_leader(
            endpoint.clone(),
            peers.clone(),
        ))));
    } else if config.role == Role::Worker {
        ec.result_shipper = Some(Arc::new(QuicShipper(link::ControlLink::new(
            endpoint.clone(),
            view.clone(),
        ))));
    }
    if let Some(shipper) = &object_results {
        ec.result_shipper = Some(shipper.clone());
    }
    ec.result_blocks = Some(crate::engine::object_results::block_stores());
    let (engine, engine_join) = worker::start(ec, plane.clone(), flows).await?;
    // Which start of this node this is: a new one on every start.
    let incarnation = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0);
    let args = AgentArgs {
        node: config.name.clone(),
        addr: local,
        role: match (voting, is_voter) {
            (true, true) => "voter".to_owned(),
            (true, false) => Role::Worker.as_str().to_owned(),
            (false, _) => config.role.as_str().to_owned(),
        },
        engine: engine.clone(),
        slots: u32::try_from(config.slots).unwrap_or(u32::MAX),
        queues: config.queues.clone(),
        heartbeat_every: config.heartbeat_every,
        view: view.clone(),
        incarnation,
        // Replicated, heartbeats go to wherever the control actor is (it moves with the lead).
        link: (!voting && config.role == Role::Worker)
            .then(|| Arc::new(link::ControlLink::new(endpoint.clone(), view.clone()))),
    };
    Actor::spawn(None, Agent, args)
        .await
        .map_err(|e| NodeError::Spawn(e.to_string()))?;
    // What this node's previous life left resumes where the control plane places it (under
    // its queue's and deployment's limits), not necessarily here.
    let resumed = engine.recover(incarnation, true).await?;
    if !resumed.is_empty() && voting {
        // The control actor is wherever the lead is: wait for one (bounded).
        let deadline = tokio::time::Instant::now() + config.join_timeout;
        while plane::control_actor().is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if !resumed.is_empty() {
        match plane::control_actor() {
            Some(control) => {
                let n = resumed.len();
                if control.cast(ControlMsg::Resumed(Wire::new(resumed))).is_err() {
                    tracing::error!(
                        runs = n,
                        "the resumed runs could not be handed to the control node"
                    );
                }
            }
            None => tracing::error!(runs = resumed.len(), "no control node to place the resumed runs"),
        }
    }
    Ok(ClusterNode {
        endpoint,
        engine,
        plane,
        view,
        persistence,
        engine_join,
        voter,
    })
}
