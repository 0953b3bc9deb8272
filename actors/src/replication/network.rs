//! Raft traffic over the cluster's QUIC connections with mutual TLS (ALPN `flotilla-raft/1`):
//! each request on a stream of its own, as one frame, answered by one frame; a snapshot's data
//! follows its frame as raw bytes to the end of the stream, so no frame limit applies to it.
//! Connections are made lazily and made again after a failure; only node certificates are
//! served.

use std::net::SocketAddr;
use std::sync::Arc;

use flotilla_cluster::role::CertRole;
use flotilla_cluster::{QuicEndpoint, frame};
use openraft::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::RaftStateMachine;
use serde::{Deserialize, Serialize};

use super::book::{AddressBook, Peers};
use super::{Control, Member};

/// The ALPN of Raft connections between voters.
pub const ALPN_RAFT: &[u8] = flotilla_cluster::tls::ALPN_RAFT;

/// The largest Raft frame taken (a batch of entries).
const RAFT_FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// The largest snapshot taken.
const SNAPSHOT_BYTES_MAX: usize = 16 * 1024 * 1024 * 1024;

/// A Raft request, as one frame.
#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Append(AppendEntriesRequest<Control>),
    Vote(VoteRequest<Control>),
    PreVote(VoteRequest<Control>),
    /// The leader hands its lead over.
    TransferLeader(TransferLeaderRequest<Control>),
    /// A snapshot: its data follows the frame, to the end of the stream.
    Snapshot {
        vote: VoteOf<Control>,
        meta: SnapshotMetaOf<Control>,
    },
    /// A node says who it is and learns who else there is.
    Hello {
        /// The node greeting.
        from: Member,
        /// Whether it is a voter holding a Raft log.
        has_log: bool,
        /// Whether it holds a replica (runs Raft).
        replica: bool,
    },
}

/// The answer to a request, as one frame (an error as its text).
#[derive(Debug, Serialize, Deserialize)]
enum Response {
    Append(AppendEntriesResponse<Control>),
    Vote(VoteResponse<Control>),
    TransferLeader(TransferLeaderResponse<Control>),
    Snapshot(SnapshotResponse<Control>),
    Failed(String),
    /// The nodes known, the leader, why the greeting node is refused (a wiped voter), the
    /// voters, and the nodes that hold a replica.
    Peers {
        members: Vec<Member>,
        leader: Option<String>,
        refused: Option<String>,
        voters: Vec<String>,
        replicas: Vec<String>,
    },
}

/// Makes the clients of the other voters, over one QUIC endpoint.
#[derive(Clone)]
pub struct QuicRaftNetwork {
    endpoint: Arc<QuicEndpoint>,
    book: AddressBook,
}

impl std::fmt::Debug for QuicRaftNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicRaftNetwork").finish_non_exhaustive()
    }
}

impl QuicRaftNetwork {
    /// Raft clients dialling from `endpoint`, to the addresses the members name.
    pub fn new(endpoint: Arc<QuicEndpoint>) -> Self {
        Self::with_book(endpoint, AddressBook::default())
    }

    /// Raft clients dialling from `endpoint`, to the addresses `book` gives (those the members
    /// name when it has none).
    pub fn with_book(endpoint: Arc<QuicEndpoint>, book: AddressBook) -> Self {
        QuicRaftNetwork { endpoint, book }
    }
}

impl RaftNetworkFactory<Control> for QuicRaftNetwork {
    type Network = QuicRaftClient;

    async fn new_client(&mut self, _target: u64, node: &Member) -> QuicRaftClient {
        QuicRaftClient {
            endpoint: self.endpoint.clone(),
            member: node.clone(),
            book: self.book.clone(),
            connection: None,
        }
    }
}

/// The client of one other voter: its connection, made when first needed.
#[allow(missing_debug_implementations)] // a QUIC endpoint and connection, nothing to show
pub struct QuicRaftClient {
    endpoint: Arc<QuicEndpoint>,
    member: Member,
    book: AddressBook,
    connection: Option<quinn::Connection>,
}

/// Why a call failed, before it was answered.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{0} is unreachable: {1}")]
    Unreachable(String, String),
    #[error("{0}: {1}")]
    Stream(String, String),
    #[error("{0} took longer than {1:?}")]
    Timeout(String, std::time::Duration),
}

impl QuicRaftClient {
    async fn connection(&mut self) -> Result<quinn::Connection, CallError> {
        if self.book.is_cut(&self.member.name) {
            self.connection = None;
            return Err(CallError::Unreachable(
                self.member.name.clone(),
                "cut off (a partition)".to_owned(),
            ));
        }
        if let Some(c) = &self.connection
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let unreachable = |e: String| CallError::Unreachable(self.member.name.clone(), e);
        let addr: SocketAddr = self
            .book
            .get(&self.member.name)
            .unwrap_or_else(|| self.member.addr.clone())
            .parse()
            .map_err(|e| unreachable(format!("{e}")))?;
        let c = self
            .endpoint
            .connect(addr, &self.member.name, ALPN_RAFT)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        self.connection = Some(c.clone());
        Ok(c)
    }

