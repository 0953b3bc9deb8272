//! The hot control state: every flow run, task run and deployment, with the indexes the rules
//! and the reads need. Kept in memory by whoever applies commands, so reads never wait on disk.

use std::collections::BTreeSet;
use std::sync::Arc;

/// Hash maps keyed by ids that clients choose: a fast hash, randomly seeded.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use crate::deployment::Deployment;
use crate::flow_run::FlowRun;
use crate::ids::{DeploymentId, FlowRunId, NodeId, TaskRunId};
use crate::state::{State, StateName, StateType};
use crate::task_run::{TaskRun, TaskRunKey};
use crate::time::Timestamp;
use crate::work_queue::Setting;

/// Runs, task runs and deployments, indexed.
#[derive(Debug, Default, Clone)]
pub struct HotState {
    flow_runs: HashMap<FlowRunId, Arc<FlowRun>>,
    flow_run_ids: BTreeSet<FlowRunId>,
    flow_run_keys: HashMap<String, FlowRunId>,
    by_state: BTreeSet<(StateType, FlowRunId)>,
    by_deployment: BTreeSet<(DeploymentId, FlowRunId)>,
    /// Terminal runs by when they ended (what pruning takes, oldest first).
    ended: BTreeSet<(Timestamp, FlowRunId)>,
    active_by_node: HashMap<NodeId, BTreeSet<FlowRunId>>,
    task_runs: HashMap<TaskRunId, Arc<TaskRun>>,
    task_run_keys: HashMap<TaskRunKey, TaskRunId>,
    tasks_by_flow: BTreeSet<(FlowRunId, TaskRunId)>,
    cache: HashMap<String, State>,
    deployments: HashMap<DeploymentId, Deployment>,
    deployment_names: HashMap<String, DeploymentId>,
    settings: std::collections::BTreeMap<String, Setting>,
    slot_holds: std::collections::BTreeMap<(String, TaskRunId), NodeId>,
    slot_holds_complete: bool,
    outcomes: HashMap<crate::control::RequestId, RememberedAnswer>,
    outcome_order: std::collections::VecDeque<(u64, crate::control::RequestId)>,
    outcome_seq: u64,
}

/// A client request's answer, remembered.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RememberedAnswer {
    /// The request.
    pub request_id: crate::control::RequestId,
    /// Its place in the order of remembering (the oldest is forgotten first).
    pub seq: u64,
    /// Remembered until then.
    pub until: Timestamp,
    /// The answer, encoded as it was sent.
    #[serde(with = "serde_bytes")]
    pub answer: Vec<u8>,
}

/// When a terminal run ended (None: it has not).
pub fn ended_at(run: &FlowRun) -> Option<Timestamp> {
    run.lifecycle
        .state
        .is_terminal()
        .then(|| run.lifecycle.end_time.unwrap_or(run.lifecycle.state.timestamp))
}

fn active_owner(run: &FlowRun) -> Option<&NodeId> {
    if run.lifecycle.state.is_terminal() {
        None
    } else {
        run.owner.as_ref()
    }
}

impl HotState {
    /// An empty state.
    pub fn new() -> Self {
        HotState::default()
    }

    /// A flow run.
    pub fn flow_run(&self, id: &FlowRunId) -> Option<&FlowRun> {
        self.flow_runs.get(id).map(|r| &**r)
    }

    /// A flow run, shared (a snapshot: later changes copy it first).
    pub fn flow_run_shared(&self, id: &FlowRunId) -> Option<Arc<FlowRun>> {
        self.flow_runs.get(id).cloned()
    }

    /// The flow run created with this idempotency key (or whose id is this string).
    pub fn flow_run_by_key(&self, key: &str) -> Option<FlowRunId> {
        self.flow_run_keys.get(key).copied()
    }

