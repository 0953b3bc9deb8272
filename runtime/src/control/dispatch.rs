//! Which due run goes next: work queues by priority (1 first; a paused queue hands out nothing;
//! a queue at its concurrency limit waits), oldest scheduled time first within a queue, and
//! deployment concurrency limits. A run whose deployment is at its limit leaves the queue for
//! the deployment's own line (named AwaitingConcurrencySlot) or is cancelled (`cancel-new`),
//! so it never holds back the runs behind it; a slot that frees brings its oldest back.
//!
//! Plain data, no actor: the control machine ([`super::ControlMachine`]) owns one and says what happened (a run came due, a
//! run ended, a queue changed); it answers with what to do (place these runs on these nodes,
//! mark these runs).

use std::collections::{BTreeMap, HashMap};

use crate::deployment::CollisionStrategy;
use crate::ids::{DeploymentId, FlowRunId, NodeId};
use crate::time::Timestamp;
use crate::work_queue::{DEFAULT_QUEUE, WorkQueue};
use serde::{Deserialize, Serialize};

/// A run handed to placement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// The run.
    pub run: FlowRunId,
    /// Its flow.
    pub flow: String,
    /// When it is due.
    pub due: Timestamp,
    /// Its work queue (None: the default queue).
    pub queue: Option<String>,
    /// Its deployment and that deployment's limit, if any.
    pub deployment: Option<(DeploymentId, Option<(u32, CollisionStrategy)>)>,
    /// The run as it was when placed, when it was at hand: handed to the node that takes it,
    /// which then claims it without reading it first (a claim of a run changed since is
    /// refused, and the node reads it then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known: Option<Box<crate::flow_run::FlowRun>>,
}

impl Placement {
    /// A run of no queue and no deployment.
    pub fn plain(run: FlowRunId, flow: String, due: Timestamp) -> Self {
        Placement {
            run,
            flow,
            due,
            queue: None,
            deployment: None,
            known: None,
        }
    }

    /// The placement, with the run as it is now.
    pub fn knowing(mut self, run: Box<crate::flow_run::FlowRun>) -> Self {
        self.known = Some(run);
        self
    }

    fn queue(&self) -> &str {
        self.queue.as_deref().unwrap_or(DEFAULT_QUEUE)
    }
}

/// What the control actor is to do with a run.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start it on this node (true: it was marked Late already).
    Place(Placement, NodeId, bool),
    /// Its deployment is at its limit: it waits (Scheduled named AwaitingConcurrencySlot).
    Await(FlowRunId),
    /// Its deployment is at its limit and cancels new runs.
    Cancel(FlowRunId),
}

/// Where a run is, as dispatch knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whereabouts<'a> {
    /// Due, and waiting to be placed.
    Waiting,
    /// Placed, on this node if known (a run read back after a restart may have none).
    Placed(Option<&'a NodeId>),
    /// Cancelled by its deployment's limit (cancel-new), not ended yet.
    Dropped,
    /// Not placed by dispatch (a subflow, run by its parent's node).
    Unknown,
}

struct Entry {
    p: Placement,
    late: bool,
}

#[derive(Clone)]
struct Active {
    queue: String,
    deployment: Option<DeploymentId>,
    node: Option<NodeId>,
}

/// Where a waiting run is.
#[derive(Clone)]
enum Spot {
    Ready(String),
    Blocked(DeploymentId),
}

type Line = BTreeMap<(Timestamp, FlowRunId), Entry>;

/// The runs waiting and running, by queue and deployment (ordered maps: the same inputs give
/// the same decisions in the same order, which a seeded simulation replays).
#[derive(Default)]
pub struct Dispatch {
    queues: BTreeMap<String, WorkQueue>,
    ready: BTreeMap<String, Line>,
    blocked: BTreeMap<DeploymentId, Line>,
    spots: BTreeMap<FlowRunId, (Spot, Timestamp)>,
    active: BTreeMap<FlowRunId, Active>,
    per_queue: BTreeMap<String, u32>,
    per_deployment: BTreeMap<DeploymentId, u32>,
    /// Runs cancelled by their deployment's limit (cancel-new), until they end.
    dropped: std::collections::BTreeSet<FlowRunId>,
    /// Runs waiting for the scheduler to hand them out (read back after a start): not placed
    /// yet, so a claim of one is a stale start from before the start.
    held: std::collections::BTreeSet<FlowRunId>,
    /// The last limit seen per deployment.
    limits: BTreeMap<DeploymentId, (u32, CollisionStrategy)>,
}

