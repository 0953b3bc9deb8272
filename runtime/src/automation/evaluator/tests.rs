#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::automation::parse_file;
use crate::event::{EventPayload, RESOURCE_ROLE, Resource};

const T0: Timestamp = Timestamp::from_micros(1_800_000_000_000_000);

fn at(ms: u64) -> Timestamp {
    T0 + Duration::from_millis(ms)
}

fn event(name: &str, id: &str, ms: u64) -> Event {
    Event {
        id: EventId::at(at(ms), crate::ids::LogIndex::new(ms + 1), 0),
        occurred: at(ms),
        event: name.to_owned(),
        resource: Resource::new(id, None),
        related: Vec::new(),
        payload: EventPayload::Data(serde_json::Value::Null),
    }
}

fn evaluator(toml: &str) -> Evaluator {
    let mut e = Evaluator::new();
    for spec in parse_file(toml).expect("automations") {
        e.put(spec, T0);
    }
    e
}

fn names(f: &[Firing]) -> Vec<&str> {
    f.iter().map(|f| f.automation.as_str()).collect()
}

#[test]
fn a_reactive_trigger_fires_when_threshold_events_come_within_its_window() {
    let mut e = evaluator(
        r#"
[[automation]]
name = "three-in-10s"
trigger = { type = "event", expect = ["app.error"], threshold = 3, within = "10s" }
actions = [{ type = "do-nothing" }]
"#,
    );
    assert!(e.event(&event("app.error", "a", 0), at(0)).is_empty());
    assert!(e.event(&event("app.error", "a", 6_000), at(6_000)).is_empty());
    // The first has left the window: two in it.
    assert!(e.event(&event("app.error", "a", 11_000), at(11_000)).is_empty());
    let f = e.event(&event("app.error", "a", 12_000), at(12_000));
    assert_eq!(names(&f), ["three-in-10s"]);
    assert_eq!(f[0].window_start, at(6_000));
    assert_eq!(f[0].events.len(), 3);
    let last = f[0].events.iter().max().expect("events");
    assert_eq!(
        f[0].key,
        format!("three-in-10s//{}/{last}", at(6_000).as_micros())
    );
    // Counting starts over after a firing.
    assert!(e.event(&event("app.error", "a", 12_500), at(12_500)).is_empty());
    // Other names are not counted.
    assert!(e.event(&event("app.other", "a", 13_000), at(13_000)).is_empty());
}

#[test]
fn a_trigger_with_within_0s_fires_on_every_matching_event() {
    let mut e = evaluator(
        r#"
[[automation]]
name = "each"
trigger = { type = "event", expect = ["flotilla.flow-run.Failed"], match_related = { "flotilla.resource.role" = "deployment", "flotilla.resource.name" = "nightly" }, threshold = 1, within = "0s" }
actions = [{ type = "do-nothing" }]
"#,
    );
    let mut failed = event("flotilla.flow-run.Failed", "flotilla.flow-run.1", 0);
    assert!(e.event(&failed, at(0)).is_empty(), "not the deployment's");
    failed
        .related
        .push(Resource::new("flotilla.deployment.9", Some("nightly")).with(RESOURCE_ROLE, "deployment"));
    assert_eq!(e.event(&failed, at(1)).len(), 1);
    assert_eq!(e.event(&failed, at(2)).len(), 1);
}

#[test]
fn for_each_counts_and_fires_per_bucket() {
    let mut e = evaluator(
        r#"
[[automation]]
name = "per-pump"
trigger = { type = "event", expect = ["app.error"], for_each = ["flotilla.resource.id"], threshold = 2, within = "1m" }
actions = [{ type = "do-nothing" }]
"#,
    );
    assert!(e.event(&event("app.error", "pump-1", 0), at(0)).is_empty());
    assert!(e.event(&event("app.error", "pump-2", 1), at(1)).is_empty());
    let f = e.event(&event("app.error", "pump-1", 2), at(2));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].bucket, "pump-1");
    let f = e.event(&event("app.error", "pump-2", 3), at(3));
    assert_eq!(f[0].bucket, "pump-2");
    assert_ne!(f[0].key, format!("per-pump/pump-1/{}", at(0).as_micros()));
}

