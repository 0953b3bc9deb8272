//! Voters in this process on 127.0.0.1, each with its own QUIC endpoint, certificate and log
//! on disk, counting what they apply: for tests and for measuring replication alone.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla_cluster::{Identity, QuicEndpoint, TransportSettings};

use super::counting::CountingMachine;
use super::network::ALPN_RAFT;
use super::{Control, Member, QuicRaftNetwork, RaftLogStore, serve};
use crate::persistence::log_io::DirIo;

/// A Raft node counting what it applies.
pub type CountingRaft = openraft::Raft<Control, CountingMachine>;

/// One voter: its Raft, its endpoint, and how others reach it.
#[allow(missing_debug_implementations)] // a Raft handle and a QUIC endpoint
pub struct LocalVoter {
    /// The Raft node.
    pub raft: CountingRaft,
    /// Its QUIC endpoint (serving Raft connections).
    pub endpoint: Arc<QuicEndpoint>,
    /// Its name and address.
    pub member: Member,
}

impl LocalVoter {
    /// Stops the node and its endpoint.
    pub async fn stop(self) {
        let _ = self.raft.shutdown().await;
        self.endpoint.close();
    }
}

/// Raft settings for voters on one machine: heartbeats every 100 ms, elections after 400 to
/// 800 ms of silence.
pub fn config() -> Result<Arc<openraft::Config>, std::io::Error> {
    let config = openraft::Config {
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        ..openraft::Config::default()
    };
    config.validate().map(Arc::new).map_err(std::io::Error::other)
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The QUIC endpoint of the node `name` (its certificate in `certs`) on `addr` (any free port
/// of 127.0.0.1 when None; a port just given up may take a moment to be free, so binding is
/// tried again for up to 10 s), and the node as members name it.
async fn bind(
    certs: &Path,
    name: &str,
    addr: Option<SocketAddr>,
) -> Result<(Arc<QuicEndpoint>, Member), std::io::Error> {
    let identity = Identity::load(certs, name).map_err(other)?;
    let addr = addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let endpoint = loop {
        match QuicEndpoint::bind(addr, identity.clone(), TransportSettings::default()) {
            Ok(e) => break Arc::new(e),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "binding again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(other(e)),
        }
    };
    let bound = endpoint
        .local_addr()
        .ok_or_else(|| other("the endpoint has no local address"))?;
    let member = Member {
        name: name.to_owned(),
        addr: bound.to_string(),
    };
    Ok((endpoint, member))
}

/// Starts voter `id` named `name` (its certificate in `certs`, its log in `dir/name`),
/// listening on `addr` (any free port when None; a port just given up may take a moment to be
/// free, so binding is tried again for up to 10 s).
pub async fn start_voter(
    dir: &Path,
    certs: &Path,
    id: u64,
    name: &str,
    addr: Option<SocketAddr>,
    config: Arc<openraft::Config>,
) -> Result<LocalVoter, std::io::Error> {
    let (endpoint, member) = bind(certs, name, addr).await?;
    let log = RaftLogStore::open(Box::new(DirIo::new(&dir.join(name))?))?;
    let raft = CountingRaft::new(
        id,
        config,
        QuicRaftNetwork::new(endpoint.clone()),
        log,
        CountingMachine::default(),
    )
    .await
    .map_err(other)?;
    let (accepting, served) = (endpoint.clone(), raft.clone());
    tokio::spawn(async move {
        while let Some((conn, alpn)) = accepting.accept().await {
            if alpn == ALPN_RAFT {
                tokio::spawn(serve(conn, served.clone()));
            }
        }
    });
    Ok(LocalVoter {
        raft,
        endpoint,
        member,
    })
}

/// A voter over a real store: its Raft node, its persistence actor (a replica), its endpoint.
#[allow(missing_debug_implementations)] // a Raft handle and a QUIC endpoint
pub struct StoreVoter {
    /// The voter.
    pub voter: super::voter::Voter,
    /// Its persistence actor: commands submitted to it are proposed through Raft.
    pub persistence: crate::persistence::PersistenceHandle,
    join: ractor::concurrency::JoinHandle<()>,
    /// Its QUIC endpoint.
    pub endpoint: Arc<QuicEndpoint>,
    /// Its name and address.
    pub member: Member,
}

impl StoreVoter {
    /// Stops the node, its store and its endpoint.
    pub async fn stop(self) {
        let _ = self.voter.raft.shutdown().await;
        self.persistence.stop(self.join).await;
        self.endpoint.close();
    }
}

/// Starts a voter named `name` over a store in `dir/name` (its certificate in `certs`),
/// listening on any free port of 127.0.0.1. Its Raft node is not initialized.
pub async fn start_store_voter(
    dir: &Path,
    certs: &Path,
    name: &str,
    snapshots: super::voter::Snapshots,
) -> Result<StoreVoter, std::io::Error> {
    let (endpoint, member) = bind(certs, name, None).await?;
    let data = dir.join(name);
    let config = crate::persistence::PersistenceConfig::new(&data);
    let opened = tokio::task::spawn_blocking(move || crate::persistence::open_replica(config))
        .await
        .map_err(other)?
        .map_err(other)?;
    let record = super::machine::AppliedRecord::decode(opened.store().replication())?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (persistence, join) = crate::persistence::start_replica(opened, tx)
        .await
        .map_err(other)?;
    let voter = super::voter::start(
        &member,
        &data,
        endpoint.clone(),
        &persistence,
        record,
        rx,
        snapshots,
    )
    .await
    .map_err(other)?;
    let (accepting, served) = (endpoint.clone(), voter.clone());
    tokio::spawn(async move {
        while let Some((conn, alpn)) = accepting.accept().await {
            if alpn == ALPN_RAFT {
                tokio::spawn(super::serve_with(conn, served.raft.clone(), served.peers.clone()));
            }
        }
    });
    Ok(StoreVoter {
        voter,
        persistence,
        join,
        endpoint,
        member,
    })
}
