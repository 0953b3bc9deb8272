//! The two threads behind the persistence actor: the log thread (append + `fdatasync`, one
//! batch at a time) and the store thread (writes the derived state behind the log, coalescing
//! whatever queued up, and checkpoints it).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use flotilla_runtime::LogIndex;
use ractor::ActorRef;

use super::PersistenceMsg;
use super::command_log::CommandLog;
use super::config::PersistenceConfig;
use super::kv::KvStore;
use super::store::StoreJob;

/// Work for the log thread.
pub(crate) enum LogJob {
    /// Append a batch and make it durable.
    Append {
        payload: Vec<u8>,
        first: LogIndex,
        last: LogIndex,
    },
    /// Remove segments the store holds durably.
    Truncate { upto: LogIndex },
}

pub(crate) fn spawn_log_thread(
    mut log: CommandLog,
    actor: ActorRef<PersistenceMsg>,
    segments: Arc<AtomicUsize>,
) -> std::io::Result<(mpsc::Sender<LogJob>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<LogJob>();
    let handle = std::thread::Builder::new()
        .name("flotilla-log".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                match job {
                    LogJob::Append { payload, first, last } => {
                        let result = log.append(&payload, first, last).map_err(|e| e.to_string());
                        segments.store(log.segment_count(), Ordering::Relaxed);
                        let failed = result.is_err();
                        if actor.cast(PersistenceMsg::Logged { last, result }).is_err() || failed {
                            break;
                        }
                    }
                    LogJob::Truncate { upto } => match log.truncate_through(upto) {
                        Ok(n) => {
                            segments.store(log.segment_count(), Ordering::Relaxed);
                            if n > 0 {
                                tracing::debug!(segments = n, %upto, "truncated the command log");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "the command log could not be truncated"),
                    },
                }
            }
        })?;
    Ok((tx, handle))
}

pub(crate) fn spawn_store_thread(
    kv: Arc<dyn KvStore>,
    actor: ActorRef<PersistenceMsg>,
    config: &PersistenceConfig,
    applied: LogIndex,
) -> std::io::Result<(mpsc::Sender<StoreJob>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<StoreJob>();
    let checkpoint_bytes = config.checkpoint_bytes;
    let interval = config.checkpoint_interval;
    let handle = std::thread::Builder::new()
        .name("flotilla-store".into())
        .spawn(move || {
            let mut since_checkpoint = 0u64;
            let mut last_checkpoint = Instant::now();
            let mut stored = applied;
            let mut checkpointed = applied;
            let checkpoint = |stored: LogIndex, checkpointed: &mut LogIndex| {
                if stored == *checkpointed {
                    return true;
                }
                match kv.checkpoint() {
                    Ok(()) => {
                        *checkpointed = stored;
                        let _ = actor.cast(PersistenceMsg::Checkpointed { upto: stored });
                        true
                    }
                    Err(e) => {
                        let _ = actor.cast(PersistenceMsg::Stored {
                            upto: stored,
                            log_bytes: 0,
                            result: Err(e.0),
                        });
                        false
                    }
                }
            };
            loop {
                let first = match rx.recv_timeout(interval) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if !checkpoint(stored, &mut checkpointed) {
                            return;
                        }
                        since_checkpoint = 0;
                        last_checkpoint = Instant::now();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        checkpoint(stored, &mut checkpointed);
                        return;
                    }
                };
                let mut jobs = vec![first];
                while jobs.len() < 256 {
                    match rx.try_recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
                for job in StoreJob::merge_all(jobs) {
                    let (upto, log_bytes) = (job.upto, job.log_bytes);
                    if let Err(e) = job.write(kv.as_ref()) {
                        let _ = actor.cast(PersistenceMsg::Stored {
                            upto,
                            log_bytes,
                            result: Err(e),
                        });
                        return;
                    }
                    stored = upto;
                    since_checkpoint += log_bytes;
                    if actor
                        .cast(PersistenceMsg::Stored {
                            upto,
                            log_bytes,
                            result: Ok(()),
                        })
                        .is_err()
                    {
                        checkpoint(stored, &mut checkpointed);
                        return;
                    }
                }
                if since_checkpoint >= checkpoint_bytes || last_checkpoint.elapsed() >= interval {
                    if !checkpoint(stored, &mut checkpointed) {
                        return;
                    }
                    since_checkpoint = 0;
                    last_checkpoint = Instant::now();
                }
            }
        })?;
    Ok((tx, handle))
}
