//! Opening a data directory: its lock, its format, its store, and (a single node's) its
//! command log replayed past the store's applied index; or, for a voter's replica, no log of
//! its own.

use super::*;

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

fn lock_dir(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| OpenError::io(path_str(&path), e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(OpenError::Locked {
            path: path_str(&path),
        }),
        Err(fs::TryLockError::Error(e)) => Err(OpenError::io(path_str(&path), e)),
    }
}

fn check_format(dir: &Path) -> Result<(), OpenError> {
    let path = dir.join(FORMAT_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let found: u32 = text
                .trim()
                .strip_prefix("flotilla-data-format ")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    OpenError::corrupt(
                        path_str(&path),
                        format!("unreadable format file: {:?}", text.trim()),
                    )
                })?;
            if found > DATA_FORMAT {
                return Err(OpenError::NewerFormat {
                    path: path_str(&path),
                    found,
                    supported: DATA_FORMAT,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join("store").exists() || dir.join("log").exists() {
                return Err(OpenError::corrupt(
                    path_str(&path),
                    "missing, but the directory holds data",
                ));
            }
            let mut f = File::create(&path).map_err(|e| OpenError::io(path_str(&path), e))?;
            writeln!(f, "flotilla-data-format {DATA_FORMAT}")
                .and_then(|()| f.sync_all())
                .and_then(|()| File::open(dir)?.sync_all())
                .map_err(|e| OpenError::io(path_str(&path), e))
        }
        Err(e) => Err(OpenError::io(path_str(&path), e)),
    }
}

/// Opens a data directory: takes its lock, checks its format, loads the store and replays the
/// command log past the store's applied index. Errors name the path and the cause.
pub fn open(config: PersistenceConfig) -> Result<OpenedStore, OpenError> {
    let dir = config.data_dir.clone();
    fs::create_dir_all(&dir).map_err(|e| OpenError::io(path_str(&dir), e))?;
    let lock = lock_dir(&dir)?;
    check_format(&dir)?;
    let store_dir = dir.join("store");
    let kv = SledKv::open(&store_dir).map_err(|e| OpenError::Store {
        path: path_str(&store_dir),
        reason: e.0,
    })?;
    let kv: Arc<dyn KvStore> = Arc::new(kv);
    open_with(lock, config, kv, &path_str(&store_dir))
}

/// Opens a data directory (its lock, format and command log) with the derived state in the
/// given store instead of sled: for tests that are not about storage. A fresh store replays the
/// whole log.
pub fn open_with_store(config: PersistenceConfig, kv: Arc<dyn KvStore>) -> Result<OpenedStore, OpenError> {
    let dir = config.data_dir.clone();
    fs::create_dir_all(&dir).map_err(|e| OpenError::io(path_str(&dir), e))?;
    let lock = lock_dir(&dir)?;
    check_format(&dir)?;
    open_with(lock, config, kv, "memory")
}

fn open_with(
    lock: File,
    config: PersistenceConfig,
    kv: Arc<dyn KvStore>,
    store_path: &str,
) -> Result<OpenedStore, OpenError> {
    let mut store = Store::load(kv.clone(), store_path)?;
    store.keep_in_memory(config.memory_runs);
    let log_dir = config.data_dir.join("log");
    let io = DirIo::new(&log_dir).map_err(|e| OpenError::io(path_str(&log_dir), e))?;
    let (mut log, entries) = CommandLog::open(Box::new(io), config.segment_bytes_max, store.applied())?;
    let replayed = entries.len();
    if replayed > 0 {
        tracing::info!(commands = replayed, from = %store.applied(), "replaying the command log");
    }
    let store_err = |reason: String| OpenError::Store {
        path: store_path.to_owned(),
        reason,
    };
    for (n, entry) in entries.into_iter().enumerate() {
        let _ = store.apply(entry.index, entry.now, entry.command);
        if n % 4096 == 4095 {
            for job in store.take_jobs() {
                job.write(kv.as_ref()).map_err(store_err)?;
            }
        }
    }
    for job in store.take_jobs() {
        job.write(kv.as_ref()).map_err(store_err)?;
    }
    store.stored_through(store.applied());
    kv.checkpoint().map_err(|e| store_err(e.0))?;
    log.truncate_through(store.applied())
        .map_err(|e| OpenError::io(path_str(&log_dir), e))?;
    Ok(OpenedStore {
        lock,
        store,
        log: Some(log),
        config,
        replayed,
    })
}

/// Opens a data directory whose log is replication's: its lock, format and store, without a
/// command log of its own (replication applies its log past the store's record).
pub fn open_replica(config: PersistenceConfig) -> Result<OpenedStore, OpenError> {
    let dir = config.data_dir.clone();
    fs::create_dir_all(&dir).map_err(|e| OpenError::io(path_str(&dir), e))?;
    let lock = lock_dir(&dir)?;
    check_format(&dir)?;
    let store_dir = dir.join("store");
    let store_path = path_str(&store_dir);
    let kv = SledKv::open(&store_dir).map_err(|e| OpenError::Store {
        path: store_path.clone(),
        reason: e.0,
    })?;
    if fs::read_dir(dir.join("log")).is_ok_and(|mut d| d.next().is_some()) {
        return Err(OpenError::corrupt(
            path_str(&dir),
            "this data directory holds a single node's command log: it cannot become a voter's",
        ));
    }
    let mut store = Store::load(Arc::new(kv), &store_path)?;
    store.keep_in_memory(config.memory_runs);
    Ok(OpenedStore {
        lock,
        store,
        log: None,
        config,
        replayed: 0,
    })
}
