//! The control state of one node: the hot state in memory, the cold records (events, logs) in
//! the key-value store behind an overlay, and the translation of `apply`'s writes into store
//! batches. No threads and no actor here: the persistence actor drives it.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use flotilla_runtime::codec;
use flotilla_runtime::{
    ApplyContext, Command, Deployment, DeploymentId, Event, EventId, FlowRun, FlowRunId, HotState,
    LogBatchId, LogIndex, LogLine, PrunedRun, Refusal, Reply, RunId, State, StateView, TaskRun, TaskRunId,
    Timestamp, Write, apply,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::error::{OpenError, PersistError};
use super::kv::{KvOp, KvStore, Tree};
use super::overlay::{Overlay, RecentEvents};
use super::read::{LogCursor, PAGE_MAX, Read, ReadReply, RunFilter, StoreStats};

mod cold;
mod evict;
mod prune;
mod reads;

pub use cold::Cold;
use cold::write_lock;
pub use prune::ColdPrune;

const APPLIED_KEY: &[u8] = b"applied";
/// What replication says was applied last (its log id and membership, encoded by the
/// replication layer), written with the applied index.
const REPLICATION_KEY: &[u8] = b"replication";
/// The record of slot holders (rewritten whole: it holds at most the sum of the tag limits).
const SLOT_HOLDS_KEY: &[u8] = b"slot-holds";
/// The event cut-off of the last pruning: blocks before it hold state changes only.
const EVENTS_PRUNED_KEY: &[u8] = b"events-pruned";

/// Events are stored in blocks of at most this many, keyed by their first event's id: one
/// store write per block instead of one per event.
pub const EVENT_BLOCK_EVENTS: usize = 64;

/// A block of events as stored: the ids, and each event encoded on its own (so one event is
/// found without decoding the others).
#[derive(Debug, Default, Serialize, Deserialize)]
struct EventBlock {
    ids: Vec<EventId>,
    events: Vec<ByteBuf>,
}

/// The largest event block accepted when reading (uncompressed).
const EVENT_BLOCK_BYTES_MAX: usize = 16 * 1024 * 1024;

impl EventBlock {
    fn find(&self, id: &EventId) -> Option<&[u8]> {
        let i = self.ids.iter().position(|x| x == id)?;
        self.events.get(i).map(|b| b.as_slice())
    }

    /// The stored form: the encoded block, LZ4-compressed with its size in front (events of a
    /// block repeat their field names and labels, so they compress several times over).
    fn to_stored(&self) -> Result<Vec<u8>, codec::EncodeError> {
        Ok(lz4_flex::compress_prepend_size(&codec::encode(self)?))
    }

    /// Reads the stored form back; a damaged or oversized block is an error, never a panic.
    fn from_stored(bytes: &[u8]) -> Result<EventBlock, PersistError> {
        let size = bytes
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| read_err("event block", "shorter than its header"))?;
        if size as usize > EVENT_BLOCK_BYTES_MAX {
            return Err(read_err(
                "event block",
                format!("claims {size} bytes, over the limit"),
            ));
        }
        let raw = lz4_flex::decompress_size_prepended(bytes).map_err(|e| read_err("event block", e))?;
        codec::decode(&raw).map_err(|e| read_err("event block", e))
    }
}

fn history_key(run: RunId, block: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(21);
    match run {
        RunId::Flow(id) => {
            k.push(0);
            k.extend_from_slice(id.as_bytes());
        }
        RunId::Task(id) => {
            k.push(1);
            k.extend_from_slice(id.as_bytes());
        }
    }
    k.extend_from_slice(&block.to_be_bytes());
    k
}