    /// Sends one request (and a body after it) on a stream of its own and reads its answer,
    /// within `ttl`.
    async fn call(
        &mut self,
        request: &Request,
        body: &[u8],
        ttl: std::time::Duration,
    ) -> Result<Response, CallError> {
        let name = self.member.name.clone();
        let conn = self.connection().await?;
        let exchange = async {
            let stream = |e: String| CallError::Stream(name.clone(), e);
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| stream(e.to_string()))?;
            frame::write_limited(&mut send, request, RAFT_FRAME_BYTES_MAX)
                .await
                .map_err(|e| stream(e.to_string()))?;
            if !body.is_empty() {
                send.write_all(body).await.map_err(|e| stream(e.to_string()))?;
            }
            send.finish().map_err(|e| stream(e.to_string()))?;
            frame::read::<Response, _>(&mut recv)
                .await
                .map_err(|e| stream(e.to_string()))
        };
        match tokio::time::timeout(ttl, exchange).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.connection = None;
                Err(e)
            }
            Err(_) => Err(CallError::Timeout(name, ttl)),
        }
    }
}

impl QuicRaftClient {
    /// A request without a body, within the RPC's time.
    async fn ask(&mut self, request: Request, option: RPCOption) -> Result<Response, RPCError<Control>> {
        self.call(&request, &[], option.hard_ttl())
            .await
            .map_err(rpc_error)
    }
}

