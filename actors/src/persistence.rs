//! The persistence actor: the only writer of the control state.
//!
//! Commands that arrive while a batch is being written form the next batch (group commit). A
//! batch is appended to the command log as one frame and made durable with one `fdatasync` (on
//! the log thread); only then are its commands applied, answered and their events published.
//! The state they derive is written to the store behind the log (on the store thread), which may
//! lag by at most `store_lag_bytes_max` of log before acknowledgements wait. The store is
//! checkpointed (made power-cut durable) from time to time, and the log is truncated up to the
//! checkpoint. On open, the log past the store's applied index is replayed.

pub mod command_log;
pub mod config;
pub mod error;
mod inbox;
pub mod kv;
pub mod log_io;
mod open;
pub mod overlay;
pub mod read;
pub mod snapshot;
pub mod store;
mod threads;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use flotilla_runtime::codec::FORMAT_VERSION;
use flotilla_runtime::{Command, Event, LogIndex, Refusal, Reply, Timestamp};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;
use tokio::sync::broadcast;

pub use command_log::{CommandLog, LogEntry, LogEntryRef};
pub use config::{PersistenceConfig, Retention};
pub use error::{OpenError, PersistError};
pub use kv::{KvError, KvOp, KvStore, MemKv, SledKv, Tree};
pub use read::{LogCursor, PAGE_MAX, Read, ReadReply, RunFilter, StoreStats};
pub use store::{Cold, ColdPrune, ReadAnswer, Store, StoreJob};

pub use inbox::Ack;
use inbox::Inbox;
use log_io::DirIo;
pub use open::{open, open_replica, open_with_store};
pub use snapshot::SnapshotReply;
use threads::{LogJob, StoreWork, spawn_log_thread, spawn_store_thread};

/// The data format version of a data directory this build writes and reads.
pub const DATA_FORMAT: u32 = 1;
const FORMAT_FILE: &str = "FORMAT";
const LOCK_FILE: &str = "LOCK";

/// The answer to a submitted command: the rules' reply or refusal, or a fault.
pub type SubmitResult = Result<Result<Reply, Refusal>, PersistError>;

/// Messages of the persistence actor.
// Submissions are the hot path and the largest variant: boxing them would add an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum PersistenceMsg {
    /// Commands are waiting in the inbox.
    Drain,
    /// Read the control state.
    Read(Read, RpcReplyPort<Result<ReadReply, PersistError>>),
    /// From the log thread: a batch is durable (or failed).
    Logged {
        /// The batch's last index.
        last: LogIndex,
        /// Ok, or the IO error.
        result: Result<(), String>,
    },
    /// From the store thread: the store holds everything up to `upto`.
    Stored {
        /// The last index stored.
        upto: LogIndex,
        /// The log bytes that covered.
        log_bytes: u64,
        /// Ok, or the store error.
        result: Result<(), String>,
    },
    /// From the store thread: the store is durable up to `upto`.
    Checkpointed {
        /// The last index made durable.
        upto: LogIndex,
    },
    /// Periodic: hand what was applied to the store thread.
    Tick,
    /// Periodic: forget what is older than the retention windows.
    Prune,
    /// A pruning command was applied; `more` when more runs are due.
    Pruned {
        /// Whether to prune again at once.
        more: bool,
    },
    /// Replicated: entries of the log, committed, to apply in order.
    Apply {
        /// The entries.
        entries: Vec<Applying>,
        /// Replication's record of what was applied, after the last of them.
        record: Vec<u8>,
        /// Told once they are applied.
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// Replicated: make the store durable now; answers replication's record as of then.
    Checkpoint(SnapshotReply<Option<Vec<u8>>>),
    /// Replicated: the whole store as of everything applied, and replication's record of it.
    Dump(SnapshotReply<(Option<Vec<u8>>, Vec<u8>)>),
    /// Replicated: replace the whole store with a dump applied through `upto` (a snapshot
    /// installed).
    Install {
        /// The dump.
        data: Vec<u8>,
        /// The last log index it holds.
        upto: LogIndex,
        /// Told once the store is replaced and durable.
        done: SnapshotReply<()>,
    },
}

