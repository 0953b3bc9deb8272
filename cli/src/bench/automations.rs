//! `flotilla bench automations`: one control node (a child process, a temporary directory)
//! holding 1,000 automations with varied filters (exact names, prefixes, resource labels,
//! related resources, thresholds over windows, `for_each` buckets); clients emit events through
//! the client protocol as fast as the node takes them for 30 s, most of them matching no
//! automation, as on a busy cluster. The firings expected are computed by the runtime's
//! evaluator fed the same events in the log's order; the firings the node made are read back
//! from its events (`flotilla.automation.triggered`, one per firing, and the actions'
//! `flotilla.automation.action.executed`). Trigger to action: from the triggering event's
//! emission to its action's outcome recorded.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use flotilla_runtime::automation::{
    Action, AutomationSpec, Evaluator, EventTrigger, Posture, Trigger, Within,
};
use flotilla_runtime::event_filter::LabelSpec;
use flotilla_runtime::{Event, EventFilter, EventId, EventPayload, Resource, Timestamp};
use hdrhistogram::Histogram;
use rand::RngExt as _;
use serde::Serialize;

use crate::cluster_cmd::LocalCluster;

#[derive(Debug, Args)]
pub struct AutomationsArgs {
    /// Print one JSON object on one line instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds of events.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Automations.
    #[arg(long, default_value_t = 1000)]
    automations: u32,
    /// Events in flight at most.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Events offered per second, spread over the emitters (0: as fast as the node answers).
    #[arg(long, default_value_t = 12_000)]
    rate: u32,
    /// The share of events that some automation counts (the others match none).
    #[arg(long, default_value_t = 0.1)]
    matching: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    automations: u32,
    seconds: f64,
    events: u64,
    events_per_s: f64,
    firings_expected: u64,
    firings_seen: u64,
    firings_lost: u64,
    firings_duplicated: u64,
    firings_unexpected: u64,
    trigger_to_action_p50_ms: f64,
    trigger_to_action_p99_ms: f64,
    trigger_to_action_max_ms: f64,
}

fn now() -> Timestamp {
    Timestamp::from(chrono::Utc::now())
}

fn label(spec: &[(&str, String)]) -> LabelSpec {
    serde_json::from_value(serde_json::Value::Object(
        spec.iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(v.clone())))
            .collect(),
    ))
    .unwrap_or_default()
}

/// Automation `i`: one of five kinds, each counting events of its own names.
fn automation(i: u32) -> AutomationSpec {
    let mut t = EventTrigger {
        posture: Posture::Reactive,
        expect: Vec::new(),
        after: Vec::new(),
        match_resource: LabelSpec::default(),
        match_related: LabelSpec::default(),
        for_each: Vec::new(),
        threshold: 1,
        within: Within(Duration::ZERO),
    };
    match i % 5 {
        0 => t.expect = vec![format!("bench.exact.{i}")],
        1 => {
            t.expect = vec![format!("bench.prefix.{i}.*")];
            t.threshold = 2;
            t.within = Within(Duration::from_secs(10));
            t.for_each = vec!["bench.key".into()];
        }
        2 => {
            t.expect = vec![format!("bench.exact.{i}")];
            t.match_resource = label(&[("bench.key", "k1".into())]);
        }
        3 => {
            t.expect = vec![format!("bench.related.{i}")];
            t.match_related = label(&[
                ("flotilla.resource.role", "owner".into()),
                ("bench.team", format!("team-{}", i % 3)),
            ]);
        }
        _ => {
            t.expect = vec![format!("bench.exact.{i}")];
            t.threshold = 3;
            t.within = Within(Duration::from_secs(60));
            t.for_each = vec!["flotilla.resource.id".into()];
        }
    }
    AutomationSpec {
        name: format!("bench-{i:05}"),
        description: None,
        trigger: Trigger::Event(t),
        actions: vec![Action::DoNothing],
        paused: false,
    }
}

