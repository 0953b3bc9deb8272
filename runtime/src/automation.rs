//! Automations as users declare them (Prefect's model): a trigger over the event stream and
//! actions run when it fires. Read from TOML (`[[automation]]`, the keys below), checked whole:
//! a file with one bad automation creates none, and the error names the automation, the key
//! and the reason.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event_filter::{EventFilter, LabelSpec};

pub mod evaluator;
pub mod record;
pub use evaluator::{Evaluator, Firing};
pub use record::{ActionOutcome, AutomationEdit, AutomationRecord, FiringMark, FiringRecord};

/// The most automations in one file.
pub const AUTOMATIONS_PER_FILE_MAX: usize = 10_000;
/// The most actions of one automation.
pub const ACTIONS_MAX: usize = 32;
/// The most inner triggers of a compound or sequence trigger.
pub const INNER_TRIGGERS_MAX: usize = 16;
/// The longest `within`.
pub const WITHIN_MAX: Duration = Duration::from_secs(30 * 24 * 3600);
/// The largest `threshold`.
pub const THRESHOLD_MAX: u32 = 100_000;

/// A duration written `0s`, `30s`, `5m`, `1h30m`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Within(pub Duration);

impl Serialize for Within {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Within {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Within).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration such as \"0s\", \"30s\" or \"5m\": {e}"
            ))
        })
    }
}

/// Whether a trigger fires on events that come, or on events that do not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Posture {
    /// Fires when `threshold` matching events arrive within `within`.
    #[default]
    Reactive,
    /// Fires when fewer than `threshold` matching events arrived during the last `within`
    /// since it was armed.
    Proactive,
}

/// How many inner triggers a compound trigger needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Require {
    /// `"all"` or `"any"`.
    Word(RequireWord),
    /// At least this many.
    Count(u32),
}

/// `all` or `any`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RequireWord {
    /// Every inner trigger.
    All,
    /// One of them.
    Any,
}

/// An event trigger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTrigger {
    /// Reactive or proactive.
    #[serde(default)]
    pub posture: Posture,
    /// The event names it counts (exact, or a prefix with `*`).
    #[serde(default)]
    pub expect: Vec<String>,
    /// Event names that arm it (proactive: counting starts at the last of them).
    #[serde(default)]
    pub after: Vec<String>,
    /// Labels the event's resource must have.
    #[serde(default, rename = "match")]
    pub match_resource: LabelSpec,
    /// Labels one of the event's related resources must have.
    #[serde(default)]
    pub match_related: LabelSpec,
    /// Labels that split the counting into buckets (one firing per bucket).
    #[serde(default)]
    pub for_each: Vec<String>,
    /// How many events.
    #[serde(default = "one")]
    pub threshold: u32,
    /// Within how long.
    #[serde(default)]
    pub within: Within,
}

fn one() -> u32 {
    1
}

/// A trigger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Trigger {
    /// Counts events.
    Event(EventTrigger),
    /// Fires when `require` of its inner triggers fired within `within`.
    Compound {
        /// How many.
        require: Require,
        /// The inner triggers.
        triggers: Vec<Trigger>,
        /// Within how long.
        #[serde(default)]
        within: Within,
    },
    /// Fires when its inner triggers fired in order within `within`.
    Sequence {
        /// The inner triggers, in order.
        triggers: Vec<Trigger>,
        /// Within how long.
        #[serde(default)]
        within: Within,
    },
}

/// An action an automation runs when it fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Action {
    /// Creates a run of a deployment, its parameters templated from the event.
    RunDeployment {
        /// The deployment.
        deployment: String,
        /// Parameters over the deployment's; string values are templates.
        #[serde(default)]
        parameters: BTreeMap<String, serde_json::Value>,
    },
    /// Pauses a deployment's schedules.
    PauseDeployment {
        /// The deployment.
        deployment: String,
    },
    /// Resumes a deployment's schedules.
    ResumeDeployment {
        /// The deployment.
        deployment: String,
    },
    /// Pauses a work queue.
    PauseWorkQueue {
        /// The queue.
        work_queue: String,
    },
    /// Resumes a work queue.
    ResumeWorkQueue {
        /// The queue.
        work_queue: String,
    },
    /// Pauses an automation (without a name: the one that fired).
    PauseAutomation {
        /// The automation.
        #[serde(default)]
        automation: Option<String>,
    },
    /// Resumes an automation (without a name: the one that fired).
    ResumeAutomation {
        /// The automation.
        #[serde(default)]
        automation: Option<String>,
    },
    /// Cancels a flow run: the triggering event's, or this one.
    CancelFlowRun {
        /// The run's id.
        #[serde(default)]
        flow_run: Option<String>,
    },
    /// Proposes a state for a flow run: the triggering event's, or this one.
    ChangeFlowRunState {
        /// The state's name (`Failed`, `Cancelled`, …).
        state: String,
        /// Its message.
        #[serde(default)]
        message: Option<String>,
        /// The run's id.
        #[serde(default)]
        flow_run: Option<String>,
    },
    /// Posts a JSON body to a webhook block's URL, signed with its secret.
    SendWebhook {
        /// The `webhook` block.
        block: String,
        /// A template that renders the JSON body.
        body: String,
    },
    /// Nothing (a firing recorded, no more).
    DoNothing,
}