/// Where the answer to a replicated command goes (to the client that proposed it).
pub type Answer = Box<dyn FnOnce(Result<Reply, Refusal>) + Send>;

/// A committed entry of the replicated log, to apply.
#[allow(missing_debug_implementations)]
pub struct Applying {
    /// Its index in the log.
    pub index: LogIndex,
    /// Its command and the leader's time for it; None for an entry of replication's own.
    pub command: Option<(Timestamp, Command)>,
    /// Where the answer goes, on the node that proposed it.
    pub answer: Option<Answer>,
}

/// Commands to propose to the replicated log, in order, with the time to give them.
pub type Proposals = tokio::sync::mpsc::UnboundedSender<(Timestamp, Vec<(Command, Ack)>)>;

impl ractor::Message for PersistenceMsg {}

impl std::fmt::Debug for PersistenceMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PersistenceMsg::Drain => f.write_str("Drain"),
            PersistenceMsg::Read(r, _) => write!(f, "Read({r:?})"),
            PersistenceMsg::Logged { last, .. } => write!(f, "Logged({last})"),
            PersistenceMsg::Stored { upto, .. } => write!(f, "Stored({upto})"),
            PersistenceMsg::Checkpointed { upto } => write!(f, "Checkpointed({upto})"),
            PersistenceMsg::Tick => f.write_str("Tick"),
            PersistenceMsg::Prune => f.write_str("Prune"),
            PersistenceMsg::Pruned { more } => write!(f, "Pruned({more})"),
            PersistenceMsg::Apply { entries, .. } => write!(f, "Apply({})", entries.len()),
            PersistenceMsg::Checkpoint(_) => f.write_str("Checkpoint"),
            PersistenceMsg::Dump(_) => f.write_str("Dump"),
            PersistenceMsg::Install { upto, .. } => write!(f, "Install({upto})"),
        }
    }
}

/// A data directory opened and recovered, ready to start the actor on.
pub struct OpenedStore {
    lock: File,
    store: Store,
    /// The command log; None when the log is replication's.
    log: Option<CommandLog>,
    config: PersistenceConfig,
    /// How many commands were replayed from the log on open.
    pub replayed: usize,
}

impl std::fmt::Debug for OpenedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedStore")
            .field("store", &self.store)
            .field("replayed", &self.replayed)
            .finish_non_exhaustive()
    }
}

impl OpenedStore {
    /// The recovered state.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

struct InFlight {
    entries: Vec<(LogIndex, Command, Ack)>,
    now: Timestamp,
    bytes: u64,
}

/// The actor's state.
#[allow(missing_debug_implementations)]
pub struct PersistenceState {
    store: Store,
    config: PersistenceConfig,
    pending: VecDeque<(Command, Ack)>,
    inbox: Arc<Inbox>,
    in_flight: Option<InFlight>,
    next_index: LogIndex,
    log_tx: Option<mpsc::Sender<LogJob>>,
    store_tx: Option<mpsc::Sender<StoreWork>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    events: broadcast::Sender<Arc<Event>>,
    lag_bytes: u64,
    stored: LogIndex,
    checkpointed: LogIndex,
    log_syncs: u64,
    log_segments: Arc<AtomicUsize>,
    failed: Option<PersistError>,
    /// Replicated: where commands go to be proposed.
    proposals: Option<Proposals>,
    unsent_bytes: u64,
    last_store_job: std::time::Instant,
    pruning: bool,
    _lock: File,
}

/// The persistence actor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Persistence;

/// What the actor starts from.
#[allow(missing_debug_implementations)]
pub struct PersistenceArgs {
    opened: OpenedStore,
    events: broadcast::Sender<Arc<Event>>,
    inbox: Arc<Inbox>,
    proposals: Option<Proposals>,
}

impl PersistenceState {
    fn clock() -> Timestamp {
        Timestamp::from(chrono::Utc::now())
    }

