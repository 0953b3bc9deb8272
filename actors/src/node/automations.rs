//! The automations driver, on the control node (the leader of a replicated cluster): it feeds
//! the sans-IO [`Evaluator`] the event stream in log order and the clock's ticks, records each
//! firing as a command before it acts, and runs the firing's actions.
//!
//! Nothing is lost or done twice across a restart or a change of leader:
//! - the trigger state is a function of the event log: a new driver arms each automation where
//!   its record says (created, changed, resumed, last fired) and replays the events of the last
//!   window (the longest `within`, plus a minute) before it follows new ones;
//! - the evaluator is driven by the events' own times and ticks at the deadlines it names, so
//!   the replay decides the same firings, with the same keys, as the driver before it;
//! - a firing is recorded (`EditAutomation::Fired`) before any action runs, and the record keeps
//!   per bucket the mark of its last firing: a firing decided again is recognised and dropped;
//! - a firing recorded whose actions did not report is run again by the next driver (its
//!   actions are idempotent where they can be: a deployment's run is created under the
//!   firing's key).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use flotilla_cluster::secrets::SecretsKey;
use flotilla_runtime::automation::{AutomationEdit, AutomationSpec, Evaluator, Firing, FiringMark};
use flotilla_runtime::{Command, Event, EventId, EventPayload, Reply, Setting, Timestamp};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::persistence::{PAGE_MAX, PersistenceHandle};

mod actions;

/// The registered name of the driver.
pub const AUTOMATIONS_NAME: &str = "flotilla.automations";
/// A proactive trigger's deadline is acted on this long after it passes, so that an event that
/// happened before it and is still on its way is counted first.
const TICK_GRACE: Duration = Duration::from_millis(50);
/// Past the longest window, how much of the event log a new driver replays.
const REPLAY_MARGIN: Duration = Duration::from_secs(60);
/// The most it replays.
const REPLAY_MAX: Duration = Duration::from_secs(3600);

/// The driver.
#[derive(Debug, Clone, Copy, Default)]
pub struct Automations;

/// What it starts from.
#[derive(Debug)]
pub struct AutomationsArgs {
    /// The control state.
    pub persistence: PersistenceHandle,
    /// What opens webhook blocks' secrets.
    pub secrets: Arc<SecretsKey>,
    /// This node's control actor, which actions ask as a client would.
    pub control: ActorRef<crate::node::control::ControlMsg>,
}

/// Its messages.
#[derive(Debug)]
pub enum AutomationsMsg {
    /// An event, durable, in log order.
    Event(Arc<Event>),
    /// Events were missed: read them from the log.
    Lagged,
    /// A deadline may have passed.
    Tick,
}

// Local only: never sent to another node.
impl ractor::Message for AutomationsMsg {}

/// One automation as the driver holds it.
#[derive(Debug)]
struct Known {
    spec: AutomationSpec,
    /// Per bucket, the mark of the last firing recorded (or sent to be).
    fired: BTreeMap<String, FiringMark>,
}

/// Its state.
#[derive(Debug)]
pub struct AutomationsState {
    p: PersistenceHandle,
    secrets: Arc<SecretsKey>,
    control: ActorRef<crate::node::control::ControlMsg>,
    evaluator: Evaluator,
    known: HashMap<String, Known>,
    /// The last event fed to the evaluator.
    cursor: Option<EventId>,
    /// The earliest tick asked for.
    timer: Option<Timestamp>,
    forwarder: Option<tokio::task::JoinHandle<()>>,
}

fn now() -> Timestamp {
    Timestamp::from(chrono::Utc::now())
}

fn longest_window(spec: &AutomationSpec) -> Duration {
    fn of(t: &flotilla_runtime::automation::Trigger) -> Duration {
        use flotilla_runtime::automation::Trigger;
        match t {
            Trigger::Event(e) => e.within.0,
            Trigger::Compound { triggers, within, .. } | Trigger::Sequence { triggers, within } => {
                triggers.iter().map(of).max().unwrap_or_default().max(within.0)
            }
        }
    }
    of(&spec.trigger)
}

