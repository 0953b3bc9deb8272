//! Memory bounded by live work plus a cache: terminal flow runs (with their task runs) beyond
//! the budget are taken out of the hot state, oldest ended first, once the store holds them,
//! and live on in the store alone, found through [`Tree::Evicted`]:
//!
//! - `r` flow run → (nothing): the run is evicted (its record in [`Tree::FlowRuns`] is current);
//! - `s` state type, flow run; `d` deployment, flow run; `e` end time, flow run: the listings;
//! - `k` idempotency key → flow run; `t` flow run, task run: its task runs.
//!
//! Every entry is derived from the run's record, which cannot change while it is evicted: a
//! command about an evicted run first brings it back (with its task runs) and removes its
//! entries, so `apply` sees the same state as if nothing had ever been evicted. Pruning reads
//! evicted runs in the store without bringing them back. Evicting and bringing back are store
//! batches of their own, written at once: after a crash the store holds either the entries or
//! not, and a run without them is loaded into memory, as before it was evicted.

use super::*;
use flotilla_runtime::StateType;
use flotilla_runtime::hot_state::ended_at;

const RUN: u8 = b'r';
const STATE: u8 = b's';
const DEPLOYMENT: u8 = b'd';
const ENDED: u8 = b'e';
const KEY: u8 = b'k';
const TASK: u8 = b't';

/// The most flow runs evicted in one go (the rest after the next store job)...
const EVICT_PER_ROUND: usize = 512;
/// ...and the most store writes that takes (a flow run of many task runs counts for each),
/// so that one round never holds up the persistence actor for long.
const EVICT_OPS_PER_ROUND: usize = 32_768;

fn state_byte(k: StateType) -> u8 {
    match k {
        StateType::Scheduled => 0,
        StateType::Pending => 1,
        StateType::Running => 2,
        StateType::Paused => 3,
        StateType::Cancelling => 4,
        StateType::Completed => 5,
        StateType::Failed => 6,
        StateType::Cancelled => 7,
        StateType::Crashed => 8,
    }
}

/// A time as 8 bytes that sort as the times do.
fn time_bytes(t: Timestamp) -> [u8; 8] {
    (t.as_micros() as u64 ^ (1 << 63)).to_be_bytes()
}