#[test]
fn a_proactive_trigger_fires_after_silence_and_not_before() {
    let mut e = evaluator(
        r#"
[[automation]]
name = "silence"
trigger = { type = "event", posture = "proactive", expect = ["app.heartbeat"], match = { "flotilla.resource.id" = "app.pump" }, threshold = 1, within = "2s" }
actions = [{ type = "do-nothing" }]
"#,
    );
    // Heartbeats every 500 ms for 4 s: never silent for 2 s.
    for ms in (0..=4_000).step_by(500) {
        assert!(
            e.event(&event("app.heartbeat", "app.pump", ms), at(ms))
                .is_empty()
        );
        assert!(e.tick(at(ms + 250)).is_empty(), "fired at {} ms", ms + 250);
    }
    // Another pump's heartbeats do not count.
    assert!(
        e.event(&event("app.heartbeat", "app.other", 4_100), at(4_100))
            .is_empty()
    );
    assert_eq!(e.next_deadline(), Some(at(6_000)));
    assert!(e.tick(at(5_999)).is_empty());
    let f = e.tick(at(6_000));
    assert_eq!(names(&f), ["silence"]);
    // Re-armed: it fires again a window later if the silence goes on, once per window.
    assert!(e.tick(at(7_000)).is_empty());
    assert_eq!(e.tick(at(8_000)).len(), 1);
    assert_ne!(e.tick(at(10_000))[0].key, f[0].key);
}

#[test]
fn a_proactive_trigger_counts_from_when_it_was_armed() {
    let mut e = evaluator(
        r#"
[[automation]]
name = "quiet"
trigger = { type = "event", posture = "proactive", expect = ["app.ping"], threshold = 2, within = "10s" }
actions = [{ type = "do-nothing" }]
"#,
    );
    // Created at T0: nothing before a whole window has passed.
    assert!(e.tick(at(9_999)).is_empty());
    assert!(e.event(&event("app.ping", "a", 9_000), at(9_000)).is_empty());
    // One ping in the last 10 s, fewer than two: it fires.
    assert_eq!(e.tick(at(10_000)).len(), 1);
    // Two pings in a window keep it quiet until the older leaves the window.
    e.event(&event("app.ping", "a", 12_000), at(12_000));
    e.event(&event("app.ping", "a", 13_000), at(13_000));
    assert!(e.tick(at(20_000)).is_empty());
    assert_eq!(e.next_deadline(), Some(at(22_000)));
    assert_eq!(e.tick(at(22_000)).len(), 1);
    // Paused, it does not fire; resumed, it is armed afresh.
    assert!(e.set_paused("quiet", true, at(22_000)));
    assert!(e.tick(at(40_000)).is_empty());
    assert!(e.set_paused("quiet", false, at(40_000)));
    assert!(e.tick(at(49_999)).is_empty());
    assert_eq!(e.tick(at(50_000)).len(), 1);
}

#[test]
fn after_arms_a_proactive_trigger() {
    let mut e = evaluator(
        r#"
[[automation]]
name = "finish-in-5s"
trigger = { type = "event", posture = "proactive", after = ["job.started"], expect = ["job.finished"], for_each = ["flotilla.resource.id"], threshold = 1, within = "5s" }
actions = [{ type = "do-nothing" }]
"#,
    );
    assert!(e.tick(at(60_000)).is_empty(), "not armed before a start");
    e.event(&event("job.started", "job-1", 60_000), at(60_000));
    e.event(&event("job.started", "job-2", 60_000), at(60_000));
    e.event(&event("job.finished", "job-2", 61_000), at(61_000));
    let f = e.tick(at(65_000));
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].bucket, "job-1");
    assert!(e.tick(at(80_000)).is_empty(), "disarmed until the next start");
}

#[test]
fn compound_and_sequence_triggers() {
    let mut e = evaluator(
        r#"
[[automation]]
name = "both"
trigger = { type = "compound", require = "all", within = "1m", triggers = [{ type = "event", expect = ["a.one"] }, { type = "event", expect = ["a.two"] }] }
actions = [{ type = "do-nothing" }]

[[automation]]
name = "either"
trigger = { type = "compound", require = "any", triggers = [{ type = "event", expect = ["a.one"] }, { type = "event", expect = ["a.three"] }] }
actions = [{ type = "do-nothing" }]

[[automation]]
name = "in-order"
trigger = { type = "sequence", within = "1m", triggers = [{ type = "event", expect = ["s.one"] }, { type = "event", expect = ["s.two"] }] }
actions = [{ type = "do-nothing" }]
"#,
    );
    assert_eq!(names(&e.event(&event("a.one", "x", 0), at(0))), ["either"]);
    assert_eq!(names(&e.event(&event("a.two", "x", 1_000), at(1_000))), ["both"]);
    // Too far apart: the first has left the window.
    e.event(&event("a.one", "x", 2_000), at(2_000));
    assert!(e.event(&event("a.two", "x", 70_000), at(70_000)).is_empty());

    // Out of order: nothing; in order: fires.
    assert!(e.event(&event("s.two", "x", 100_000), at(100_000)).is_empty());
    assert!(e.event(&event("s.one", "x", 101_000), at(101_000)).is_empty());
    assert_eq!(
        names(&e.event(&event("s.two", "x", 102_000), at(102_000))),
        ["in-order"]
    );
    // In order but too slow: nothing.
    e.event(&event("s.one", "x", 200_000), at(200_000));
    assert!(e.event(&event("s.two", "x", 300_000), at(300_000)).is_empty());
}