    fn fail_all(&mut self, err: PersistError) {
        self.inbox.close(err.clone());
        if let Some(batch) = self.in_flight.take() {
            for (_, _, port) in batch.entries {
                let _ = port.send(Err(err.clone()));
            }
        }
        for (_, port) in self.pending.drain(..) {
            let _ = port.send(Err(err.clone()));
        }
        self.failed = Some(err);
    }

    /// Starts writing the next batch when none is being written and the store keeps up.
    fn start_batch(&mut self) {
        if self.proposals.is_some() {
            return self.propose();
        }
        if self.in_flight.is_some()
            || self.pending.is_empty()
            || self.lag_bytes >= self.config.store_lag_bytes_max
        {
            return;
        }
        let Some(log_tx) = &self.log_tx else { return };
        let now = self.store.next_now(Self::clock());
        // Version byte, then a MessagePack array32 header patched with the count at the end.
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.push(FORMAT_VERSION);
        buf.extend_from_slice(&[0xdd, 0, 0, 0, 0]);
        let mut entries = Vec::new();
        let first = self.next_index;
        while let Some((command, port)) = self.pending.pop_front() {
            if entries.len() >= self.config.batch_commands_max || buf.len() >= self.config.batch_bytes_max {
                self.pending.push_front((command, port));
                break;
            }
            let index = LogIndex::new(first.get() + entries.len() as u64);
            let start = buf.len();
            let entry = LogEntryRef {
                index,
                now,
                command: &command,
            };
            let mut ser = rmp_serde::Serializer::new(&mut buf).with_struct_map();
            if let Err(e) = entry.serialize(&mut ser) {
                buf.truncate(start);
                let _ = port.send(Err(PersistError::Encode(e.to_string())));
                continue;
            }
            let size = buf.len() - start;
            if size > self.config.command_bytes_max {
                buf.truncate(start);
                let _ = port.send(Err(PersistError::TooLarge {
                    size,
                    max: self.config.command_bytes_max,
                }));
                continue;
            }
            entries.push((index, command, port));
        }
        if entries.is_empty() {
            return;
        }
        let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        buf[2..6].copy_from_slice(&count.to_be_bytes());
        let last = LogIndex::new(first.get() + entries.len() as u64 - 1);
        let bytes = buf.len() as u64;
        if log_tx
            .send(LogJob::Append {
                payload: buf,
                first,
                last,
            })
            .is_err()
        {
            for (_, _, port) in entries {
                let _ = port.send(Err(PersistError::LogWrite("the log thread is gone".into())));
            }
            self.fail_all(PersistError::LogWrite("the log thread is gone".into()));
            return;
        }
        self.next_index = last.next();
        self.in_flight = Some(InFlight { entries, now, bytes });
    }

    /// Replicated: hands what is pending to replication, in order, with one time for all.
    fn propose(&mut self) {
        let Some(tx) = &self.proposals else { return };
        if self.pending.is_empty() || self.lag_bytes >= self.config.store_lag_bytes_max {
            return;
        }
        let now = self.store.next_now(Self::clock());
        let batch: Vec<_> = self.pending.drain(..).collect();
        if let Err(e) = tx.send((now, batch)) {
            for (_, ack) in e.0.1 {
                let _ = ack.send(Err(PersistError::Stopped));
            }
        }
    }

    /// Replicated: applies committed entries in order, answers the proposers, publishes, and
    /// hands the writes to the store.
    fn apply_committed(&mut self, entries: Vec<Applying>, record: Vec<u8>) {
        /// What an entry counts for towards store writes (replication's log is not ours).
        const ENTRY_BYTES: u64 = 256;
        let publish = self.events.receiver_count() > 0;
        let bytes = ENTRY_BYTES * entries.len() as u64;
        for a in entries {
            let reply = match a.command {
                Some((now, command)) => {
                    let now = self.store.next_now(now);
                    let (reply, events) = self.store.apply(a.index, now, command);
                    if publish {
                        for e in events {
                            let _ = self.events.send(e);
                        }
                    }
                    reply
                }
                None => {
                    self.store.skip(a.index);
                    Ok(Reply::Recorded)
                }
            };
            if let Some(answer) = a.answer {
                answer(reply);
            }
        }
        self.store.set_replication(record);
        self.store.add_log_bytes(bytes);
        self.lag_bytes += bytes;
        self.unsent_bytes += bytes;
        if self.unsent_bytes >= self.config.store_write_bytes
            || self.last_store_job.elapsed() >= self.config.store_write_interval
        {
            self.send_store_job();
        }
    }