fn time_from(b: &[u8]) -> Option<Timestamp> {
    let arr: [u8; 8] = b.try_into().ok()?;
    Some(Timestamp::from_micros(
        (u64::from_be_bytes(arr) ^ (1 << 63)) as i64,
    ))
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The id at the end of an entry's key.
fn trailing_id(k: &[u8]) -> Option<[u8; 16]> {
    k.len().checked_sub(16).and_then(|at| k[at..].try_into().ok())
}

/// The prefix of the evicted runs a listing covers.
pub(super) fn listing_prefix(filter: &RunFilter) -> Vec<u8> {
    match filter {
        RunFilter::All => vec![RUN],
        RunFilter::State(t) => vec![STATE, state_byte(*t)],
        RunFilter::Deployment(d) => key(&[&[DEPLOYMENT], d.as_bytes()]),
    }
}

/// Every entry of an evicted run: put when it is evicted, deleted when it comes back or goes.
fn entries(run: &FlowRun, tasks: &[TaskRunId], put: bool) -> Vec<KvOp> {
    let id = run.id.as_bytes();
    let mut keys = vec![
        key(&[&[RUN], id]),
        key(&[&[STATE, state_byte(run.lifecycle.state.kind)], id]),
    ];
    if let Some(d) = run.deployment_id {
        keys.push(key(&[&[DEPLOYMENT], d.as_bytes(), id]));
    }
    if let Some(t) = ended_at(run) {
        keys.push(key(&[&[ENDED], &time_bytes(t), id]));
    }
    let mut ops: Vec<KvOp> = keys
        .into_iter()
        .chain(tasks.iter().map(|t| key(&[&[TASK], id, t.as_bytes()])))
        .map(|k| {
            if put {
                KvOp::Put(Tree::Evicted, k, Vec::new())
            } else {
                KvOp::Delete(Tree::Evicted, k)
            }
        })
        .collect();
    if let Some(k) = &run.idempotency_key {
        let k = key(&[&[KEY], k.as_bytes()]);
        ops.push(if put {
            KvOp::Put(Tree::Evicted, k, id.to_vec())
        } else {
            KvOp::Delete(Tree::Evicted, k)
        });
    }
    ops
}

fn decode_record<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, PersistError> {
    codec::decode(bytes).map_err(|e| read_err(what, e))
}

/// An evicted run as the store holds it.
struct Stored {
    run: FlowRun,
    tasks: Vec<TaskRun>,
}

impl Cold {
    /// Whether a flow run is evicted.
    fn is_evicted(&self, id: &FlowRunId) -> Result<bool, PersistError> {
        Ok(self.get(Tree::Evicted, &key(&[&[RUN], id.as_bytes()]))?.is_some())
    }

    /// An evicted flow run's record.
    pub(super) fn evicted_run(&self, id: &FlowRunId) -> Result<Option<FlowRun>, PersistError> {
        if !self.is_evicted(id)? {
            return Ok(None);
        }
        match self.get(Tree::FlowRuns, id.as_bytes())? {
            Some(b) => decode_record("an evicted flow run", &b).map(Some),
            None => Ok(None),
        }
    }

    /// An evicted task run's record (its flow run is evicted).
    pub(super) fn evicted_task(&self, id: &TaskRunId) -> Result<Option<TaskRun>, PersistError> {
        let Some(b) = self.get(Tree::TaskRuns, id.as_bytes())? else {
            return Ok(None);
        };
        let run: TaskRun = decode_record("an evicted task run", &b)?;
        Ok(self.is_evicted(&run.key.flow_run)?.then_some(run))
    }

    /// Up to `limit` records of `tree` named by the entries that start with `prefix` (each
    /// ending with the record's id), after the entry of id `after`.
    fn records_named<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &[u8],
        after: Option<&[u8; 16]>,
        limit: usize,
        tree: Tree,
        what: &str,
    ) -> Result<Vec<T>, PersistError> {
        let start = after.map(|a| key(&[prefix, a]));
        let bound = start.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let mut out = Vec::new();
        for (k, _) in self.scan(Tree::Evicted, prefix, bound, limit)? {
            let Some(id) = trailing_id(&k) else { continue };
            if let Some(record) = self.get(tree, &id)? {
                out.push(decode_record(what, &record)?);
            }
        }
        Ok(out)
    }

    /// Up to `limit` evicted flow runs whose entries start with `prefix`, after `after` (by id).
    pub(super) fn evicted_page(
        &self,
        prefix: &[u8],
        after: Option<FlowRunId>,
        limit: usize,
    ) -> Result<Vec<FlowRun>, PersistError> {
        let after = after.as_ref().map(FlowRunId::as_bytes);
        self.records_named(prefix, after, limit, Tree::FlowRuns, "an evicted flow run")
    }

    /// Up to `limit` task runs of an evicted flow run, after `after` (by id).
    pub(super) fn evicted_tasks(
        &self,
        flow_run: &FlowRunId,
        after: Option<TaskRunId>,
        limit: usize,
    ) -> Result<Vec<TaskRun>, PersistError> {
        let prefix = key(&[&[TASK], flow_run.as_bytes()]);
        let after = after.as_ref().map(TaskRunId::as_bytes);
        self.records_named(&prefix, after, limit, Tree::TaskRuns, "an evicted task run")
    }

    /// An evicted flow run with every one of its task runs.
    fn evicted_whole(&self, id: &FlowRunId) -> Result<Option<Stored>, PersistError> {
        let Some(run) = self.evicted_run(id)? else {
            return Ok(None);
        };
        let mut tasks = Vec::new();
        loop {
            let page = self.evicted_tasks(id, tasks.last().map(|t: &TaskRun| t.id), 1024)?;
            if page.is_empty() {
                break;
            }
            tasks.extend(page);
        }
        Ok(Some(Stored { run, tasks }))
    }

    /// Up to `limit` evicted flow runs that ended before `before`, those that ended first first.
    fn evicted_ended_before(
        &self,
        before: Timestamp,
        limit: usize,
    ) -> Result<Vec<(Timestamp, FlowRunId)>, PersistError> {
        let entries = self.scan(Tree::Evicted, &[ENDED], Bound::Unbounded, limit)?;
        Ok(entries
            .iter()
            .filter_map(|(k, _)| Some((time_from(k.get(1..9)?)?, FlowRunId::from_bytes(trailing_id(k)?))))
            .take_while(|(t, _)| *t < before)
            .collect())
    }

    /// The flow run evicted with this idempotency key.
    fn evicted_by_key(&self, k: &str) -> Result<Option<FlowRunId>, PersistError> {
        Ok(self
            .get(Tree::Evicted, &key(&[&[KEY], k.as_bytes()]))?
            .and_then(|v| <[u8; 16]>::try_from(v.as_slice()).ok())
            .map(FlowRunId::from_bytes))
    }
}

/// Sorts a page of flow runs from memory and one from the store by id into one, each once.
pub(super) fn merge_pages(hot: Vec<FlowRun>, cold: Vec<FlowRun>, limit: usize) -> Vec<FlowRun> {
    let mut all = hot;
    all.extend(cold);
    all.sort_by_key(|r| r.id);
    all.dedup_by_key(|r| r.id);
    all.truncate(limit);
    all
}