/// Figures of one queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueLoad {
    /// Runs due and not started.
    pub waiting: u32,
    /// Runs handed out and not ended.
    pub active: u32,
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatch")
            .field("waiting", &self.spots.len())
            .field("active", &self.active.len())
            .finish_non_exhaustive()
    }
}

impl Dispatch {
    /// Replaces the known work queues.
    pub fn set_queues(&mut self, queues: impl IntoIterator<Item = WorkQueue>) {
        self.queues = queues.into_iter().map(|q| (q.name.clone(), q)).collect();
    }

    /// A queue put.
    pub fn put_queue(&mut self, q: WorkQueue) {
        self.queues.insert(q.name.clone(), q);
    }

    /// A queue deleted (its runs go on as in a queue with default settings).
    pub fn delete_queue(&mut self, name: &str) {
        self.queues.remove(name);
    }

    /// How many runs wait.
    pub fn waiting(&self) -> usize {
        self.spots.len()
    }

    /// A queue's figures.
    pub fn load(&self, queue: &str) -> QueueLoad {
        QueueLoad {
            waiting: self.ready.get(queue).map_or(0, |l| l.len() as u32),
            active: self.per_queue.get(queue).copied().unwrap_or(0),
        }
    }

    /// Every queue's figures (queues with runs waiting or running).
    pub fn loads(&self) -> HashMap<String, QueueLoad> {
        let mut out: HashMap<String, QueueLoad> = HashMap::new();
        for (q, l) in &self.ready {
            out.entry(q.clone()).or_default().waiting = l.len() as u32;
        }
        for (q, n) in &self.per_queue {
            out.entry(q.clone()).or_default().active = *n;
        }
        out
    }

    /// A run that was running before (read back after a restart): it counts against its
    /// queue's and deployment's limits until it ends.
    pub fn restore(
        &mut self,
        run: FlowRunId,
        queue: Option<&str>,
        deployment: Option<DeploymentId>,
        node: Option<NodeId>,
    ) {
        if self.active.contains_key(&run) {
            return;
        }
        let queue = queue.unwrap_or(DEFAULT_QUEUE).to_owned();
        *self.per_queue.entry(queue.clone()).or_default() += 1;
        if let Some(d) = deployment {
            *self.per_deployment.entry(d).or_default() += 1;
        }
        self.active.insert(
            run,
            Active {
                queue,
                deployment,
                node,
            },
        );
    }

    /// A run came due. A run already waiting or running is not added twice.
    pub fn add(&mut self, p: Placement) -> Option<Action> {
        self.held.remove(&p.run);
        if self.spots.contains_key(&p.run)
            || self.active.contains_key(&p.run)
            || self.dropped.contains(&p.run)
        {
            return None;
        }
        if let Some((d, Some(limit))) = p.deployment {
            self.limits.insert(d, limit);
        }
        let key = (p.due, p.run);
        let queue = p.queue().to_owned();
        self.spots.insert(p.run, (Spot::Ready(queue.clone()), p.due));
        self.ready
            .entry(queue)
            .or_default()
            .insert(key, Entry { p, late: false });
        None
    }

    /// Hands out what can go now. `place(flow, queue)` finds a node with room that serves the
    /// queue and runs the flow (and counts the run against it), or None.
    pub fn dispatch(&mut self, mut place: impl FnMut(&str, &str) -> Option<NodeId>) -> Vec<Action> {
        let mut out = Vec::new();
        let mut order: Vec<(u32, String)> = self
            .ready
            .iter()
            .filter(|(_, l)| !l.is_empty())
            .map(|(name, _)| (self.queues.get(name).map_or(1, |q| q.priority), name.clone()))
            .collect();
        order.sort();
        for (_, name) in order {
            let (paused, limit) = self
                .queues
                .get(&name)
                .map_or((false, None), |q| (q.paused, q.concurrency_limit));
            if paused {
                continue;
            }
            // Flows no node could take in this pass: the runs behind are tried, these skipped.
            let mut full: Vec<String> = Vec::new();
            let keys: Vec<(Timestamp, FlowRunId)> = match self.ready.get(&name) {
                Some(l) => l.keys().copied().collect(),
                None => continue,
            };
            for key in keys {
                let running = self.per_queue.get(&name).copied().unwrap_or(0);
                if limit.is_some_and(|l| running >= l) {
                    break;
                }
                let Some(line) = self.ready.get_mut(&name) else {
                    break;
                };
                let Some(entry) = line.get(&key) else { continue };
                if full.contains(&entry.p.flow) {
                    continue;
                }
                // The deployment's own limit: at it, the run leaves the queue.
                if let Some((d, _)) = entry.p.deployment
                    && let Some(&(max, collision)) = self.limits.get(&d)
                    && self.per_deployment.get(&d).copied().unwrap_or(0) >= max
                {
                    let Some(entry) = line.remove(&key) else { continue };
                    let run = entry.p.run;
                    match collision {
                        CollisionStrategy::Enqueue => {
                            self.spots.insert(run, (Spot::Blocked(d), key.0));
                            self.blocked.entry(d).or_default().insert(key, entry);
                            out.push(Action::Await(run));
                        }
                        CollisionStrategy::CancelNew => {
                            self.spots.remove(&run);
                            self.dropped.insert(run);
                            out.push(Action::Cancel(run));
                        }
                    }
                    continue;
                }
                let Some(node) = place(&entry.p.flow, &name) else {
                    full.push(entry.p.flow.clone());
                    continue;
                };
                let Some(entry) = line.remove(&key) else { continue };
                self.spots.remove(&entry.p.run);
                let deployment = entry.p.deployment.map(|(d, _)| d);
                *self.per_queue.entry(name.clone()).or_default() += 1;
                if let Some(d) = deployment {
                    *self.per_deployment.entry(d).or_default() += 1;
                }
                self.active.insert(
                    entry.p.run,
                    Active {
                        queue: name.clone(),
                        deployment,
                        node: Some(node.clone()),
                    },
                );
                out.push(Action::Place(entry.p, node, entry.late));
            }
        }
        out
    }

