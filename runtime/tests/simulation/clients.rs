//! The clients of the control machine simulation: a user asking for runs through a lossy link
//! (each request sent again, the same, until it is answered; now and then the command run again
//! under the same `--idempotency-key`), a scheduler firing a deployment's schedule, and a
//! restarted node's previous life whose late proposals carry no epoch — with what each must
//! see: one request, one key, one fire time: one run; nothing answered lost; no node's proposal
//! accepted for a run it does not hold under the run's epoch.

use super::*;

const SCHEDULE_EVERY: Duration = Duration::from_millis(500);
/// The scheduled deployment's key (no limit).
const SCHEDULED: &str = "every-500ms";

/// A user's requests and what they were answered.
#[derive(Debug, Default)]
pub struct Client {
    /// Requests not answered yet, by their run id: when last sent, and the request.
    asked: BTreeMap<FlowRunId, (Timestamp, NewFlowRun)>,
    /// The run each request (by its run id) was answered with.
    answered: BTreeMap<FlowRunId, FlowRunId>,
    /// The user's keys, and the runs their requests were answered with.
    keys: BTreeMap<String, BTreeSet<FlowRunId>>,
}

/// The scheduler's memory: the next fire time (the `k`th of the schedule). A control restart
/// loses it: the scheduler reads back an older mark and fires again what it fired last.
#[derive(Debug)]
pub struct Scheduler {
    next: u32,
    firings: u64,
}

impl Scheduler {
    pub fn new() -> Self {
        Scheduler { next: 0, firings: 0 }
    }

    /// The control node restarted: `back` fire times are fired again.
    pub fn restarted(&mut self, back: u32) {
        self.next = self.next.saturating_sub(back);
    }
}

impl Sim {
    /// A user asks for a run in a random queue, maybe of a limited deployment, maybe under an
    /// idempotency key of its own.
    pub(super) fn make_run(&mut self) {
        self.made += 1;
        let id = FlowRunId::from_uuid(derived_id(&format!("run/{}", self.made)));
        let queue = QUEUES[self.rng.below(3) as usize].0;
        let d = match self.rng.below(4) {
            0 => Some(DEPLOYMENTS[0]),
            1 => Some(DEPLOYMENTS[1]),
            _ => None,
        };
        let key = self.rng.chance(200).then(|| format!("key-{}", self.made));
        let new = NewFlowRun {
            resume: self.rng.chance(500),
            work_queue: Some(queue.into()),
            deployment_id: d.map(|(key, ..)| deployment(key)),
            scheduled_time: Some(self.now),
            idempotency_key: key.clone(),
            ..NewFlowRun::new(id, "f", serde_json::Value::Null)
        };
        self.note(format!(
            "asks for {} in {queue}, deployment {:?}, key {key:?}",
            short(id),
            d.map(|d| d.0)
        ));
        if let Some(key) = key {
            self.client.keys.entry(key).or_default();
        }
        self.ask(new);
    }

    fn ask(&mut self, new: NewFlowRun) {
        self.client.asked.insert(new.id, (self.now, new.clone()));
        self.send_faulty(Msg::Create(Box::new(new)));
    }

    /// What the clients do at `now`: requests not answered are sent again; now and then a user
    /// runs a command again under a key it used (a new request, the same key); the schedule
    /// fires.
    pub(super) fn clients_act(&mut self) {
        let now = self.now;
        let again: Vec<NewFlowRun> = self
            .client
            .asked
            .values()
            .filter(|(at, _)| now.saturating_since(*at) >= RESEND_AFTER)
            .map(|(_, new)| new.clone())
            .collect();
        for new in again {
            self.ask(new);
        }
        if !self.faults() {
            return;
        }
        if self.rng.chance(20) && !self.client.keys.is_empty() {
            let i = self.rng.below(self.client.keys.len() as u64) as usize;
            let key = self.client.keys.keys().nth(i).cloned();
            self.made += 1;
            let id = FlowRunId::from_uuid(derived_id(&format!("run/{}", self.made)));
            self.note(format!("runs its command again under {key:?}: {}", short(id)));
            self.ask(NewFlowRun {
                work_queue: Some("default".into()),
                scheduled_time: Some(now),
                idempotency_key: key,
                ..NewFlowRun::new(id, "f", serde_json::Value::Null)
            });
        }
        while self.start + SCHEDULE_EVERY * self.scheduler.next <= now {
            self.fire();
        }
    }