/// What the store must write to cover the log up to `upto`: the changed hot records (shared
/// snapshots, encoded on the store thread), the new events, and pre-encoded cold records.
#[derive(Debug, Default)]
pub struct StoreJob {
    /// The last log index whose writes it holds.
    pub upto: LogIndex,
    /// The size of the log frames it covers.
    pub log_bytes: u64,
    /// Flow runs as they are at `upto`.
    pub flow_runs: Vec<Arc<FlowRun>>,
    /// Task runs as they are at `upto`.
    pub task_runs: Vec<Arc<TaskRun>>,
    /// Deployments put (`Some`) or deleted (`None`).
    pub deployments: Vec<(DeploymentId, Option<Deployment>)>,
    /// Settings put (`Some`) or deleted (`None`), by key.
    pub settings: Vec<(String, Option<flotilla_runtime::Setting>)>,
    /// New events, in order.
    pub events: Vec<Arc<Event>>,
    /// Other writes, encoded.
    pub ops: Vec<KvOp>,
    /// What to forget once the rest is written: pruned runs, and the event and log cut-offs.
    pub prune: ColdPrune,
    /// The record of slot holders (whether complete, the holdings), when it changed.
    pub slot_holds: Option<SlotHolds>,
    /// Answers remembered, by slot of their ring.
    pub answers: Vec<(u32, flotilla_runtime::RememberedAnswer)>,
    /// Replication's record of what was applied, when it changed.
    pub replication: Option<Vec<u8>>,
}

/// The record of slot holders as stored: whether it names every holder, and (tag, holder,
/// node) for each holding.
pub type SlotHolds = (bool, Vec<(String, TaskRunId, flotilla_runtime::NodeId)>);

impl StoreJob {
    /// Merges jobs queued one after another into as few as can be: the latest snapshot of each
    /// record wins, and a job that prunes ends a group (what follows it may make a pruned run
    /// again).
    pub fn merge_all(jobs: Vec<StoreJob>) -> Vec<StoreJob> {
        let mut out = Vec::new();
        let mut group = Vec::new();
        for job in jobs {
            let prunes = !job.prune.is_empty();
            group.push(job);
            if prunes {
                out.push(StoreJob::merge(std::mem::take(&mut group)));
            }
        }
        if !group.is_empty() {
            out.push(StoreJob::merge(group));
        }
        out
    }

    /// Merges jobs queued one after another into one: the latest snapshot of each record wins.
    pub fn merge(jobs: Vec<StoreJob>) -> StoreJob {
        let mut it = jobs.into_iter();
        let Some(mut acc) = it.next() else {
            return StoreJob::default();
        };
        let mut rest = it.peekable();
        if rest.peek().is_none() {
            return acc;
        }
        for job in rest {
            acc.upto = acc.upto.max(job.upto);
            acc.log_bytes += job.log_bytes;
            acc.flow_runs.extend(job.flow_runs);
            acc.task_runs.extend(job.task_runs);
            acc.deployments.extend(job.deployments);
            acc.settings.extend(job.settings);
            acc.events.extend(job.events);
            acc.ops.extend(job.ops);
            acc.prune.extend(job.prune);
            if job.slot_holds.is_some() {
                acc.slot_holds = job.slot_holds;
            }
            acc.answers.extend(job.answers);
            if job.replication.is_some() {
                acc.replication = job.replication;
            }
        }
        let mut seen = HashSet::new();
        acc.flow_runs.reverse();
        acc.flow_runs.retain(|r| seen.insert(r.id));
        let mut seen = HashSet::new();
        acc.task_runs.reverse();
        acc.task_runs.retain(|r| seen.insert(r.id));
        let mut seen = HashSet::new();
        acc.deployments.reverse();
        acc.deployments.retain(|(id, _)| seen.insert(*id));
        let mut seen = HashSet::new();
        acc.settings.reverse();
        acc.settings.retain(|(key, _)| seen.insert(key.clone()));
        acc
    }