    /// A batch is durable: apply it, answer, publish, and hand its writes to the store.
    fn batch_logged(&mut self) {
        let Some(batch) = self.in_flight.take() else {
            return;
        };
        self.log_syncs += 1;
        self.store.add_log_bytes(batch.bytes);
        self.lag_bytes += batch.bytes;
        let publish = self.events.receiver_count() > 0;
        for (index, command, port) in batch.entries {
            let (reply, events) = self.store.apply(index, batch.now, command);
            if publish {
                for e in events {
                    let _ = self.events.send(e);
                }
            }
            let _ = port.send(Ok(reply));
        }
        self.unsent_bytes += batch.bytes;
        if self.unsent_bytes >= self.config.store_write_bytes
            || self.last_store_job.elapsed() >= self.config.store_write_interval
        {
            self.send_store_job();
        }
    }

    /// Hands everything applied since the last job to the store thread (each changed run
    /// encoded once, however often it changed in between).
    fn send_store_job(&mut self) {
        if self.unsent_bytes == 0 {
            return;
        }
        let jobs = self.store.take_jobs();
        self.unsent_bytes = 0;
        self.last_store_job = std::time::Instant::now();
        if let Some(tx) = &self.store_tx
            && jobs
                .into_iter()
                .any(|job| tx.send(StoreWork::Write(job)).is_err())
        {
            self.fail_all(PersistError::StoreWrite("the store thread is gone".into()));
        }
    }

