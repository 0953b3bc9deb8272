//! Events on the control node: pages of them after a cursor (by name prefix, or by an
//! [`EventFilter`]), waiting a while for the next one when there is none yet; and users' events
//! recorded, durably, before they are answered.

use super::*;
use flotilla_runtime::{Event, EventFilter, EventId};

/// Pages read past events that do not match, per request.
const SCAN_PAGES: usize = 20;

/// A scan of the events after `cursor`.
struct Scan {
    /// The events that matched (at most the limit).
    found: Vec<Event>,
    /// The last event read.
    cursor: Option<EventId>,
    /// Whether the scan passed the end of the window (or of the log).
    done: bool,
}

/// Reads up to [`SCAN_PAGES`] pages after `cursor`: the events that `matches` says match, until
/// `limit` of them, or one that `past` says is beyond the window.
async fn scan(
    p: &PersistenceHandle,
    mut cursor: Option<EventId>,
    limit: usize,
    matches: &impl Fn(&Event) -> bool,
    past: &impl Fn(&Event) -> bool,
) -> Result<Scan, PersistError> {
    let mut found = Vec::new();
    for _ in 0..SCAN_PAGES {
        let page = p.events(cursor, PAGE_MAX).await?;
        let Some(last) = page.last().map(|e| e.id) else {
            return Ok(Scan {
                found,
                cursor,
                done: true,
            });
        };
        for e in page {
            if past(&e) {
                return Ok(Scan {
                    found,
                    cursor,
                    done: true,
                });
            }
            cursor = Some(e.id);
            if matches(&e) {
                found.push(e);
                if found.len() == limit {
                    return Ok(Scan {
                        found,
                        cursor,
                        done: false,
                    });
                }
            }
        }
        cursor = Some(last);
    }
    Ok(Scan {
        found,
        cursor,
        done: false,
    })
}

/// Waits until `deadline` for a new event that `matches`; whether one came.
async fn wait_for_one(
    live: &mut tokio::sync::broadcast::Receiver<Arc<Event>>,
    deadline: tokio::time::Instant,
    matches: &impl Fn(&Event) -> bool,
) -> bool {
    let waited = tokio::time::timeout_at(deadline, async {
        loop {
            match live.recv().await {
                Ok(e) if matches(&e) => return true,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
            }
        }
    })
    .await;
    matches!(waited, Ok(true))
}

fn deadline_after(wait_ms: u32) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(u64::from(wait_ms.min(WAIT_MS_MAX)))
}

/// Events after a cursor whose names start with `prefix`; waits up to `wait_ms` for one when
/// there is none yet. Reads at most 20 pages past events that do not match.
pub(super) async fn events(
    p: &PersistenceHandle,
    after: Option<EventId>,
    prefix: Option<String>,
    limit: u32,
    wait_ms: u32,
) -> Response {
    let limit = (limit as usize).clamp(1, PAGE_MAX);
    let matches = |e: &Event| prefix.as_deref().is_none_or(|x| e.event.starts_with(x));
    // Subscribe before reading, so an event between the two is not missed.
    let mut live = p.subscribe();
    let deadline = deadline_after(wait_ms);
    let mut cursor = after;
    loop {
        match scan(p, cursor, limit, &matches, &|_| false).await {
            Err(e) => return persist_err(e),
            Ok(s) if !s.found.is_empty() => return Response::Events(s.found),
            Ok(s) => cursor = s.cursor,
        }
        if !wait_for_one(&mut live, deadline, &matches).await {
            return Response::Events(Vec::new());
        }
    }
}

/// Events after a cursor (or from the filter's `since`) that match `filter`, at most `limit`;
/// waits up to `wait_ms` for one when there is none yet. Answers where the scan stopped, so
/// that a filter matching few of many events is paged through rather than read in one go.
pub(super) async fn find_events(
    p: &PersistenceHandle,
    after: Option<EventId>,
    filter: EventFilter,
    limit: u32,
    wait_ms: u32,
) -> Response {
    if let Err(e) = filter.check() {
        return refused(ErrorKind::Invalid, format!("the event filter: {e}"));
    }
    let limit = (limit as usize).clamp(1, PAGE_MAX);
    let from = filter.since.map(EventId::first_at);
    let mut cursor = after.max(from);
    let matches = |e: &Event| filter.matches(e);
    let past = |e: &Event| filter.until.is_some_and(|u| e.occurred >= u);
    let mut live = p.subscribe();
    let deadline = deadline_after(wait_ms);
    loop {
        let s = match scan(p, cursor, limit, &matches, &past).await {
            Ok(s) => s,
            Err(e) => return persist_err(e),
        };
        let window_over = s.done && filter.until.is_some();
        if !s.found.is_empty() || !s.done || window_over {
            return Response::EventPage {
                events: s.found,
                next: if window_over { None } else { s.cursor },
            };
        }
        cursor = s.cursor;
        if !wait_for_one(&mut live, deadline, &matches).await {
            return Response::EventPage {
                events: Vec::new(),
                next: cursor,
            };
        }
    }
}

/// Records a user's event: given the next id in log order, durable before it is answered.
pub(super) async fn emit(p: &PersistenceHandle, mut event: Event) -> Response {
    event.id = EventId::from_bytes([0; 16]);
    match p.submit(Command::AppendEvent(event)).await {
        Ok(Ok(Reply::EventAppended { id })) => Response::EventEmitted(id),
        Ok(Ok(other)) => refused(ErrorKind::Unavailable, format!("unexpected answer {other:?}")),
        Ok(Err(refusal)) => refused(ErrorKind::of_refusal(&refusal), refusal.to_string()),
        Err(e) => persist_err(e),
    }
}