    fn unindex(&mut self, id: &FlowRunId) {
        let Some(old) = self.flow_runs.get(id) else { return };
        self.by_state.remove(&(old.lifecycle.state.kind, old.id));
        if let Some(d) = old.deployment_id {
            self.by_deployment.remove(&(d, old.id));
        }
        if let Some(t) = ended_at(old) {
            self.ended.remove(&(t, old.id));
        }
        if let Some(n) = active_owner(old)
            && let Some(set) = self.active_by_node.get_mut(n)
        {
            set.remove(&old.id);
            if set.is_empty() {
                self.active_by_node.remove(n);
            }
        }
    }

    fn index(&mut self, id: &FlowRunId) {
        let Some(run) = self.flow_runs.get(id) else { return };
        self.by_state.insert((run.lifecycle.state.kind, run.id));
        if let Some(d) = run.deployment_id {
            self.by_deployment.insert((d, run.id));
        }
        if let Some(t) = ended_at(run) {
            self.ended.insert((t, run.id));
        }
        if let Some(n) = active_owner(run) {
            self.active_by_node.entry(n.clone()).or_default().insert(run.id);
        }
    }

    /// Inserts or replaces a flow run, keeping the indexes.
    pub fn put_flow_run(&mut self, run: FlowRun) {
        let id = run.id;
        if self.flow_runs.contains_key(&id) {
            self.unindex(&id);
        } else {
            let key = run.idempotency_key.clone().unwrap_or_else(|| run.id.to_string());
            self.flow_run_keys.insert(key, id);
            self.flow_run_ids.insert(id);
        }
        self.flow_runs.insert(id, Arc::new(run));
        self.index(&id);
    }

    /// Changes a flow run in place, keeping the indexes (its id must not change).
    pub fn update_flow_run<R>(&mut self, id: &FlowRunId, f: impl FnOnce(&mut FlowRun) -> R) -> Option<R> {
        if !self.flow_runs.contains_key(id) {
            return None;
        }
        self.unindex(id);
        let r = self.flow_runs.get_mut(id).map(|run| f(Arc::make_mut(run)));
        self.index(id);
        r
    }

    /// Removes a flow run (not its task runs) with its indexes and idempotency key.
    pub fn remove_flow_run(&mut self, id: &FlowRunId) -> Option<Arc<FlowRun>> {
        self.unindex(id);
        let run = self.flow_runs.remove(id)?;
        self.flow_run_ids.remove(id);
        let key = run.idempotency_key.clone().unwrap_or_else(|| run.id.to_string());
        if self.flow_run_keys.get(&key) == Some(id) {
            self.flow_run_keys.remove(&key);
        }
        Some(run)
    }

    /// Takes a terminal flow run and its task runs out of memory (to live only in the store),
    /// with their indexes and keys; None (and nothing taken) when it is not terminal.
    pub fn evict(&mut self, id: &FlowRunId) -> Option<(Arc<FlowRun>, Vec<Arc<TaskRun>>)> {
        ended_at(self.flow_runs.get(id)?)?;
        let run = self.remove_flow_run(id)?;
        Some((run, self.remove_task_runs_of(id)))
    }

    /// How many flow and task runs are held.
    pub fn resident(&self) -> usize {
        self.flow_runs.len() + self.task_runs.len()
    }

    /// Terminal flow runs, those that ended first first, with when they ended.
    pub fn ended(&self) -> impl Iterator<Item = &(Timestamp, FlowRunId)> {
        self.ended.iter()
    }

