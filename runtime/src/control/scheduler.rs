//! The scheduler's decisions, as a pure machine its actor drives: which runs each active
//! deployment's schedules make (created ahead of time, Scheduled at their fire time), and when
//! each is handed to placement — at its time, on a wake-up set for the earliest, no polling.
//!
//! ```text
//! Scheduler::handle(&mut self, now, Input) -> Vec<Effect>
//! Input  = Loaded { deployment, runs } | Started | Changed { id, deployment }
//!        | Created { deployment, generation, runs } | Wake
//! Effect = Create { deployment, generation, runs } | Append(Command) | HandOut(Placement)
//!        | WakeAt(Timestamp)
//! ```
//!
//! Runs are made with the idempotency key `sched/{deployment}/{schedule}/{version}/{fire time}`
//! (the version is the deployment's last change) and a run id derived from it, so a restart,
//! a lost answer or a second scheduler never makes a fire time's run twice. On start it is
//! given each deployment's runs as the store has them: those not started are handed out when
//! due (at once if their time passed — the control machine marks them Late if no node takes
//! them), creation goes on after the last fire time made, fire times that fell while it was
//! down are skipped unless the schedule has `catchup`, and runs made for an older version of
//! the deployment are cancelled. Changing, pausing or deleting a deployment cancels its runs
//! that have not started and schedules afresh. Nothing here reads a clock: `now` is an argument.

use std::collections::BTreeMap;
use std::time::Duration;

use super::dispatch::Placement;
use super::ids::derived_id;
use crate::command::{Command, NewFlowRun};
use crate::deployment::{Compiled, Deployment};
use crate::ids::{DeploymentId, FlowRunId, TransitionId, uuid_v7_from};
use crate::rules::Proposal;
use crate::state::{State, StateName};
use crate::time::Timestamp;

#[cfg(test)]
mod tests;

/// How far ahead runs are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ahead {
    /// At least this many runs ahead per deployment...
    pub runs: usize,
    /// ...and at least this far ahead...
    pub time: Duration,
    /// ...but never more than this many.
    pub max: usize,
}

impl Default for Ahead {
    fn default() -> Self {
        Ahead {
            runs: 3,
            time: Duration::from_secs(3600),
            max: 100,
        }
    }
}

/// A deployment's run as the store has it.
#[derive(Clone, Debug, PartialEq)]
pub struct KnownRun {
    /// The run.
    pub id: FlowRunId,
    /// Its flow.
    pub flow: String,
    /// Its work queue.
    pub queue: Option<String>,
    /// Its idempotency key (the scheduler's runs carry theirs).
    pub key: Option<String>,
    /// When it is due.
    pub due: Timestamp,
    /// Whether it waits to be handed out (Scheduled, claimed by nobody).
    pub waiting: bool,
}

/// What the scheduler is told.
#[derive(Clone, Debug)]
pub enum Input {
    /// A deployment read back at the start, with its runs.
    Loaded {
        /// The deployment.
        deployment: Deployment,
        /// Its runs.
        runs: Vec<KnownRun>,
    },
    /// Every deployment is loaded: runs are made from now on.
    Started,
    /// A deployment as it is now, after a change (None: deleted).
    Changed {
        /// Which.
        id: DeploymentId,
        /// As it is now.
        deployment: Option<Deployment>,
    },
    /// Runs of a [`Effect::Create`] made: (fire time, run) of those that wait to be handed out.
    Created {
        /// Whose.
        deployment: DeploymentId,
        /// The generation the `Create` carried (an answer for a deployment since changed is
        /// ignored).
        generation: u64,
        /// (fire time, run).
        runs: Vec<(Timestamp, FlowRunId)>,
    },
    /// The wake-up set by [`Effect::WakeAt`] came.
    Wake,
}

/// What the scheduler wants done.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Make these runs (each with the flow's options applied), then answer with
    /// [`Input::Created`].
    Create {
        /// Whose.
        deployment: DeploymentId,
        /// To give back in [`Input::Created`].
        generation: u64,
        /// (fire time, the run to make).
        runs: Vec<(Timestamp, NewFlowRun)>,
    },
    /// Append a command (a run of an older version of its deployment cancelled).
    Append(Box<Command>),
    /// Hand a due run to placement.
    HandOut(Placement),
    /// Feed [`Input::Wake`] at this time.
    WakeAt(Timestamp),
}

