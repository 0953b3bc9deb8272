//! The automation evaluator: a sans-IO machine, events and clock ticks in, firings out. Each
//! event is matched against an index of the triggers (by event name: exact names in a map,
//! prefixes in an ordered map, other patterns in a short list), never against every automation
//! in turn. A firing carries a deterministic key (automation, bucket, window start), so that the
//! driver recording it can tell one firing from the same one decided again.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{AutomationSpec, EventTrigger, Posture, Require, RequireWord, Trigger};
use crate::event::Event;
use crate::event_filter::glob;
use crate::ids::EventId;
use crate::time::Timestamp;

/// The most buckets one trigger keeps (`for_each` splits counting by labels); past it, the
/// oldest bucket is forgotten.
pub const BUCKETS_MAX: usize = 10_000;
/// The most triggering event ids a firing names.
pub const FIRING_EVENTS_MAX: usize = 16;

/// A decision to run an automation's actions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Firing {
    /// The automation.
    pub automation: String,
    /// The bucket (the `for_each` labels' values, joined; empty without `for_each`).
    pub bucket: String,
    /// When the window that fired started.
    pub window_start: Timestamp,
    /// When it fired.
    pub at: Timestamp,
    /// The events that made it fire (the last ones, at most [`FIRING_EVENTS_MAX`]; none for a
    /// proactive trigger).
    pub events: Vec<EventId>,
    /// `automation/bucket/window start`: the same firing decided twice has the same key.
    pub key: String,
}

/// The counting of one event trigger for one bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Bucket {
    /// Matching events in the window, oldest first (at most `threshold` kept).
    times: VecDeque<(Timestamp, EventId)>,
    /// Proactive: counting starts here (armed).
    armed_at: Option<Timestamp>,
    /// Whether an `after` event was seen (always, without `after`).
    after_seen: bool,
}

/// The state of a trigger (mirrors its shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum TriggerState {
    Event(BTreeMap<String, Bucket>),
    /// Each inner trigger's last firing.
    Compound(Vec<TriggerState>, Vec<Option<Timestamp>>),
    /// The inner triggers, the next one expected, and when the sequence started.
    Sequence(Vec<TriggerState>, usize, Option<Timestamp>),
}

impl TriggerState {
    fn new(t: &Trigger, now: Timestamp) -> Self {
        match t {
            Trigger::Event(e) => {
                let mut buckets = BTreeMap::new();
                // Proactive without for_each: one bucket, armed now.
                if e.posture == Posture::Proactive && e.for_each.is_empty() {
                    buckets.insert(
                        String::new(),
                        Bucket {
                            armed_at: Some(now),
                            after_seen: e.after.is_empty(),
                            ..Bucket::default()
                        },
                    );
                }
                TriggerState::Event(buckets)
            }
            Trigger::Compound { triggers, .. } => TriggerState::Compound(
                triggers.iter().map(|t| TriggerState::new(t, now)).collect(),
                vec![None; triggers.len()],
            ),
            Trigger::Sequence { triggers, .. } => TriggerState::Sequence(
                triggers.iter().map(|t| TriggerState::new(t, now)).collect(),
                0,
                None,
            ),
        }
    }
}

/// One automation as the evaluator holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Held {
    spec: AutomationSpec,
    paused: bool,
    state: TriggerState,
}

/// The evaluator.
#[derive(Clone, Debug, Default)]
pub struct Evaluator {
    automations: BTreeMap<String, Held>,
    index: Index,
    /// The automations whose trigger is proactive (the only ones a tick concerns).
    proactive: BTreeSet<String>,
    /// Each armed proactive automation's next deadline, in time order, and by name: kept as
    /// their states change, so that the next deadline is known without a look at every one.
    deadlines: BTreeSet<(Timestamp, String)>,
    deadline_of: HashMap<String, Timestamp>,
}

/// Which automations an event name may concern.
#[derive(Clone, Debug, Default)]
struct Index {
    exact: BTreeMap<String, BTreeSet<String>>,
    /// Patterns `prefix*`, by prefix.
    prefixes: BTreeMap<String, BTreeSet<String>>,
    /// Any other pattern.
    others: Vec<(String, String)>,
}