#[test]
fn an_event_reaches_only_the_automations_that_name_it() {
    let mut toml = String::new();
    for i in 0..200 {
        toml.push_str(&format!(
            "[[automation]]\nname = \"a{i}\"\ntrigger = {{ type = \"event\", expect = [\"app.{i}\"] }}\nactions = [{{ type = \"do-nothing\" }}]\n"
        ));
    }
    toml.push_str("[[automation]]\nname = \"prefix\"\ntrigger = { type = \"event\", expect = [\"app.1*\"] }\nactions = [{ type = \"do-nothing\" }]\n");
    toml.push_str("[[automation]]\nname = \"glob\"\ntrigger = { type = \"event\", expect = [\"*.17\"] }\nactions = [{ type = \"do-nothing\" }]\n");
    let mut e = evaluator(&toml);
    assert_eq!(
        e.index.candidates("app.17").into_iter().collect::<Vec<_>>(),
        ["a17", "glob", "prefix"]
    );
    let mut fired = names(&e.event(&event("app.17", "x", 0), at(0)))
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    fired.sort();
    assert_eq!(fired, ["a17", "glob", "prefix"]);
    assert!(e.remove("a17"));
    assert!(!e.index.candidates("app.17").contains("a17"));
}

proptest::proptest! {
    /// Any sequence of events and ticks: a reactive trigger with threshold 1 and no window
    /// fires exactly once per matching event, and firings' keys are never repeated by a
    /// proactive trigger.
    #[test]
    fn firings_match_events_one_for_one(steps in proptest::collection::vec((0u8..3, 1u64..3_000), 1..60)) {
        let mut e = evaluator(r#"
[[automation]]
name = "each"
trigger = { type = "event", expect = ["x.hit"], within = "0s" }
actions = [{ type = "do-nothing" }]
[[automation]]
name = "quiet"
trigger = { type = "event", posture = "proactive", expect = ["x.hit"], within = "1s" }
actions = [{ type = "do-nothing" }]
"#);
        let (mut now, mut hits, mut each, mut keys) = (0u64, 0, 0, BTreeSet::new());
        for (kind, gap) in steps {
            now += gap;
            let fired = match kind {
                0 => { hits += 1; e.event(&event("x.hit", "r", now), at(now)) }
                1 => e.event(&event("x.miss", "r", now), at(now)),
                _ => e.tick(at(now)),
            };
            for f in fired {
                if f.automation == "each" { each += 1 } else {
                    proptest::prop_assert!(keys.insert(f.key.clone()), "key {} twice", f.key);
                }
            }
        }
        proptest::prop_assert_eq!(each, hits);
    }

    /// Whatever happens (events, ticks, pauses, resumes, removals, replacements), the next
    /// deadline kept in the index is the earliest of every automation's own, as a look at each
    /// would find it.
    #[test]
    fn the_deadline_index_agrees_with_every_automation(
        steps in proptest::collection::vec((0u8..7, 0u8..3, 1u64..3_000), 1..80),
    ) {
        let toml = |i: u8| format!(r#"
[[automation]]
name = "quiet-{i}"
trigger = {{ type = "event", posture = "proactive", expect = ["x.{i}"], for_each = ["flotilla.resource.id"], threshold = {t}, within = "{w}ms" }}
actions = [{{ type = "do-nothing" }}]
[[automation]]
name = "loud-{i}"
trigger = {{ type = "event", expect = ["x.{i}"], within = "0s" }}
actions = [{{ type = "do-nothing" }}]
"#, t = 1 + u32::from(i), w = 500 + 700 * u32::from(i));
        let mut e = Evaluator::new();
        for i in 0..3 {
            for spec in parse_file(&toml(i)).expect("automations") {
                e.put(spec, T0);
            }
        }
        let mut now = 0u64;
        for (kind, i, gap) in steps {
            now += gap;
            match kind {
                0 | 1 => { e.event(&event(&format!("x.{i}"), &format!("r{}", gap % 3), now), at(now)); }
                2 => { e.tick(at(now)); }
                3 => { e.set_paused(&format!("quiet-{i}"), true, at(now)); }
                4 => { e.set_paused(&format!("quiet-{i}"), false, at(now)); }
                5 => { e.remove(&format!("quiet-{i}")); }
                _ => {
                    for spec in parse_file(&toml(i)).expect("automations") {
                        e.put(spec, at(now));
                    }
                }
            }
            let brute = e
                .automations
                .values()
                .filter(|h| !h.paused)
                .filter_map(|h| deadline(&h.spec.trigger, &h.state))
                .min();
            proptest::prop_assert_eq!(e.next_deadline(), brute);
        }
    }
}
