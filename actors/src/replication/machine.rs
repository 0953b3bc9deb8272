//! The replicated state machine: committed entries of the Raft log applied, in order, by the
//! persistence actor to the sled-backed store (the same `apply` a single node runs), with
//! replication's record of what was applied (the last log id and membership) written with the
//! store's applied index. Commands are proposed through [`spawn_proposer`]: in order, many at a
//! time, each answered once committed and applied.
//!
//! Snapshots: building one makes the store durable through what it applied (a checkpoint) and
//! records that point; the log is purged only behind it. The store itself is the snapshot: when
//! a follower needs one, the store is dumped as of everything applied then (on the store
//! thread, between two writes), and a follower installs a dump by replacing its store whole.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use flotilla_runtime::{Command, LogIndex, Timestamp, codec};
use futures::StreamExt;
use openraft::EntryPayload;
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::async_runtime::WatchReceiver as _;
use openraft::entry::RaftEntry;
use openraft::errors::ClientWriteError;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use ractor::ActorRef;
use tokio::sync::mpsc;

use super::{Control, Logged};
use crate::persistence::{Ack, Applying, PersistError, PersistenceMsg};

type LogId = LogIdOf<Control>;

/// The Raft node of a voter.
pub type StoreRaft = openraft::Raft<Control, StoreMachine>;

/// Replication's record of what was applied, as the store keeps it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct AppliedRecord {
    /// The last log id applied.
    pub last: Option<LogId>,
    /// The membership as of it.
    pub membership: StoredMembershipOf<Control>,
}

impl AppliedRecord {
    /// Decodes the record a store holds (none: nothing applied yet).
    pub fn decode(bytes: Option<&[u8]>) -> io::Result<AppliedRecord> {
        bytes.map_or_else(
            || Ok(AppliedRecord::default()),
            |b| codec::decode(b).map_err(io::Error::other),
        )
    }
}

/// The state machine: the persistence actor's store.
#[derive(Clone, Debug)]
pub struct StoreMachine {
    persistence: ActorRef<PersistenceMsg>,
    applied: AppliedRecord,
    /// Set once the Raft node is built: until then openraft reads only a snapshot's meta, and
    /// the store is not dumped for it.
    serving: Arc<AtomicBool>,
}

impl StoreMachine {
    /// The machine over the persistence actor `persistence`, whose store holds `applied`.
    pub fn new(persistence: ActorRef<PersistenceMsg>, applied: AppliedRecord) -> Self {
        StoreMachine {
            persistence,
            applied,
            serving: Arc::default(),
        }
    }

    /// What to set once the Raft node over this machine is built.
    pub fn serving(&self) -> Arc<AtomicBool> {
        self.serving.clone()
    }

    /// Asks the persistence actor, and waits for its answer.
    async fn ask<T>(
        &self,
        msg: impl FnOnce(crate::persistence::SnapshotReply<T>) -> PersistenceMsg,
    ) -> Result<T, io::Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.persistence
            .cast(msg(tx))
            .map_err(|e| io::Error::other(format!("the persistence actor is gone: {e}")))?;
        rx.await
            .map_err(|_| io::Error::other("the persistence actor stopped"))?
            .map_err(io::Error::other)
    }
}

/// The meta of a snapshot of the store as `record` says it was.
fn meta_of(record: &AppliedRecord) -> SnapshotMetaOf<Control> {
    SnapshotMetaOf::<Control> {
        last_log_id: record.last,
        last_membership: record.membership.clone(),
    }
}

impl RaftSnapshotBuilder<Control> for StoreMachine {
    type SnapshotData = Vec<u8>;

    /// A checkpoint: the store made durable through what it applied. Its data is empty (the
    /// store is the snapshot; it is dumped when one is sent).
    async fn build_snapshot(&mut self) -> Result<SnapshotOf<Control, Vec<u8>>, io::Error> {
        let record = self.ask(PersistenceMsg::Checkpoint).await?;
        let record = AppliedRecord::decode(record.as_deref())?;
        if record.last.is_none() {
            return Err(io::Error::other("nothing applied yet to take a snapshot of"));
        }
        Ok(SnapshotOf::<Control, Vec<u8>> {
            meta: meta_of(&record),
            snapshot: Vec::new(),
        })
    }
}