/// The scheduler's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Deployments known.
    pub deployments: u64,
    /// Runs asked to be made.
    pub created: u64,
    /// Runs handed to placement.
    pub handed_out: u64,
}

#[derive(Debug)]
struct Dep {
    d: Deployment,
    compiled: Vec<Option<Compiled>>,
    /// The last fire time a run was made for, per schedule.
    last: Vec<Option<Timestamp>>,
    /// Runs made and not handed out yet.
    ahead: usize,
    /// The latest fire time made.
    horizon: Option<Timestamp>,
    /// How many runs a `Create` not answered yet asked for (0: none is out).
    refilling: usize,
    generation: u64,
}

impl Dep {
    fn new(d: Deployment, generation: u64) -> Dep {
        let compiled: Vec<Option<Compiled>> = d
            .schedules
            .iter()
            .map(|s| s.active.then(|| s.kind.compile().ok()).flatten())
            .collect();
        let n = compiled.len();
        Dep {
            d,
            compiled,
            last: vec![None; n],
            ahead: 0,
            horizon: None,
            refilling: 0,
            generation,
        }
    }
}

/// A run waiting to be handed out.
#[derive(Debug)]
struct Due {
    deployment: DeploymentId,
    flow: String,
    queue: Option<String>,
    /// Made by a schedule (counted ahead, cancelled when the deployment changes), not ad hoc.
    scheduled: bool,
}

/// The scheduler (see the module docs).
#[derive(Debug, Default)]
pub struct Scheduler {
    ahead: Ahead,
    deps: BTreeMap<DeploymentId, Dep>,
    due: BTreeMap<(Timestamp, FlowRunId), Due>,
    armed: Option<Timestamp>,
    started: bool,
    counts: Counts,
}

/// The idempotency key of a deployment's run for a fire time of one of its schedules.
pub fn run_key(d: &Deployment, schedule: usize, t: Timestamp) -> String {
    format!(
        "sched/{}/{schedule}/{}/{}",
        d.id,
        d.updated.as_micros(),
        t.as_micros()
    )
}

/// The schedule index, deployment version and fire time of a scheduler-made run's key.
fn parse_key(k: &str) -> Option<(usize, Timestamp, Timestamp)> {
    let mut parts = k.strip_prefix("sched/")?.split('/');
    let _dep = parts.next()?;
    let i = parts.next()?.parse().ok()?;
    let version = parts.next()?.parse().ok()?;
    let t = parts.next()?.parse().ok()?;
    Some((i, Timestamp::from_micros(version), Timestamp::from_micros(t)))
}

impl Scheduler {
    /// A scheduler that knows no deployment yet: give it each one ([`Input::Loaded`]), then
    /// [`Input::Started`].
    pub fn new(ahead: Ahead) -> Self {
        Scheduler {
            ahead,
            ..Scheduler::default()
        }
    }

    /// Its figures.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// How many runs wait to be handed out.
    pub fn waiting(&self) -> usize {
        self.due.len()
    }

    /// Handles one input at `now`; returns what to do, in order.
    pub fn handle(&mut self, now: Timestamp, input: Input) -> Vec<Effect> {
        let mut out = Vec::new();
        match input {
            Input::Loaded { deployment, runs } => self.load(now, deployment, runs, &mut out),
            Input::Started => {
                self.started = true;
                let ids: Vec<DeploymentId> = self.deps.keys().copied().collect();
                for id in ids {
                    self.refill(now, id, &mut out);
                }
                self.wake(now, &mut out);
            }
            Input::Changed { id, deployment } => self.changed(now, id, deployment, &mut out),
            Input::Created {
                deployment,
                generation,
                runs,
            } => {
                match self.deps.get_mut(&deployment) {
                    Some(dep) if dep.generation == generation => {
                        // Runs asked for that do not wait (not made, or taken already) are
                        // not ahead any more.
                        let asked = std::mem::take(&mut dep.refilling);
                        dep.ahead = dep.ahead.saturating_sub(asked.saturating_sub(runs.len()));
                        for (t, run) in runs {
                            let due = Due {
                                deployment,
                                flow: dep.d.flow_name.clone(),
                                queue: dep.d.work_queue.clone(),
                                scheduled: true,
                            };
                            self.due.insert((t, run), due);
                        }
                        // Due ones already (a slow store) go at once.
                        self.wake(now, &mut out);
                    }
                    // Made for the deployment as it was before a change, or since deleted:
                    // cancelled like the others it made then.
                    _ => {
                        for (_, run) in runs {
                            out.push(cancelled(now, run, &format!("generation-{generation}")));
                        }
                    }
                }
            }
            Input::Wake => {
                self.armed = None;
                self.wake(now, &mut out);
            }
        }
        out
    }