    /// The scheduler fires its next fire time: a run keyed by the deployment and the time.
    fn fire(&mut self) {
        let k = self.scheduler.next;
        self.scheduler.next += 1;
        self.scheduler.firings += 1;
        let at = self.start + SCHEDULE_EVERY * k;
        let id = FlowRunId::from_uuid(derived_id(&format!("fired/{}", self.scheduler.firings)));
        let new = NewFlowRun {
            resume: true,
            work_queue: Some("default".into()),
            deployment_id: Some(deployment(SCHEDULED)),
            scheduled_time: Some(at),
            idempotency_key: Some(format!("scheduled/{SCHEDULED}/{}", at.as_micros())),
            ..NewFlowRun::new(id, "f", serde_json::Value::Null)
        };
        if let Ok(Reply::FlowRunCreated { run, created: true }) = self.log(Command::CreateFlowRun(new)) {
            self.note(format!("schedule fires {k}: {}", short(run.id)));
            if let Some(p) = self.waiting_placement(run.id) {
                self.drive(Input::Due(p));
            }
        }
    }

    /// The control node gets a request for a run: it makes it (once: by its run id, or its
    /// key) and answers with the run.
    pub(super) fn control_creates(&mut self, new: NewFlowRun) {
        let asked = new.id;
        match self.log(Command::CreateFlowRun(new)) {
            Ok(Reply::FlowRunCreated { run, created }) => {
                if created {
                    self.note(format!("made {}", short(run.id)));
                    if let Some(p) = self.waiting_placement(run.id) {
                        self.drive(Input::Due(p));
                    }
                }
                self.send_faulty(Msg::Created(asked, run.id));
            }
            other => self.broken(format!("the request for {} answered {other:?}", short(asked))),
        }
    }

    /// The user is answered: the run made for its request.
    pub(super) fn client_told(&mut self, asked: FlowRunId, run: FlowRunId) {
        let key = self
            .client
            .asked
            .remove(&asked)
            .and_then(|(_, new)| new.idempotency_key);
        if let Some(first) = self.client.answered.insert(asked, run)
            && first != run
        {
            self.broken(format!(
                "the request for {} answered with {} and then {}",
                short(asked),
                short(first),
                short(run)
            ));
        }
        if let Some(key) = key {
            let runs = self.client.keys.entry(key.clone()).or_default();
            runs.insert(run);
            if runs.len() > 1 {
                let runs: Vec<String> = runs.iter().map(|r| short(*r)).collect();
                self.broken(format!("the key {key} answered with runs {runs:?}"));
            }
        }
    }

    /// A restarted node's previous life still had proposals in flight for the runs it held:
    /// Crashed, without an epoch (as a worker once sent them).
    pub(super) fn late_proposals(&mut self, i: usize) {
        let node = self.nodes[i].name.clone();
        for (run, epoch) in std::mem::take(&mut self.nodes[i].lost) {
            if !self.rng.chance(500) {
                continue;
            }
            let mut late = self.proposal(run, epoch, &node, StateName::Crashed, self.now);
            if let Command::ProposeFlowRunState { proposal, .. } = &mut late {
                proposal.epoch = None;
            }
            self.send_faulty(Msg::Late(node.clone(), epoch, late));
        }
    }

    /// A late proposal arrives: accepted only if the run is still where that life left it.
    pub(super) fn late_arrives(&mut self, node: NodeId, held: flotilla_runtime::Epoch, late: Command) {
        let Command::ProposeFlowRunState { run, .. } = &late else {
            return;
        };
        let run = *run;
        let before = self.state.hot().flow_run(&run).map(|r| r.epoch);
        let reply = self.log(late);
        if accepted(&reply) && before != Some(held) {
            self.broken(format!(
                "{node}'s previous life, which held {} under {held}, changed it under epoch {before:?}",
                short(run)
            ));
        }
    }

    fn broken(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }

    /// A run made under a key (the user's, or a fire time's): the first under its key.
    pub(super) fn made_under_key(&mut self, run: &flotilla_runtime::FlowRun) {
        if let Some(key) = &run.idempotency_key
            && let Some(first) = self.keyed.insert(key.clone(), run.id)
        {
            self.broken(format!(
                "two runs under the key {key}: {} and {}",
                short(first),
                short(run.id)
            ));
        }
    }

    /// What broke while a command was logged or a message handled.
    pub(super) fn check_clients(&self) -> Result<(), String> {
        self.violation.clone().map_or(Ok(()), Err)
    }

    /// Once quiet: every request answered, and every run answered is there (the runs are never
    /// pruned here).
    pub(super) fn clients_settled(&self) -> Result<(), String> {
        if let Some(run) = self.client.asked.keys().next() {
            return Err(format!("the request for {} was never answered", short(*run)));
        }
        let hot = self.state.hot();
        match self.client.answered.values().find(|r| hot.flow_run(r).is_none()) {
            Some(lost) => Err(format!("{} was answered and is lost", short(*lost))),
            None => Ok(()),
        }
    }

    /// What the run came to: the log's length and every run's state and epoch.
    pub fn digest(&self) -> String {
        let mut runs: Vec<String> = self
            .state
            .hot()
            .flow_runs()
            .map(|r| format!("{} {} {}", r.id, r.lifecycle.state.name, r.epoch))
            .collect();
        runs.sort();
        format!("{} commands, {} runs: {runs:?}", self.index, runs.len())
    }
}
