//! The control state of one node: the hot state in memory, the cold records (events, logs) in
//! the key-value store behind an overlay, and the translation of `apply`'s writes into store
//! batches. No threads and no actor here: the persistence actor drives it.

use std::collections::HashSet;
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

const APPLIED_KEY: &[u8] = b"applied";
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
}

/// The record of slot holders as stored: whether it names every holder, and (tag, holder,
/// node) for each holding.
pub type SlotHolds = (bool, Vec<(String, TaskRunId, flotilla_runtime::NodeId)>);

/// What a store job forgets after writing (see [`ColdPrune::ops`]).
#[derive(Debug, Default)]
pub struct ColdPrune {
    /// Pruned flow runs.
    pub runs: Vec<PrunedRun>,
    /// The latest event and log cut-offs.
    pub before: Option<(Timestamp, Timestamp)>,
}

impl ColdPrune {
    /// Whether there is nothing to forget.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.before.is_none()
    }

    fn extend(&mut self, other: ColdPrune) {
        self.runs.extend(other.runs);
        if other.before.is_some() {
            self.before = other.before;
        }
    }

    /// The store writes that forget it, read from the store as it is once the job's own writes
    /// are in: the pruned runs' records, history blocks, logs and state events; the events
    /// older than the cut-off that are not state changes; log batches older than theirs.
    pub fn ops(&self, kv: &dyn KvStore) -> Result<Vec<KvOp>, PersistError> {
        let store = |e: super::kv::KvError| read_err("store", e);
        let mut ops = Vec::new();
        let mut dead: std::collections::BTreeSet<EventId> = std::collections::BTreeSet::new();
        for p in &self.runs {
            ops.push(KvOp::Delete(Tree::FlowRuns, p.flow_run.as_bytes().to_vec()));
            for t in &p.task_runs {
                ops.push(KvOp::Delete(Tree::TaskRuns, t.as_bytes().to_vec()));
            }
            for (run, blocks) in &p.archived {
                for b in 0..*blocks {
                    let key = history_key(*run, b);
                    if let Some(bytes) = kv.get(Tree::History, &key).map_err(store)? {
                        let ids: Vec<EventId> =
                            codec::decode(&bytes).map_err(|e| read_err("history block", e))?;
                        dead.extend(ids);
                    }
                    ops.push(KvOp::Delete(Tree::History, key));
                }
            }
            dead.extend(p.events.iter().copied());
            let prefix = p.flow_run.as_bytes();
            let mut after: Option<Vec<u8>> = None;
            loop {
                let start = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
                let page = kv.scan(Tree::Logs, prefix, start, 1_024).map_err(store)?;
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                ops.extend(page.into_iter().map(|(k, _)| KvOp::Delete(Tree::Logs, k)));
            }
        }
        let mut blocks = EventBlocks::default();
        // The pruned runs' state changes, one block read per block touched.
        while let Some(id) = dead.pop_first() {
            let Some((key, bytes)) = kv.floor(Tree::Events, id.as_bytes()).map_err(store)? else {
                continue;
            };
            let block = blocks.get(key, &bytes)?;
            retain_events(block, |bid, _| bid != &id && !dead.remove(bid));
        }
        if let Some((events_before, logs_before)) = self.before {
            let cut = EventId::first_at(events_before);
            let from = match kv.get(Tree::Meta, EVENTS_PRUNED_KEY).map_err(store)? {
                Some(w) => kv.floor(Tree::Events, &w).map_err(store)?.map(|(k, _)| k),
                None => None,
            };
            let mut start = from.clone();
            let mut inclusive = true;
            'scan: loop {
                let bound = match &start {
                    Some(k) if inclusive => Bound::Included(k.as_slice()),
                    Some(k) => Bound::Excluded(k.as_slice()),
                    None => Bound::Unbounded,
                };
                let page = kv.scan(Tree::Events, b"", bound, 64).map_err(store)?;
                if page.is_empty() {
                    break;
                }
                for (key, bytes) in page {
                    if key.as_slice() >= cut.as_bytes().as_slice() {
                        break 'scan;
                    }
                    let block = blocks.get(key.clone(), &bytes)?;
                    retain_events(block, |id, raw| {
                        id >= &cut || codec::decode::<Event>(raw).map_or(true, |e| e.state().is_some())
                    });
                    start = Some(key);
                }
                inclusive = false;
            }
            ops.push(KvOp::Put(
                Tree::Meta,
                EVENTS_PRUNED_KEY.to_vec(),
                cut.as_bytes().to_vec(),
            ));
            let logs_cut = u64::try_from(logs_before.as_millis()).unwrap_or(0);
            let mut after: Option<Vec<u8>> = None;
            loop {
                let start = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
                let page = kv.scan(Tree::Logs, b"", start, 4_096).map_err(store)?;
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                ops.extend(
                    page.into_iter()
                        .filter(|(k, _)| k.get(16..22).is_some_and(|b| v7_millis(b) < logs_cut))
                        .map(|(k, _)| KvOp::Delete(Tree::Logs, k)),
                );
            }
        }
        ops.extend(blocks.into_ops()?);
        Ok(ops)
    }
}

