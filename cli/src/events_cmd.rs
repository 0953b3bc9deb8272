//! `flotilla events ls | tail | emit`: the cluster's events, found with one filter (names,
//! resource labels, related resources, a time window), and users' own events.

use std::time::Duration;

use clap::{Args, Subcommand};
use flotilla_runtime::event::{EVENT_PAYLOAD_BYTES_MAX, RESOURCE_ROLE};
use flotilla_runtime::{Event, EventFilter, EventId, LabelSpec, Resource, Timestamp};

use crate::config::{CodedError, Conn, duration};

/// Which events (the same flags for `ls` and `tail`).
#[derive(Debug, Clone, Default, Args)]
pub struct FilterArgs {
    /// Event names: exact, or a prefix written with `*` (`flotilla.flow-run.*`); repeated, any
    /// of them.
    #[arg(long = "event", value_name = "NAME")]
    event: Vec<String>,
    /// Event names left out (the same forms); repeatable.
    #[arg(long = "exclude", value_name = "NAME")]
    exclude: Vec<String>,
    /// A label of the event's resource, KEY=VALUE (`*` wildcards): every key given must match,
    /// a key given twice either value.
    #[arg(long = "resource", value_name = "KEY=VALUE")]
    resource: Vec<String>,
    /// A related resource, ROLE:KEY=VALUE[,KEY=VALUE…] (roles: flow, deployment, work-queue,
    /// node, tag, or any a user gave); each one given must be among the event's related.
    #[arg(long = "related", value_name = "ROLE:KEY=VALUE")]
    related: Vec<String>,
    /// Events before this time: RFC 3339, or how long ago (`5m`).
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
}

