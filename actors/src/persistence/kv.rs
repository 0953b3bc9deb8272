//! The store behind the command log: an ordered key-value store with a few trees, atomic
//! batches and an explicit checkpoint that makes everything applied durable.
//!
//! Two implementations pass one conformance suite (`actors/tests/kv_conformance.rs`):
//! [`SledKv`] (sled 0.34) and [`MemKv`] (a `BTreeMap`, for tests that are not about storage).

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// The trees (key spaces) of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tree {
    /// Bookkeeping: the applied log index, the format.
    Meta,
    /// Flow runs by id.
    FlowRuns,
    /// Task runs by id.
    TaskRuns,
    /// Deployments by id.
    Deployments,
    /// Events in blocks, by the id of each block's first event.
    Events,
    /// Log batches by flow run and batch id.
    Logs,
    /// Archived blocks of state histories, by run and block number.
    History,
    /// Work queues and tag limits, by setting key.
    Settings,
    /// Remembered answers to client requests, in a ring of slots (overwritten, never deleted).
    Outcomes,
    /// Log batches by time: batch id then flow run id, empty values (what log retention walks,
    /// oldest first, instead of every batch).
    LogTimes,
    /// Where the flow runs and task runs kept only in the store (not in memory) are found: by
    /// state, deployment, end time, idempotency key and flow run (see `store/evict.rs`).
    Evicted,
}

impl Tree {
    /// Every tree.
    pub const ALL: [Tree; 11] = [
        Tree::Meta,
        Tree::FlowRuns,
        Tree::TaskRuns,
        Tree::Deployments,
        Tree::Events,
        Tree::Logs,
        Tree::History,
        Tree::Settings,
        Tree::Outcomes,
        Tree::LogTimes,
        Tree::Evicted,
    ];

    /// The tree whose [`Tree::prefix`] is `prefix`.
    pub fn from_prefix(prefix: u8) -> Option<Tree> {
        Tree::ALL.into_iter().find(|t| t.prefix() == prefix)
    }

    /// The byte that names the tree.
    pub fn prefix(self) -> u8 {
        match self {
            Tree::Meta => 0,
            Tree::FlowRuns => 1,
            Tree::TaskRuns => 2,
            Tree::Deployments => 3,
            Tree::Events => 4,
            Tree::Logs => 5,
            Tree::History => 6,
            Tree::Settings => 7,
            Tree::Outcomes => 8,
            Tree::LogTimes => 9,
            Tree::Evicted => 10,
        }
    }

    fn key(self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(key.len() + 1);
        k.push(self.prefix());
        k.extend_from_slice(key);
        k
    }
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One change in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvOp {
    /// Insert or replace.
    Put(Tree, Vec<u8>, Vec<u8>),
    /// Remove (absent keys are fine).
    Delete(Tree, Vec<u8>),
}

/// A fault of the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store error: {0}")]
pub struct KvError(pub String);

/// An ordered key-value store with trees.
pub trait KvStore: Send + Sync {
    /// Applies a batch atomically: after a crash either all of it or none of it is there.
    fn apply(&self, ops: &[KvOp]) -> Result<(), KvError>;
    /// Reads one key.
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Up to `limit` entries of `tree` whose keys start with `prefix`, from `start` on, in key
    /// order (keys returned without the tree).
    fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, KvError>;
    /// The entry of `tree` with the greatest key at or before `key`.
    fn floor(&self, tree: Tree, key: &[u8]) -> Result<Option<Entry>, KvError>;
    /// Makes every applied batch durable (survives power loss).
    fn checkpoint(&self) -> Result<(), KvError>;
}

fn scan_bounds(tree: Tree, prefix: &[u8], start: Bound<&[u8]>) -> (Bound<Vec<u8>>, Vec<u8>) {
    let full_prefix = tree.key(prefix);
    let lower = match start {
        Bound::Included(k) if k >= prefix => Bound::Included(tree.key(k)),
        Bound::Excluded(k) if k >= prefix => Bound::Excluded(tree.key(k)),
        _ => Bound::Included(full_prefix.clone()),
    };
    (lower, full_prefix)
}

/// The store in sled 0.34: one sled tree, keys prefixed by a tree byte, so that a batch over
/// several trees is one atomic `apply_batch`.
#[derive(Clone)]
pub struct SledKv {
    db: sled::Db,
    dir: PathBuf,
}

impl std::fmt::Debug for SledKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledKv").field("dir", &self.dir).finish()
    }
}

