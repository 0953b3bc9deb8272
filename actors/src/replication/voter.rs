//! A node of a replicated cluster: its Raft node (for a voter), its address book kept by
//! greeting the seeds and every voter learned of, and the rule by which a cluster forms — on
//! first start only, once a majority of the named voters is up and none of them has been seen
//! with a log and lost it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla_cluster::QuicEndpoint;
use openraft::async_runtime::WatchReceiver as _;

use super::book::{AddressBook, Peers, SeenWithLog};
use super::machine::{AppliedRecord, StoreMachine, StoreRaft, spawn_proposer};
use super::{Member, QuicRaftNetwork, RaftLogStore, hello};
use crate::persistence::log_io::DirIo;
use crate::persistence::{Ack, PersistenceHandle};
use flotilla_cluster::wire::{ReplicaStatus, ReplicationStatus};
use flotilla_runtime::{Command, Timestamp};

/// The Raft node id of the node named `name`: the same on every node, for as long as the name
/// is (FNV-1a of the name).
pub fn node_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// When voters take snapshots and how much log they keep behind one.
#[derive(Clone, Copy, Debug)]
pub struct Snapshots {
    /// A snapshot (a checkpoint of the store) after this many entries applied since the last.
    pub every: u64,
    /// Entries kept behind the last snapshot: a follower at most this far behind is sent
    /// entries rather than the whole store, and a purge stays this far behind the applies
    /// (openraft #2116: a purge overtaking a queued apply panics its core).
    pub keep: u64,
}

impl Default for Snapshots {
    /// Every 100,000 entries, 50,000 kept: at 40,000 writes/s a snapshot every 2.5 s and at
    /// most 150,000 entries (tens of megabytes) of log on disk.
    fn default() -> Self {
        Snapshots {
            every: 100_000,
            keep: 50_000,
        }
    }
}

/// Raft settings of a cluster's voters: heartbeats every 50 ms, elections after 300 to 600 ms
/// of silence past the leader's lease (600 ms), and snapshots as `snapshots` says (the log
/// purged only behind a durable checkpoint of the store). A restarted leader is elected again
/// like any voter. A voter whose log went back (wiped) is refused by the greetings; should one
/// get through, the leader sends it the log again rather than stop (openraft's alternative is
/// a panic of the leader's core).
pub fn voter_config(snapshots: Snapshots) -> Result<Arc<openraft::Config>, String> {
    let config = openraft::Config {
        cluster_name: "flotilla".to_owned(),
        heartbeat_interval: 50,
        election_timeout_min: 300,
        election_timeout_max: 600,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshots.every.max(1)),
        max_in_snapshot_log_to_keep: snapshots.keep,
        purge_batch_size: (snapshots.every / 10).max(1),
        allow_log_reversion: Some(true),
        enable_leader_restore: Some(false),
        ..openraft::Config::default()
    };
    config.validate().map(Arc::new).map_err(|e| e.to_string())
}

/// A node to greet: its address, and the name its certificate must be valid for.
#[derive(Clone, Debug)]
pub struct Greet {
    /// Where.
    pub addr: SocketAddr,
    /// The TLS name.
    pub host: String,
}

/// A voter's replication: its Raft node and what it answers greetings with.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // a Raft handle
pub struct Voter {
    /// The Raft node.
    pub raft: StoreRaft,
    /// The address book, the voters seen with a log, the leader.
    pub peers: Peers,
    /// Whether its log was empty when it started.
    pub fresh: bool,
}

/// Why a node could not take its place in a replicated cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VoterError {
    /// Its Raft log or state could not be opened.
    #[error("cannot open the Raft log in {path}: {reason}")]
    Log {
        /// The directory.
        path: String,
        /// Why.
        reason: String,
    },
    /// A voter refused it (its data directory was wiped).
    #[error("{0}")]
    Refused(String),
    /// Raft could not start or form the cluster.
    #[error("replication: {0}")]
    Raft(String),
}