/// A random event: for automation `j` (its kind's names and labels), or noise.
fn event(n: u32, matching: f64, rng: &mut impl rand::Rng) -> Event {
    let j = rng.random_range(0..n);
    let key = format!("k{}", rng.random_range(0..4u32));
    let resource =
        Resource::new(format!("bench.res.{}", rng.random_range(0..8u32)), None).with("bench.key", key);
    let mut related = Vec::new();
    let name = if rng.random_bool(matching.clamp(0.0, 1.0)) {
        match j % 5 {
            1 => format!("bench.prefix.{j}.x"),
            3 => {
                related.push(
                    Resource::new(format!("bench.owner.{}", rng.random_range(0..3u32)), None)
                        .with("flotilla.resource.role", "owner")
                        .with("bench.team", format!("team-{}", rng.random_range(0..3u32))),
                );
                format!("bench.related.{j}")
            }
            _ => format!("bench.exact.{j}"),
        }
    } else {
        format!("bench.noise.{j}")
    };
    Event::user(&name, now(), resource, related, serde_json::Value::Null)
}

fn free_port() -> anyhow::Result<u16> {
    for _ in 0..200 {
        let p = 20_000 + (rand::random::<u16>() % 30_000);
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return Ok(p);
        }
    }
    anyhow::bail!("cannot find a free UDP port")
}

