//! `apply` of automations and blocks.

use super::*;
use crate::automation::{ActionOutcome, AutomationEdit, AutomationRecord, Firing, parse_file};
use crate::block::{BlockRecord, BlockType};

fn record(toml: &str, now: Timestamp) -> Vec<Setting> {
    parse_file(toml)
        .expect("automations")
        .into_iter()
        .map(|s| Setting::Automation(Box::new(AutomationRecord::new(s, now))))
        .collect()
}

const TWO: &str = r#"
[[automation]]
name = "a"
trigger = { type = "event", expect = ["x.*"] }
actions = [{ type = "run-deployment", deployment = "cleanup" }, { type = "pause-automation", automation = "b" }]

[[automation]]
name = "b"
trigger = { type = "event", expect = ["y"] }
actions = [{ type = "do-nothing" }]
"#;

fn firing(name: &str, ms: i64, event: Option<EventId>) -> Firing {
    let window_start = Timestamp::from_millis(1_800_000_000_000 + ms);
    Firing {
        automation: name.to_owned(),
        bucket: String::new(),
        window_start,
        at: window_start,
        events: event.into_iter().collect(),
        key: format!("{name}//{ms}/{event:?}"),
    }
}

fn automation<'a>(w: &'a World, name: &str) -> &'a AutomationRecord {
    match w.state.hot().setting(&crate::work_queue::automation_key(name)) {
        Some(Setting::Automation(a)) => a,
        other => panic!("no automation {name}: {other:?}"),
    }
}

#[test]
fn a_file_is_put_whole_or_not_at_all() {
    let mut w = World::new();
    let at = w.now;
    // Its run-deployment names a deployment that does not exist: nothing is put.
    let out = w.apply(Command::PutSettings {
        settings: record(TWO, at),
        at,
    });
    let err = out.reply.unwrap_err().to_string();
    assert!(
        err.contains("\"a\"") && err.contains("actions[0]") && err.contains("cleanup"),
        "{err}"
    );
    assert!(out.writes.is_empty());
    assert!(w.state.hot().setting("automation/b").is_none());
    let d = Deployment {
        id: DeploymentId::from_bytes([7; 16]),
        name: "cleanup".into(),
        flow_name: "etl".into(),
        parameters: serde_json::Value::Null,
        schedules: vec![],
        work_queue: None,
        tags: vec![],
        concurrency_limit: None,
        collision: Default::default(),
        paused: false,
        result_storage: None,
        created: at,
        updated: at,
    };
    w.apply(Command::PutDeployment(d)).reply.expect("deployment");
    let out = w.apply(Command::PutSettings {
        settings: record(TWO, at),
        at,
    });
    assert_eq!(
        out.reply,
        Ok(Reply::SettingsPut {
            created: 2,
            updated: 0
        })
    );
    let created = out
        .events()
        .filter(|e| e.event == "flotilla.automation.created")
        .count();
    assert_eq!(created, 2);
    // The same file again changes nothing.
    let out = w.apply(Command::PutSettings {
        settings: record(TWO, at),
        at,
    });
    assert_eq!(
        out.reply,
        Ok(Reply::SettingsPut {
            created: 0,
            updated: 0
        })
    );
}

#[test]
fn a_firing_is_recorded_once_by_its_mark_in_log_order() {
    let mut w = World::new();
    let at = w.now;
    let one = r#"
[[automation]]
name = "b"
trigger = { type = "event", expect = ["y"] }
actions = [{ type = "do-nothing" }]
"#;
    w.apply(Command::PutSettings {
        settings: record(one, at),
        at,
    })
    .reply
    .expect("put");
    let e1 = EventId::at(at, LogIndex::new(10), 0);
    let e2 = EventId::at(at, LogIndex::new(11), 0);
    let fired = |w: &mut World, f: Firing| {
        let out = w.apply(Command::EditAutomation {
            name: "b".into(),
            edit: AutomationEdit::Fired(f),
            at,
        });
        let changed = matches!(out.reply, Ok(Reply::AutomationEdited { changed: true }));
        let triggered = out
            .events()
            .filter(|e| e.event == "flotilla.automation.triggered")
            .count();
        assert_eq!(triggered, usize::from(changed));
        changed
    };
    assert!(fired(&mut w, firing("b", 500, Some(e1))));
    // Decided again (a replay after a restart): a repeat.
    assert!(!fired(&mut w, firing("b", 500, Some(e1))));
    // A later event that happened earlier (two clients' events reach the log in either
    // order) is a new firing, not a repeat: found by `bench automations`.
    assert!(fired(&mut w, firing("b", 100, Some(e2))));
    assert_eq!(automation(&w, "b").firings, 2);
    // Outcomes are recorded once, each an event.
    let key = firing("b", 100, Some(e2)).key;
    let outcomes = vec![ActionOutcome {
        action: "do-nothing".into(),
        ok: true,
        detail: "nothing".into(),
        at: Some(at),
    }];
    let ran = |w: &mut World| {
        w.apply(Command::EditAutomation {
            name: "b".into(),
            edit: AutomationEdit::Ran {
                key: key.clone(),
                outcomes: outcomes.clone(),
            },
            at,
        })
    };
    let out = ran(&mut w);
    assert_eq!(
        out.events()
            .filter(|e| e.event == "flotilla.automation.action.executed")
            .count(),
        1
    );
    assert!(ran(&mut w).writes.is_empty());
    let a = automation(&w, "b");
    assert_eq!(
        a.pending().count(),
        1,
        "the first firing's actions have not reported"
    );
    // Pause, then pause again: the second changes nothing.
    let pause = |w: &mut World| {
        w.apply(Command::EditAutomation {
            name: "b".into(),
            edit: AutomationEdit::Pause,
            at,
        })
        .reply
    };
    assert_eq!(pause(&mut w), Ok(Reply::AutomationEdited { changed: true }));
    assert_eq!(pause(&mut w), Ok(Reply::AutomationEdited { changed: false }));
    assert!(automation(&w, "b").spec.paused);
    let missing = w.apply(Command::EditAutomation {
        name: "nope".into(),
        edit: AutomationEdit::Resume,
        at,
    });
    assert_eq!(missing.reply, Err(Refusal::AutomationNotFound("nope".into())));
}

#[test]
fn a_block_event_shows_no_sealed_field() {
    let mut w = World::new();
    let at = w.now;
    let b = BlockRecord {
        kind: BlockType::Secret,
        name: "api".into(),
        plain: serde_json::Map::new(),
        sealed: [(
            "value".to_owned(),
            crate::block::Sealed {
                key_id: "k".into(),
                nonce: vec![1; 24],
                ciphertext: b"CIPHERTEXT".to_vec(),
            },
        )]
        .into_iter()
        .collect(),
        created: at,
        updated: at,
    };
    let out = w.apply(Command::PutSetting {
        setting: Setting::Block(Box::new(b)),
        at,
    });
    let e = out.events().next().expect("an event");
    assert_eq!(e.event, "flotilla.block.created");
    let shown = serde_json::to_string(&e.payload).expect("json");
    assert!(
        shown.contains(crate::block::MASK) && !shown.contains("CIPHERTEXT"),
        "{shown}"
    );
}