fn rpc_error(e: CallError) -> RPCError<Control> {
    match e {
        CallError::Unreachable(..) => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected(r: Response) -> RPCError<Control> {
    let text = match r {
        Response::Failed(why) => why,
        other => format!("unexpected answer {other:?}"),
    };
    RPCError::Network(NetworkError::from_string(text))
}

impl RaftNetworkV2<Control> for QuicRaftClient {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<Control>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<Control>, RPCError<Control>> {
        let answer = self.ask(Request::Append(rpc), option).await?;
        match answer {
            Response::Append(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<Control>,
        option: RPCOption,
    ) -> Result<VoteResponse<Control>, RPCError<Control>> {
        let answer = self.ask(Request::Vote(rpc), option).await?;
        match answer {
            Response::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<Control>,
        option: RPCOption,
    ) -> Result<VoteResponse<Control>, RPCError<Control>> {
        let answer = self.ask(Request::PreVote(rpc), option).await?;
        match answer {
            Response::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<Control>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<Control>, RPCError<Control>> {
        match self.ask(Request::TransferLeader(rpc), option).await? {
            Response::TransferLeader(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<Control>,
        snapshot: SnapshotOf<Control, Vec<u8>>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<Control>, StreamingError<Control>> {
        let request = Request::Snapshot {
            vote,
            meta: snapshot.meta,
        };
        // A snapshot may take long: bounded by the caller's cancellation, not the RPC's ttl.
        let ttl = option.hard_ttl().max(std::time::Duration::from_secs(600));
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = self.call(&request, &snapshot.snapshot, ttl) => match r {
                Ok(Response::Snapshot(r)) => Ok(r),
                Ok(other) => Err(StreamingError::Network(NetworkError::from_string(format!("{other:?}")))),
                Err(e @ CallError::Unreachable(..)) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
                Err(e) => Err(StreamingError::Network(NetworkError::new(&e))),
            },
        }
    }
}

/// Greets the node at `addr` (its certificate's name `host`) as `from`: the nodes it knows and
/// the leader it knows of, or why `from` is refused.
pub async fn hello(
    endpoint: &QuicEndpoint,
    addr: SocketAddr,
    host: &str,
    from: &Member,
    has_log: bool,
    replica: bool,
) -> Result<Greeting, String> {
    let exchange = async {
        let conn = endpoint
            .connect(addr, host, ALPN_RAFT)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let request = Request::Hello {
            from: from.clone(),
            has_log,
            replica,
        };
        frame::write_limited(&mut send, &request, RAFT_FRAME_BYTES_MAX)
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let answer = frame::read::<Response, _>(&mut recv)
            .await
            .map_err(|e| e.to_string());
        conn.close(0u32.into(), b"greeted");
        answer
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), exchange).await {
        Err(_) => Err(format!("{addr} did not answer in time")),
        Ok(Err(e)) => Err(e),
        Ok(Ok(Response::Peers {
            members,
            leader,
            refused,
            voters,
            replicas,
        })) => Ok(Greeting {
            members,
            leader,
            refused,
            voters,
            replicas,
        }),
        Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
    }
}

/// What a greeting brought back.
#[derive(Clone, Debug)]
pub struct Greeting {
    /// The nodes the greeted node knows.
    pub members: Vec<Member>,
    /// The leader it knows of.
    pub leader: Option<String>,
    /// Why the greeting node is refused.
    pub refused: Option<String>,
    /// The voters, as the greeted node knows them.
    pub voters: Vec<String>,
    /// The nodes known to hold a replica.
    pub replicas: Vec<String>,
}

/// Serves the Raft requests of one connection (a voter's), each stream in a task of its own,
/// until the connection closes. A connection whose certificate is not a node's is refused.
pub async fn serve<SM>(conn: quinn::Connection, raft: openraft::Raft<Control, SM>)
where
    SM: RaftStateMachine<Control, SnapshotData = Vec<u8>>,
{
    serve_with(conn, raft, Peers::default()).await;
}

/// As [`serve`], answering greetings from `peers`.
pub async fn serve_with<SM>(conn: quinn::Connection, raft: openraft::Raft<Control, SM>, peers: Peers)
where
    SM: RaftStateMachine<Control, SnapshotData = Vec<u8>>,
{
    if !matches!(CertRole::of_peer(&conn), CertRole::Node | CertRole::Unmarked) {
        conn.close(1u32.into(), b"forbidden: a node certificate is needed");
        return;
    }
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let raft = raft.clone();
        let peers = peers.clone();
        tokio::spawn(async move {
            let request = match frame::read_len(&mut recv).await {
                Ok(len) if len > RAFT_FRAME_BYTES_MAX => Err(format!(
                    "a request of {len} bytes is over the limit of {RAFT_FRAME_BYTES_MAX}"
                )),
                Ok(len) => frame::read_payload::<Request, _>(&mut recv, len)
                    .await
                    .map_err(|e| format!("undecodable request: {e}")),
                Err(e) => Err(format!("unreadable request: {e}")),
            };
            let response = match request {
                Err(why) => Response::Failed(why),
                Ok(Request::Append(rpc)) => match raft.append_entries(rpc).await {
                    Ok(r) => Response::Append(r),
                    Err(e) => Response::Failed(e.to_string()),
                },
                Ok(Request::Vote(rpc)) => match raft.vote(rpc).await {
                    Ok(r) => Response::Vote(r),
                    Err(e) => Response::Failed(e.to_string()),
                },
                Ok(Request::PreVote(rpc)) => match raft.pre_vote(rpc).await {
                    Ok(r) => Response::Vote(r),
                    Err(e) => Response::Failed(e.to_string()),
                },
                Ok(Request::TransferLeader(rpc)) => match raft.handle_transfer_leader(rpc).await {
                    Ok(r) => Response::TransferLeader(r),
                    Err(e) => Response::Failed(e.to_string()),
                },
                Ok(Request::Hello {
                    from,
                    has_log,
                    replica,
                }) => {
                    // A voter of the membership back without its log is refused; one removed
                    // may come back empty, to be added again.
                    let (member, replicated, voters) = {
                        use openraft::async_runtime::WatchReceiver as _;
                        let metrics = raft.metrics();
                        let m = metrics.borrow_watched();
                        let membership = m.membership_config.membership();
                        let id = super::voter::node_id(&from.name);
                        let voters: Vec<String> = membership
                            .voter_ids()
                            .filter_map(|id| membership.get_node(&id).map(|n| n.name.clone()))
                            .collect();
                        // The leader knows whether it replicated to it (even before a greeting
                        // with its log was recorded).
                        let replicated = m
                            .replication
                            .as_ref()
                            .and_then(|r| r.get(&id))
                            .is_some_and(Option::is_some);
                        (membership.get_node(&id).is_some(), replicated, voters)
                    };
                    if replicated && let Some(s) = &peers.seen {
                        s.note(&from.name, true);
                    }
                    let refused = peers
                        .seen
                        .as_ref()
                        .and_then(|s| s.note(&from.name, has_log))
                        .filter(|_| member);
                    if refused.is_none() {
                        peers.book.put(&from.name, &from.addr);
                        if replica {
                            peers.book.note_replica(&from.name);
                        }
                    }
                    Response::Peers {
                        members: peers.book.all(),
                        leader: peers.leader(),
                        refused,
                        voters,
                        replicas: peers.book.replicas(),
                    }
                }
                Ok(Request::Snapshot { vote, meta }) => match recv.read_to_end(SNAPSHOT_BYTES_MAX).await {
                    Err(e) => Response::Failed(format!("the snapshot's data: {e}")),
                    Ok(data) => {
                        let snapshot = SnapshotOf::<Control, Vec<u8>> { meta, snapshot: data };
                        match raft.install_full_snapshot(vote, snapshot).await {
                            Ok(r) => Response::Snapshot(r),
                            Err(e) => Response::Failed(e.to_string()),
                        }
                    }
                },
            };
            if frame::write_limited(&mut send, &response, RAFT_FRAME_BYTES_MAX)
                .await
                .is_ok()
            {
                let _ = send.finish();
            }
        });
    }
}

#[cfg(test)]
mod tests;