/// An automation as declared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutomationSpec {
    /// Its unique name.
    pub name: String,
    /// What a person reads about it.
    #[serde(default)]
    pub description: Option<String>,
    /// When it fires.
    pub trigger: Trigger,
    /// What it does then, in order.
    pub actions: Vec<Action>,
    /// Created paused.
    #[serde(default)]
    pub paused: bool,
}

/// Why a file of automations is refused (nothing in it is created).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AutomationError(pub String);

/// A file of `[[automation]]` tables (and others, such as `[[deployment]]`, left to their
/// readers).
#[derive(Deserialize)]
struct File {
    #[serde(default)]
    automation: Vec<toml_value::Table>,
}

mod toml_value {
    /// A TOML table, read as JSON-like values so that each automation is decoded on its own and
    /// its error names it.
    pub type Table = serde_json::Map<String, serde_json::Value>;
}

impl EventTrigger {
    /// The filter of the events it counts.
    pub fn filter(&self) -> EventFilter {
        EventFilter {
            event: self.expect.clone(),
            resource: self.match_resource.clone(),
            related: if self.match_related.is_empty() {
                Vec::new()
            } else {
                vec![self.match_related.clone()]
            },
            ..EventFilter::default()
        }
    }
}

impl Trigger {
    fn check(&self, depth: usize) -> Result<(), String> {
        match self {
            Trigger::Event(e) => {
                if e.expect.is_empty() && e.after.is_empty() {
                    return Err("trigger: an event trigger needs `expect` (or `after`)".into());
                }
                if e.threshold == 0 || e.threshold > THRESHOLD_MAX {
                    return Err(format!(
                        "trigger.threshold: 1 to {THRESHOLD_MAX}, not {}",
                        e.threshold
                    ));
                }
                if e.within.0 > WITHIN_MAX {
                    return Err(format!(
                        "trigger.within: at most {}",
                        humantime::format_duration(WITHIN_MAX)
                    ));
                }
                if e.posture == Posture::Proactive && e.within.0.is_zero() {
                    return Err("trigger.within: a proactive trigger needs a window longer than 0s".into());
                }
                if e.for_each.len() > crate::event_filter::PATTERNS_MAX {
                    return Err("trigger.for_each: too many labels".into());
                }
                e.filter().check().map_err(|err| format!("trigger: {err}"))?;
                let mut after = EventFilter::default();
                after.event = e.after.clone();
                after.check().map_err(|err| format!("trigger.after: {err}"))
            }
            Trigger::Compound { triggers, within, .. } | Trigger::Sequence { triggers, within } => {
                if depth > 3 {
                    return Err("trigger: compound and sequence triggers nest at most 3 deep".into());
                }
                if triggers.is_empty() || triggers.len() > INNER_TRIGGERS_MAX {
                    return Err(format!(
                        "trigger.triggers: 1 to {INNER_TRIGGERS_MAX} inner triggers"
                    ));
                }
                if within.0 > WITHIN_MAX {
                    return Err(format!(
                        "trigger.within: at most {}",
                        humantime::format_duration(WITHIN_MAX)
                    ));
                }
                if let Trigger::Compound {
                    require: Require::Count(n),
                    ..
                } = self
                    && (*n == 0 || *n as usize > triggers.len())
                {
                    return Err(format!(
                        "trigger.require: 1 to {} (its inner triggers), not {n}",
                        triggers.len()
                    ));
                }
                triggers.iter().try_for_each(|t| t.check(depth + 1))
            }
        }
    }
}

/// Checks a template's syntax.
fn check_template(text: &str) -> Result<(), String> {
    let env = minijinja::Environment::new();
    env.template_from_str(text)
        .map(|_| ())
        .map_err(|e| format!("not a template: {e}"))
}