    /// The store batch: every record encoded, events in blocks, and the applied index last.
    pub fn into_ops(self) -> Vec<KvOp> {
        let mut ops = self.ops;
        ops.reserve(self.flow_runs.len() + self.task_runs.len() + self.events.len() / EVENT_BLOCK_EVENTS + 2);
        for run in &self.flow_runs {
            match codec::encode(&**run) {
                Ok(bytes) => ops.push(KvOp::Put(Tree::FlowRuns, run.id.as_bytes().to_vec(), bytes)),
                Err(e) => tracing::error!(error = %e, run = %run.id, "a flow run could not be encoded"),
            }
        }
        for run in &self.task_runs {
            match codec::encode(&**run) {
                Ok(bytes) => ops.push(KvOp::Put(Tree::TaskRuns, run.id.as_bytes().to_vec(), bytes)),
                Err(e) => tracing::error!(error = %e, run = %run.id, "a task run could not be encoded"),
            }
        }
        for (id, d) in &self.deployments {
            match d.as_ref().map(codec::encode) {
                Some(Ok(bytes)) => ops.push(KvOp::Put(Tree::Deployments, id.as_bytes().to_vec(), bytes)),
                Some(Err(e)) => tracing::error!(error = %e, "a deployment could not be encoded"),
                None => ops.push(KvOp::Delete(Tree::Deployments, id.as_bytes().to_vec())),
            }
        }
        for (key, s) in &self.settings {
            match s.as_ref().map(codec::encode) {
                Some(Ok(bytes)) => ops.push(KvOp::Put(Tree::Settings, key.as_bytes().to_vec(), bytes)),
                Some(Err(e)) => tracing::error!(error = %e, "a setting could not be encoded"),
                None => ops.push(KvOp::Delete(Tree::Settings, key.as_bytes().to_vec())),
            }
        }
        for chunk in self.events.chunks(EVENT_BLOCK_EVENTS) {
            let mut block = EventBlock::default();
            for e in chunk {
                match codec::encode(&**e) {
                    Ok(bytes) => {
                        block.ids.push(e.id);
                        block.events.push(ByteBuf::from(bytes));
                    }
                    Err(err) => tracing::error!(error = %err, "an event could not be encoded"),
                }
            }
            if let (Some(first), Ok(bytes)) = (block.ids.first(), block.to_stored()) {
                ops.push(KvOp::Put(Tree::Events, first.as_bytes().to_vec(), bytes));
            }
        }
        for (slot, answer) in &self.answers {
            match codec::encode(answer) {
                Ok(bytes) => ops.push(KvOp::Put(Tree::Outcomes, slot.to_be_bytes().to_vec(), bytes)),
                Err(e) => tracing::error!(error = %e, "a remembered answer could not be encoded"),
            }
        }
        if let Some(holds) = &self.slot_holds {
            match codec::encode(holds) {
                Ok(bytes) => ops.push(KvOp::Put(Tree::Meta, SLOT_HOLDS_KEY.to_vec(), bytes)),
                Err(e) => tracing::error!(error = %e, "the slot holders could not be encoded"),
            }
        }
        if let Some(r) = self.replication {
            ops.push(KvOp::Put(Tree::Meta, REPLICATION_KEY.to_vec(), r));
        }
        ops.push(KvOp::Put(
            Tree::Meta,
            APPLIED_KEY.to_vec(),
            self.upto.get().to_be_bytes().to_vec(),
        ));
        ops
    }
}

/// The answer to a read (see [`Store::read`]).
#[allow(missing_debug_implementations)]
pub enum ReadAnswer {
    /// Answered from memory.
    Ready(Result<ReadReply, PersistError>),
    /// To be answered from the store: run it on a blocking thread.
    Cold(Box<dyn FnOnce() -> Result<ReadReply, PersistError> + Send>),
}

impl ReadAnswer {
    fn cold(f: impl FnOnce() -> Result<ReadReply, PersistError> + Send + 'static) -> Self {
        ReadAnswer::Cold(Box::new(f))
    }

    /// The answer, reading the store on this thread if need be.
    pub fn wait(self) -> Result<ReadReply, PersistError> {
        match self {
            ReadAnswer::Ready(r) => r,
            ReadAnswer::Cold(f) => f(),
        }
    }
}

