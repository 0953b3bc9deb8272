//! Results: serialized values, inline in the store up to a size, in a result directory above.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use flotilla_runtime::{ResultRef, RunId};

/// A result that cannot be stored or read back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResultError {
    /// The file could not be written or read.
    #[error("result {key}: {source}")]
    Io {
        /// The result's key.
        key: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The stored bytes are not what was written.
    #[error("result {key} is damaged: {reason}")]
    Damaged {
        /// The result's key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The result is not here and could not be fetched from the control node's result store.
    #[error("result {key} is not on this node and could not be fetched from the control node: {reason}")]
    Fetch {
        /// The result's key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The result could not be shipped to the control node's result store.
    #[error("result {key} could not be shipped to the control node: {reason}")]
    Ship {
        /// The result's key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// Ships a large result to the control node's result store, so that any node can read it and
/// it outlives the node that made it. Called from a blocking thread; returns once the control
/// node has the result durably.
pub trait ResultShipper: Send + Sync + std::fmt::Debug + 'static {
    /// Ships `bytes` under `key`.
    fn ship(&self, key: &str, bytes: &[u8]) -> Result<(), String>;

    /// Reads back the result under `key` from the control node's result store (a result
    /// another node made, read by a node resuming its run).
    fn fetch(&self, key: &str) -> Result<Vec<u8>, String>;
}

/// The object stores `s3` blocks name, for the runs whose flow or deployment sets
/// `result_storage = "s3/NAME"`.
pub trait BlockStores: Send + Sync + std::fmt::Debug + 'static {
    /// The store of `storage` (`s3/NAME`).
    fn store(&self, storage: &str) -> Result<std::sync::Arc<dyn ResultShipper>, String>;
}

/// Whether `key` is one this store makes: `flow-runs/ID-N.bin` or `task-runs/ID-N.bin`.
pub fn valid_key(key: &str) -> bool {
    let Some((dir, file)) = key.split_once('/') else {
        return false;
    };
    let Some(stem) = file.strip_suffix(".bin") else {
        return false;
    };
    let Some((id, attempt)) = stem.rsplit_once('-') else {
        return false;
    };
    matches!(dir, "flow-runs" | "task-runs")
        && id.len() == 36
        && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        && !attempt.is_empty()
        && attempt.len() <= 10
        && attempt.chars().all(|c| c.is_ascii_digit())
}

/// Where results go.
#[derive(Debug, Clone)]
pub struct ResultStore {
    dir: PathBuf,
    inline_max: usize,
    shipper: Option<std::sync::Arc<dyn ResultShipper>>,
    /// The object stores of `s3` blocks.
    blocks: Option<std::sync::Arc<dyn BlockStores>>,
    /// The block whose store this store's large results go to (`s3/NAME`).
    route: Option<String>,
}

impl ResultStore {
    /// Results up to `inline_max` bytes stay inline; larger ones go under `dir`.
    pub fn new(dir: PathBuf, inline_max: usize) -> Self {
        ResultStore {
            dir,
            inline_max,
            shipper: None,
            blocks: None,
            route: None,
        }
    }

    /// Results of runs whose flow or deployment names an `s3` block go to its store.
    pub fn with_blocks(mut self, blocks: std::sync::Arc<dyn BlockStores>) -> Self {
        self.blocks = Some(blocks);
        self
    }

    /// The same store, its large results going to `storage`'s object store (`s3/NAME`) when
    /// given.
    pub fn routed(&self, storage: Option<String>) -> Self {
        ResultStore {
            route: storage,
            ..self.clone()
        }
    }

    fn block_store(&self, storage: &str) -> Result<std::sync::Arc<dyn ResultShipper>, String> {
        match &self.blocks {
            Some(b) => b.store(storage),
            None => Err(format!("this node has no object stores for blocks ({storage})")),
        }
    }

    /// Large results are also shipped with `shipper` before their reference is returned (a
    /// worker's store: the control node keeps them).
    pub fn with_shipper(mut self, shipper: std::sync::Arc<dyn ResultShipper>) -> Self {
        self.shipper = Some(shipper);
        self
    }

    /// Whether a result of this size goes to a file (and so should be stored off the hot path).
    pub fn goes_to_file(&self, len: usize) -> bool {
        len > self.inline_max
    }

    /// Stores a result of `owner`'s attempt number `attempt`. Large ones are written to a file
    /// and made durable (`fsync` of the file and its directory) before the reference is returned.
    pub fn store(&self, owner: RunId, attempt: u32, bytes: Vec<u8>) -> Result<ResultRef, ResultError> {
        if !self.goes_to_file(bytes.len()) {
            return Ok(ResultRef::Inline(bytes));
        }
        let key = match owner {
            RunId::Flow(id) => format!("flow-runs/{id}-{attempt}.bin"),
            RunId::Task(id) => format!("task-runs/{id}-{attempt}.bin"),
        };
        self.put(&key, &bytes)?;
        let shipper = match &self.route {
            Some(storage) => Some(self.block_store(storage).map_err(|reason| ResultError::Ship {
                key: key.clone(),
                reason,
            })?),
            None => self.shipper.clone(),
        };
        if let Some(shipper) = shipper {
            shipper.ship(&key, &bytes).map_err(|reason| ResultError::Ship {
                key: key.clone(),
                reason,
            })?;
        }
        Ok(ResultRef::Stored {
            crc32: crc32fast::hash(&bytes),
            size: bytes.len() as u64,
            key,
            store: self.route.clone(),
        })
    }

    /// Writes `bytes` under `key` (one of [`valid_key`]'s) durably: the file and its directory
    /// are fsynced before it returns.
    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<(), ResultError> {
        if !valid_key(key) {
            return Err(ResultError::Damaged {
                key: key.to_owned(),
                reason: "not a result key".into(),
            });
        }
        let path = self.dir.join(key);
        let io = |source| ResultError::Io {
            key: key.to_owned(),
            source,
        };
        let parent = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(parent).map_err(io)?;
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// As [`ResultStore::load`], off the async runtime's threads when it reads a file.
    pub async fn load_async(&self, r: &ResultRef) -> Result<Vec<u8>, ResultError> {
        match r {
            ResultRef::Inline(b) => Ok(b.clone()),
            ResultRef::Stored { key, .. } => {
                let (store, r2, key) = (self.clone(), r.clone(), key.clone());
                tokio::task::spawn_blocking(move || store.load(&r2))
                    .await
                    .unwrap_or_else(|e| {
                        Err(ResultError::Io {
                            key,
                            source: std::io::Error::other(e.to_string()),
                        })
                    })
            }
        }
    }

    /// The bytes under `key` (one of [`valid_key`]'s), unchecked: the control node serving a
    /// node that reads a result another made (the reader checks size and checksum).
    pub fn get(&self, key: &str) -> Result<Vec<u8>, ResultError> {
        if !valid_key(key) {
            return Err(ResultError::Damaged {
                key: key.to_owned(),
                reason: "not a result key".into(),
            });
        }
        fs::read(self.dir.join(key)).map_err(|source| ResultError::Io {
            key: key.to_owned(),
            source,
        })
    }

    /// Reads a result back, checking its size and checksum. One this node does not have (made
    /// by another node, whose run this node resumed) is fetched from the control node's result
    /// store, checked the same way and kept here.
    pub fn load(&self, r: &ResultRef) -> Result<Vec<u8>, ResultError> {
        match self.load_local(r) {
            Err(ResultError::Io { key, source }) if source.kind() == std::io::ErrorKind::NotFound => {
                let ResultRef::Stored {
                    size, crc32, store, ..
                } = r
                else {
                    return Err(ResultError::Io { key, source });
                };
                let shipper = match store {
                    Some(storage) => self.block_store(storage).map_err(|reason| ResultError::Fetch {
                        key: key.clone(),
                        reason,
                    })?,
                    None => match &self.shipper {
                        Some(s) => s.clone(),
                        None => return Err(ResultError::Io { key, source }),
                    },
                };
                let bytes = shipper.fetch(&key).map_err(|reason| ResultError::Fetch {
                    key: key.clone(),
                    reason,
                })?;
                check(&key, &bytes, *size, *crc32)?;
                if let Err(e) = self.put(&key, &bytes) {
                    tracing::warn!(error = %e, "a fetched result could not be kept here");
                }
                Ok(bytes)
            }
            other => other,
        }
    }

    fn load_local(&self, r: &ResultRef) -> Result<Vec<u8>, ResultError> {
        match r {
            ResultRef::Inline(b) => Ok(b.clone()),
            ResultRef::Stored { key, size, crc32, .. } => {
                let damaged = |reason: String| ResultError::Damaged {
                    key: key.clone(),
                    reason,
                };
                let rel = Path::new(key);
                if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                    return Err(damaged(
                        "the key is not a relative path inside the result directory".into(),
                    ));
                }
                let bytes = fs::read(self.dir.join(rel)).map_err(|source| ResultError::Io {
                    key: key.clone(),
                    source,
                })?;
                check(key, &bytes, *size, *crc32)?;
                Ok(bytes)
            }
        }
    }
}

/// Checks a stored result's bytes against the size and checksum recorded with its reference.
fn check(key: &str, bytes: &[u8], size: u64, crc32: u32) -> Result<(), ResultError> {
    let damaged = |reason: String| ResultError::Damaged {
        key: key.to_owned(),
        reason,
    };
    if bytes.len() as u64 != size {
        return Err(damaged(format!(
            "{} bytes where {size} were written",
            bytes.len()
        )));
    }
    if crc32fast::hash(bytes) != crc32 {
        return Err(damaged("checksum mismatch".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_runtime::TaskRunId;

    /// The control node's result store, as a worker sees it.
    #[derive(Debug)]
    struct Control(ResultStore);

    impl ResultShipper for Control {
        fn ship(&self, key: &str, bytes: &[u8]) -> Result<(), String> {
            self.0.put(key, bytes).map_err(|e| e.to_string())
        }
        fn fetch(&self, key: &str) -> Result<Vec<u8>, String> {
            self.0.get(key).map_err(|e| e.to_string())
        }
    }

    #[test]
    fn a_result_made_on_another_node_is_fetched_from_the_control_node_and_checked() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let control = std::sync::Arc::new(Control(ResultStore::new(c.path().to_owned(), usize::MAX)));
        let maker = ResultStore::new(a.path().to_owned(), 8).with_shipper(control.clone());
        let owner = RunId::Task(TaskRunId::from_bytes([2; 16]));
        let r = maker.store(owner, 1, vec![9; 100]).unwrap();
        // The node that resumes the run never had it: it reads it from the control node.
        let resumer = ResultStore::new(b.path().to_owned(), 8).with_shipper(control.clone());
        assert_eq!(resumer.load(&r).unwrap(), vec![9; 100]);
        // ... and keeps it: read again without the control node's copy.
        let ResultRef::Stored { key, .. } = &r else {
            panic!("inline: {r:?}")
        };
        std::fs::remove_file(c.path().join(key)).unwrap();
        assert_eq!(resumer.load(&r).unwrap(), vec![9; 100]);
        // A copy that is not what was written is refused, as a local one is.
        control.0.put(key, &[1; 100]).unwrap();
        let fresh = tempfile::tempdir().unwrap();
        let other = ResultStore::new(fresh.path().to_owned(), 8).with_shipper(control.clone());
        assert!(matches!(other.load(&r), Err(ResultError::Damaged { .. })));
        // Lost everywhere: an error, never bytes.
        std::fs::remove_file(c.path().join(key)).unwrap();
        let lost = tempfile::tempdir().unwrap();
        let other = ResultStore::new(lost.path().to_owned(), 8).with_shipper(control);
        assert!(matches!(other.load(&r), Err(ResultError::Fetch { .. })));
        // A store with nothing to fetch from says the file is missing.
        assert!(matches!(
            ResultStore::new(lost.path().to_owned(), 8).load(&r),
            Err(ResultError::Io { .. })
        ));
    }

    #[test]
    fn only_result_keys_are_accepted() {
        let id = "01a213b8-0c22-7ed0-83b9-93dd9085f0a5";
        assert!(valid_key(&format!("flow-runs/{id}-1.bin")));
        assert!(valid_key(&format!("task-runs/{id}-12.bin")));
        for bad in [
            format!("../{id}-1.bin"),
            format!("flow-runs/../../{id}-1.bin"),
            format!("other/{id}-1.bin"),
            format!("flow-runs/{id}-.bin"),
            format!("flow-runs/{id}-1.txt"),
            format!("/flow-runs/{id}-1.bin"),
            "flow-runs/....................................-1.bin".to_owned(),
            String::new(),
        ] {
            assert!(!valid_key(&bad), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let store = ResultStore::new(dir.path().to_owned(), 4);
        assert!(store.put("flow-runs/../../x", b"x").is_err());
    }

    #[test]
    fn small_results_are_inline_and_large_ones_in_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResultStore::new(dir.path().to_path_buf(), 8);
        let owner = RunId::Task(TaskRunId::from_bytes([1; 16]));
        let small = store.store(owner, 1, vec![1, 2, 3]).unwrap();
        assert_eq!(small, ResultRef::Inline(vec![1, 2, 3]));
        let big = store.store(owner, 1, vec![7; 100]).unwrap();
        assert!(matches!(big, ResultRef::Stored { size: 100, .. }));
        assert_eq!(store.load(&big).unwrap(), vec![7; 100]);
        // Damage is detected and said.
        let ResultRef::Stored { key, .. } = &big else {
            unreachable!()
        };
        fs::write(dir.path().join(key), vec![8; 100]).unwrap();
        let err = store.load(&big).unwrap_err().to_string();
        assert!(err.contains("damaged") && err.contains(key), "{err}");
        fs::remove_file(dir.path().join(key)).unwrap();
        assert!(matches!(store.load(&big), Err(ResultError::Io { .. })));
        // A key that leaves the directory is refused.
        let evil = ResultRef::Stored {
            key: "../etc/passwd".into(),
            size: 1,
            crc32: 0,
            store: None,
        };
        assert!(matches!(store.load(&evil), Err(ResultError::Damaged { .. })));
    }
}
