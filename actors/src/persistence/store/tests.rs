//! The store's encodings and job merging.

use super::*;
use flotilla_runtime::{EventPayload, Resource};
use proptest::prelude::*;

fn event(n: u64) -> Event {
    Event {
        id: EventId::at(Timestamp::from_millis(1), LogIndex::new(n), 0),
        occurred: Timestamp::from_millis(1),
        event: "flotilla.test".into(),
        resource: Resource::new("r", None),
        related: vec![],
        payload: EventPayload::Data(serde_json::json!({ "n": n })),
    }
}

#[test]
fn event_blocks_round_trip_and_find_by_id() {
    let events: Vec<Event> = (1..=5).map(event).collect();
    let block = EventBlock {
        ids: events.iter().map(|e| e.id).collect(),
        events: events
            .iter()
            .map(|e| ByteBuf::from(codec::encode(e).unwrap()))
            .collect(),
    };
    let stored = block.to_stored().unwrap();
    let back = EventBlock::from_stored(&stored).unwrap();
    let found: Event = codec::decode(back.find(&events[3].id).unwrap()).unwrap();
    assert_eq!(found, events[3]);
    assert!(back.find(&event(9).id).is_none());
}

fn queue(name: &str, priority: u32) -> flotilla_runtime::Setting {
    flotilla_runtime::Setting::WorkQueue(flotilla_runtime::WorkQueue {
        id: flotilla_runtime::WorkQueueId::from_bytes([0; 16]),
        name: name.into(),
        priority,
        concurrency_limit: None,
        paused: false,
    })
}

/// Regression: merging queued jobs dropped every job's settings but the first's, so a
/// setting acknowledged under load was never written to the store (and lost on restart once
/// the log was truncated past it).
#[test]
fn merged_jobs_keep_every_jobs_settings_the_latest_winning() {
    let job = |upto: u64, settings: Vec<(String, Option<flotilla_runtime::Setting>)>| StoreJob {
        upto: LogIndex::new(upto),
        settings,
        ..StoreJob::default()
    };
    let merged = StoreJob::merge(vec![
        job(1, vec![("work-queue/a".into(), Some(queue("a", 1)))]),
        job(2, vec![("work-queue/b".into(), Some(queue("b", 2)))]),
        job(
            3,
            vec![
                ("work-queue/a".into(), Some(queue("a", 3))),
                ("work-queue/c".into(), None),
            ],
        ),
    ]);
    assert_eq!(merged.upto, LogIndex::new(3));
    let mut got = merged.settings.clone();
    got.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        got,
        vec![
            ("work-queue/a".to_string(), Some(queue("a", 3))),
            ("work-queue/b".to_string(), Some(queue("b", 2))),
            ("work-queue/c".to_string(), None),
        ]
    );
}

#[test]
fn an_event_block_claiming_a_huge_size_is_refused() {
    let mut bytes = (u32::MAX).to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0; 16]);
    assert!(EventBlock::from_stored(&bytes).is_err());
}

proptest! {
    #[test]
    fn decoding_arbitrary_event_blocks_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = EventBlock::from_stored(&bytes);
    }

    #[test]
    fn decoding_damaged_event_blocks_never_panics(at in 0usize..1000, val: u8) {
        let events: Vec<Event> = (1..=3).map(event).collect();
        let block = EventBlock {
            ids: events.iter().map(|e| e.id).collect(),
            events: events.iter().map(|e| ByteBuf::from(codec::encode(e).unwrap())).collect(),
        };
        let mut stored = block.to_stored().unwrap();
        let i = at % stored.len();
        stored[i] = val;
        if let Ok(b) = EventBlock::from_stored(&stored) {
            for raw in &b.events {
                let _ = codec::decode::<Event>(raw);
            }
        }
    }
}

/// Regression (found by the eviction property test): a run made again under the id of one
/// pruned since the last job was written and then deleted by that pruning, in one job. A
/// pruning now ends a merged group, so what follows it is written after it.
#[test]
fn merging_never_puts_a_pruning_after_what_followed_it() {
    let job = |upto: u64, prunes: bool| StoreJob {
        upto: LogIndex::new(upto),
        prune: ColdPrune {
            before: prunes.then_some((Timestamp::EPOCH, Timestamp::EPOCH)),
            ..ColdPrune::default()
        },
        ..StoreJob::default()
    };
    let merged = StoreJob::merge_all(vec![job(1, false), job(2, true), job(3, false), job(4, false)]);
    let uptos: Vec<u64> = merged.iter().map(|j| j.upto.get()).collect();
    assert_eq!(uptos, vec![2, 4]);
    assert!(!merged[0].prune.is_empty() && merged[1].prune.is_empty());
}
