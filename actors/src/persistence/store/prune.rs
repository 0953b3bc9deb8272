//! Forgetting what is past its retention in the store: pruned runs' records, old events and
//! log batches.

use super::*;

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

    pub(super) fn extend(&mut self, other: ColdPrune) {
        self.runs.extend(other.runs);
        if other.before.is_some() {
            self.before = other.before;
        }
    }

    /// The store writes that forget it, read from the store as it is once the job's own writes
    /// are in: the pruned runs' records, history blocks, logs and state events; the events
    /// older than the cut-off that are not state changes; log batches older than theirs.
    pub fn ops(&self, kv: &dyn KvStore) -> Result<Vec<KvOp>, PersistError> {
        let store = |e: crate::persistence::kv::KvError| read_err("store", e);
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
            each_key(kv, Tree::Logs, p.flow_run.as_bytes(), |k| {
                if let Some(t) = swap_halves(&k) {
                    ops.push(KvOp::Delete(Tree::LogTimes, t));
                }
                ops.push(KvOp::Delete(Tree::Logs, k));
                true
            })?;
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
            if kv.get(Tree::Meta, LOG_TIMES_KEY).map_err(store)?.is_some() {
                prune_logs_by_time(kv, logs_cut, &mut ops)?;
            } else {
                index_and_prune_every_log(kv, logs_cut, &mut ops)?;
            }
        }
        ops.extend(blocks.into_ops()?);
        Ok(ops)
    }
}

/// Forgets the log batches older than `cut` (ms since the epoch), oldest first from
/// [`Tree::LogTimes`]: the cost follows what is forgotten, not what is kept.
fn prune_logs_by_time(kv: &dyn KvStore, cut: u64, ops: &mut Vec<KvOp>) -> Result<(), PersistError> {
    each_key(kv, Tree::LogTimes, b"", |k| {
        if k.get(..6).is_none_or(|b| v7_millis(b) >= cut) {
            return false;
        }
        if let Some(log) = swap_halves(&k) {
            ops.push(KvOp::Delete(Tree::Logs, log));
        }
        ops.push(KvOp::Delete(Tree::LogTimes, k));
        true
    })
}

/// The first log pruning of a store written before [`Tree::LogTimes`]: walks every batch once,
/// forgetting those older than `cut` and indexing the rest by time, then marks the index whole.
fn index_and_prune_every_log(kv: &dyn KvStore, cut: u64, ops: &mut Vec<KvOp>) -> Result<(), PersistError> {
    each_key(kv, Tree::Logs, b"", |k| {
        // A log key is the run's id then the batch's, whose first 6 bytes are its time.
        let Some(t) = swap_halves(&k) else { return true };
        if v7_millis(&t[..6]) < cut {
            ops.push(KvOp::Delete(Tree::LogTimes, t));
            ops.push(KvOp::Delete(Tree::Logs, k));
        } else {
            ops.push(KvOp::Put(Tree::LogTimes, t, Vec::new()));
        }
        true
    })?;
    ops.push(KvOp::Put(Tree::Meta, LOG_TIMES_KEY.to_vec(), Vec::new()));
    Ok(())
}

/// Calls `f` with each key of `tree` under `prefix`, in order, a page at a time, until it
/// returns false.
fn each_key(
    kv: &dyn KvStore,
    tree: Tree,
    prefix: &[u8],
    mut f: impl FnMut(Vec<u8>) -> bool,
) -> Result<(), PersistError> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let start = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let page = kv
            .scan(tree, prefix, start, 1_024)
            .map_err(|e| read_err("store", e))?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        after = Some(last.clone());
        for (k, _) in page {
            if !f(k) {
                return Ok(());
            }
        }
    }
}

/// A 32-byte key with its two halves swapped: a log key (run, batch) as its
/// [`Tree::LogTimes`] key (batch, run), and back.
fn swap_halves(k: &[u8]) -> Option<Vec<u8>> {
    let (first, second) = (k.get(..16)?, k.get(16..32)?);
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(second);
    out.extend_from_slice(first);
    Some(out)
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