    /// A deployment's runs read back: those not started wait to be handed out, the last fire
    /// time per schedule is where making goes on, runs of an older version are cancelled.
    fn load(&mut self, now: Timestamp, d: Deployment, runs: Vec<KnownRun>, out: &mut Vec<Effect>) {
        let id = d.id;
        let mut dep = Dep::new(d, 0);
        let mut stale = Vec::new();
        for run in runs {
            let Some((i, version, t)) = run.key.as_deref().and_then(parse_key) else {
                // An ad-hoc run of the deployment not started yet: handed out as well.
                if run.waiting {
                    let due = Due {
                        deployment: id,
                        flow: run.flow,
                        queue: run.queue,
                        scheduled: false,
                    };
                    self.due.insert((run.due, run.id), due);
                }
                continue;
            };
            if version != dep.d.updated {
                // Made before the deployment's last change and left behind by a crash.
                if run.waiting {
                    stale.push(run.id);
                }
                continue;
            }
            if let Some(l) = dep.last.get_mut(i) {
                *l = Some(l.map_or(t, |x| x.max(t)));
            }
            if run.waiting {
                dep.ahead += 1;
                dep.horizon = Some(dep.horizon.map_or(t, |h| h.max(t)));
                let due = Due {
                    deployment: id,
                    flow: run.flow,
                    queue: run.queue,
                    scheduled: true,
                };
                self.due.insert((t, run.id), due);
            }
        }
        cancel(now, &dep.d, stale, out);
        // Fire times missed while down: skipped, unless the schedule catches up.
        for (i, s) in dep.d.schedules.iter().enumerate() {
            if !s.catchup
                && let Some(l) = dep.last[i]
                && l < now
            {
                dep.last[i] = Some(now);
            }
        }
        if self.deps.insert(id, dep).is_none() {
            self.counts.deployments += 1;
        }
        if self.started {
            self.refill(now, id, out);
            self.wake(now, out);
        }
    }