impl StoreJob {
    /// Writes the job to the store: its records, then what it prunes (read from the store with
    /// those records in), and the applied index last.
    pub fn write(mut self, kv: &dyn KvStore) -> Result<(), String> {
        let prune = std::mem::take(&mut self.prune);
        let mut ops = self.into_ops();
        if !prune.is_empty() {
            let applied = ops.pop();
            kv.apply(&ops).map_err(|e| e.0)?;
            ops = prune.ops(kv).map_err(|e| e.to_string())?;
            ops.extend(applied);
        }
        kv.apply(&ops).map_err(|e| e.0)
    }
}

/// The millisecond prefix of a UUID v7 (its first six bytes).
fn v7_millis(b: &[u8]) -> u64 {
    b.iter().take(6).fold(0, |acc, x| (acc << 8) | u64::from(*x))
}

/// Keeps the events of a block for which `keep` holds (id, encoded event); notes a change.
fn retain_events(slot: &mut (EventBlock, bool), mut keep: impl FnMut(&EventId, &[u8]) -> bool) {
    let (block, changed) = slot;
    let before = block.ids.len();
    let mut kept_ids = Vec::with_capacity(before);
    let mut kept = Vec::with_capacity(before);
    for (id, raw) in block.ids.drain(..).zip(block.events.drain(..)) {
        if keep(&id, &raw) {
            kept_ids.push(id);
            kept.push(raw);
        }
    }
    *changed |= kept_ids.len() != before;
    block.ids = kept_ids;
    block.events = kept;
}

/// Event blocks read and changed by a pruning, written back (or deleted when emptied) at the end.
#[derive(Default)]
struct EventBlocks {
    blocks: std::collections::BTreeMap<Vec<u8>, (EventBlock, bool)>,
}

impl EventBlocks {
    /// The block stored under `key` (`bytes`, unless it was read already), to change.
    fn get(&mut self, key: Vec<u8>, bytes: &[u8]) -> Result<&mut (EventBlock, bool), PersistError> {
        use std::collections::btree_map::Entry;
        Ok(match self.blocks.entry(key) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert((EventBlock::from_stored(bytes)?, false)),
        })
    }

    fn into_ops(self) -> Result<Vec<KvOp>, PersistError> {
        let mut ops = Vec::new();
        for (key, (block, changed)) in self.blocks {
            if !changed {
                continue;
            }
            if block.ids.is_empty() {
                ops.push(KvOp::Delete(Tree::Events, key));
            } else {
                let bytes = block.to_stored().map_err(|e| read_err("event block", e))?;
                ops.push(KvOp::Put(Tree::Events, key, bytes));
            }
        }
        Ok(ops)
    }
}

impl StoreJob {
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
}

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

/// The cold side of the state: the key-value store, and what was applied but is not in it yet
/// (records and recent events, behind locks). Cheap to clone: cold reads run on blocking
/// threads, off the persistence actor, while it goes on applying.
#[derive(Clone)]
pub struct Cold {
    kv: Arc<dyn KvStore>,
    overlay: Arc<RwLock<Overlay>>,
    events: Arc<RwLock<RecentEvents>>,
}

impl std::fmt::Debug for Cold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cold").finish_non_exhaustive()
    }
}

fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Cold {
    fn new(kv: Arc<dyn KvStore>) -> Self {
        Cold {
            kv,
            overlay: Arc::default(),
            events: Arc::default(),
        }
    }

    /// An event by id: the recent ones first, then the store (in that order, so that one moving
    /// from the first to the second meanwhile is seen in the second).
    fn find_event(&self, id: &EventId) -> Result<Option<Arc<Event>>, PersistError> {
        if let Some(e) = read_lock(&self.events).get(id) {
            return Ok(Some(e.clone()));
        }
        let Some((_, block)) = self
            .kv
            .floor(Tree::Events, id.as_bytes())
            .map_err(|e| read_err("store", e))?
        else {
            return Ok(None);
        };
        let block = EventBlock::from_stored(&block)?;
        match block.find(id) {
            Some(bytes) => Ok(Some(Arc::new(
                codec::decode(bytes).map_err(|e| read_err(&format!("event {id}"), e))?,
            ))),
            None => Ok(None),
        }
    }

    fn exists(&self, tree: Tree, key: &[u8]) -> bool {
        if read_lock(&self.overlay).get(tree, key).is_some() {
            return true;
        }
        match self.kv.get(tree, key) {
            Ok(v) => v.is_some(),
            Err(e) => {
                tracing::error!(error = %e, "store read failed during apply; treating the record as absent");
                false
            }
        }
    }

    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, PersistError> {
        if let Some(v) = read_lock(&self.overlay).get(tree, key) {
            return Ok(Some(v.clone()));
        }
        self.kv.get(tree, key).map_err(|e| read_err("store", e))
    }

    /// The overlay first, then the store (see [`Cold::find_event`]).
    fn scan(
        &self,
        tree: Tree,
        prefix: &[u8],
        start: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<super::kv::Entry>, PersistError> {
        let b = read_lock(&self.overlay).scan(tree, prefix, start, limit);
        let mut a = self
            .kv
            .scan(tree, prefix, start, limit)
            .map_err(|e| read_err("store", e))?;
        if !b.is_empty() {
            a.extend(b);
            a.sort_by(|x, y| x.0.cmp(&y.0));
            a.dedup_by(|x, y| x.0 == y.0);
            a.truncate(limit);
        }
        Ok(a)
    }

    /// A page of a run's state history: its archived blocks, then its recent window.
    fn history(
        &self,
        run: RunId,
        archived_blocks: u32,
        window: &[EventId],
        offset: usize,
        limit: usize,
    ) -> Result<Vec<State>, PersistError> {
        let mut ids = Vec::new();
        for block in 0..archived_blocks {
            let bytes = self
                .get(Tree::History, &history_key(run, block))?
                .ok_or_else(|| PersistError::Read(format!("history block {block} of {run} is missing")))?;
            let part: Vec<EventId> = codec::decode(&bytes).map_err(|e| read_err("history block", e))?;
            ids.extend(part);
        }
        ids.extend_from_slice(window);
        let mut out = Vec::new();
        for id in ids.iter().skip(offset).take(limit.min(PAGE_MAX)) {
            let event = self
                .find_event(id)?
                .ok_or_else(|| PersistError::Read(format!("history event {id} is missing")))?;
            if let Some(s) = event.state() {
                out.push(s.clone());
            }
        }
        Ok(out)
    }

    /// Up to `limit` events after `after`, in id order: blocks from the store merged with the
    /// overlay.
    fn events_after(&self, after: Option<EventId>, limit: usize) -> Result<Vec<Event>, PersistError> {
        // The recent ones first (see `find_event`).
        let recent: Vec<Arc<Event>> = read_lock(&self.events).after(after, limit).cloned().collect();
        let mut found: Vec<Event> = Vec::new();
        let mut start = match after {
            Some(a) => self
                .kv
                .floor(Tree::Events, a.as_bytes())
                .map_err(|e| read_err("store", e))?
                .map(|(k, _)| k),
            None => None,
        };
        let mut inclusive = true;
        'blocks: loop {
            let bound = match &start {
                Some(k) if inclusive => Bound::Included(k.as_slice()),
                Some(k) => Bound::Excluded(k.as_slice()),
                None => Bound::Unbounded,
            };
            let page = self
                .kv
                .scan(Tree::Events, b"", bound, 16)
                .map_err(|e| read_err("store", e))?;
            if page.is_empty() {
                break;
            }
            for (k, v) in &page {
                let block = EventBlock::from_stored(v)?;
                for (id, bytes) in block.ids.into_iter().zip(block.events) {
                    if after.is_none_or(|a| id > a) {
                        found.push(codec::decode(&bytes).map_err(|e| read_err(&format!("event {id}"), e))?);
                        if found.len() >= limit {
                            break 'blocks;
                        }
                    }
                }
                start = Some(k.clone());
            }
            inclusive = false;
        }
        found.extend(recent.iter().map(|e| (**e).clone()));
        found.sort_by_key(|e| e.id);
        found.dedup_by(|a, b| a.id == b.id);
        found.truncate(limit);
        Ok(found)
    }

    fn logs(
        &self,
        flow_run: FlowRunId,
        after: Option<LogCursor>,
        limit: usize,
    ) -> Result<ReadReply, PersistError> {
        let limit = limit.clamp(1, PAGE_MAX);
        let prefix = flow_run.as_bytes().to_vec();
        let mut lines: Vec<LogLine> = Vec::new();
        let mut cursor = after;
        let mut start_key = after.map(|c| log_key(&flow_run, &c.batch));
        let mut first_page = true;
        loop {
            let start = match (&start_key, first_page) {
                (Some(k), true) => Bound::Included(k.as_slice()),
                (Some(k), false) => Bound::Excluded(k.as_slice()),
                (None, _) => Bound::Unbounded,
            };
            let batches = self.scan(Tree::Logs, &prefix, start, 64)?;
            if batches.is_empty() {
                return Ok(ReadReply::Logs { lines, next: cursor });
            }
            for (k, v) in &batches {
                let batch =
                    LogBatchId::from_bytes(k[16..32].try_into().map_err(|_| read_err("log key", "short"))?);
                let batch_lines: Vec<LogLine> = codec::decode(v).map_err(|e| read_err("log batch", e))?;
                let skip = match cursor {
                    Some(c) if c.batch == batch => c.line as usize,
                    _ => 0,
                };
                for (i, line) in batch_lines.into_iter().enumerate().skip(skip) {
                    if lines.len() >= limit {
                        return Ok(ReadReply::Logs { lines, next: cursor });
                    }
                    lines.push(line);
                    cursor = Some(LogCursor {
                        batch,
                        line: u32::try_from(i + 1).unwrap_or(u32::MAX),
                    });
                }
            }
            start_key = batches.last().map(|(k, _)| k.clone());
            first_page = false;
        }
    }
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

fn read_err(what: &str, e: impl std::fmt::Display) -> PersistError {
    PersistError::Read(format!("{what}: {e}"))
}

/// Decodes every record of a tree, page by page.
fn load_tree<T: serde::de::DeserializeOwned>(
    kv: &dyn KvStore,
    tree: Tree,
    path: &str,
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
        load_tree(kv.as_ref(), Tree::FlowRuns, path, |r| hot.put_flow_run(r))?;
        load_tree(kv.as_ref(), Tree::TaskRuns, path, |r| hot.put_task_run(r))?;
        load_tree(kv.as_ref(), Tree::Deployments, path, |d| hot.put_deployment(d))?;
        load_tree(kv.as_ref(), Tree::Settings, path, |s| hot.put_setting(s))?;
        let mut answers: Vec<flotilla_runtime::RememberedAnswer> = Vec::new();
        load_tree(kv.as_ref(), Tree::Outcomes, path, |a| answers.push(a))?;
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
        Ok(Store {
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
        let mut view = View {
            hot: &mut self.hot,
            cold: &self.cold,
        };
        let outcome = apply(&mut view, command, ApplyContext { index, now });
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
        match w {
            Write::FlowRun(id) => self.dirty_runs.push(id),
            Write::TaskRun(id) => self.dirty_tasks.push(id),
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

    /// What to write for everything applied since the last job: shared snapshots of the
    /// changed records (each once, however often it changed), the new events, the cold records.
    pub fn take_job(&mut self) -> StoreJob {
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
            slot_holds: std::mem::take(&mut self.slot_holds_dirty)
                .then(|| (self.hot.slot_holds_complete(), self.slot_holds())),
        }
    }

    /// The store now holds everything up to `upto`: forget those overlay records.
    pub fn stored_through(&mut self, upto: LogIndex) {
        write_lock(&self.cold.overlay).stored_through(upto);
        write_lock(&self.cold.events).stored_through(upto);
    }

    /// The store, for writing jobs synchronously (recovery).
    pub fn kv(&self) -> &Arc<dyn KvStore> {
        &self.kv
    }

    /// Answers a read: from the hot state at once, or, for what lives in the store (histories,
    /// events, logs), as a job to run off the actor.
    pub fn read(&self, read: Read, stats: StoreStats) -> ReadAnswer {
        let hot = &self.hot;
        let cold = self.cold.clone();
        let history = |run: RunId, offset: usize, limit: usize| {
            let lifecycle = match run {
                RunId::Flow(id) => hot.flow_run(&id).map(|r| &r.lifecycle),
                RunId::Task(id) => hot.task_run(&id).map(|r| &r.lifecycle),
            };
            match lifecycle {
                None => ReadAnswer::Ready(Ok(ReadReply::History(None))),
                Some(l) => {
                    let (blocks, window) = (l.archived_blocks, l.history.clone());
                    let cold = cold.clone();
                    ReadAnswer::cold(move || {
                        Ok(ReadReply::History(Some(
                            cold.history(run, blocks, &window, offset, limit)?,
                        )))
                    })
                }
            }
        };
        ReadAnswer::Ready(Ok(match read {
            Read::FlowRun(id) => ReadReply::FlowRun(hot.flow_run(&id).cloned().map(Box::new)),
            Read::FlowRuns { filter, after, limit } => {
                let limit = limit.min(PAGE_MAX);
                let page = match filter {
                    RunFilter::All => hot.flow_runs_page(after, limit),
                    RunFilter::State(t) => hot.flow_runs_in_state(t, after, limit),
                    RunFilter::Deployment(d) => hot.flow_runs_of_deployment(d, after, limit),
                };
                ReadReply::FlowRuns(page.into_iter().cloned().collect())
            }
            Read::TaskRun(id) => ReadReply::TaskRun(hot.task_run(&id).cloned().map(Box::new)),
            Read::TaskRuns {
                flow_run,
                after,
                limit,
            } => ReadReply::TaskRuns(
                hot.task_runs_of(flow_run, after, limit.min(PAGE_MAX))
                    .into_iter()
                    .cloned()
                    .collect(),
            ),
            Read::FlowRunHistory { run, offset, limit } => return history(RunId::Flow(run), offset, limit),
            Read::TaskRunHistory { run, offset, limit } => return history(RunId::Task(run), offset, limit),
            Read::Events { after, limit } => {
                return ReadAnswer::cold(move || {
                    Ok(ReadReply::Events(
                        cold.events_after(after, limit.clamp(1, PAGE_MAX))?,
                    ))
                });
            }
            Read::Logs {
                flow_run,
                after,
                limit,
            } => {
                if hot.flow_run(&flow_run).is_none() {
                    // Unknown or pruned (its batches may not be deleted from the store yet).
                    ReadReply::Logs {
                        lines: Vec::new(),
                        next: after,
                    }
                } else {
                    return ReadAnswer::cold(move || cold.logs(flow_run, after, limit));
                }
            }
            Read::Deployment(id) => ReadReply::Deployment(hot.deployment(&id).cloned().map(Box::new)),
            Read::Settings => ReadReply::Settings(hot.settings().cloned().collect()),
            Read::Answer { request_id, now } => {
                ReadReply::Answer(hot.answer_to(&request_id, now).map(|a| a.answer.clone()))
            }
            Read::SlotHolds => {
                ReadReply::SlotHolds(self.hot.slot_holds_complete().then(|| self.slot_holds()))
            }
            Read::DeploymentByName(name) => {
                ReadReply::Deployment(hot.deployment_by_name(&name).cloned().map(Box::new))
            }
            Read::Deployments { after, limit } => {
                let mut all: Vec<&flotilla_runtime::Deployment> = hot
                    .deployments()
                    .filter(|d| after.as_ref().is_none_or(|a| d.name.as_str() > a.as_str()))
                    .collect();
                all.sort_by(|a, b| a.name.cmp(&b.name));
                ReadReply::Deployments(all.into_iter().take(limit.clamp(1, PAGE_MAX)).cloned().collect())
            }
            Read::Cached { key, now } => ReadReply::Cached(hot.cached(&key, now).cloned()),
            Read::Stats => ReadReply::Stats(StoreStats {
                flow_runs: hot.flow_run_count(),
                applied: self.applied,
                ..stats
            }),
        }))
    }
}

#[cfg(test)]
mod tests;
