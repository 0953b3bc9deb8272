//! A replica's whole store as one blob (a Raft snapshot's data), and the store replaced by one.
//!
//! A dump is taken on the store thread between two writes, so it holds exactly the state the
//! store had applied through one log index, replication's record of it included. Replacing is
//! one atomic batch (every key of the store removed, every key of the dump put) followed by a
//! checkpoint: after a crash the store is either the old one or the new one, never a mix.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::PersistenceState;
use super::kv::{KvOp, KvStore, Tree};
use super::threads::{StoreControl, StoreWork};
use flotilla_runtime::{LogIndex, codec};

/// Where an answer about the store as a whole goes.
pub type SnapshotReply<T> = tokio::sync::oneshot::Sender<Result<T, String>>;

/// The answer of the store thread, or why there is none.
async fn answer<T>(rx: tokio::sync::oneshot::Receiver<Result<T, String>>) -> Result<T, String> {
    rx.await
        .unwrap_or_else(|_| Err("the store thread stopped".into()))
}

impl PersistenceState {
    /// Hands everything applied to the store thread, then `work`.
    fn hand_to_store_thread(&mut self, work: StoreControl) -> Result<(), String> {
        self.send_store_job();
        match &self.store_tx {
            Some(tx) => tx
                .send(StoreWork::Control(work))
                .map_err(|_| "the store thread is gone".to_owned()),
            None => Err("the store thread is gone".to_owned()),
        }
    }

    /// Makes the store durable through everything applied; answers replication's record as of
    /// then (what a snapshot's meta says).
    pub(super) fn checkpoint_now(&mut self, reply: SnapshotReply<Option<Vec<u8>>>) {
        let record = self.store.replication().map(<[u8]>::to_vec);
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Err(e) = self.hand_to_store_thread(StoreControl::Checkpoint(tx)) {
            let _ = reply.send(Err(e));
            return;
        }
        tokio::spawn(async move {
            let _ = reply.send(answer(rx).await.map(|()| record));
        });
    }

    /// Dumps the store as of everything applied, with replication's record of it; the actor
    /// goes on applying meanwhile.
    pub(super) fn dump_now(&mut self, reply: SnapshotReply<(Option<Vec<u8>>, Vec<u8>)>) {
        let record = self.store.replication().map(<[u8]>::to_vec);
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Err(e) = self.hand_to_store_thread(StoreControl::Dump(tx)) {
            let _ = reply.send(Err(e));
            return;
        }
        tokio::spawn(async move {
            let _ = reply.send(answer(rx).await.map(|data| (record, data)));
        });
    }

    /// Replaces the store with the dump `data`, applied through `upto`, and loads it; nothing
    /// is read or applied meanwhile.
    pub(super) async fn install(&mut self, data: Vec<u8>, upto: LogIndex) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.hand_to_store_thread(StoreControl::Replace {
            data,
            upto,
            reply: tx,
        })?;
        answer(rx).await?;
        let path = self.config.data_dir.join("store").display().to_string();
        let mut store = super::Store::load(self.store.kv().clone(), &path).map_err(|e| e.to_string())?;
        store.keep_in_memory(self.config.memory_runs);
        if store.applied() != upto {
            return Err(format!(
                "the snapshot installed holds the store applied through {}, not {upto}",
                store.applied()
            ));
        }
        self.store = store;
        (self.stored, self.checkpointed) = (upto, upto);
        (self.lag_bytes, self.unsent_bytes) = (0, 0);
        Ok(())
    }
}

/// The trees of a store, each with its entries in key order.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Dump {
    trees: Vec<(u8, Vec<(ByteBuf, ByteBuf)>)>,
}

/// Every entry of `kv`, encoded.
pub(crate) fn dump(kv: &dyn KvStore) -> Result<Vec<u8>, String> {
    let mut d = Dump::default();
    for tree in Tree::ALL {
        let entries = kv
            .scan(tree, &[], std::ops::Bound::Unbounded, usize::MAX)
            .map_err(|e| e.0)?;
        d.trees.push((
            tree.prefix(),
            entries
                .into_iter()
                .map(|(k, v)| (ByteBuf::from(k), ByteBuf::from(v)))
                .collect(),
        ));
    }
    codec::encode(&d).map_err(|e| e.to_string())
}

/// Replaces every entry of `kv` with those of the dump `data`, atomically, and makes it
/// durable. A dump that does not decode, or names a tree this build does not know, changes
/// nothing.
pub(crate) fn replace(kv: &dyn KvStore, data: &[u8]) -> Result<(), String> {
    let d: Dump = codec::decode(data).map_err(|e| format!("the snapshot does not decode: {e}"))?;
    let mut ops = Vec::new();
    for tree in Tree::ALL {
        for (k, _) in kv
            .scan(tree, &[], std::ops::Bound::Unbounded, usize::MAX)
            .map_err(|e| e.0)?
        {
            ops.push(KvOp::Delete(tree, k));
        }
    }
    for (prefix, entries) in d.trees {
        let tree = Tree::from_prefix(prefix)
            .ok_or_else(|| format!("the snapshot holds a tree this build does not know ({prefix})"))?;
        ops.extend(
            entries
                .into_iter()
                .map(|(k, v)| KvOp::Put(tree, k.into_vec(), v.into_vec())),
        );
    }
    kv.apply(&ops).map_err(|e| e.0)?;
    kv.checkpoint().map_err(|e| e.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::kv::MemKv;

    fn put(kv: &MemKv, tree: Tree, k: &str, v: &str) {
        kv.apply(&[KvOp::Put(tree, k.as_bytes().to_vec(), v.as_bytes().to_vec())])
            .unwrap();
    }

    #[test]
    fn a_replaced_store_holds_exactly_the_dump() {
        let from = MemKv::new();
        put(&from, Tree::Meta, "applied", "7");
        put(&from, Tree::FlowRuns, "a", "run a");
        put(&from, Tree::Events, "e1", "event");
        let data = dump(&from).unwrap();

        let to = MemKv::new();
        put(&to, Tree::FlowRuns, "a", "older run a");
        put(&to, Tree::FlowRuns, "b", "run b, gone from the dump");
        put(&to, Tree::Logs, "l", "a log");
        replace(&to, &data).unwrap();
        assert_eq!(dump(&to).unwrap(), data);
        assert_eq!(to.get(Tree::FlowRuns, b"b").unwrap(), None);
        assert_eq!(to.get(Tree::FlowRuns, b"a").unwrap(), Some(b"run a".to_vec()));
    }

    #[test]
    fn a_bad_dump_changes_nothing() {
        let to = MemKv::new();
        put(&to, Tree::FlowRuns, "a", "run a");
        let before = dump(&to).unwrap();
        assert!(replace(&to, b"not a dump").is_err());
        let unknown = codec::encode(&Dump {
            trees: vec![(1, vec![]), (200, vec![])],
        })
        .unwrap();
        let err = replace(&to, &unknown).unwrap_err();
        assert!(err.contains("200"), "{err}");
        assert_eq!(dump(&to).unwrap(), before);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_refused_or_replace_cleanly(data in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let to = MemKv::new();
            put(&to, Tree::FlowRuns, "a", "run a");
            let before = dump(&to).unwrap();
            if replace(&to, &data).is_err() {
                proptest::prop_assert_eq!(dump(&to).unwrap(), before);
            }
        }
    }
}