impl Index {
    fn add(&mut self, pattern: &str, automation: &str) {
        match pattern.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => {
                self.prefixes
                    .entry(prefix.to_owned())
                    .or_default()
                    .insert(automation.to_owned());
            }
            _ if !pattern.contains('*') => {
                self.exact
                    .entry(pattern.to_owned())
                    .or_default()
                    .insert(automation.to_owned());
            }
            _ => self.others.push((pattern.to_owned(), automation.to_owned())),
        }
    }

    fn remove(&mut self, automation: &str) {
        for set in self.exact.values_mut().chain(self.prefixes.values_mut()) {
            set.remove(automation);
        }
        self.exact.retain(|_, s| !s.is_empty());
        self.prefixes.retain(|_, s| !s.is_empty());
        self.others.retain(|(_, a)| a != automation);
    }

    /// The automations whose triggers name `event` (or a pattern of it).
    fn candidates(&self, event: &str) -> BTreeSet<&str> {
        let mut out: BTreeSet<&str> = BTreeSet::new();
        if let Some(s) = self.exact.get(event) {
            out.extend(s.iter().map(String::as_str));
        }
        for end in 0..=event.len() {
            if event.is_char_boundary(end)
                && let Some(s) = self.prefixes.get(&event[..end])
            {
                out.extend(s.iter().map(String::as_str));
            }
        }
        for (p, a) in &self.others {
            if glob(p, event) {
                out.insert(a);
            }
        }
        out
    }
}

/// Every event name pattern a trigger counts or is armed by.
fn patterns(t: &Trigger, out: &mut Vec<String>) {
    match t {
        Trigger::Event(e) => out.extend(e.expect.iter().chain(&e.after).cloned()),
        Trigger::Compound { triggers, .. } | Trigger::Sequence { triggers, .. } => {
            for t in triggers {
                patterns(t, out);
            }
        }
    }
}

/// The bucket of an event for a trigger's `for_each` labels: their values, joined (None: the
/// event lacks one of them).
fn bucket_of(e: &EventTrigger, event: &Event) -> Option<String> {
    let mut key = String::new();
    for (i, label) in e.for_each.iter().enumerate() {
        let v = event.resource.0.get(label)?;
        if i > 0 {
            key.push('\u{1f}');
        }
        key.push_str(v);
    }
    Some(key)
}

impl Evaluator {
    /// An evaluator with no automation.
    pub fn new() -> Self {
        Evaluator::default()
    }

    /// Adds or replaces an automation, armed at `now` (its counting starts afresh).
    pub fn put(&mut self, spec: AutomationSpec, now: Timestamp) {
        self.remove(&spec.name);
        let mut names = Vec::new();
        patterns(&spec.trigger, &mut names);
        for p in &names {
            self.index.add(p, &spec.name);
        }
        let state = TriggerState::new(&spec.trigger, now);
        let paused = spec.paused;
        let name = spec.name.clone();
        if matches!(&spec.trigger, Trigger::Event(e) if e.posture == Posture::Proactive) {
            self.proactive.insert(name.clone());
        }
        self.automations
            .insert(name.clone(), Held { spec, paused, state });
        self.refresh_deadline(&name);
    }

    /// Keeps the deadline index in step with one automation's state.
    fn refresh_deadline(&mut self, name: &str) {
        if !self.proactive.contains(name) {
            return;
        }
        if let Some(old) = self.deadline_of.remove(name) {
            self.deadlines.remove(&(old, name.to_owned()));
        }
        let next = self
            .automations
            .get(name)
            .filter(|h| !h.paused)
            .and_then(|h| deadline(&h.spec.trigger, &h.state));
        if let Some(d) = next {
            self.deadline_of.insert(name.to_owned(), d);
            self.deadlines.insert((d, name.to_owned()));
        }
    }

