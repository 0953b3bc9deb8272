//! Automations and blocks in the control state: a file of settings put whole, and the changes
//! to one automation (pause, resume, a firing, its actions' outcomes), each with its event.

use super::*;
use crate::automation::{Action, AutomationEdit, AutomationRecord};

/// The role of a firing's triggering events among its related resources.
pub const TRIGGERING_EVENT: &str = "triggering-event";

fn automation_resource(name: &str) -> Resource {
    Resource::new(format!("flotilla.automation.{name}"), Some(name))
}

impl Tx {
    /// Several settings, all checked before any is stored: all of them or none.
    pub(super) fn put_settings(mut self, view: &mut impl StateView, settings: Vec<Setting>) -> Outcome {
        let mut keys = std::collections::BTreeSet::new();
        for s in &settings {
            if !keys.insert(s.key()) {
                return Outcome::refused(Refusal::Invalid(format!("{} is named twice", s.key())));
            }
        }
        for s in &settings {
            if let Err(r) = check_setting(view, s, &settings) {
                return Outcome::refused(r);
            }
        }
        let (mut created, mut updated) = (0, 0);
        for s in settings {
            let s = match s {
                Setting::Automation(a) => {
                    let old = match view
                        .hot()
                        .setting(&crate::work_queue::automation_key(&a.spec.name))
                    {
                        Some(Setting::Automation(o)) => Some(o.as_ref()),
                        _ => None,
                    };
                    Setting::Automation(Box::new(a.replacing(old, self.now())))
                }
                other => other,
            };
            let out = Tx {
                at: self.at,
                events: self.events,
                writes: Vec::new(),
                record: self.record,
            }
            .put_setting(view, s);
            self.events = self
                .events
                .saturating_add(out.writes.iter().filter(|w| matches!(w, Write::Event(_))).count() as u16);
            match out.reply {
                Ok(Reply::SettingPut { created: true }) => created += 1,
                Ok(_) if !out.writes.is_empty() => updated += 1,
                Ok(_) => {}
                // Checked above: not reached.
                Err(r) => return Outcome::refused(r),
            }
            self.writes.extend(out.writes);
        }
        self.done(Reply::SettingsPut { created, updated })
    }

    /// One change to one automation, made to it as it is now.
    pub(super) fn edit_automation(
        mut self,
        view: &mut impl StateView,
        name: &str,
        edit: AutomationEdit,
    ) -> Outcome {
        let key = crate::work_queue::automation_key(name);
        let Some(Setting::Automation(a)) = view.hot().setting(&key) else {
            return Outcome::refused(Refusal::AutomationNotFound(name.to_owned()));
        };
        let mut a: AutomationRecord = a.as_ref().clone();
        let now = self.now();
        let mut events: Vec<(String, Vec<Resource>, serde_json::Value)> = Vec::new();
        let changed = match &edit {
            AutomationEdit::Pause if a.spec.paused => false,
            AutomationEdit::Resume if !a.spec.paused => false,
            AutomationEdit::Pause | AutomationEdit::Resume => {
                let pause = matches!(edit, AutomationEdit::Pause);
                a.spec.paused = pause;
                if !pause {
                    a.armed = now;
                }
                let what = if pause { "paused" } else { "resumed" };
                events.push((
                    format!("flotilla.automation.{what}"),
                    Vec::new(),
                    serde_json::Value::Null,
                ));
                true
            }
            AutomationEdit::Fired(f) => {
                let fired = a.fire(f);
                if fired {
                    let related = f
                        .events
                        .iter()
                        .map(|e| {
                            Resource::new(format!("flotilla.event.{e}"), None)
                                .with(crate::event::RESOURCE_ROLE, TRIGGERING_EVENT)
                        })
                        .collect();
                    events.push((
                        "flotilla.automation.triggered".to_owned(),
                        related,
                        serde_json::json!({
                            "key": f.key,
                            "bucket": f.bucket,
                            "window_start": f.window_start,
                            "at": f.at,
                        }),
                    ));
                }
                fired
            }
            AutomationEdit::Ran { key, outcomes } => {
                let ran = a.ran(key, outcomes);
                if ran {
                    for (i, o) in outcomes.iter().enumerate() {
                        let what = if o.ok { "executed" } else { "failed" };
                        events.push((
                            format!("flotilla.automation.action.{what}"),
                            Vec::new(),
                            serde_json::json!({
                                "key": key,
                                "action": i,
                                "type": o.action,
                                "at": o.at,
                                if o.ok { "detail" } else { "reason" }: o.detail,
                            }),
                        ));
                    }
                }
                ran
            }
        };
        if !changed {
            return self.done(Reply::AutomationEdited { changed: false });
        }
        for (event, related, payload) in events {
            let id = self.next_event_id();
            self.writes.push(Write::Event(Event {
                id,
                occurred: now,
                event,
                resource: automation_resource(name),
                related,
                payload: EventPayload::Data(payload),
            }));
        }
        self.writes.push(Write::Setting(key));
        view.hot_mut().put_setting(Setting::Automation(Box::new(a)));
        self.done(Reply::AutomationEdited { changed: true })
    }
}

/// What a setting in a file needs of the control state: an automation's deployments, blocks and
/// automations exist (or come in the same file).
fn check_setting(view: &impl StateView, s: &Setting, batch: &[Setting]) -> Result<(), Refusal> {
    let Setting::Automation(a) = s else {
        return Ok(());
    };
    let name = &a.spec.name;
    let refuse =
        |i: usize, why: String| Refusal::Invalid(format!("automation {name:?}: actions[{i}]: {why}"));
    a.spec
        .check()
        .map_err(|e| Refusal::Invalid(format!("automation {name:?}: {e}")))?;
    let in_batch = |key: &str| batch.iter().any(|b| b.key() == key);
    for (i, action) in a.spec.actions.iter().enumerate() {
        let missing = match action {
            Action::RunDeployment { deployment, .. }
            | Action::PauseDeployment { deployment }
            | Action::ResumeDeployment { deployment } => view
                .hot()
                .deployment_by_name(deployment)
                .is_none()
                .then(|| format!("no deployment named {deployment:?}")),
            Action::PauseAutomation {
                automation: Some(other),
            }
            | Action::ResumeAutomation {
                automation: Some(other),
            } => {
                let key = crate::work_queue::automation_key(other);
                (view.hot().setting(&key).is_none() && !in_batch(&key))
                    .then(|| format!("no automation named {other:?}"))
            }
            Action::SendWebhook { block, .. } => {
                let key = crate::block::block_key(crate::block::BlockType::Webhook, block);
                view.hot()
                    .setting(&key)
                    .is_none()
                    .then(|| format!("no webhook block named {block:?}"))
            }
            _ => None,
        };
        if let Some(why) = missing {
            return Err(refuse(i, why));
        }
    }
    Ok(())
}