/// Every string in a JSON value, each checked as a template.
fn check_templates(v: &serde_json::Value) -> Result<(), String> {
    match v {
        serde_json::Value::String(s) => check_template(s),
        serde_json::Value::Array(a) => a.iter().try_for_each(check_templates),
        serde_json::Value::Object(o) => o.values().try_for_each(check_templates),
        _ => Ok(()),
    }
}

impl Action {
    /// Its type's name (`run-deployment`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Action::RunDeployment { .. } => "run-deployment",
            Action::PauseDeployment { .. } => "pause-deployment",
            Action::ResumeDeployment { .. } => "resume-deployment",
            Action::PauseWorkQueue { .. } => "pause-work-queue",
            Action::ResumeWorkQueue { .. } => "resume-work-queue",
            Action::PauseAutomation { .. } => "pause-automation",
            Action::ResumeAutomation { .. } => "resume-automation",
            Action::CancelFlowRun { .. } => "cancel-flow-run",
            Action::ChangeFlowRunState { .. } => "change-flow-run-state",
            Action::SendWebhook { .. } => "send-webhook",
            Action::DoNothing => "do-nothing",
        }
    }

    /// Checks its templates (the key and the reason when one is bad).
    fn check(&self) -> Result<(), String> {
        match self {
            Action::RunDeployment { parameters, .. } => parameters
                .iter()
                .try_for_each(|(k, v)| check_templates(v).map_err(|e| format!("parameters.{k}: {e}"))),
            Action::SendWebhook { body, .. } => check_template(body).map_err(|e| format!("body: {e}")),
            Action::ChangeFlowRunState { state, .. } => state
                .parse::<crate::state::StateType>()
                .map(|_| ())
                .map_err(|_| format!("state: {state:?} is not a state name (Failed, Cancelled, …)")),
            _ => Ok(()),
        }
    }
}

impl AutomationSpec {
    /// Checks what serde cannot: names, sizes, windows.
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > crate::flow_run::NAME_LEN_MAX {
            return Err(format!("name: 1 to {} bytes long", crate::flow_run::NAME_LEN_MAX));
        }
        if self.actions.is_empty() || self.actions.len() > ACTIONS_MAX {
            return Err(format!("actions: 1 to {ACTIONS_MAX} actions"));
        }
        for (i, action) in self.actions.iter().enumerate() {
            action.check().map_err(|e| format!("actions[{i}].{e}"))?;
        }
        self.trigger.check(0)
    }
}