    /// Queues a pruning command (one at a time) with cut-offs from the clock; its answer
    /// comes back as [`PersistenceMsg::Pruned`].
    fn prune(&mut self, myself: &ActorRef<PersistenceMsg>) {
        if self.pruning || self.failed.is_some() {
            return;
        }
        let now = Self::clock();
        let r = self.config.retention;
        let before = |d: std::time::Duration| {
            Timestamp::from_micros(
                now.as_micros()
                    .saturating_sub(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            )
        };
        let command = Command::Prune(flotilla_runtime::Prune {
            runs_before: before(r.runs),
            events_before: before(r.events),
            logs_before: before(r.logs),
            runs_max: Retention::RUNS_PER_COMMAND,
        });
        let (ack, answer) = tokio::sync::oneshot::channel();
        self.pending.push_back((command, ack));
        self.pruning = true;
        let me = myself.clone();
        tokio::spawn(async move {
            let more = matches!(answer.await, Ok(Ok(Ok(Reply::Pruned { more: true, .. }))));
            let _ = me.cast(PersistenceMsg::Pruned { more });
        });
        self.start_batch();
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            applied: self.store.applied(),
            stored: self.stored,
            checkpointed: self.checkpointed,
            flow_runs: 0,
            resident_runs: 0,
            lag_bytes: self.lag_bytes,
            log_segments: self.log_segments.load(Ordering::Relaxed),
            log_syncs: self.log_syncs,
        }
    }
}

impl Actor for Persistence {
    type Msg = PersistenceMsg;
    type State = PersistenceState;
    type Arguments = PersistenceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let OpenedStore {
            lock,
            store,
            log,
            config,
            ..
        } = args.opened;
        let next_index = store.applied().next();
        let applied = store.applied();
        let log_segments = Arc::new(AtomicUsize::new(
            log.as_ref().map_or(0, CommandLog::segment_count),
        ));
        let mut threads = Vec::new();
        let log_tx = match log {
            Some(log) => {
                let (tx, thread) = spawn_log_thread(log, myself.clone(), log_segments.clone())?;
                threads.push(thread);
                Some(tx)
            }
            None => None,
        };
        let (store_tx, store_thread) =
            spawn_store_thread(store.kv().clone(), myself.clone(), &config, applied)?;
        threads.push(store_thread);
        myself.send_interval(config.store_write_interval, || PersistenceMsg::Tick);
        myself.send_interval(config.retention.interval(), || PersistenceMsg::Prune);
        Ok(PersistenceState {
            store,
            config,
            pending: VecDeque::new(),
            inbox: args.inbox,
            in_flight: None,
            next_index,
            proposals: args.proposals,
            log_tx,
            store_tx: Some(store_tx),
            threads,
            events: args.events,
            lag_bytes: 0,
            stored: applied,
            checkpointed: applied,
            log_syncs: 0,
            log_segments,
            failed: None,
            unsent_bytes: 0,
            last_store_job: std::time::Instant::now(),
            pruning: false,
            _lock: lock,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PersistenceMsg::Drain => {
                state.pending.extend(state.inbox.take());
                state.start_batch();
            }
            PersistenceMsg::Read(read, port) => match state.store.read(read, state.stats()) {
                ReadAnswer::Ready(r) => {
                    let _ = port.send(r);
                }
                // Histories, events and logs are read from the store on a blocking thread, so
                // that neither the actor nor the runtime's threads wait on the disk.
                ReadAnswer::Cold(job) => {
                    tokio::task::spawn_blocking(move || {
                        let _ = port.send(job());
                    });
                }
            },
            PersistenceMsg::Logged { last, result } => match result {
                Ok(()) => {
                    debug_assert_eq!(
                        state
                            .in_flight
                            .as_ref()
                            .and_then(|b| b.entries.last().map(|e| e.0)),
                        Some(last)
                    );
                    state.batch_logged();
                    state.start_batch();
                }
                Err(e) => {
                    tracing::error!(error = %e, "the command log could not be written; refusing further commands");
                    state.fail_all(PersistError::LogWrite(e));
                }
            },
            PersistenceMsg::Stored {
                upto,
                log_bytes,
                result,
            } => match result {
                Ok(()) => {
                    // Older than a snapshot installed since: the store holds more.
                    state.stored = state.stored.max(upto);
                    state.lag_bytes = state.lag_bytes.saturating_sub(log_bytes);
                    state.store.stored_through(upto);
                    state.start_batch();
                }
                Err(e) => {
                    tracing::error!(error = %e, "the store could not be written; refusing further commands");
                    state.fail_all(PersistError::StoreWrite(e));
                }
            },
            PersistenceMsg::Tick => {
                if state.last_store_job.elapsed() >= state.config.store_write_interval {
                    state.send_store_job();
                }
            }
            PersistenceMsg::Prune => state.prune(&myself),
            PersistenceMsg::Pruned { more } => {
                state.pruning = false;
                if more {
                    state.prune(&myself);
                }
            }
            PersistenceMsg::Apply {
                entries,
                record,
                done,
            } => {
                state.apply_committed(entries, record);
                let _ = done.send(());
            }
            PersistenceMsg::Checkpoint(reply) => state.checkpoint_now(reply),
            PersistenceMsg::Dump(reply) => state.dump_now(reply),
            PersistenceMsg::Install { data, upto, done } => {
                let _ = done.send(state.install(data, upto).await);
            }
            PersistenceMsg::Checkpointed { upto } => {
                state.checkpointed = state.checkpointed.max(upto);
                if let Some(tx) = &state.log_tx {
                    let _ = tx.send(LogJob::Truncate { upto });
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.fail_all(PersistError::Stopped);
        state.send_store_job();
        state.log_tx = None;
        state.store_tx = None;
        let threads = std::mem::take(&mut state.threads);
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await?;
        Ok(())
    }
}

/// A handle on a running persistence actor.
#[derive(Clone)]
pub struct PersistenceHandle {
    actor: ActorRef<PersistenceMsg>,
    events: broadcast::Sender<Arc<Event>>,
    inbox: Arc<Inbox>,
}

impl std::fmt::Debug for PersistenceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistenceHandle")
            .field("actor", &self.actor.get_id())
            .finish()
    }
}

/// Opens the data directory and starts the persistence actor on it.
pub async fn start(
    config: PersistenceConfig,
) -> Result<(PersistenceHandle, ractor::concurrency::JoinHandle<()>), StartError> {
    let opened = tokio::task::spawn_blocking(move || open(config))
        .await
        .map_err(|e| StartError::Spawn(e.to_string()))??;
    start_opened(opened).await
}

/// Starts the persistence actor on an opened data directory.
pub async fn start_opened(
    opened: OpenedStore,
) -> Result<(PersistenceHandle, ractor::concurrency::JoinHandle<()>), StartError> {
    start_with(opened, None).await
}

/// Starts the persistence actor on an opened data directory whose log is replication's:
/// commands go to `proposals`, committed entries come back as [`PersistenceMsg::Apply`].
pub async fn start_replica(
    opened: OpenedStore,
    proposals: Proposals,
) -> Result<(PersistenceHandle, ractor::concurrency::JoinHandle<()>), StartError> {
    start_with(opened, Some(proposals)).await
}

async fn start_with(
    opened: OpenedStore,
    proposals: Option<Proposals>,
) -> Result<(PersistenceHandle, ractor::concurrency::JoinHandle<()>), StartError> {
    let (events, _) = broadcast::channel(opened.config.event_channel_capacity.max(1));
    let inbox = Arc::new(Inbox::default());
    let (actor, join) = Actor::spawn(
        None,
        Persistence,
        PersistenceArgs {
            opened,
            events: events.clone(),
            inbox: inbox.clone(),
            proposals,
        },
    )
    .await
    .map_err(|e| StartError::Spawn(e.to_string()))?;
    Ok((PersistenceHandle { actor, events, inbox }, join))
}

/// Why the persistence actor did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The data directory could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The actor or its threads could not be started.
    #[error("cannot start the persistence actor: {0}")]
    Spawn(String),
}

impl PersistenceHandle {
    /// Submits a command; answers once it is durable and applied.
    pub async fn submit(&self, command: Command) -> SubmitResult {
        self.enqueue(command).await.unwrap_or(Err(PersistError::Stopped))
    }