/// Starts a voter's Raft node over the persistence actor `persistence` (a replica), its log
/// in `dir/raft`; commands sent to `proposals` are proposed through it.
pub async fn start(
    me: &Member,
    dir: &Path,
    endpoint: Arc<QuicEndpoint>,
    persistence: &PersistenceHandle,
    record: AppliedRecord,
    proposals: tokio::sync::mpsc::UnboundedReceiver<(Timestamp, Vec<(Command, Ack)>)>,
    snapshots: Snapshots,
) -> Result<Voter, VoterError> {
    let raft_dir = dir.join("raft");
    let log_err = |e: std::io::Error| VoterError::Log {
        path: raft_dir.display().to_string(),
        reason: e.to_string(),
    };
    let io = DirIo::new(&raft_dir).map_err(log_err)?;
    let log = RaftLogStore::open(Box::new(io)).map_err(log_err)?;
    let fresh = log.is_empty();
    let seen = SeenWithLog::open(&raft_dir).map_err(log_err)?;
    let peers = Peers {
        book: AddressBook::default(),
        seen: Some(Arc::new(seen)),
        leader: Arc::default(),
    };
    peers.book.put(&me.name, &me.addr);
    peers.book.note_replica(&me.name);
    let config = voter_config(snapshots).map_err(VoterError::Raft)?;
    let machine = StoreMachine::new(persistence.actor().clone(), record);
    let serving = machine.serving();
    let raft = StoreRaft::new(
        node_id(&me.name),
        config,
        QuicRaftNetwork::with_book(endpoint, peers.book.clone()),
        log,
        machine,
    )
    .await
    .map_err(|e| VoterError::Raft(e.to_string()))?;
    serving.store(true, std::sync::atomic::Ordering::Release);
    spawn_proposer(raft.clone(), proposals);
    Ok(Voter { raft, peers, fresh })
}

/// Greets `seeds` and every voter in the book once, as `me` (with a log or not); merges what
/// they know into the book. Returns the voters that answered, and the leader named last.
pub async fn greet_all(
    endpoint: &QuicEndpoint,
    me: &Member,
    has_log: bool,
    seeds: &[Greet],
    voters: &[String],
    peers: &Peers,
) -> Result<(Vec<String>, Option<String>), VoterError> {
    let replica = peers.book.is_replica(&me.name);
    let mut targets: Vec<Greet> = seeds.to_vec();
    for v in voters.iter().filter(|v| **v != me.name) {
        if let Some(addr) = peers.book.get(v).and_then(|a| a.parse().ok()) {
            targets.push(Greet {
                addr,
                host: v.clone(),
            });
        }
    }
    let calls = targets
        .iter()
        .map(|t| hello(endpoint, t.addr, &t.host, me, has_log, replica));
    let answers = futures::future::join_all(calls).await;
    let mut answered = Vec::new();
    let mut leader = None;
    for (t, a) in targets.iter().zip(answers) {
        match a {
            Ok(g) => {
                if let Some(why) = g.refused {
                    return Err(VoterError::Refused(why));
                }
                for m in &g.members {
                    if m.name != me.name {
                        peers.book.put(&m.name, &m.addr);
                    }
                }
                for r in &g.replicas {
                    peers.book.note_replica(r);
                }
                if !g.voters.is_empty() {
                    peers.book.set_voters(g.voters.clone());
                }
                if let Some(name) = g
                    .members
                    .iter()
                    .find(|m| m.addr == t.addr.to_string())
                    .map(|m| m.name.clone())
                    && voters.contains(&name)
                    && !answered.contains(&name)
                {
                    answered.push(name);
                }
                leader = g.leader.or(leader);
            }
            Err(e) => tracing::debug!(addr = %t.addr, error = %e, "no answer to a greeting"),
        }
    }
    Ok((answered, leader))
}