    /// Removes an automation; whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        self.index.remove(name);
        let had = self.automations.remove(name).is_some();
        self.refresh_deadline(name);
        self.proactive.remove(name);
        had
    }

    /// Pauses (`true`) or resumes an automation; a resumed one is armed afresh at `now`.
    /// Whether there is one.
    pub fn set_paused(&mut self, name: &str, paused: bool, now: Timestamp) -> bool {
        let Some(h) = self.automations.get_mut(name) else {
            return false;
        };
        if h.paused && !paused {
            h.state = TriggerState::new(&h.spec.trigger, now);
        }
        h.paused = paused;
        self.refresh_deadline(name);
        true
    }

    /// The automations, by name.
    pub fn specs(&self) -> impl Iterator<Item = (&AutomationSpec, bool)> {
        self.automations.values().map(|h| (&h.spec, h.paused))
    }

    /// An event arrives: the firings it causes.
    pub fn event(&mut self, event: &Event, now: Timestamp) -> Vec<Firing> {
        let names: Vec<String> = self
            .index
            .candidates(&event.event)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut out = Vec::new();
        for name in names {
            let Some(h) = self.automations.get_mut(&name) else {
                continue;
            };
            if h.paused {
                continue;
            }
            if let Some((bucket, window_start, events)) = on_event(&h.spec.trigger, &mut h.state, event, now)
            {
                out.push(firing(&name, bucket, window_start, now, events));
            }
            self.refresh_deadline(&name);
        }
        out
    }

    /// Time passes: the proactive triggers whose silence lasted their window fire.
    pub fn tick(&mut self, now: Timestamp) -> Vec<Firing> {
        let mut out = Vec::new();
        let names: Vec<String> = self.proactive.iter().cloned().collect();
        for name in names {
            let Some(h) = self.automations.get_mut(&name) else {
                continue;
            };
            if h.paused {
                continue;
            }
            for (bucket, window_start) in on_tick(&h.spec.trigger, &mut h.state, now) {
                out.push(firing(&name, bucket, window_start, now, Vec::new()));
            }
            self.refresh_deadline(&name);
        }
        out
    }

    /// The next time a tick may fire something (None: no proactive trigger is armed).
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.deadlines.first().map(|(d, _)| *d)
    }
}

fn firing(
    name: &str,
    bucket: String,
    window_start: Timestamp,
    at: Timestamp,
    events: Vec<EventId>,
) -> Firing {
    // The event that made it fire tells two firings of one window start apart (two events
    // of one microsecond, each firing a reactive trigger on its own).
    let key = match events.iter().max() {
        Some(e) => format!("{name}/{bucket}/{}/{e}", window_start.as_micros()),
        None => format!("{name}/{bucket}/{}", window_start.as_micros()),
    };
    Firing {
        automation: name.to_owned(),
        bucket,
        window_start,
        at,
        events,
        key,
    }
}

