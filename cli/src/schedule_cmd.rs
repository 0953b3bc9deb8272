//! `flotilla schedule preview`: the next fire times of a schedule, computed here with no node.

use chrono::{DateTime, Utc};
use clap::Subcommand;
use flotilla_runtime::cron::{CronExpr, parse_timezone};

/// Schedule commands.
#[derive(Debug, Subcommand)]
pub enum ScheduleCmd {
    /// Print the next fire times of a cron expression strictly after a time (default now).
    /// Times are wall-clock times in the zone: one a spring-forward change skips runs shifted
    /// forward by the gap (02:30 → 03:30); one a fall-back change repeats runs once, the first
    /// time.
    Preview {
        /// The expression: 5 fields (minute hour day-of-month month day-of-week), 6 with seconds
        /// first, or @hourly, @daily, @weekly, @monthly, @yearly.
        expression: String,
        /// The IANA time zone the expression is read in.
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// Start after this time (RFC 3339) [default: now].
        #[arg(long)]
        after: Option<String>,
        /// How many fire times.
        #[arg(long, default_value_t = 5)]
        count: usize,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: ScheduleCmd) -> anyhow::Result<()> {
    let ScheduleCmd::Preview {
        expression,
        timezone,
        after,
        count,
        json,
    } = cmd;
    anyhow::ensure!((1..=1000).contains(&count), "--count must be between 1 and 1000");
    let expr = CronExpr::parse(&expression)?;
    let tz = parse_timezone(&timezone)?;
    let after = match after {
        Some(a) => DateTime::parse_from_rfc3339(&a)
            .map_err(|e| {
                anyhow::anyhow!("--after {a:?} is not an RFC 3339 time such as 2026-03-01T10:00:00Z: {e}")
            })?
            .with_timezone(&Utc),
        None => Utc::now(),
    };
    let next: Vec<String> = expr
        .upcoming(tz, after, count)
        .iter()
        .map(|t| {
            t.with_timezone(&tz)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
        })
        .collect();
    if json {
        crate::output::print(&crate::output::PreviewOut {
            expression: &expression,
            timezone: &timezone,
            next,
        })?;
    } else {
        if next.is_empty() {
            println!("no fire times after {after}");
        }
        for t in &next {
            println!("{t}");
        }
    }
    Ok(())
}