impl AutomationsState {
    /// Holds an automation, armed at `armed`.
    fn put(&mut self, spec: AutomationSpec, armed: Timestamp, fired: BTreeMap<String, FiringMark>) {
        self.evaluator.put(spec.clone(), armed);
        self.known.insert(spec.name.clone(), Known { spec, fired });
    }

    /// Feeds one event (once): the deadlines before it first, then the event.
    fn event(&mut self, e: &Event) {
        if self.cursor.is_some_and(|c| c >= e.id) {
            return;
        }
        self.cursor = Some(e.id);
        self.tick_until(e.occurred);
        if let Some(rest) = e.event.strip_prefix("flotilla.automation.") {
            self.changed(rest, e);
        }
        for f in self.evaluator.event(e, e.occurred) {
            self.fire(f, Some(e));
        }
    }

    /// An automation was created, changed, paused, resumed or deleted.
    fn changed(&mut self, what: &str, e: &Event) {
        let Some(name) = e.resource.name().map(str::to_owned) else {
            return;
        };
        match what {
            "created" | "updated" => {
                let EventPayload::Data(d) = &e.payload else { return };
                match serde_json::from_value::<AutomationSpec>(d.clone()) {
                    Ok(spec) => {
                        let fired = self.known.remove(&name).map(|k| k.fired).unwrap_or_default();
                        self.put(spec, e.occurred, fired);
                    }
                    Err(err) => {
                        tracing::error!(automation = %name, error = %err, "an automation's event does not hold it")
                    }
                }
            }
            "deleted" => {
                self.evaluator.remove(&name);
                self.known.remove(&name);
            }
            "paused" | "resumed" => {
                let paused = what == "paused";
                self.evaluator.set_paused(&name, paused, e.occurred);
                if let Some(k) = self.known.get_mut(&name) {
                    k.spec.paused = paused;
                }
            }
            _ => {}
        }
    }

    /// Fires every deadline up to `t`, each at its own time.
    fn tick_until(&mut self, t: Timestamp) {
        for _ in 0..100_000 {
            match self.evaluator.next_deadline() {
                Some(d) if d <= t => {
                    for f in self.evaluator.tick(d) {
                        self.fire(f, None);
                    }
                }
                _ => return,
            }
        }
    }

    /// Records a firing (unless it was), then runs its actions.
    fn fire(&mut self, f: Firing, event: Option<&Event>) {
        let Some(k) = self.known.get_mut(&f.automation) else {
            return;
        };
        let mark = f.mark();
        if k.fired.get(&f.bucket).is_some_and(|m| *m >= mark) {
            return;
        }
        if !k.fired.contains_key(&f.bucket)
            && k.fired.len() >= flotilla_runtime::automation::evaluator::BUCKETS_MAX
        {
            // As the record does: the bucket marked longest ago is forgotten.
            let oldest = k.fired.iter().min_by_key(|(_, m)| **m).map(|(b, _)| b.clone());
            if let Some(b) = oldest {
                k.fired.remove(&b);
            }
        }
        k.fired.insert(f.bucket.clone(), mark);
        let actions = k.spec.actions.clone();
        let recorded = self.p.enqueue(Command::EditAutomation {
            name: f.automation.clone(),
            edit: AutomationEdit::Fired(f.clone()),
            at: f.at,
        });
        let ctx = actions::Context {
            p: self.p.clone(),
            secrets: self.secrets.clone(),
            control: self.control.clone(),
        };
        let event = event.cloned();
        tokio::spawn(async move {
            match recorded.await {
                Ok(Ok(Ok(Reply::AutomationEdited { changed: true }))) => {
                    tracing::info!(automation = %f.automation, key = %f.key, "an automation fired");
                    actions::run(ctx, actions, f, event).await;
                }
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(refusal))) => {
                    tracing::warn!(automation = %f.automation, %refusal, "a firing was not recorded");
                }
                Ok(Err(e)) => {
                    tracing::error!(automation = %f.automation, error = %e, "a firing could not be recorded")
                }
                Err(_) => tracing::error!(automation = %f.automation, "a firing's record was dropped"),
            }
        });
    }

    /// Feeds the events of the log after the cursor (or from `from`), up to its end.
    async fn catch_up(&mut self, from: Option<EventId>) {
        let mut cursor = self.cursor.or(from);
        loop {
            let page = match self.p.events(cursor, PAGE_MAX).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(error = %e, "the automations cannot read the events");
                    return;
                }
            };
            let Some(last) = page.last().map(|e| e.id) else {
                return;
            };
            for e in &page {
                self.event(e);
            }
            cursor = Some(last);
        }
    }

    /// Asks for a tick when the next deadline passes.
    fn schedule(&mut self, myself: &ActorRef<AutomationsMsg>) {
        let Some(d) = self.evaluator.next_deadline() else {
            return;
        };
        if self.timer.is_some_and(|t| t <= d && t > now()) {
            return;
        }
        self.timer = Some(d);
        let wait = d.saturating_since(now()) + TICK_GRACE;
        myself.send_after(wait, || AutomationsMsg::Tick);
    }
}

