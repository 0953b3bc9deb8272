//! A cluster node: one QUIC endpoint (mutual TLS), a ractor_cluster node server whose sessions
//! ride on QUIC streams, the engine, an agent, and on the control node the persistence actor
//! and the control actor. Workers join through seeds (redialled with backoff) and reach the
//! control state through the control actor.

pub mod agent;
pub mod control;
pub mod plane;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flotilla_cluster::bidi::QuicBidi;
use flotilla_cluster::wire::{ClusterStatus, Envelope, ErrorKind, PROTOCOL_VERSION, Response, WireError};
use flotilla_cluster::{ALPN_CLIENT, ALPN_NODE, Identity, QuicEndpoint, TransportSettings, certs, frame};
use flotilla_runtime::{NodeId, codec};
use ractor::{Actor, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};

use crate::engine::worker::{self, EngineHandle};
use crate::engine::{EngineConfig, FlowFn};
use crate::persistence::{self, PersistenceConfig, PersistenceHandle};
use agent::{Agent, AgentArgs};
use control::{Control, ControlArgs, ControlMsg, MembershipSettings};
use plane::{ControlPlane, RemoteControl, control_actor};

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
    /// How long a worker tries its seeds before giving up.
    pub join_timeout: Duration,
    /// QUIC keep-alive and idle timeout.
    pub transport: TransportSettings,
    /// Whether flow and task logs are printed to stderr.
    pub log_to_stderr: bool,
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
            join_timeout: Duration::from_secs(60),
            transport: TransportSettings::default(),
            log_to_stderr: true,
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
        self.endpoint.close();
        self.engine.stop(self.engine_join).await;
        if let Some((p, j)) = self.persistence {
            p.stop(j).await;
        }
    }
}

/// Carries one incoming node connection's streams to the node server as ractor_cluster sessions.
async fn serve_node_connection(conn: quinn::Connection, server: ActorRef<NodeServerMessage>, local: String) {
    let peer = conn.remote_address().to_string();
    while let Ok((send, recv)) = conn.accept_bi().await {
        let stream = Box::new(QuicBidi {
            send,
            recv,
            peer: peer.clone(),
            local: local.clone(),
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
}

/// Serves one client connection: each stream is one request, answered by the control actor.
async fn serve_client_connection(conn: quinn::Connection) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            let response = match frame::read::<Envelope, _>(&mut recv).await {
                Err(e) => Response::Error(WireError::new(ErrorKind::Protocol, format!("a bad request: {e}"))),
                Ok(env) if env.version != PROTOCOL_VERSION => Response::Error(WireError::new(
                    ErrorKind::Protocol,
                    format!(
                        "protocol version {} is not spoken here (this node speaks {PROTOCOL_VERSION})",
                        env.version
                    ),
                )),
                Ok(env) => ask_control(&env.request).await,
            };
            let _ = frame::write(&mut send, &response).await;
            let _ = send.finish();
        });
    }
}

/// Asks the control actor (local or remote) a client request.
pub async fn ask_control(request: &flotilla_cluster::wire::Request) -> Response {
    let Some(control) = control_actor() else {
        return Response::Error(WireError::new(
            ErrorKind::Unavailable,
            "no control node is connected to this node",
        ));
    };
    let Ok(bytes) = codec::encode(request) else {
        return Response::Error(WireError::new(
            ErrorKind::Protocol,
            "the request cannot be encoded",
        ));
    };
    match control
        .call(|port| ControlMsg::Request(bytes, port), Some(plane::CALL_TIMEOUT))
        .await
    {
        Ok(ractor::rpc::CallResult::Success(reply)) => codec::decode(&reply).unwrap_or_else(|e| {
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

/// Keeps a link to a seed: dials it (with backoff) and, once connected, carries a ractor_cluster
/// session over a QUIC stream until the connection drops; then dials again.
async fn keep_link(
    endpoint: QuicEndpoint,
    Seed { addr: seed, host }: Seed,
    server: ActorRef<NodeServerMessage>,
    local: String,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match endpoint.connect(seed, &host, ALPN_NODE).await {
            Ok(conn) => {
                backoff = Duration::from_millis(50);
                match conn.open_bi().await {
                    Ok((send, recv)) => {
                        let stream = Box::new(QuicBidi {
                            send,
                            recv,
                            peer: seed.to_string(),
                            local: local.clone(),
                        });
                        if let Err(e) = ractor_cluster::client_connect_external(&server, stream).await {
                            tracing::warn!(%seed, error = %e, "cannot open a cluster session");
                        } else {
                            tracing::info!(%seed, "joined");
                        }
                        let reason = conn.closed().await;
                        tracing::warn!(%seed, %reason, "lost the link to the seed; dialling again");
                    }
                    Err(e) => tracing::warn!(%seed, error = %e, "cannot open a stream to the seed"),
                }
            }
            Err(e) => tracing::debug!(%seed, error = %e, "seed not reachable yet"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
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

    let (plane, persistence) = match config.role {
        Role::Control => {
            let (p, join) = persistence::start(PersistenceConfig::new(&config.data_dir)).await?;
            let settings = MembershipSettings {
                unreachable_after: config.unreachable_after,
                ..MembershipSettings::default()
            };
            Actor::spawn(
                Some(control::CONTROL_NAME.to_owned()),
                Control,
                ControlArgs {
                    persistence: p.clone(),
                    settings,
                    flows: flows.clone(),
                },
            )
            .await
            .map_err(|e| NodeError::Spawn(e.to_string()))?;
            (ControlPlane::Local(p.clone()), Some((p, join)))
        }
        Role::Worker => (ControlPlane::Remote(RemoteControl::start()), None),
    };

    // Connections in: node sessions and clients.
    {
        let endpoint = endpoint.clone();
        let server = node_server.clone();
        let local = local.clone();
        tokio::spawn(async move {
            while let Some((conn, alpn)) = endpoint.accept().await {
                if alpn == ALPN_NODE {
                    tokio::spawn(serve_node_connection(conn, server.clone(), local.clone()));
                } else if alpn == ALPN_CLIENT {
                    tokio::spawn(serve_client_connection(conn));
                }
            }
        });
    }
    for seed in &config.join {
        tokio::spawn(keep_link(
            endpoint.clone(),
            seed.clone(),
            node_server.clone(),
            local.clone(),
        ));
    }
    if config.role == Role::Worker {
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
    ec.slots = config.slots.max(1);
    ec.log_to_stderr = config.log_to_stderr;
    let (engine, engine_join) = worker::start(ec, plane.clone(), flows).await?;
    let view = Arc::new(RwLock::new(ClusterStatus::default()));
    let args = AgentArgs {
        node: config.name.clone(),
        addr: local,
        role: config.role.as_str().to_owned(),
        engine: engine.clone(),
        slots: u32::try_from(config.slots).unwrap_or(u32::MAX),
        heartbeat_every: config.heartbeat_every,
        view: view.clone(),
    };
    Actor::spawn(None, Agent, args)
        .await
        .map_err(|e| NodeError::Spawn(e.to_string()))?;
    engine.recover().await?;
    Ok(ClusterNode {
        endpoint,
        engine,
        plane,
        view,
        persistence,
        engine_join,
    })
}