fn within(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// An event for a trigger: Some((bucket, window start, events)) when it fires.
fn on_event(
    t: &Trigger,
    state: &mut TriggerState,
    event: &Event,
    now: Timestamp,
) -> Option<(String, Timestamp, Vec<EventId>)> {
    match (t, state) {
        (Trigger::Event(e), TriggerState::Event(buckets)) => on_event_trigger(e, buckets, event, now),
        (
            Trigger::Compound {
                require,
                triggers,
                within: w,
            },
            TriggerState::Compound(inner, fired),
        ) => {
            let mut events = Vec::new();
            for (i, (t, s)) in triggers.iter().zip(inner.iter_mut()).enumerate() {
                if let Some((_, _, ev)) = on_event(t, s, event, now) {
                    fired[i] = Some(now);
                    events.extend(ev);
                }
            }
            if let Some(w) = within(w.0) {
                for f in fired.iter_mut() {
                    if f.is_some_and(|at| now.saturating_since(at) > w) {
                        *f = None;
                    }
                }
            }
            let count = fired.iter().filter(|f| f.is_some()).count();
            let need = match require {
                Require::Word(RequireWord::All) => triggers.len(),
                Require::Word(RequireWord::Any) => 1,
                Require::Count(n) => *n as usize,
            };
            if count >= need && count > 0 {
                let start = fired.iter().flatten().min().copied().unwrap_or(now);
                fired.iter_mut().for_each(|f| *f = None);
                return Some((String::new(), start, events));
            }
            None
        }
        (Trigger::Sequence { triggers, within: w }, TriggerState::Sequence(inner, next, started)) => {
            if let (Some(w), Some(s)) = (within(w.0), *started)
                && now.saturating_since(s) > w
            {
                *next = 0;
                *started = None;
            }
            let mut events = Vec::new();
            let mut fired_now = Vec::new();
            for (i, (t, s)) in triggers.iter().zip(inner.iter_mut()).enumerate() {
                if let Some((_, _, ev)) = on_event(t, s, event, now) {
                    fired_now.push(i);
                    events.extend(ev);
                }
            }
            for i in fired_now {
                if i == *next {
                    if i == 0 {
                        *started = Some(now);
                    }
                    *next += 1;
                } else if i == 0 {
                    // The first again: the sequence starts over from it.
                    *started = Some(now);
                    *next = 1;
                }
            }
            if *next == triggers.len() {
                let start = started.unwrap_or(now);
                *next = 0;
                *started = None;
                return Some((String::new(), start, events));
            }
            None
        }
        _ => None,
    }
}

fn on_event_trigger(
    e: &EventTrigger,
    buckets: &mut BTreeMap<String, Bucket>,
    event: &Event,
    now: Timestamp,
) -> Option<(String, Timestamp, Vec<EventId>)> {
    let counted = !e.expect.is_empty() && e.filter().matches(event);
    let arming = !e.after.is_empty()
        && e.after.iter().any(|p| glob(p, &event.event))
        && e.match_resource.matches(&event.resource);
    if !counted && !arming {
        return None;
    }
    let key = bucket_of(e, event)?;
    if !buckets.contains_key(&key) && buckets.len() >= BUCKETS_MAX {
        // Forget the bucket armed longest ago.
        let oldest = buckets
            .iter()
            .min_by_key(|(_, b)| b.armed_at.or(b.times.front().map(|t| t.0)))
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            buckets.remove(&k);
        }
    }
    let bucket = buckets.entry(key.clone()).or_insert_with(|| Bucket {
        armed_at: (e.posture == Posture::Proactive).then_some(now),
        after_seen: e.after.is_empty(),
        ..Bucket::default()
    });
    if arming {
        bucket.after_seen = true;
        if e.posture == Posture::Proactive {
            bucket.armed_at = Some(now);
            bucket.times.clear();
        }
    }
    if !counted || !bucket.after_seen {
        return None;
    }
    bucket.times.push_back((now, event.id));
    if let Some(w) = within(e.within.0) {
        while bucket
            .times
            .front()
            .is_some_and(|(t, _)| now.saturating_since(*t) >= w)
        {
            bucket.times.pop_front();
        }
    }
    while bucket.times.len() > e.threshold as usize {
        bucket.times.pop_front();
    }
    // Proactive after an `after` event: the events it expected came; it waits for the next
    // `after` event.
    if e.posture == Posture::Proactive && !e.after.is_empty() && bucket.times.len() >= e.threshold as usize {
        bucket.after_seen = false;
        bucket.times.clear();
        return None;
    }
    if e.posture == Posture::Reactive && bucket.times.len() >= e.threshold as usize {
        let start = bucket.times.front().map_or(now, |t| t.0);
        let events: Vec<EventId> = bucket
            .times
            .iter()
            .rev()
            .take(FIRING_EVENTS_MAX)
            .map(|t| t.1)
            .collect();
        bucket.times.clear();
        if !e.after.is_empty() {
            bucket.after_seen = false;
        }
        return Some((key, start, events));
    }
    None
}

/// Proactive buckets whose window passed with fewer than `threshold` events: (bucket, window
/// start) each, re-armed at `now`.
fn on_tick(t: &Trigger, state: &mut TriggerState, now: Timestamp) -> Vec<(String, Timestamp)> {
    match (t, state) {
        (Trigger::Event(e), TriggerState::Event(buckets)) if e.posture == Posture::Proactive => {
            let w = e.within.0;
            let mut out = Vec::new();
            for (key, b) in buckets.iter_mut() {
                let Some(armed) = b.armed_at else { continue };
                if !b.after_seen {
                    continue;
                }
                while b
                    .times
                    .front()
                    .is_some_and(|(t, _)| now.saturating_since(*t) >= w)
                {
                    b.times.pop_front();
                }
                // A whole window since it was armed, and fewer events than the threshold in the
                // last one.
                if now.saturating_since(armed) >= w && (b.times.len() as u32) < e.threshold {
                    out.push((key.clone(), armed));
                    b.armed_at = Some(now);
                    b.times.clear();
                    if !e.after.is_empty() {
                        b.after_seen = false;
                    }
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

/// When a proactive trigger may fire next, if it can.
fn deadline(t: &Trigger, state: &TriggerState) -> Option<Timestamp> {
    match (t, state) {
        (Trigger::Event(e), TriggerState::Event(buckets)) if e.posture == Posture::Proactive => buckets
            .values()
            .filter(|b| b.after_seen)
            .filter_map(|b| {
                // Once a window has passed since it was armed, and the oldest event kept (when
                // as many as the threshold are) has left the window.
                let armed = b.armed_at? + e.within.0;
                let full = b.times.len() >= e.threshold as usize;
                let leaves = b.times.front().filter(|_| full).map(|(t, _)| *t + e.within.0);
                Some(leaves.map_or(armed, |l| l.max(armed)))
            })
            .min(),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