    /// Queues a command without waiting: the answer arrives on the returned channel once the
    /// command is durable and applied. Commands are logged and applied in the order they are
    /// queued, so the answer to one means every command queued before it is durable too.
    pub fn enqueue(&self, command: Command) -> tokio::sync::oneshot::Receiver<SubmitResult> {
        let (ack, answer) = tokio::sync::oneshot::channel();
        match self.inbox.push(command, ack) {
            Ok(true) => {
                if self.actor.cast(PersistenceMsg::Drain).is_err() {
                    self.inbox.close(PersistError::Stopped);
                }
            }
            Ok(false) => {}
            Err((err, ack)) => {
                let _ = ack.send(Err(err));
            }
        }
        answer
    }

    /// Reads the control state.
    pub async fn read(&self, read: Read) -> Result<ReadReply, PersistError> {
        match self
            .actor
            .call(|port| PersistenceMsg::Read(read, port), None)
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err(PersistError::Stopped),
        }
    }

    /// Receives every event from now on, once it is durable.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    crate::read_helpers!();

    /// The actor, for replication to hand it committed entries.
    pub fn actor(&self) -> &ActorRef<PersistenceMsg> {
        &self.actor
    }

    /// Stops the actor; its threads finish their work (a last checkpoint) first.
    pub async fn stop(&self, join: ractor::concurrency::JoinHandle<()>) {
        self.actor.stop(None);
        let _ = join.await;
    }
}

#[doc(hidden)]
pub fn unexpected(reply: ReadReply) -> PersistError {
    PersistError::Read(format!("unexpected reply {reply:?}"))
}