impl RaftStateMachine<Control> for StoreMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembershipOf<Control>), io::Error> {
        Ok((self.applied.last, self.applied.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: futures::Stream<Item = Result<openraft::storage::EntryResponder<Control>, io::Error>>
            + Unpin
            + Send,
    {
        let mut batch = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let log_id = entry.log_id();
            self.applied.last = Some(log_id);
            let command = match entry.payload {
                EntryPayload::Membership(m) => {
                    self.applied.membership = StoredMembershipOf::<Control>::new(Some(log_id), m);
                    None
                }
                EntryPayload::Normal(Logged { now, command }) => Some((now, command)),
                EntryPayload::Blank => None,
            };
            batch.push(Applying {
                index: LogIndex::new(log_id.index),
                command,
                answer: responder
                    .map(|r| -> crate::persistence::Answer { Box::new(move |reply| r.send(reply)) }),
            });
        }
        if batch.is_empty() {
            return Ok(());
        }
        let record = codec::encode(&self.applied).map_err(io::Error::other)?;
        let (done, applied) = tokio::sync::oneshot::channel();
        self.persistence
            .cast(PersistenceMsg::Apply {
                entries: batch,
                record,
                done,
            })
            .map_err(|e| io::Error::other(format!("the persistence actor is gone: {e}")))?;
        applied
            .await
            .map_err(|_| io::Error::other("the persistence actor stopped while applying"))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<Control>,
        data: Vec<u8>,
    ) -> Result<(), io::Error> {
        let Some(last) = meta.last_log_id else {
            return Err(io::Error::other(
                "a snapshot of nothing applied cannot be installed",
            ));
        };
        if data.is_empty() {
            return Err(io::Error::other(format!(
                "the snapshot through {last} has no data: a checkpoint's meta is never sent"
            )));
        }
        let upto = LogIndex::new(last.index);
        self.ask(|done| PersistenceMsg::Install { data, upto, done })
            .await?;
        self.applied = AppliedRecord {
            last: Some(last),
            membership: meta.last_membership.clone(),
        };
        Ok(())
    }

    /// The store as of now. On start (the Raft node not built yet) only the meta is read: the
    /// store applied through its record, which is durable.
    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<Control, Vec<u8>>>, io::Error> {
        if self.applied.last.is_none() {
            return Ok(None);
        }
        if !self.serving.load(Ordering::Acquire) {
            return Ok(Some(SnapshotOf::<Control, Vec<u8>> {
                meta: meta_of(&self.applied),
                snapshot: Vec::new(),
            }));
        }
        let (record, data) = self.ask(PersistenceMsg::Dump).await?;
        let record = AppliedRecord::decode(record.as_deref())?;
        Ok(Some(SnapshotOf::<Control, Vec<u8>> {
            meta: meta_of(&record),
            snapshot: data,
        }))
    }
}

/// How long a leader goes without a quorum's acknowledgement before it refuses writes.
pub const QUORUM_LOST_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether `raft` leads without having heard a quorum for [`QUORUM_LOST_AFTER`].
pub fn quorum_lost(raft: &StoreRaft) -> bool {
    use openraft::Instant as _;
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    m.state.is_leader()
        && m.last_quorum_acked
            .as_ref()
            .is_some_and(|at| at.elapsed() > QUORUM_LOST_AFTER)
}

/// The name of the node `id` in the membership of `raft`, when it is a member.
fn name_of(raft: &StoreRaft, id: u64) -> Option<String> {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    m.membership_config
        .membership()
        .get_node(&id)
        .map(|n| n.name.clone())
}

/// Proposes the commands sent to `rx` to `raft`, in the order they come, many
/// in one go; each is answered once committed and applied, or refused with
/// [`PersistError::NotLeader`] on a node that does not lead.
pub fn spawn_proposer(raft: StoreRaft, mut rx: mpsc::UnboundedReceiver<(Timestamp, Vec<(Command, Ack)>)>) {
    tokio::spawn(async move {
        while let Some((now, batch)) = rx.recv().await {
            let (commands, acks): (Vec<Command>, Vec<Ack>) = batch.into_iter().unzip();
            // A leader that has heard no quorum for longer than its lease is cut off (a
            // minority): it refuses rather than let the writes wait for a heal.
            if quorum_lost(&raft) {
                for ack in acks {
                    let _ = ack.send(Err(PersistError::NotLeader { leader: None }));
                }
                continue;
            }
            let data = commands.into_iter().map(|command| Logged { now, command });
            // Sent to Raft before the next batch is: the order is kept.
            let answers = match raft.client_write_many(data).await {
                Ok(s) => s,
                Err(e) => {
                    for ack in acks {
                        let _ = ack.send(Err(PersistError::LogWrite(e.to_string())));
                    }
                    continue;
                }
            };
            let raft = raft.clone();
            tokio::spawn(async move {
                // Fused: a stream that ended (the node stopped) is never polled again.
                let mut answers = answers.fuse();
                for ack in acks {
                    let answer = match answers.next().await {
                        Some(Ok(Ok(written))) => Ok(written.response),
                        Some(Ok(Err(ClientWriteError::ForwardToLeader(f)))) => Err(PersistError::NotLeader {
                            leader: f.leader_id.and_then(|id| name_of(&raft, id)),
                        }),
                        Some(Ok(Err(e))) => Err(PersistError::LogWrite(e.to_string())),
                        Some(Err(e)) => Err(PersistError::LogWrite(e.to_string())),
                        None => Err(PersistError::Stopped),
                    };
                    let _ = ack.send(answer);
                }
            });
        }
    });
}