/// The control state.
pub struct Store {
    hot: HotState,
    kv: Arc<dyn KvStore>,
    cold: Cold,
    applied: LogIndex,
    last_now: Timestamp,
    dirty_runs: Vec<FlowRunId>,
    dirty_tasks: Vec<TaskRunId>,
    dirty_deployments: Vec<(DeploymentId, bool)>,
    dirty_settings: Vec<(String, bool)>,
    cold_ops: Vec<KvOp>,
    new_events: Vec<Arc<Event>>,
    job_log_bytes: u64,
    prune: ColdPrune,
    slot_holds_dirty: bool,
    answers: Vec<(u32, flotilla_runtime::RememberedAnswer)>,
    /// At most about this many flow and task runs in memory (see `evict.rs`).
    resident_max: usize,
    /// Flow runs that live in the store alone.
    evicted: usize,
    /// Terminal flow runs changed since the last store job written, and when.
    unstored: HashMap<FlowRunId, LogIndex>,
    /// Jobs closed early, to be written before the rest (see [`Store::take_jobs`]).
    sealed: Vec<StoreJob>,
    /// Replication's record of what was applied (as stored, and whether it changed since the
    /// last job).
    replication: Option<Vec<u8>>,
    replication_dirty: bool,
}

/// Flow and task runs kept in memory by default (runs that have not ended always are).
pub const MEMORY_RUNS_DEFAULT: usize = 100_000;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("applied", &self.applied)
            .field("flow_runs", &self.hot.flow_run_count())
            .finish_non_exhaustive()
    }
}

struct View<'a> {
    hot: &'a mut HotState,
    cold: &'a Cold,
}

impl StateView for View<'_> {
    fn hot(&self) -> &HotState {
        self.hot
    }
    fn hot_mut(&mut self) -> &mut HotState {
        self.hot
    }
    fn event_exists(&self, id: &EventId) -> bool {
        match self.cold.find_event(id) {
            Ok(v) => v.is_some(),
            Err(e) => {
                tracing::error!(error = %e, "store read failed during apply; treating the event as absent");
                false
            }
        }
    }
    fn log_batch_exists(&self, flow_run: &FlowRunId, batch: &LogBatchId) -> bool {
        self.cold.exists(Tree::Logs, &log_key(flow_run, batch))
    }
}

fn log_key(flow_run: &FlowRunId, batch: &LogBatchId) -> Vec<u8> {
    let mut k = Vec::with_capacity(32);
    k.extend_from_slice(flow_run.as_bytes());
    k.extend_from_slice(batch.as_bytes());
    k
}

/// A log batch's key in [`Tree::LogTimes`]: its id (time-ordered) first.
fn log_time_key(batch: &LogBatchId, flow_run: &FlowRunId) -> Vec<u8> {
    let mut k = Vec::with_capacity(32);
    k.extend_from_slice(batch.as_bytes());
    k.extend_from_slice(flow_run.as_bytes());
    k
}

/// Set once every log batch in the store is also in [`Tree::LogTimes`] (a store written before
/// that tree existed gets it on its first log pruning).
const LOG_TIMES_KEY: &[u8] = b"log-times";

fn read_err(what: &str, e: impl std::fmt::Display) -> PersistError {
    PersistError::Read(format!("{what}: {e}"))
}