    /// A run ended (or was cancelled before it started): its slots free, and the oldest run its
    /// deployment held back goes back to its queue. Returns the node it ran on.
    pub fn ended(&mut self, run: FlowRunId) -> Option<NodeId> {
        self.dropped.remove(&run);
        self.held.remove(&run);
        if let Some((spot, due)) = self.spots.remove(&run) {
            match spot {
                Spot::Ready(q) => {
                    if let Some(l) = self.ready.get_mut(&q) {
                        l.remove(&(due, run));
                    }
                }
                Spot::Blocked(d) => {
                    if let Some(l) = self.blocked.get_mut(&d) {
                        l.remove(&(due, run));
                    }
                }
            }
            return None;
        }
        let a = self.active.remove(&run)?;
        if let Some(n) = self.per_queue.get_mut(&a.queue) {
            *n = n.saturating_sub(1);
        }
        if let Some(d) = a.deployment {
            if let Some(n) = self.per_deployment.get_mut(&d) {
                *n = n.saturating_sub(1);
            }
            if let Some(line) = self.blocked.get_mut(&d)
                && let Some((key, entry)) = line.pop_first()
            {
                let queue = entry.p.queue().to_owned();
                self.spots
                    .insert(entry.p.run, (Spot::Ready(queue.clone()), key.0));
                self.ready.entry(queue).or_default().insert(key, entry);
            }
        }
        a.node
    }

    /// Runs waiting in a queue (not held back by their deployment) whose time passed more than
    /// `after` ago, each returned once: they are to be marked Late.
    pub fn late(&mut self, now: Timestamp, after: std::time::Duration) -> Vec<FlowRunId> {
        let mut out = Vec::new();
        for line in self.ready.values_mut() {
            for ((due, run), e) in line.iter_mut() {
                // In time order: the rest are not late yet.
                if now.saturating_since(*due) <= after {
                    break;
                }
                if !e.late {
                    e.late = true;
                    out.push(*run);
                }
            }
        }
        out
    }

    /// Where a run is: waiting to be placed, placed (on a node, if known), or not here.
    pub fn whereabouts(&self, run: &FlowRunId) -> Whereabouts<'_> {
        if self.spots.contains_key(run) || self.held.contains(run) {
            Whereabouts::Waiting
        } else if self.dropped.contains(run) {
            Whereabouts::Dropped
        } else if let Some(a) = self.active.get(run) {
            Whereabouts::Placed(a.node.as_ref())
        } else {
            Whereabouts::Unknown
        }
    }

    /// Runs that wait for their hand-out (by the scheduler): until it comes, they are waiting.
    pub fn hold(&mut self, runs: impl IntoIterator<Item = FlowRunId>) {
        for run in runs {
            if !self.spots.contains_key(&run) && !self.active.contains_key(&run) {
                self.held.insert(run);
            }
        }
    }

    /// Whether a run waits for its hand-out by the scheduler.
    pub fn is_held(&self, run: &FlowRunId) -> bool {
        self.held.contains(run)
    }

    /// Forgets what runs: a resync follows with [`Dispatch::restore`].
    pub fn clear_active(&mut self) {
        self.active.clear();
        self.per_queue.clear();
        self.per_deployment.clear();
    }
}

#[cfg(test)]
mod tests;