/// The ids of the evicted flow runs and task runs (what loading leaves in the store).
pub(super) fn evicted_ids(
    kv: &dyn KvStore,
    path: &str,
) -> Result<(HashSet<FlowRunId>, HashSet<TaskRunId>), OpenError> {
    let mut runs = HashSet::new();
    let mut tasks = HashSet::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let start = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let page = kv
            .scan(Tree::Evicted, b"", start, 10_000)
            .map_err(|e| OpenError::Store {
                path: path.to_owned(),
                reason: e.0,
            })?;
        let Some((last, _)) = page.last() else {
            return Ok((runs, tasks));
        };
        after = Some(last.clone());
        for (k, _) in &page {
            match (k.first(), trailing_id(k)) {
                (Some(&RUN), Some(id)) => {
                    runs.insert(FlowRunId::from_bytes(id));
                }
                (Some(&TASK), Some(id)) => {
                    tasks.insert(TaskRunId::from_bytes(id));
                }
                _ => {}
            }
        }
    }
}

impl Store {
    /// Keeps at most about `max` flow and task runs in memory: terminal ones beyond it live
    /// in the store alone (runs that have not ended always stay).
    pub fn keep_in_memory(&mut self, max: usize) {
        self.resident_max = max;
    }

    /// How many flow runs live in the store alone.
    pub fn evicted(&self) -> usize {
        self.evicted
    }

    /// Notes that a terminal flow run changed at `index` (it may not be evicted before the
    /// store holds that change).
    pub(super) fn changed_at(&mut self, index: LogIndex, id: FlowRunId) {
        if self
            .hot
            .flow_run(&id)
            .is_some_and(|r| r.lifecycle.state.is_terminal())
        {
            self.unstored.insert(id, index);
        }
    }

    /// Evicts terminal flow runs, oldest ended first, while memory holds more runs than it
    /// should; only those the store holds as they are (through `upto`).
    pub(super) fn evict_stored(&mut self, upto: LogIndex) {
        self.unstored.retain(|_, at| *at > upto);
        let mut over = self.hot.resident().saturating_sub(self.resident_max);
        if over == 0 {
            return;
        }
        let candidates: Vec<FlowRunId> = self
            .hot
            .ended()
            .map(|(_, id)| *id)
            .filter(|id| !self.unstored.contains_key(id))
            .take(EVICT_PER_ROUND)
            .collect();
        let mut ops = Vec::new();
        let mut taken = Vec::new();
        for id in candidates {
            if over == 0 || ops.len() >= EVICT_OPS_PER_ROUND {
                break;
            }
            let Some((run, tasks)) = self.hot.evict(&id) else {
                continue;
            };
            let task_ids: Vec<TaskRunId> = tasks.iter().map(|t| t.id).collect();
            ops.extend(entries(&run, &task_ids, true));
            over = over.saturating_sub(1 + tasks.len());
            taken.push((run, tasks));
        }
        if taken.is_empty() {
            return;
        }
        match self.kv.apply(&ops) {
            Ok(()) => self.evicted += taken.len(),
            Err(e) => {
                tracing::error!(error = %e, "terminal runs could not be moved out of memory; they stay");
                for (run, tasks) in taken {
                    self.hot.put_flow_run(Arc::unwrap_or_clone(run));
                    for t in tasks {
                        self.hot.put_task_run(Arc::unwrap_or_clone(t));
                    }
                }
            }
        }
    }

    /// Brings back every evicted run `command` reads, so that `apply` sees it.
    pub(super) fn bring_back_for(&mut self, command: &Command) {
        if self.evicted == 0 {
            return;
        }
        let flow_of_task = |store: &Store, id: &TaskRunId| -> Option<FlowRunId> {
            if store.hot.task_run(id).is_some() {
                return None;
            }
            match store.cold.evicted_task(id) {
                Ok(t) => t.map(|t| t.key.flow_run),
                Err(e) => {
                    tracing::error!(error = %e, task_run = %id, "an evicted task run could not be read");
                    None
                }
            }
        };
        let ids: Vec<FlowRunId> = match command {
            Command::CreateFlowRun(new) => {
                let k = new.idempotency_key.clone().unwrap_or_else(|| new.id.to_string());
                let mut ids = vec![new.id];
                if self.hot.flow_run_by_key(&k).is_none() {
                    match self.cold.evicted_by_key(&k) {
                        Ok(found) => ids.extend(found),
                        Err(e) => tracing::error!(error = %e, "an idempotency key could not be read"),
                    }
                }
                ids
            }
            Command::ProposeFlowRunState { run, .. } | Command::RetryFlowRun { run, .. } => vec![*run],
            Command::AppendLogs { flow_run, .. } => vec![*flow_run],
            Command::CreateTaskRun(new) => vec![new.key.flow_run],
            Command::RecordTaskRun {
                create: Some(new), ..
            } => vec![new.key.flow_run],
            Command::ProposeTaskRunState { run, .. }
            | Command::RetryTaskRun { run, .. }
            | Command::RecordTaskRun { run, .. } => flow_of_task(self, run).into_iter().collect(),
            _ => Vec::new(),
        };
        for id in ids {
            self.bring_back(&id);
        }
    }