    /// Removes the task runs of a flow run, with their keys; returns them.
    pub fn remove_task_runs_of(&mut self, flow_run: &FlowRunId) -> Vec<Arc<TaskRun>> {
        let ids: Vec<TaskRunId> = self
            .tasks_by_flow
            .range((*flow_run, TaskRunId::from_bytes([0; 16]))..)
            .take_while(|(f, _)| f == flow_run)
            .map(|(_, t)| *t)
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            self.tasks_by_flow.remove(&(*flow_run, id));
            if let Some(run) = self.task_runs.remove(&id) {
                if self.task_run_keys.get(&run.key) == Some(&id) {
                    self.task_run_keys.remove(&run.key);
                }
                out.push(run);
            }
        }
        out
    }

    /// Gives back the room of maps that emptied (after a pruning): a map keeps the capacity of
    /// its busiest moment otherwise, so memory would follow the peak, not the live work. Only
    /// maps with over four times the room they need are shrunk (to twice), so the cost is
    /// amortised over the removals that emptied them.
    pub fn shrink_spare(&mut self) {
        fn shrink<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>) {
            if m.capacity() > 4 * m.len() + 1024 {
                m.shrink_to(2 * m.len());
            }
        }
        shrink(&mut self.flow_runs);
        shrink(&mut self.flow_run_keys);
        shrink(&mut self.task_runs);
        shrink(&mut self.task_run_keys);
        shrink(&mut self.cache);
    }

    /// Forgets cached results that expired before `now`.
    pub fn prune_cache(&mut self, now: Timestamp) {
        self.cache
            .retain(|_, s| s.details.cache_expiration.is_none_or(|e| e > now));
    }

    /// Records that `holder` on `node` holds a slot of each of `tags`.
    pub fn hold_slots(&mut self, holder: TaskRunId, node: &NodeId, tags: &[String]) {
        for t in tags {
            self.slot_holds.insert((t.clone(), holder), node.clone());
        }
    }

    /// Records that these holders hold no slot (of `tag` only, when given).
    pub fn free_slots(&mut self, holders: &[TaskRunId], tag: Option<&str>) {
        self.slot_holds
            .retain(|(t, h), _| !(holders.contains(h) && tag.is_none_or(|x| x == t)));
    }

    /// Remembers a request's answer at `now` (a request remembered already keeps its first
    /// answer), then forgets the oldest beyond `max` and those older than `keep`. The answer
    /// remembered, or None when it was remembered before.
    pub fn remember(
        &mut self,
        o: &crate::command::RememberedOutcome,
        now: Timestamp,
    ) -> Option<&RememberedAnswer> {
        if self.outcomes.contains_key(&o.request_id) {
            return None;
        }
        let seq = self.outcome_seq;
        self.put_answer(RememberedAnswer {
            request_id: o.request_id,
            seq,
            until: now + o.keep,
            answer: o.answer.clone(),
        });
        while self.outcome_order.len() > o.max.max(1) as usize
            || self
                .outcome_order
                .front()
                .is_some_and(|(_, id)| self.outcomes.get(id).is_none_or(|a| a.until <= now))
        {
            if let Some((_, id)) = self.outcome_order.pop_front() {
                self.outcomes.remove(&id);
            }
        }
        self.outcomes.get(&o.request_id)
    }

    /// Puts back an answer remembered before (loading a store), in `seq` order.
    pub fn put_answer(&mut self, a: RememberedAnswer) {
        self.outcome_seq = self.outcome_seq.max(a.seq + 1);
        self.outcome_order.push_back((a.seq, a.request_id));
        self.outcomes.insert(a.request_id, a);
    }

    /// The answer remembered for a request, if it is still remembered at `now`.
    pub fn answer_to(&self, id: &crate::control::RequestId, now: Timestamp) -> Option<&RememberedAnswer> {
        self.outcomes.get(id).filter(|a| a.until > now)
    }

    /// How many answers are remembered.
    pub fn answer_count(&self) -> usize {
        self.outcomes.len()
    }

    /// Forgets every recorded slot holding.
    pub fn clear_slot_holds(&mut self) {
        self.slot_holds.clear();
    }

    /// The record of slot holdings names every holder that may run.
    pub fn slot_holds_completed(&mut self) {
        self.slot_holds_complete = true;
    }

    /// Whether the record of slot holdings names every holder that may run.
    pub fn slot_holds_complete(&self) -> bool {
        self.slot_holds_complete
    }

    /// Every recorded slot holding: (tag, holder) and the holder's node.
    pub fn slot_holds(&self) -> impl Iterator<Item = (&(String, TaskRunId), &NodeId)> {
        self.slot_holds.iter()
    }

    /// How many task runs there are.
    pub fn task_run_count(&self) -> usize {
        self.task_runs.len()
    }

    /// The non-terminal flow runs a node owns.
    pub fn active_flow_runs_of(&self, node: &NodeId) -> Vec<FlowRunId> {
        self.active_by_node
            .get(node)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Up to `limit` flow runs in a state type, after `after` (by id).
    pub fn flow_runs_in_state(
        &self,
        kind: StateType,
        after: Option<FlowRunId>,
        limit: usize,
    ) -> Vec<&FlowRun> {
        let start = match after {
            Some(a) => std::ops::Bound::Excluded((kind, a)),
            None => std::ops::Bound::Included((kind, FlowRunId::from_bytes([0; 16]))),
        };
        self.by_state
            .range((start, std::ops::Bound::Unbounded))
            .take_while(|(k, _)| *k == kind)
            .take(limit)
            .filter_map(|(_, id)| self.flow_run(id))
            .collect()
    }

    /// Up to `limit` terminal flow runs that ended before `before`, those that ended first
    /// first.
    pub fn ended_before(&self, before: Timestamp, limit: usize) -> Vec<FlowRunId> {
        self.ended
            .iter()
            .take_while(|(t, _)| *t < before)
            .take(limit)
            .map(|(_, id)| *id)
            .collect()
    }

    /// Up to `limit` flow runs of a deployment, after `after` (by id).
    pub fn flow_runs_of_deployment(
        &self,
        d: DeploymentId,
        after: Option<FlowRunId>,
        limit: usize,
    ) -> Vec<&FlowRun> {
        let start = match after {
            Some(a) => std::ops::Bound::Excluded((d, a)),
            None => std::ops::Bound::Included((d, FlowRunId::from_bytes([0; 16]))),
        };
        self.by_deployment
            .range((start, std::ops::Bound::Unbounded))
            .take_while(|(k, _)| *k == d)
            .take(limit)
            .filter_map(|(_, id)| self.flow_run(id))
            .collect()
    }

    /// Up to `limit` flow runs in id order (creation order), after `after`.
    pub fn flow_runs_page(&self, after: Option<FlowRunId>, limit: usize) -> Vec<&FlowRun> {
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(a),
            None => std::ops::Bound::Unbounded,
        };
        self.flow_run_ids
            .range((start, std::ops::Bound::Unbounded))
            .take(limit)
            .filter_map(|id| self.flow_run(id))
            .collect()
    }

    /// How many flow runs there are.
    pub fn flow_run_count(&self) -> usize {
        self.flow_runs.len()
    }

    /// Every flow run (no order).
    pub fn flow_runs(&self) -> impl Iterator<Item = &FlowRun> {
        self.flow_runs.values().map(|r| &**r)
    }

    /// A task run.
    pub fn task_run(&self, id: &TaskRunId) -> Option<&TaskRun> {
        self.task_runs.get(id).map(|r| &**r)
    }

    /// A task run, shared (a snapshot: later changes copy it first).
    pub fn task_run_shared(&self, id: &TaskRunId) -> Option<Arc<TaskRun>> {
        self.task_runs.get(id).cloned()
    }

    /// The task run of a task call.
    pub fn task_run_by_key(&self, key: &TaskRunKey) -> Option<TaskRunId> {
        self.task_run_keys.get(key).copied()
    }

    fn cache_result(&mut self, id: &TaskRunId) {
        let Some(run) = self.task_runs.get(id) else { return };
        let s = &run.lifecycle.state;
        if s.name == StateName::Completed
            && let Some(k) = &s.details.cache_key
        {
            self.cache.insert(k.clone(), s.clone());
        }
    }

    /// Inserts or replaces a task run, keeping the indexes and the cache.
    pub fn put_task_run(&mut self, run: TaskRun) {
        let id = run.id;
        if !self.task_runs.contains_key(&id) {
            self.task_run_keys.insert(run.key.clone(), id);
            self.tasks_by_flow.insert((run.key.flow_run, id));
        }
        self.task_runs.insert(id, Arc::new(run));
        self.cache_result(&id);
    }

    /// Changes a task run in place, keeping the cache (its id and key must not change).
    pub fn update_task_run<R>(&mut self, id: &TaskRunId, f: impl FnOnce(&mut TaskRun) -> R) -> Option<R> {
        let r = self.task_runs.get_mut(id).map(|run| f(Arc::make_mut(run)))?;
        self.cache_result(id);
        Some(r)
    }

    /// The task runs of a flow run, in creation order, after `after`.
    pub fn task_runs_of(&self, flow_run: FlowRunId, after: Option<TaskRunId>, limit: usize) -> Vec<&TaskRun> {
        let start = match after {
            Some(a) => std::ops::Bound::Excluded((flow_run, a)),
            None => std::ops::Bound::Included((flow_run, TaskRunId::from_bytes([0; 16]))),
        };
        self.tasks_by_flow
            .range((start, std::ops::Bound::Unbounded))
            .take_while(|(f, _)| *f == flow_run)
            .take(limit)
            .filter_map(|(_, id)| self.task_run(id))
            .collect()
    }

    /// Every task run (no order).
    pub fn task_runs(&self) -> impl Iterator<Item = &TaskRun> {
        self.task_runs.values().map(|r| &**r)
    }

    /// Remembers a cached Completed state (learned from elsewhere) for a cache key.
    pub fn put_cached(&mut self, key: String, state: State) {
        self.cache.insert(key, state);
    }

    /// The cached Completed state for a cache key, if it has not expired at `now`.
    pub fn cached(&self, key: &str, now: Timestamp) -> Option<&State> {
        self.cache
            .get(key)
            .filter(|s| s.details.cache_expiration.is_none_or(|e| e > now))
    }

    /// A deployment.
    pub fn deployment(&self, id: &DeploymentId) -> Option<&Deployment> {
        self.deployments.get(id)
    }

    /// A deployment by name.
    pub fn deployment_by_name(&self, name: &str) -> Option<&Deployment> {
        self.deployment_names
            .get(name)
            .and_then(|id| self.deployments.get(id))
    }

    /// Every deployment (no order).
    pub fn deployments(&self) -> impl Iterator<Item = &Deployment> {
        self.deployments.values()
    }

    /// Inserts or replaces a deployment.
    pub fn put_deployment(&mut self, d: Deployment) {
        if let Some(old) = self.deployments.get(&d.id)
            && old.name != d.name
        {
            self.deployment_names.remove(&old.name);
        }
        self.deployment_names.insert(d.name.clone(), d.id);
        self.deployments.insert(d.id, d);
    }

    /// A setting by key.
    pub fn setting(&self, key: &str) -> Option<&Setting> {
        self.settings.get(key)
    }

    /// Every setting, by key.
    pub fn settings(&self) -> impl Iterator<Item = &Setting> {
        self.settings.values()
    }

    /// Inserts or replaces a setting.
    pub fn put_setting(&mut self, s: Setting) {
        self.settings.insert(s.key(), s);
    }

    /// Removes a setting; whether it existed.
    pub fn delete_setting(&mut self, key: &str) -> bool {
        self.settings.remove(key).is_some()
    }

    /// Removes a deployment; whether it existed.
    pub fn delete_deployment(&mut self, id: &DeploymentId) -> bool {
        match self.deployments.remove(id) {
            Some(d) => {
                self.deployment_names.remove(&d.name);
                true
            }
            None => false,
        }
    }
}