/// Decodes every record of a tree, page by page, but those whose key `skip` names.
fn load_tree<T: serde::de::DeserializeOwned>(
    kv: &dyn KvStore,
    tree: Tree,
    path: &str,
    skip: impl Fn(&[u8]) -> bool,
    mut each: impl FnMut(T),
) -> Result<(), OpenError> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let start = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let page = kv.scan(tree, b"", start, 10_000).map_err(|e| OpenError::Store {
            path: path.to_owned(),
            reason: e.0,
        })?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        after = Some(last.clone());
        for (k, v) in page {
            if skip(&k) {
                continue;
            }
            let value = codec::decode(&v).map_err(|e| {
                OpenError::corrupt(
                    path.to_owned(),
                    format!("record {:?}/{} does not decode: {e}", tree, hex(&k)),
                )
            })?;
            each(value);
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Store {
    /// Loads the state the store holds; returns it with the last log index it had applied.
    pub fn load(kv: Arc<dyn KvStore>, path: &str) -> Result<Store, OpenError> {
        let store_err = |e: super::kv::KvError| OpenError::Store {
            path: path.to_owned(),
            reason: e.0,
        };
        let applied = match kv.get(Tree::Meta, APPLIED_KEY).map_err(store_err)? {
            None => LogIndex::ZERO,
            Some(v) => {
                let arr: [u8; 8] = v
                    .as_slice()
                    .try_into()
                    .map_err(|_| OpenError::corrupt(path.to_owned(), "the applied index is not 8 bytes"))?;
                LogIndex::new(u64::from_be_bytes(arr))
            }
        };
        let mut hot = HotState::new();
        let (evicted_runs, evicted_tasks) = evict::evicted_ids(kv.as_ref(), path)?;
        let id_in = |k: &[u8]| <[u8; 16]>::try_from(k).ok();
        load_tree(
            kv.as_ref(),
            Tree::FlowRuns,
            path,
            |k| id_in(k).is_some_and(|b| evicted_runs.contains(&FlowRunId::from_bytes(b))),
            |r| hot.put_flow_run(r),
        )?;
        load_tree(
            kv.as_ref(),
            Tree::TaskRuns,
            path,
            |k| id_in(k).is_some_and(|b| evicted_tasks.contains(&TaskRunId::from_bytes(b))),
            |r| hot.put_task_run(r),
        )?;
        let evicted = evicted_runs.len();
        drop((evicted_runs, evicted_tasks));
        let all = |_: &[u8]| false;
        load_tree(kv.as_ref(), Tree::Deployments, path, all, |d| {
            hot.put_deployment(d)
        })?;
        load_tree(kv.as_ref(), Tree::Settings, path, all, |s| hot.put_setting(s))?;
        let mut answers: Vec<flotilla_runtime::RememberedAnswer> = Vec::new();
        load_tree(kv.as_ref(), Tree::Outcomes, path, all, |a| answers.push(a))?;
        answers.sort_by_key(|a| a.seq);
        for a in answers {
            hot.put_answer(a);
        }
        if let Some(bytes) = kv.get(Tree::Meta, SLOT_HOLDS_KEY).map_err(store_err)? {
            let (complete, holds): SlotHolds = codec::decode(&bytes).map_err(|e| {
                OpenError::corrupt(path.to_owned(), format!("the slot holders do not decode: {e}"))
            })?;
            for (tag, holder, node) in holds {
                hot.hold_slots(holder, &node, &[tag]);
            }
            if complete {
                hot.slot_holds_completed();
            }
        }
        let replication = kv.get(Tree::Meta, REPLICATION_KEY).map_err(store_err)?;
        Ok(Store {
            replication,
            replication_dirty: false,
            hot,
            cold: Cold::new(kv.clone()),
            kv,
            applied,
            last_now: Timestamp::EPOCH,
            dirty_runs: Vec::new(),
            dirty_tasks: Vec::new(),
            dirty_deployments: Vec::new(),
            dirty_settings: Vec::new(),
            cold_ops: Vec::new(),
            new_events: Vec::new(),
            job_log_bytes: 0,
            prune: ColdPrune::default(),
            slot_holds_dirty: false,
            answers: Vec::new(),
            resident_max: MEMORY_RUNS_DEFAULT,
            evicted,
            unstored: HashMap::new(),
            sealed: Vec::new(),
        })
    }

    fn slot_holds(&self) -> Vec<(String, TaskRunId, flotilla_runtime::NodeId)> {
        self.hot
            .slot_holds()
            .map(|((tag, holder), node)| (tag.clone(), *holder, node.clone()))
            .collect()
    }

    /// The last log index applied.
    pub fn applied(&self) -> LogIndex {
        self.applied
    }

    /// Replication's record of what was applied, as last set (or loaded).
    pub fn replication(&self) -> Option<&[u8]> {
        self.replication.as_deref()
    }

    /// Sets replication's record of what was applied; it is written with the next job.
    pub fn set_replication(&mut self, record: Vec<u8>) {
        self.replication = Some(record);
        self.replication_dirty = true;
    }

    /// Moves the applied index past a log entry that holds no command (a replication entry).
    pub fn skip(&mut self, index: LogIndex) {
        self.applied = self.applied.max(index);
    }

    /// The hot state.
    pub fn hot(&self) -> &HotState {
        &self.hot
    }

    /// The time to give the next batch: the clock, but never earlier than the last batch's.
    pub fn next_now(&self, clock: Timestamp) -> Timestamp {
        clock.max(self.last_now)
    }

    /// Applies the command logged at `index`, remembering what to write to the store.
    /// Returns the reply and the events it produced (to publish).
    pub fn apply(
        &mut self,
        index: LogIndex,
        now: Timestamp,
        command: Command,
    ) -> (Result<Reply, Refusal>, Vec<Arc<Event>>) {
        self.bring_back_for(&command);
        let (command, pruned) = match command {
            Command::Prune(p) => {
                let (rest, pruned) = self.prune_evicted(p);
                (Command::Prune(rest), Some(pruned))
            }
            other => (other, None),
        };
        let mut view = View {
            hot: &mut self.hot,
            cold: &self.cold,
        };
        let mut outcome = apply(&mut view, command, ApplyContext { index, now });
        if let Some(p) = pruned {
            outcome.reply = p.add_to(outcome.reply);
        }
        self.applied = index;
        self.last_now = self.last_now.max(now);
        let mut events = Vec::new();
        for w in outcome.writes {
            if let Some(e) = self.note_write(index, w) {
                events.push(e);
            }
        }
        (outcome.reply, events)
    }

    fn note_write(&mut self, index: LogIndex, w: Write) -> Option<Arc<Event>> {
        let run = match &w {
            Write::FlowRun(id) => Some(*id),
            Write::TaskRun(id) => self.hot.task_run(id).map(|t| t.key.flow_run),
            _ => None,
        };
        if let Some(run) = run
            && self.prune.runs.iter().any(|p| p.flow_run == run)
        {
            // A run made again under the id of one pruned since the last job: the pruning must
            // be written first, alone (else it would delete the new run's records).
            let mut job = self.take_job();
            job.upto = LogIndex::new(index.get().saturating_sub(1));
            self.sealed.push(job);
        }
        match w {
            Write::FlowRun(id) => {
                self.changed_at(index, id);
                self.dirty_runs.push(id);
            }
            Write::TaskRun(id) => {
                if let Some(flow) = self.hot.task_run(&id).map(|t| t.key.flow_run) {
                    self.changed_at(index, flow);
                }
                self.dirty_tasks.push(id);
            }
            Write::Deployment(id) => self.dirty_deployments.push((id, true)),
            Write::DeploymentDeleted(id) => self.dirty_deployments.push((id, false)),
            Write::Setting(key) => self.dirty_settings.push((key, true)),
            Write::SettingDeleted(key) => self.dirty_settings.push((key, false)),
            Write::Event(e) => {
                let e = Arc::new(e);
                write_lock(&self.cold.events).push(index, e.clone());
                self.new_events.push(e.clone());
                return Some(e);
            }
            Write::Pruned(p) => self.prune.runs.push(p),
            Write::SlotHolds => self.slot_holds_dirty = true,
            Write::Remembered { slot, answer } => self.answers.push((slot, answer)),
            Write::PrunedBefore { events, logs } => self.prune.before = Some((events, logs)),
            Write::HistoryBlock { run, block, events } => match codec::encode(&events) {
                Ok(bytes) => {
                    let key = history_key(run, block);
                    write_lock(&self.cold.overlay).put(index, Tree::History, key.clone(), bytes.clone());
                    self.cold_ops.push(KvOp::Put(Tree::History, key, bytes));
                }
                Err(err) => tracing::error!(error = %err, "a history block could not be encoded"),
            },
            Write::Logs {
                flow_run,
                batch,
                lines,
            } => match codec::encode(&lines) {
                Ok(bytes) => {
                    let key = log_key(&flow_run, &batch);
                    write_lock(&self.cold.overlay).put(index, Tree::Logs, key.clone(), bytes.clone());
                    self.cold_ops.push(KvOp::Put(Tree::Logs, key, bytes));
                    self.cold_ops.push(KvOp::Put(
                        Tree::LogTimes,
                        log_time_key(&batch, &flow_run),
                        Vec::new(),
                    ));
                }
                Err(err) => tracing::error!(error = %err, "log lines could not be encoded"),
            },
        }
        None
    }

    /// Counts log bytes towards the next store job.
    pub fn add_log_bytes(&mut self, bytes: u64) {
        self.job_log_bytes += bytes;
    }

    /// What to write for everything applied since the last jobs, in order: jobs closed early
    /// (a pruning before a run made again under a pruned id), then the rest.
    pub fn take_jobs(&mut self) -> Vec<StoreJob> {
        let mut jobs = std::mem::take(&mut self.sealed);
        jobs.push(self.take_job());
        jobs
    }

    /// What to write for everything applied since the last job: shared snapshots of the
    /// changed records (each once, however often it changed), the new events, the cold records.
    fn take_job(&mut self) -> StoreJob {
        let mut seen = HashSet::with_capacity(self.dirty_runs.len());
        let flow_runs = self
            .dirty_runs
            .drain(..)
            .filter(|id| seen.insert(*id))
            .filter_map(|id| self.hot.flow_run_shared(&id))
            .collect();
        let mut seen = HashSet::with_capacity(self.dirty_tasks.len());
        let task_runs = self
            .dirty_tasks
            .drain(..)
            .filter(|id| seen.insert(*id))
            .filter_map(|id| self.hot.task_run_shared(&id))
            .collect();
        let deployments = self
            .dirty_deployments
            .drain(..)
            .map(|(id, present)| (id, self.hot.deployment(&id).filter(|_| present).cloned()))
            .collect();
        let settings = self
            .dirty_settings
            .drain(..)
            .map(|(key, present)| {
                let s = self.hot.setting(&key).filter(|_| present).cloned();
                (key, s)
            })
            .collect();
        StoreJob {
            settings,
            upto: self.applied,
            log_bytes: std::mem::take(&mut self.job_log_bytes),
            flow_runs,
            task_runs,
            deployments,
            events: std::mem::take(&mut self.new_events),
            ops: std::mem::take(&mut self.cold_ops),
            prune: std::mem::take(&mut self.prune),
            answers: std::mem::take(&mut self.answers),
            replication: std::mem::take(&mut self.replication_dirty)
                .then(|| self.replication.clone())
                .flatten(),
            slot_holds: std::mem::take(&mut self.slot_holds_dirty)
                .then(|| (self.hot.slot_holds_complete(), self.slot_holds())),
        }
    }

    /// The store now holds everything up to `upto`: forget those overlay records.
    pub fn stored_through(&mut self, upto: LogIndex) {
        write_lock(&self.cold.overlay).stored_through(upto);
        write_lock(&self.cold.events).stored_through(upto);
        self.evict_stored(upto);
    }

    /// The store, for writing jobs synchronously (recovery).
    pub fn kv(&self) -> &Arc<dyn KvStore> {
        &self.kv
    }
}

#[cfg(test)]
mod tests;