    /// An evicted flow run with its task runs, its entries removed (it is evicted no more):
    /// to bring back or to prune. None (logged) when it cannot be read or its entries removed.
    fn take_evicted(&mut self, id: &FlowRunId, why: &str) -> Option<Stored> {
        let stored = match self.cold.evicted_whole(id) {
            Ok(s) => s?,
            Err(e) => {
                tracing::error!(error = %e, flow_run = %id, "an evicted flow run could not be read to {why}");
                return None;
            }
        };
        let task_ids: Vec<TaskRunId> = stored.tasks.iter().map(|t| t.id).collect();
        if let Err(e) = self.kv.apply(&entries(&stored.run, &task_ids, false)) {
            tracing::error!(error = %e, flow_run = %id, "an evicted flow run could not be taken out of the store to {why}");
            return None;
        }
        self.evicted = self.evicted.saturating_sub(1);
        Some(stored)
    }

    /// Brings an evicted flow run and its task runs back into memory.
    fn bring_back(&mut self, id: &FlowRunId) {
        if self.hot.flow_run(id).is_some() {
            return;
        }
        let Some(stored) = self.take_evicted(id, "bring it back") else {
            return;
        };
        self.hot.put_flow_run(stored.run);
        for t in stored.tasks {
            self.hot.put_task_run(t);
        }
    }

    /// Prunes the evicted runs among the oldest due, straight from the store; returns the
    /// pruning left for `apply` (the runs in memory among them) and what was pruned here.
    pub(super) fn prune_evicted(&mut self, p: flotilla_runtime::Prune) -> (flotilla_runtime::Prune, Pruned) {
        let max = p.runs_max as usize;
        let nothing = Pruned::default();
        if self.evicted == 0 {
            return (p, nothing);
        }
        let cold = match self.cold.evicted_ended_before(p.runs_before, max + 1) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "evicted runs due to be pruned could not be read");
                return (p, nothing);
            }
        };
        let mut due: Vec<(Timestamp, FlowRunId, bool)> = self
            .hot
            .ended()
            .take_while(|(t, _)| *t < p.runs_before)
            .take(max + 1)
            .map(|(t, id)| (*t, *id, false))
            .chain(cold.into_iter().map(|(t, id)| (t, id, true)))
            .collect();
        due.sort();
        let more = due.len() > max;
        due.truncate(max);
        let (mut flows, mut tasks) = (0u32, 0u32);
        for (_, id, _) in due.iter().filter(|(_, _, evicted)| *evicted) {
            let Some(stored) = self.take_evicted(id, "prune it") else {
                continue;
            };
            let mut pruned = PrunedRun {
                flow_run: *id,
                task_runs: stored.tasks.iter().map(|t| t.id).collect(),
                archived: vec![(RunId::Flow(*id), stored.run.lifecycle.archived_blocks)],
                events: stored.run.lifecycle.history.clone(),
            };
            for t in &stored.tasks {
                pruned
                    .archived
                    .push((RunId::Task(t.id), t.lifecycle.archived_blocks));
                pruned.events.extend_from_slice(&t.lifecycle.history);
            }
            flows += 1;
            tasks = tasks.saturating_add(u32::try_from(pruned.task_runs.len()).unwrap_or(u32::MAX));
            self.prune.runs.push(pruned);
        }
        let in_memory = due.iter().filter(|(_, _, evicted)| !*evicted).count();
        let rest = flotilla_runtime::Prune {
            runs_max: u32::try_from(in_memory).unwrap_or(u32::MAX),
            ..p
        };
        (
            rest,
            Pruned {
                flow_runs: flows,
                task_runs: tasks,
                more,
            },
        )
    }
}

/// What pruning took from the store alone.
#[derive(Debug, Default)]
pub(super) struct Pruned {
    flow_runs: u32,
    task_runs: u32,
    more: bool,
}

impl Pruned {
    /// `apply`'s reply to the rest of the pruning, with this added.
    pub(super) fn add_to(&self, reply: Result<Reply, Refusal>) -> Result<Reply, Refusal> {
        match reply {
            Ok(Reply::Pruned {
                flow_runs,
                task_runs,
                more,
            }) => Ok(Reply::Pruned {
                flow_runs: flow_runs.saturating_add(self.flow_runs),
                task_runs: task_runs.saturating_add(self.task_runs),
                more: more || self.more,
            }),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests;
