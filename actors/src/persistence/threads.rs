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

use super::snapshot::SnapshotReply as StoreReply;

/// Work for the store thread, done in the order sent.
// Writes are nearly all of it: boxing them would add an allocation each.
#[allow(clippy::large_enum_variant)]
pub(crate) enum StoreWork {
    /// Write what was applied.
    Write(StoreJob),
    /// Anything else.
    Control(StoreControl),
}

/// Work for the store thread other than writes.
pub(crate) enum StoreControl {
    /// Make everything written so far durable now.
    Checkpoint(StoreReply<()>),
    /// Read the whole store as written so far (see [`super::snapshot::dump`]).
    Dump(StoreReply<Vec<u8>>),
    /// Replace the whole store with a dump applied through `upto`, durably.
    Replace {
        data: Vec<u8>,
        upto: LogIndex,
        reply: StoreReply<()>,
    },
}

pub(crate) fn spawn_store_thread(
    kv: Arc<dyn KvStore>,
    actor: ActorRef<PersistenceMsg>,
    config: &PersistenceConfig,
    applied: LogIndex,
) -> std::io::Result<(mpsc::Sender<StoreWork>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<StoreWork>();
    let checkpoint_bytes = config.checkpoint_bytes;
    let interval = config.checkpoint_interval;
    let handle = std::thread::Builder::new()
        .name("flotilla-store".into())
        .spawn(move || {
            yield_to_the_node();
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
                // Writes queued one after another are merged, up to the first other work.
                let mut jobs = Vec::new();
                let mut other = None;
                let mut next = Some(first);
                while let Some(work) = next.take() {
                    match work {
                        StoreWork::Write(job) => jobs.push(job),
                        StoreWork::Control(work) => {
                            other = Some(work);
                            break;
                        }
                    }
                    if jobs.len() < 256 {
                        next = rx.try_recv().ok();
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
                let forced = match other {
                    None => false,
                    Some(StoreControl::Checkpoint(reply)) => {
                        let ok = checkpoint(stored, &mut checkpointed);
                        let _ = reply.send(if ok {
                            Ok(())
                        } else {
                            Err("the store could not be checkpointed".into())
                        });
                        if !ok {
                            return;
                        }
                        true
                    }
                    Some(StoreControl::Dump(reply)) => {
                        let _ = reply.send(super::snapshot::dump(kv.as_ref()));
                        false
                    }
                    Some(StoreControl::Replace { data, upto, reply }) => {
                        let result = super::snapshot::replace(kv.as_ref(), &data);
                        if result.is_ok() {
                            (stored, checkpointed) = (upto, upto);
                        }
                        let _ = reply.send(result);
                        true
                    }
                };
                if forced {
                    since_checkpoint = 0;
                    last_checkpoint = Instant::now();
                } else if since_checkpoint >= checkpoint_bytes || last_checkpoint.elapsed() >= interval {
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

/// The store thread only has to keep up on average: it runs at a lower priority (nice 10) than
/// the node's runtime threads, so that on a busy machine it takes the time they leave idle
/// instead of preempting an actor in the middle of its work.
fn yield_to_the_node() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    // thread-priority maps 0..=99 onto niceness 19..=-20: 22 is nice 10.
    let Ok(value) = ThreadPriorityValue::try_from(22u8) else {
        return;
    };
    if let Err(e) = set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Crossplatform(value),
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other),
    ) {
        tracing::debug!(error = ?e, "the store thread's priority could not be lowered");
    }
}
