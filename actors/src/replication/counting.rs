//! A state machine that applies membership and only counts commands, with snapshots of that:
//! for tests of the log store and the network, and for measuring replication alone.

use std::io;
use std::sync::Arc;

use flotilla_runtime::codec;
use futures::StreamExt;
use openraft::EntryPayload;
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::entry::RaftEntry;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use serde::{Deserialize, Serialize};

use super::Control;

type LogId = LogIdOf<Control>;

/// What the suite's state machine holds: the last applied id and membership.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Applied {
    last: Option<LogId>,
    membership: StoredMembershipOf<Control>,
    /// How many commands it applied.
    commands: u64,
}

/// A snapshot as held: its meta and its data.
type Held = (SnapshotMetaOf<Control>, Vec<u8>);

/// The state machine (cheap to clone: a builder shares its current snapshot).
#[derive(Clone, Debug, Default)]
pub struct CountingMachine {
    applied: Applied,
    /// The current snapshot, shared with the builders.
    snapshot: Arc<std::sync::Mutex<Option<Held>>>,
}

impl CountingMachine {
    fn held(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_snapshot(&self, s: Held) {
        *self.held() = Some(s);
    }
}

impl RaftSnapshotBuilder<Control> for CountingMachine {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<Control, Vec<u8>>, io::Error> {
        let meta = SnapshotMetaOf::<Control> {
            last_log_id: self.applied.last,
            last_membership: self.applied.membership.clone(),
        };
        let data = codec::encode(&self.applied).map_err(io::Error::other)?;
        self.set_snapshot((meta.clone(), data.clone()));
        Ok(SnapshotOf::<Control, Vec<u8>> { meta, snapshot: data })
    }
}

impl RaftStateMachine<Control> for CountingMachine {
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
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            self.applied.last = Some(entry.log_id());
            match &entry.payload {
                EntryPayload::Membership(m) => {
                    self.applied.membership =
                        StoredMembershipOf::<Control>::new(Some(entry.log_id()), m.clone());
                }
                EntryPayload::Normal(_) => self.applied.commands += 1,
                EntryPayload::Blank => {}
            }
            if let Some(r) = responder {
                r.send(Ok(flotilla_runtime::Reply::Recorded));
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<Control>,
        data: Vec<u8>,
    ) -> Result<(), io::Error> {
        self.applied = codec::decode(&data).map_err(io::Error::other)?;
        self.set_snapshot((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<Control, Vec<u8>>>, io::Error> {
        Ok(self
            .held()
            .clone()
            .map(|(meta, snapshot)| SnapshotOf::<Control, Vec<u8>> { meta, snapshot }))
    }
}