impl Actor for Automations {
    type Msg = AutomationsMsg;
    type State = AutomationsState;
    type Arguments = AutomationsArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: AutomationsArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Subscribed before reading, so that nothing falls between the replay and the stream.
        let mut live = args.persistence.subscribe();
        let settings = args.persistence.settings().await?;
        let mut s = AutomationsState {
            p: args.persistence,
            secrets: args.secrets,
            control: args.control,
            evaluator: Evaluator::new(),
            known: HashMap::new(),
            cursor: None,
            timer: None,
            forwarder: None,
        };
        let records: Vec<_> = settings
            .into_iter()
            .filter_map(|x| match x {
                Setting::Automation(a) => Some(*a),
                _ => None,
            })
            .collect();
        let window = records
            .iter()
            .map(|a| longest_window(&a.spec))
            .max()
            .unwrap_or_default();
        let from = now() - (window + REPLAY_MARGIN).min(REPLAY_MAX);
        let mut pending = Vec::new();
        for a in records {
            let last_fired = a.recent.iter().map(|r| r.firing.at).max();
            let armed = a.armed.max(from).max(last_fired.unwrap_or(from));
            pending.extend(a.pending().cloned().map(|f| (a.spec.actions.clone(), f)));
            s.put(a.spec, armed, a.fired);
        }
        s.catch_up(Some(EventId::first_at(from))).await;
        // Firings recorded whose actions never reported.
        for (actions, f) in pending {
            let ctx = actions::Context {
                p: s.p.clone(),
                secrets: s.secrets.clone(),
                control: s.control.clone(),
            };
            tracing::info!(automation = %f.automation, key = %f.key, "running the actions of a firing left unfinished");
            tokio::spawn(actions::run(ctx, actions, f, None));
        }
        let me = myself.clone();
        s.forwarder = Some(tokio::spawn(async move {
            loop {
                let msg = match live.recv().await {
                    Ok(e) => AutomationsMsg::Event(e),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => AutomationsMsg::Lagged,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                if me.cast(msg).is_err() {
                    break;
                }
            }
        }));
        s.schedule(&myself);
        Ok(s)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AutomationsMsg::Event(e) => s.event(&e),
            AutomationsMsg::Lagged => {
                tracing::warn!("the automations missed events; reading them from the log");
                s.catch_up(None).await;
            }
            AutomationsMsg::Tick => {
                s.timer = None;
                s.tick_until(now() - TICK_GRACE);
            }
        }
        s.schedule(&myself);
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        s: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(f) = s.forwarder.take() {
            f.abort();
        }
        Ok(())
    }
}