pub async fn run(args: AutomationsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.automations >= 1, "--automations is at least 1");
    anyhow::ensure!(args.concurrency >= 1, "--concurrency is at least 1");
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    if !args.json {
        eprintln!("starting a control node…");
    }
    let cluster = LocalCluster::start(1, dir.path(), free_port()?, &["--quiet-runs"]).await?;
    let r = measure(&args, &cluster.client).await;
    cluster.stop().await;
    let report = r?;
    if report.firings_lost > 0 || report.firings_unexpected > 0 {
        // Kept for a look at what the node did.
        let kept = std::env::temp_dir().join("flotilla-bench-automations-n1.log");
        if std::fs::copy(dir.path().join("n1.log"), &kept).is_ok() {
            eprintln!("the node's log is kept in {}", kept.display());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

async fn measure(args: &AutomationsArgs, client: &flotilla::Client) -> anyhow::Result<Report> {
    let specs: Vec<AutomationSpec> = (0..args.automations).map(automation).collect();
    client
        .put_automations(specs.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the automations: {e}"))?;
    let start = now();
    if !args.json {
        eprintln!(
            "{} automations; emitting events for {} s…",
            args.automations, args.seconds
        );
    }
    // The emitters: each event kept with its id and when it was sent.
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let mut tasks = Vec::new();
    // Each emitter offers its share of the rate, on a fixed schedule (an open loop: one that
    // falls behind catches up at once).
    let period =
        (args.rate > 0).then(|| Duration::from_secs_f64(args.concurrency as f64 / f64::from(args.rate)));
    for i in 0..args.concurrency {
        let (client, stop, n, matching) = (client.clone(), stop.clone(), args.automations, args.matching);
        let offset = period.map(|p| p.mul_f64(i as f64 / args.concurrency as f64));
        tasks.push(tokio::spawn(async move {
            let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::from_rng(&mut rand::rng());
            let mut sent: Vec<(EventId, Event)> = Vec::new();
            let mut next = tokio::time::Instant::now() + offset.unwrap_or_default();
            while !stop.load(Ordering::Relaxed) {
                if let Some(p) = period {
                    tokio::time::sleep_until(next).await;
                    next += p;
                }
                let e = event(n, matching, &mut rng);
                let id = client
                    .emit(e.clone())
                    .await
                    .map_err(|err| anyhow::anyhow!("emit_event: {err}"))?;
                sent.push((id, e));
            }
            anyhow::Ok(sent)
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await.context("an emitter stopped")??);
    }
    let elapsed = began.elapsed().as_secs_f64();
    let events = sent.len() as u64;
    // What the node should have fired: the evaluator fed the same events in log order.
    sent.sort_by_key(|(id, _)| *id);
    let mut reference = Evaluator::new();
    for s in &specs {
        reference.put(s.clone(), start);
    }
    let mut expected: BTreeMap<String, EventId> = BTreeMap::new();
    let mut emitted_at: HashMap<EventId, Timestamp> = HashMap::with_capacity(sent.len());
    for (id, e) in &mut sent {
        e.id = *id;
        emitted_at.insert(*id, e.occurred);
        for f in reference.event(e, e.occurred) {
            expected.insert(f.key.clone(), *id);
        }
    }
    if !args.json {
        eprintln!(
            "{events} events in {elapsed:.1} s; {} firings expected; reading them back…",
            expected.len()
        );
    }
    // What it fired, and when each firing's action was recorded.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut seen, mut executed): (HashMap<String, u32>, HashMap<String, Timestamp>) = Default::default();
    let mut cursor = Some(EventId::first_at(start));
    let filter = EventFilter {
        event: vec!["flotilla.automation.*".into()],
        ..EventFilter::default()
    };
    loop {
        let (page, next) = client
            .find_events(cursor, filter.clone(), 1000, Duration::from_millis(200))
            .await
            .map_err(|e| anyhow::anyhow!("reading the firings: {e}"))?;
        for e in &page {
            let EventPayload::Data(d) = &e.payload else {
                continue;
            };
            let Some(key) = d.get("key").and_then(|k| k.as_str()) else {
                continue;
            };
            match e.event.as_str() {
                "flotilla.automation.triggered" => *seen.entry(key.to_owned()).or_default() += 1,
                "flotilla.automation.action.executed" | "flotilla.automation.action.failed" => {
                    // When the action was done (its outcome is recorded a commit later).
                    let at = d
                        .get("at")
                        .and_then(|a| serde_json::from_value::<Timestamp>(a.clone()).ok())
                        .unwrap_or(e.occurred);
                    executed.entry(key.to_owned()).or_insert(at);
                }
                _ => {}
            }
        }
        cursor = next.or(cursor);
        let done = expected.keys().all(|k| executed.contains_key(k));
        if (page.is_empty() && done) || Instant::now() > deadline {
            break;
        }
    }
    let mut h = Histogram::<u64>::new_with_max(600_000_000, 3).context("histogram")?;
    for (key, trigger) in &expected {
        if let (Some(at), Some(sent)) = (executed.get(key), emitted_at.get(trigger)) {
            let _ = h.record(at.saturating_since(*sent).as_micros() as u64);
        }
    }
    let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
    let lost = expected.keys().filter(|k| !seen.contains_key(*k)).count() as u64;
    for (k, trigger) in expected.iter().filter(|(k, _)| !seen.contains_key(*k)).take(10) {
        let e = sent.iter().find(|(id, _)| id == trigger).map(|(_, e)| e);
        eprintln!(
            "lost: {k} (its action {}), triggered by {trigger} {:?}",
            if executed.contains_key(k) {
                "recorded"
            } else {
                "not recorded"
            },
            e.map(|e| (&e.event, e.occurred, &e.resource))
        );
    }
    for k in seen.keys().filter(|k| !expected.contains_key(*k)).take(10) {
        eprintln!("unexpected: {k}");
    }
    Ok(Report {
        scenario: "automations",
        automations: args.automations,
        seconds: (elapsed * 10.0).round() / 10.0,
        events,
        events_per_s: (events as f64 / elapsed).round(),
        firings_expected: expected.len() as u64,
        firings_seen: seen.len() as u64,
        firings_lost: lost,
        firings_duplicated: seen.values().map(|n| u64::from(n.saturating_sub(1))).sum(),
        firings_unexpected: seen.keys().filter(|k| !expected.contains_key(*k)).count() as u64,
        trigger_to_action_p50_ms: ms(h.value_at_quantile(0.5)),
        trigger_to_action_p99_ms: ms(h.value_at_quantile(0.99)),
        trigger_to_action_max_ms: ms(h.max()),
    })
}