/// The automations of a TOML file, each decoded and checked: all of them, or an error naming
/// the first bad one, the key and the reason.
pub fn parse_file(text: &str) -> Result<Vec<AutomationSpec>, AutomationError> {
    let file: File = toml::from_str(text)
        .map_err(|e| AutomationError(format!("not a TOML file of [[automation]]: {e}")))?;
    if file.automation.len() > AUTOMATIONS_PER_FILE_MAX {
        return Err(AutomationError(format!(
            "at most {AUTOMATIONS_PER_FILE_MAX} automations in a file"
        )));
    }
    let mut out: Vec<AutomationSpec> = Vec::with_capacity(file.automation.len());
    for (i, table) in file.automation.into_iter().enumerate() {
        let name = table
            .get("name")
            .and_then(|n| n.as_str())
            .map_or_else(|| format!("#{}", i + 1), |n| format!("{n:?}"));
        let spec: AutomationSpec = serde_json::from_value(serde_json::Value::Object(table))
            .map_err(|e| AutomationError(format!("automation {name}: {e}")))?;
        spec.check()
            .map_err(|e| AutomationError(format!("automation {name}: {e}")))?;
        if out.iter().any(|a| a.name == spec.name) {
            return Err(AutomationError(format!(
                "automation {name}: named twice in the file"
            )));
        }
        out.push(spec);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECOVER: &str = r#"
[[automation]]
name = "recover"
trigger = { type = "event", posture = "reactive", expect = ["flotilla.flow-run.Failed"], match_related = { "flotilla.resource.role" = "deployment", "flotilla.resource.name" = "nightly" }, threshold = 1, within = "0s" }
actions = [{ type = "run-deployment", deployment = "cleanup", parameters = { reason = "{{ event.resource['flotilla.resource.id'] }} failed" } }]

[[automation]]
name = "silence"
trigger = { type = "event", posture = "proactive", expect = ["app.heartbeat"], match = { "flotilla.resource.id" = "app.pump" }, threshold = 1, within = "2s" }
actions = [{ type = "run-deployment", deployment = "on-silence" }, { type = "pause-automation" }]

[[automation]]
name = "both"
trigger = { type = "compound", require = "all", within = "5m", triggers = [
  { type = "event", expect = ["a.one"] },
  { type = "event", expect = ["a.two"], for_each = ["flotilla.resource.id"], threshold = 2, within = "30s" },
] }
actions = [{ type = "do-nothing" }]

[[automation]]
name = "in-order"
trigger = { type = "sequence", within = "1m", triggers = [{ type = "event", expect = ["s.one"] }, { type = "event", expect = ["s.two"] }] }
actions = [{ type = "send-webhook", block = "hook", body = '{"what": "{{ event.event }}"}' }]

[[deployment]]
name = "left to its own reader"
"#;

    #[test]
    fn the_documented_file_reads_as_written() {
        let all = parse_file(RECOVER).expect("automations");
        assert_eq!(all.len(), 4);
        let Trigger::Event(e) = &all[0].trigger else {
            panic!("an event trigger")
        };
        assert_eq!(e.posture, Posture::Reactive);
        assert_eq!(e.within, Within(Duration::ZERO));
        assert_eq!(e.match_related.0.len(), 2);
        let Trigger::Event(e) = &all[1].trigger else {
            panic!("an event trigger")
        };
        assert_eq!(e.posture, Posture::Proactive);
        assert_eq!(e.within, Within(Duration::from_secs(2)));
        assert!(matches!(
            all[1].actions[1],
            Action::PauseAutomation { automation: None }
        ));
        assert!(
            matches!(&all[2].trigger, Trigger::Compound { require: Require::Word(RequireWord::All), triggers, .. } if triggers.len() == 2)
        );
        assert!(matches!(&all[3].actions[0], Action::SendWebhook { block, .. } if block == "hook"));
    }

    fn refused(text: &str) -> String {
        parse_file(text).expect_err("refused").0
    }

    #[test]
    fn a_bad_automation_is_refused_naming_it_the_key_and_the_reason() {
        let bad = r#"
[[automation]]
name = "good-one"
trigger = { type = "event", expect = ["app.x"] }
actions = [{ type = "do-nothing" }]

[[automation]]
name = "bad-one"
trigger = { type = "event", expect = ["app.y"] }
actions = [{ type = "launch-rockets" }]
"#;
        let e = refused(bad);
        assert!(e.contains("\"bad-one\"") && e.contains("launch-rockets"), "{e}");

        let e = refused(
            r#"
[[automation]]
name = "templ"
trigger = { type = "event", expect = ["a"] }
actions = [{ type = "send-webhook", block = "h", body = "{{ event.event " }]
"#,
        );
        assert!(
            e.contains("\"templ\"") && e.contains("actions[0].body") && e.contains("template"),
            "{e}"
        );
        let e = refused(
            r#"
[[automation]]
name = "state"
trigger = { type = "event", expect = ["a"] }
actions = [{ type = "do-nothing" }, { type = "change-flow-run-state", state = "Exploded" }]
"#,
        );
        assert!(e.contains("actions[1].state") && e.contains("Exploded"), "{e}");

        let e = refused(
            r#"
[[automation]]
name = "typo"
trigger = { type = "event", expect = ["a"], treshold = 2 }
actions = [{ type = "do-nothing" }]
"#,
        );
        assert!(e.contains("\"typo\"") && e.contains("treshold"), "{e}");

        let e = refused(
            r#"
[[automation]]
name = "slow"
trigger = { type = "event", expect = ["a"], within = "a while" }
actions = [{ type = "do-nothing" }]
"#,
        );
        assert!(e.contains("\"slow\"") && e.contains("a while"), "{e}");

        let e = refused(
            r#"
[[automation]]
name = "never"
trigger = { type = "event", posture = "proactive", expect = ["a"], within = "0s" }
actions = [{ type = "do-nothing" }]
"#,
        );
        assert!(e.contains("\"never\"") && e.contains("within"), "{e}");

        let e = refused(
            r#"
[[automation]]
name = "too-many"
trigger = { type = "compound", require = 3, triggers = [{ type = "event", expect = ["a"] }] }
actions = [{ type = "do-nothing" }]
"#,
        );
        assert!(e.contains("\"too-many\"") && e.contains("require"), "{e}");

        let e = refused(
            r#"
[[automation]]
name = "twice"
trigger = { type = "event", expect = ["a"] }
actions = [{ type = "do-nothing" }]
[[automation]]
name = "twice"
trigger = { type = "event", expect = ["a"] }
actions = [{ type = "do-nothing" }]
"#,
        );
        assert!(e.contains("twice"), "{e}");
        assert!(refused("[[automation]]\nname = 3").contains("#1"));
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_read_or_refused_without_panicking(text in ".{0,400}") {
            let _ = parse_file(&text);
        }
    }
}