    /// Makes a deployment's next runs until it is covered far enough ahead.
    fn refill(&mut self, now: Timestamp, id: DeploymentId, out: &mut Vec<Effect>) {
        let ahead = self.ahead;
        let Some(dep) = self.deps.get_mut(&id) else { return };
        if dep.d.paused || dep.refilling > 0 || !self.started {
            return;
        }
        let covered = |n: usize, horizon: Option<Timestamp>| {
            n >= ahead.max || (n >= ahead.runs && horizon.is_some_and(|h| h >= now + ahead.time))
        };
        // The next fire times of every schedule, merged in time order, as far as needed.
        let mut cursors: Vec<(usize, Option<Timestamp>)> = dep
            .compiled
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c.next_after(dep.last[i].unwrap_or(now)))))
            .collect();
        let mut make = Vec::new();
        let (mut n, mut horizon) = (dep.ahead, dep.horizon);
        while !covered(n, horizon) {
            let Some((slot, t)) = cursors
                .iter()
                .enumerate()
                .filter_map(|(slot, (_, t))| t.map(|t| (slot, t)))
                .min_by_key(|(_, t)| *t)
            else {
                break;
            };
            let i = cursors[slot].0;
            n += 1;
            horizon = Some(horizon.map_or(t, |h| h.max(t)));
            dep.last[i] = Some(t);
            let key = run_key(&dep.d, i, t);
            let derived = derived_id(&key).into_bytes();
            let mut random = [0u8; 10];
            random.copy_from_slice(&derived[..10]);
            // Time-ordered (by fire time) like every run id, and the same for the same key.
            let run = FlowRunId::from_uuid(uuid_v7_from(t, random));
            let new = NewFlowRun::of_deployment(run, &dep.d, &dep.d.schedules[i].parameters)
                .with_key(Some(key))
                .due_at(t);
            make.push((t, new));
            cursors[slot].1 = dep.compiled[i].as_ref().and_then(|c| c.next_after(t));
        }
        if make.is_empty() {
            return;
        }
        dep.ahead = n;
        dep.horizon = horizon;
        dep.refilling = make.len();
        self.counts.created += make.len() as u64;
        out.push(Effect::Create {
            deployment: id,
            generation: dep.generation,
            runs: make,
        });
    }

    /// Hands out every run that is due, makes more where that left too few, and sets the next
    /// wake-up.
    fn wake(&mut self, now: Timestamp, out: &mut Vec<Effect>) {
        let mut touched = Vec::new();
        while let Some(entry) = self.due.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((at, run), due) = entry.remove_entry();
            let d = self.deps.get(&due.deployment).map(|d| &d.d);
            out.push(Effect::HandOut(Placement {
                run,
                flow: due.flow,
                due: at,
                queue: due.queue,
                deployment: Some((
                    due.deployment,
                    d.and_then(|d| d.concurrency_limit.map(|l| (l, d.collision))),
                )),
                known: None,
            }));
            self.counts.handed_out += 1;
            if due.scheduled
                && let Some(d) = self.deps.get_mut(&due.deployment)
            {
                d.ahead = d.ahead.saturating_sub(1);
                touched.push(due.deployment);
            }
        }
        touched.dedup();
        for dep in touched {
            self.refill(now, dep, out);
        }
        // A wake-up at the earliest due run, unless one is set no later.
        if let Some(&(first, _)) = self.due.keys().next()
            && self.armed.is_none_or(|a| a > first)
        {
            self.armed = Some(first);
            out.push(Effect::WakeAt(first));
        }
    }

    /// A deployment changed: its runs that have not started are cancelled and it starts afresh.
    fn changed(
        &mut self,
        now: Timestamp,
        id: DeploymentId,
        fresh: Option<Deployment>,
        out: &mut Vec<Effect>,
    ) {
        if let (Some(old), Some(new)) = (self.deps.get(&id), &fresh)
            && old.d.spec() == new.spec()
        {
            return;
        }
        let generation = self.deps.get(&id).map_or(0, |d| d.generation + 1);
        let stale: Vec<FlowRunId> = self
            .due
            .iter()
            .filter(|(_, d)| d.deployment == id && d.scheduled)
            .map(|((_, run), _)| *run)
            .collect();
        self.due.retain(|_, d| !(d.deployment == id && d.scheduled));
        if self.deps.remove(&id).is_some() {
            self.counts.deployments -= 1;
        }
        if let Some(d) = fresh {
            cancel(now, &d, stale, out);
            self.deps.insert(id, Dep::new(d, generation));
            self.counts.deployments += 1;
            self.refill(now, id, out);
        } else {
            for run in stale {
                out.push(cancelled(now, run, "deleted"));
            }
        }
    }
}

/// Cancels runs made for `d` as it was before its last change.
fn cancel(now: Timestamp, d: &Deployment, runs: Vec<FlowRunId>, out: &mut Vec<Effect>) {
    let version = d.updated.as_micros().to_string();
    for run in runs {
        out.push(cancelled(now, run, &version));
    }
}

/// A run cancelled because its deployment changed (`why`: the new version, or `deleted`): the
/// transition id is derived from both, so cancelling it again is one change.
fn cancelled(now: Timestamp, run: FlowRunId, why: &str) -> Effect {
    let tid = TransitionId::from_uuid(derived_id(&format!("deployment-changed/{run}/{why}")));
    Effect::Append(Box::new(Command::ProposeFlowRunState {
        run,
        proposal: Proposal::new(
            State::named(StateName::Cancelling, now).with_message("its deployment changed"),
            tid,
        ),
    }))
}