/// Event commands.
#[derive(Debug, Subcommand)]
pub enum EventsCmd {
    /// List the events that match, oldest first, a page at a time.
    Ls {
        #[command(flatten)]
        filter: FilterArgs,
        /// Events at or after this time: RFC 3339, or how long ago (`10m`) [default: the oldest
        /// kept].
        #[arg(long, value_name = "TIME", conflicts_with = "cursor")]
        since: Option<String>,
        /// At most this many (1 to 1,000); the next page's cursor is printed on stderr when
        /// more may remain.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Go on from this cursor (printed by an earlier page).
        #[arg(long)]
        cursor: Option<String>,
        /// A JSON array of the events.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print the latest events, and with --follow every new one as it comes.
    Tail {
        #[command(flatten)]
        filter: FilterArgs,
        /// Keep printing new events until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only events whose name starts with this (the same as `--event PREFIX*`).
        #[arg(long)]
        prefix: Option<String>,
        /// Start this far back, or at this time (RFC 3339).
        #[arg(long, default_value = "10m")]
        since: String,
        /// Without --follow, print at most this many (the latest; with --cursor, the next page
        /// of at most 1,000).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print the page of events after this cursor (oldest first) instead of the latest; the
        /// next page's cursor is printed on stderr when more remain.
        #[arg(long, conflicts_with_all = ["follow", "since"])]
        cursor: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Record an event of your own (durable once this returns).
    Emit {
        /// Its name, dotted (`app.heartbeat`).
        name: String,
        /// A label of its resource, KEY=VALUE; `flotilla.resource.id` is required.
        #[arg(long = "resource", value_name = "KEY=VALUE", required = true)]
        resource: Vec<String>,
        /// A related resource, ROLE:KEY=VALUE[,KEY=VALUE…]; repeatable.
        #[arg(long = "related", value_name = "ROLE:KEY=VALUE")]
        related: Vec<String>,
        /// Its payload, JSON (`@FILE` reads it from a file, `@-` from standard input).
        #[arg(long, value_name = "JSON")]
        payload_json: Option<String>,
        /// Print {"id": …}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// An event page's cursor: opaque to users (`e` and the last event's id, without dashes).
fn event_cursor(last: EventId) -> String {
    format!("e{}", last.as_uuid().simple())
}

fn cursor_event(cursor: &str) -> anyhow::Result<Option<EventId>> {
    if cursor == "start" {
        return Ok(None);
    }
    cursor
        .strip_prefix('e')
        .and_then(|hex| uuid::Uuid::try_parse(hex).ok())
        .map(|u| Some(EventId::from_uuid(u)))
        .ok_or_else(|| {
            anyhow::anyhow!("--cursor {cursor:?} is not a cursor this command printed (or `start`)")
        })
}

/// A time given as RFC 3339 or as how long ago.
fn time_arg(flag: &str, s: &str) -> anyhow::Result<Timestamp> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(Timestamp::from(t.with_timezone(&chrono::Utc)));
    }
    let ago = duration(flag, s)
        .map_err(|_| anyhow::anyhow!("{flag} {s:?}: expected an RFC 3339 time or how long ago (`10m`)"))?;
    Ok(Timestamp::from(chrono::Utc::now()) - ago)
}

/// `KEY=VALUE`.
fn label(flag: &str, s: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| anyhow::anyhow!("{flag} {s:?}: expected KEY=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// `ROLE:KEY=VALUE[,KEY=VALUE…]`: the role and the labels.
fn related_arg(s: &str) -> anyhow::Result<(String, Vec<(String, String)>)> {
    let (role, labels) = s
        .split_once(':')
        .filter(|(r, _)| !r.is_empty())
        .ok_or_else(|| anyhow::anyhow!("--related {s:?}: expected ROLE:KEY=VALUE[,KEY=VALUE…]"))?;
    let labels = labels
        .split(',')
        .map(|l| label("--related", l))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((role.to_owned(), labels))
}

impl FilterArgs {
    /// The filter these flags (and `since`) describe, checked.
    fn filter(&self, since: Option<Timestamp>) -> anyhow::Result<EventFilter> {
        let mut f = EventFilter {
            event: self.event.clone(),
            exclude: self.exclude.clone(),
            since,
            until: self
                .until
                .as_deref()
                .map(|u| time_arg("--until", u))
                .transpose()?,
            ..EventFilter::default()
        };
        for r in &self.resource {
            let (k, v) = label("--resource", r)?;
            f.resource.add(&k, &v);
        }
        for r in &self.related {
            let (role, labels) = related_arg(r)?;
            let mut spec = LabelSpec::default();
            spec.add(RESOURCE_ROLE, &role);
            for (k, v) in labels {
                spec.add(&k, &v);
            }
            f.related.push(spec);
        }
        f.check().map_err(|e| invalid(e.0))?;
        Ok(f)
    }
}

fn invalid(message: String) -> anyhow::Error {
    anyhow::Error::new(CodedError {
        code: "invalid",
        message,
    })
}

fn print_event(e: &Event, json: bool) {
    if json {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
    } else {
        let name = e.resource.name().map(|n| format!(" ({n})")).unwrap_or_default();
        println!(
            "{}  {:<36} {}{name}",
            e.occurred,
            e.event,
            e.resource.id().unwrap_or("-")
        );
    }
}

pub async fn events(cmd: EventsCmd) -> anyhow::Result<bool> {
    match cmd {
        EventsCmd::Ls {
            filter,
            since,
            limit,
            cursor,
            json,
            conn,
        } => {
            anyhow::ensure!((1..=1000).contains(&limit), "--limit {limit}: from 1 to 1000");
            let since = since.as_deref().map(|s| time_arg("--since", s)).transpose()?;
            let filter = filter.filter(since)?;
            let after = cursor.as_deref().map(cursor_event).transpose()?.flatten();
            let out = if json { Out::Array } else { Out::Text };
            ls(filter, after, limit, out, conn).await
        }
        EventsCmd::Tail {
            filter,
            follow,
            prefix,
            since,
            limit,
            cursor,
            json,
            conn,
        } => {
            anyhow::ensure!(limit >= 1, "--limit is at least 1");
            let mut args = filter;
            if let Some(p) = prefix {
                args.event.push(format!("{p}*"));
            }
            if let Some(from) = cursor {
                anyhow::ensure!(
                    limit <= 1000,
                    "--limit {limit}: from 1 to 1000 (follow `next cursor:` for more)"
                );
                let after = cursor_event(&from)?;
                let out = if json { Out::Lines } else { Out::Text };
                return ls(args.filter(None)?, after, limit, out, conn).await;
            }
            let since = time_arg("--since", &since)?;
            tail(args.filter(Some(since))?, limit, follow, json, conn).await
        }
        EventsCmd::Emit {
            name,
            resource,
            related,
            payload_json,
            json,
            conn,
        } => emit(name, resource, related, payload_json, json, conn).await,
    }
}

/// How events are printed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    /// A line each, for a person.
    Text,
    /// A JSON object per line (`tail --json`).
    Lines,
    /// One JSON array (`ls --json`).
    Array,
}

/// Up to `limit` events that match, after `after`, oldest first; the next cursor on stderr when
/// more may remain.
async fn ls(
    filter: EventFilter,
    mut after: Option<EventId>,
    limit: usize,
    out: Out,
    conn: Conn,
) -> anyhow::Result<bool> {
    let s = conn.connect().await?;
    let mut found: Vec<Event> = Vec::new();
    let more = loop {
        let want = u32::try_from(limit - found.len()).unwrap_or(1000);
        let (page, next) = s
            .client
            .find_events(after, filter.clone(), want, Duration::ZERO)
            .await
            .map_err(|e| s.fail(e))?;
        let ended = next.is_none() || (page.is_empty() && next == after);
        found.extend(page);
        after = next;
        if found.len() >= limit {
            break after;
        }
        if ended {
            break None;
        }
    };
    if out == Out::Array {
        println!("{}", serde_json::to_string(&found)?);
    } else {
        for e in &found {
            print_event(e, out == Out::Lines);
        }
    }
    if let Some(next) = more {
        eprintln!("next cursor: {}", event_cursor(next));
    }
    Ok(true)
}

/// The latest `limit` events that match since the filter's `since`, then with `follow` every
/// new one as it comes.
async fn tail(
    filter: EventFilter,
    limit: usize,
    follow: bool,
    json: bool,
    conn: Conn,
) -> anyhow::Result<bool> {
    let s = conn.connect().await?;
    let mut cursor = None;
    // What is there already: the latest `limit` of it (read at most 100 pages).
    let mut latest = std::collections::VecDeque::with_capacity(limit.min(1000));
    for _ in 0..100 {
        let (page, next) = s
            .client
            .find_events(cursor, filter.clone(), 1000, Duration::ZERO)
            .await
            .map_err(|e| s.fail(e))?;
        let ended = next.is_none() || (page.is_empty() && next == cursor);
        for e in page {
            if latest.len() == limit {
                latest.pop_front();
            }
            latest.push_back(e);
        }
        cursor = next.or(cursor);
        if ended {
            break;
        }
    }
    for e in &latest {
        print_event(e, json);
    }
    if !follow {
        return Ok(true);
    }
    loop {
        let (page, next) = s
            .client
            .find_events(cursor, filter.clone(), 1000, Duration::from_secs(5))
            .await
            .map_err(|e| s.fail(e))?;
        for e in &page {
            print_event(e, json);
        }
        match next {
            Some(n) => cursor = Some(n),
            // The window (--until) is over.
            None => return Ok(true),
        }
    }
}

async fn emit(
    name: String,
    resource: Vec<String>,
    related: Vec<String>,
    payload_json: Option<String>,
    json: bool,
    conn: Conn,
) -> anyhow::Result<bool> {
    let mut labels = std::collections::BTreeMap::new();
    for r in &resource {
        let (k, v) = label("--resource", r)?;
        labels.insert(k, v);
    }
    let resource = Resource(labels);
    if resource.id().is_none() {
        return Err(invalid(format!(
            "--resource: an event's resource needs a {:?} label",
            flotilla_runtime::event::RESOURCE_ID
        )));
    }
    let related = related
        .iter()
        .map(|r| {
            let (role, labels) = related_arg(r)?;
            let mut res = Resource::default().with(RESOURCE_ROLE, role);
            for (k, v) in labels {
                res = res.with(&k, v);
            }
            Ok(res)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let payload = match payload_json.as_deref() {
        None => serde_json::Value::Null,
        Some(p) => {
            let text = crate::flow_run::json_text("--payload-json", p)?;
            if text.len() > EVENT_PAYLOAD_BYTES_MAX {
                return Err(anyhow::Error::new(CodedError {
                    code: "payload_too_large",
                    message: format!(
                        "--payload-json: {} bytes, over the {EVENT_PAYLOAD_BYTES_MAX} an event's payload may take",
                        text.len()
                    ),
                }));
            }
            serde_json::from_str(&text).map_err(|e| invalid(format!("--payload-json is not JSON: {e}")))?
        }
    };
    let s = conn.connect().await?;
    let id = s
        .client
        .emit_event(&name, resource, related, payload)
        .await
        .map_err(|e| s.fail(e))?;
    if json {
        println!("{}", serde_json::json!({ "id": id.to_string() }));
    } else {
        println!("{id}");
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_make_the_filter_they_say() {
        let args = FilterArgs {
            event: vec!["flotilla.flow-run.*".into()],
            exclude: vec!["*.Running".into()],
            resource: vec![
                "flotilla.resource.id=app.*".into(),
                "flotilla.resource.id=other".into(),
            ],
            related: vec!["deployment:flotilla.resource.name=nightly,team=data".into()],
            until: None,
        };
        let f = args.filter(None).expect("a filter");
        assert_eq!(f.resource.0["flotilla.resource.id"].patterns().len(), 2);
        assert_eq!(f.related[0].0.len(), 3, "the role and two labels");
        for bad in ["deployment", ":x=y", "deployment:novalue"] {
            let args = FilterArgs {
                related: vec![bad.into()],
                ..FilterArgs::default()
            };
            assert!(args.filter(None).is_err(), "{bad:?} accepted");
        }
        let args = FilterArgs {
            resource: vec!["=x".into()],
            ..FilterArgs::default()
        };
        assert!(args.filter(None).is_err());
    }

    #[test]
    fn times_are_rfc3339_or_how_long_ago() {
        assert!(time_arg("--since", "2026-12-01T10:00:00Z").is_ok());
        let ago = time_arg("--since", "10m").expect("a time");
        assert!(ago < Timestamp::from(chrono::Utc::now()));
        assert!(time_arg("--since", "yesterday").is_err());
    }
}