impl SledKv {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, KvError> {
        // A store of this process closed just now may still be held by one of sled's
        // background threads for a moment (its file lock goes with the last of them): wait a
        // little for it rather than fail. Another process's lock is refused by the data
        // directory's own lock before this is reached.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let db = loop {
            let opened = sled::Config::new()
                .path(dir)
                .flush_every_ms(None)
                // sled's page cache: a bound on the memory that follows the data written (at
                // 256 MiB, a node keeping a million task runs held 300 MiB more).
                .cache_capacity(64 * 1024 * 1024)
                .open();
            match opened {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(KvError(e.to_string())),
            }
        };
        Ok(SledKv {
            db,
            dir: dir.to_path_buf(),
        })
    }
}

fn sled_err(e: sled::Error) -> KvError {
    KvError(e.to_string())
}

/// `fsync`s every file under `dir` and every directory, so that what sled's `flush` wrote
/// (with `sync_file_range`, and its blob files not at all) survives a power cut.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            sync_tree(&entry.path())?;
        } else if ty.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()
}

impl KvStore for SledKv {
    fn apply(&self, ops: &[KvOp]) -> Result<(), KvError> {
        // A transaction, not `apply_batch`: both are atomic across a crash, but in sled 0.34.7
        // a batch that removes keys leaks memory (about 2.6 GiB over a million removes of
        // time-ordered keys, 20,000 live), while the same writes in a transaction stay flat.
        // Only the store thread writes, so the transaction never conflicts and runs once.
        let result: sled::transaction::TransactionResult<(), ()> = self.db.transaction(|tx| {
            for op in ops {
                match op {
                    KvOp::Put(t, k, v) => {
                        tx.insert(t.key(k), v.as_slice())?;
                    }
                    KvOp::Delete(t, k) => {
                        tx.remove(t.key(k))?;
                    }
                }
            }
            Ok(())
        });
        result.map_err(|e| match e {
            sled::transaction::TransactionError::Storage(e) => sled_err(e),
            sled::transaction::TransactionError::Abort(()) => KvError("store transaction aborted".into()),
        })
    }

    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.db.get(tree.key(key)).map_err(sled_err)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, KvError> {
        let (lower, full_prefix) = scan_bounds(tree, prefix, start);
        let mut out = Vec::new();
        for item in self.db.range::<Vec<u8>, _>((lower, Bound::Unbounded)) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(sled_err)?;
            if !k.starts_with(&full_prefix) {
                break;
            }
            out.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn floor(&self, tree: Tree, key: &[u8]) -> Result<Option<Entry>, KvError> {
        let lower = vec![tree.prefix()];
        match self.db.range(lower..=tree.key(key)).next_back() {
            Some(item) => {
                let (k, v) = item.map_err(sled_err)?;
                Ok(Some((k[1..].to_vec(), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    fn checkpoint(&self) -> Result<(), KvError> {
        self.db.flush().map_err(sled_err)?;
        sync_tree(&self.dir).map_err(|e| KvError(format!("syncing {}: {e}", self.dir.display())))
    }
}

/// The store in memory. Clones share the data, so a "reopen" in a test keeps everything
/// applied (as if every batch were durable).
#[derive(Clone, Debug, Default)]
pub struct MemKv {
    map: Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>,
}

impl MemKv {
    /// An empty store.
    pub fn new() -> Self {
        MemKv::default()
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KvStore for MemKv {
    fn apply(&self, ops: &[KvOp]) -> Result<(), KvError> {
        let mut map = self.map();
        for op in ops {
            match op {
                KvOp::Put(t, k, v) => {
                    map.insert(t.key(k), v.clone());
                }
                KvOp::Delete(t, k) => {
                    map.remove(&t.key(k));
                }
            }
        }
        Ok(())
    }

    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.map().get(&tree.key(key)).cloned())
    }

    fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, KvError> {
        let (lower, full_prefix) = scan_bounds(tree, prefix, start);
        Ok(self
            .map()
            .range((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(&full_prefix))
            .take(limit)
            .map(|(k, v)| (k[1..].to_vec(), v.clone()))
            .collect())
    }

    fn floor(&self, tree: Tree, key: &[u8]) -> Result<Option<Entry>, KvError> {
        let lower = vec![tree.prefix()];
        Ok(self
            .map()
            .range(lower..=tree.key(key))
            .next_back()
            .map(|(k, v)| (k[1..].to_vec(), v.clone())))
    }

    fn checkpoint(&self) -> Result<(), KvError> {
        Ok(())
    }
}