/// Forms the cluster on a voter's first start: once a majority of `voters` (this one
/// included) has answered and none refused it, the membership of all of them is written as
/// the log's first entry (the same entry on every voter that does so). A voter whose log is
/// not empty does nothing: membership is what its log says. Bounded by `timeout`.
pub async fn form(
    endpoint: &QuicEndpoint,
    me: &Member,
    seeds: &[Greet],
    voters: &[String],
    voter: &Voter,
    timeout: Duration,
) -> Result<(), VoterError> {
    if !voter.fresh {
        return Ok(());
    }
    let majority = voters.len() / 2 + 1;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = Duration::from_millis(20);
    loop {
        let (answered, leader) = greet_all(endpoint, me, false, seeds, voters, &voter.peers).await?;
        // A cluster already formed (a leader is known): this voter is sent its log by the
        // leader once it is a member (it is, or it is added) — once the leader itself has
        // greeted it back (it knows whether it replicated to this voter before).
        if let Some(l) = leader {
            if answered.contains(&l) {
                return Ok(());
            }
            if let Some(addr) = voter.peers.book.get(&l).and_then(|a| a.parse().ok()) {
                let g = hello(endpoint, addr, &l, me, false, true).await;
                match g {
                    Ok(g) if g.refused.is_some() => {
                        return Err(VoterError::Refused(g.refused.unwrap_or_default()));
                    }
                    Ok(_) => return Ok(()),
                    Err(e) => tracing::debug!(leader = %l, error = %e, "no answer from the leader yet"),
                }
            }
        }
        if answered.len() + 1 >= majority {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(VoterError::Raft(format!(
                "only {} of the voters {} answered within {timeout:?}: a majority is needed to form the cluster",
                answered.len() + 1,
                voters.join(",")
            )));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
    let members: BTreeMap<u64, Member> = voters
        .iter()
        .map(|v| {
            (
                node_id(v),
                Member {
                    name: v.clone(),
                    addr: String::new(),
                },
            )
        })
        .collect();
    match voter.raft.initialize(members).await {
        Ok(()) => Ok(()),
        Err(openraft::errors::RaftError::APIError(openraft::errors::InitializeError::NotAllowed(_))) => {
            Ok(())
        }
        Err(e) => Err(VoterError::Raft(e.to_string())),
    }
}

/// The leader's name as this node's Raft sees it.
pub fn leader_of(raft: &StoreRaft) -> Option<String> {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    let id = m.current_leader?;
    m.membership_config
        .membership()
        .get_node(&id)
        .map(|n| n.name.clone())
}

impl Voter {
    /// How the replicated control state stands, as this node's Raft sees it.
    pub fn status(&self) -> ReplicationStatus {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let name = |id: &u64| membership.get_node(id).map(|n| n.name.clone());
        let voters: Vec<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| ReplicaStatus {
                name: node.name.clone(),
                voter: voters.contains(id),
                applied: if *id == m.id {
                    m.last_applied.map(|l| l.index)
                } else {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(id).copied().flatten())
                        .map(|l| l.index)
                },
            })
            .collect();
        ReplicationStatus {
            leader: m.current_leader.as_ref().and_then(name),
            term: m.current_term,
            last_index: m.last_log_index,
            applied: m.last_applied.map(|l| l.index),
            snapshot: m.snapshot.map(|l| l.index),
            purged: m.purged.map(|l| l.index),
            members,
        }
    }
}

/// A change of the voters, asked of the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VoterChange {
    /// Make the node a voter (a learner first, until it has caught up).
    Add(String),
    /// Make the voter a node that holds no replica.
    Remove(String),
    /// Hand the lead to the voter.
    TransferLeader(String),
}

impl Voter {
    /// Carries out `change` (on the leader; joint consensus for the voters). Answers why not.
    pub async fn change(&self, change: VoterChange) -> Result<(), String> {
        use openraft::ChangeMembers;
        use std::collections::BTreeSet;
        let voters: Vec<u64> = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            m.membership_config.membership().voter_ids().collect()
        };
        match change {
            VoterChange::Add(name) => {
                let id = node_id(&name);
                if voters.contains(&id) {
                    return Err(format!("{name} is a voter already"));
                }
                let addr = self.peers.book.get(&name).ok_or_else(|| {
                    format!(
                        "no node named {name} has greeted the voters: start it with --voters and --join first"
                    )
                })?;
                if !self.peers.book.is_replica(&name) {
                    return Err(format!(
                        "{name} holds no replica: a voter is a node started with its own name in --voters"
                    ));
                }
                self.raft
                    .add_learner(
                        id,
                        Member {
                            name: name.clone(),
                            addr,
                        },
                        true,
                    )
                    .await
                    .map_err(|e| format!("{name} could not be brought up to date: {e}"))?;
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
            VoterChange::Remove(name) => {
                let id = node_id(&name);
                if !voters.contains(&id) {
                    return Err(format!("{name} is not a voter"));
                }
                if voters.len() == 1 {
                    return Err(format!("{name} is the only voter"));
                }
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
            VoterChange::TransferLeader(name) => {
                let id = node_id(&name);
                if !voters.contains(&id) {
                    return Err(format!("{name} is not a voter"));
                }
                // Asked: the lead moves shortly (the asker watches the status for it).
                self.raft
                    .trigger()
                    .transfer_leader(id)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}
