//! Cron expressions as crontab reads them, fire times computed by the `cron` crate on a
//! wall-clock calendar and placed in an IANA time zone by Prefect's rule.
//!
//! - 5 fields (`minute hour day-of-month month day-of-week`), or 6 with seconds first; the
//!   aliases `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`), `@hourly`.
//! - Each field: `*`, a value, `a-b`, a step (`*/15`, `5/10`, `1-30/2`), lists of these; month
//!   names `JAN`–`DEC` and day names `SUN`–`SAT` in any case; day of week 0 and 7 are Sunday,
//!   and a day range may wrap (`FRI-MON`).
//! - When both day-of-month and day-of-week are restricted (neither is `*` or `?`), a day
//!   matches if either does (as Vixie cron and croniter); otherwise both must.
//! - Time zones: fire times are wall-clock times. A time that a spring-forward change skips runs
//!   shifted forward by the gap (a 02:30 job runs at 03:30 on that day); a time that a fall-back
//!   change repeats runs once, at its first occurrence.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration as Span, LocalResult, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;

/// A cron expression that cannot be used, saying which field is wrong and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cron expression {expression:?}: {reason}")]
pub struct CronError {
    expression: String,
    reason: String,
}

/// A time zone name that is not an IANA zone.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IANA time zone (such as UTC, Europe/London, America/New_York)")]
pub struct TimezoneError(String);

/// Parses an IANA time zone name.
pub fn parse_timezone(name: &str) -> Result<Tz, TimezoneError> {
    name.parse::<Tz>().map_err(|_| TimezoneError(name.to_owned()))
}

/// The fields, by position, with their ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Second,
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Second => "second",
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day-of-month",
            Field::Month => "month",
            Field::DayOfWeek => "day-of-week",
        }
    }

    /// The values accepted as written (day of week: 0–7, 7 being Sunday again).
    fn range(self) -> (u32, u32) {
        match self {
            Field::Second | Field::Minute => (0, 59),
            Field::Hour => (0, 23),
            Field::DayOfMonth => (1, 31),
            Field::Month => (1, 12),
            Field::DayOfWeek => (0, 7),
        }
    }

    fn names(self) -> &'static [&'static str] {
        match self {
            Field::Month => &[
                "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
            ],
            Field::DayOfWeek => &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
            _ => &[],
        }
    }

    fn value(self, s: &str) -> Result<u32, String> {
        let (lo, hi) = self.range();
        let names = self.names();
        let upper = s.to_ascii_uppercase();
        if let Some(i) = names.iter().position(|n| *n == upper) {
            let base = if self == Field::Month { 1 } else { 0 };
            return Ok(i as u32 + base);
        }
        let v: u32 = s.parse().map_err(|_| {
            if names.is_empty() {
                format!("{s:?} is not a number")
            } else {
                format!(
                    "{s:?} is not a number or a name ({}–{})",
                    names[0],
                    names[names.len() - 1]
                )
            }
        })?;
        if v < lo || v > hi {
            return Err(format!("{v} is out of range {lo}–{hi}"));
        }
        Ok(v)
    }
}

/// One field's values as a bit set (day of week folded to 0–6).
fn parse_field(field: Field, text: &str) -> Result<u64, String> {
    let (lo, hi) = field.range();
    let mut bits = 0u64;
    let mut set = |v: u32| {
        let v = if field == Field::DayOfWeek && v == 7 { 0 } else { v };
        bits |= 1 << v;
    };
    if text.is_empty() {
        return Err("empty".into());
    }
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().map_err(|_| format!("step {s:?} is not a number"))?;
                if step == 0 || step > hi - lo + 1 {
                    return Err(format!("step {step} must be between 1 and {}", hi - lo + 1));
                }
                (r, step)
            }
            None => (item, 1),
        };
        let (start, end) = match range {
            "*" | "?" => {
                if range == "?" && !matches!(field, Field::DayOfMonth | Field::DayOfWeek) {
                    return Err("? is only for day-of-month and day-of-week".into());
                }
                let hi = if field == Field::DayOfWeek { 6 } else { hi };
                (lo, hi)
            }
            r => match r.split_once('-') {
                Some((a, b)) => (field.value(a)?, field.value(b)?),
                None => {
                    let v = field.value(r)?;
                    // `5/10`: from 5 to the end of the range.
                    if step > 1 || item.contains('/') {
                        (v, if field == Field::DayOfWeek { 6 } else { hi })
                    } else {
                        (v, v)
                    }
                }
            },
        };
        if start <= end {
            let mut v = start;
            while v <= end {
                set(v);
                v += step;
            }
        } else if field == Field::DayOfWeek {
            // A wrapping day range (FRI-MON): through Saturday and on from Sunday.
            let days: Vec<u32> = (start..=6).chain(0..=end).collect();
            for v in days.into_iter().step_by(step as usize) {
                set(v);
            }
        } else {
            return Err(format!("range {range} goes backwards"));
        }
    }
    Ok(bits)
}

fn list(bits: u64, lo: u32, hi: u32) -> String {
    let all = (lo..=hi).all(|v| bits & (1 << v) != 0);
    if all {
        return "*".into();
    }
    (lo..=hi)
        .filter(|v| bits & (1 << v) != 0)
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn day_list(bits: u64) -> String {
    let names = Field::DayOfWeek.names();
    if (0..7).all(|v| bits & (1 << v) != 0) {
        return "*".into();
    }
    (0..7)
        .filter(|v| bits & (1 << v) != 0)
        .map(|v| names[v as usize])
        .collect::<Vec<_>>()
        .join(",")
}

/// A parsed cron expression.
#[derive(Clone)]
pub struct CronExpr {
    source: String,
    /// One schedule, or two whose union is the expression (day-of-month OR day-of-week).
    schedules: Vec<cron::Schedule>,
}

impl fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CronExpr").field(&self.source).finish()
    }
}

impl PartialEq for CronExpr {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Display for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for CronExpr {
    type Err = CronError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CronExpr::parse(s)
    }
}

impl CronExpr {
    /// Parses an expression.
    pub fn parse(expression: &str) -> Result<CronExpr, CronError> {
        let err = |reason: String| CronError {
            expression: expression.to_owned(),
            reason,
        };
        if expression.len() > 512 {
            return Err(err("longer than 512 characters".into()));
        }
        let text = expression.trim();
        let expanded = match text.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            a if a.starts_with('@') => {
                return Err(err(format!(
                    "unknown alias {text:?} (known: @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)"
                )));
            }
            _ => text,
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        let (fields, texts): (&[Field], Vec<&str>) = match parts.len() {
            5 => (
                &[
                    Field::Minute,
                    Field::Hour,
                    Field::DayOfMonth,
                    Field::Month,
                    Field::DayOfWeek,
                ],
                parts.clone(),
            ),
            6 => (
                &[
                    Field::Second,
                    Field::Minute,
                    Field::Hour,
                    Field::DayOfMonth,
                    Field::Month,
                    Field::DayOfWeek,
                ],
                parts.clone(),
            ),
            n => {
                return Err(err(format!(
                    "{n} fields; expected 5 (minute hour day-of-month month day-of-week) or 6 (second first)"
                )));
            }
        };
        let mut bits = [1u64; 6]; // second 0 unless given
        let mut raw = ["0"; 6];
        let offset = 6 - fields.len();
        for (i, (f, t)) in fields.iter().zip(&texts).enumerate() {
            bits[i + offset] =
                parse_field(*f, t).map_err(|r| err(format!("{} field {t:?}: {r}", f.name())))?;
            raw[i + offset] = t;
        }
        let [sec, min, hour, dom, mon, dow] = bits;
        let restricted = |t: &str| t != "*" && t != "?";
        let either = restricted(raw[3]) && restricted(raw[5]);
        let head = format!("{} {} {}", list(sec, 0, 59), list(min, 0, 59), list(hour, 0, 23));
        let exprs = if either {
            vec![
                format!("{head} {} {} *", list(dom, 1, 31), list(mon, 1, 12)),
                format!("{head} * {} {}", list(mon, 1, 12), day_list(dow)),
            ]
        } else {
            vec![format!(
                "{head} {} {} {}",
                list(dom, 1, 31),
                list(mon, 1, 12),
                day_list(dow)
            )]
        };
        let schedules = exprs
            .iter()
            .map(|e| cron::Schedule::from_str(e).map_err(|x| err(format!("cannot be read ({x})"))))
            .collect::<Result<Vec<_>, _>>()?;
        let parsed = CronExpr {
            source: text.to_owned(),
            schedules,
        };
        // An impossible date (February 31st) never fires: say so now.
        let start = DateTime::<Utc>::from_timestamp(0, 0)
            .unwrap_or_default()
            .naive_utc();
        if parsed.next_wall(start).is_none() {
            return Err(err(
                "it never fires (no day matches both its day and its month)".into()
            ));
        }
        Ok(parsed)
    }

    /// The expression as given.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The first wall-clock time strictly after `wall` (None: no more, past the year 2100).
    fn next_wall(&self, wall: NaiveDateTime) -> Option<NaiveDateTime> {
        let t = wall.and_utc();
        self.schedules
            .iter()
            .filter_map(|s| s.after(&t).next())
            .min()
            .map(|d| d.naive_utc())
    }

    /// The first fire time strictly after `after`, in zone `tz`.
    pub fn next_after(&self, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let wall_after = after.with_timezone(&tz).naive_local();
        let w = self.next_wall(wall_after)?;
        let i = localize(tz, w);
        // No offset change around: the wall time maps plainly.
        let margin = Span::hours(3);
        if offset_secs(tz, after - margin) == offset_secs(tz, i + margin) && i > after {
            return Some(i);
        }
        // Around a change: place every wall time from a few hours before, keep the earliest
        // instant after `after`.
        let mut best: Option<DateTime<Utc>> = None;
        let mut wall = wall_after - margin;
        while let Some(w) = self.next_wall(wall) {
            let i = localize(tz, w);
            if i > after && best.is_none_or(|b| i < b) {
                best = Some(i);
            }
            if let Some(b) = best
                && w.and_utc() > b + margin * 2
            {
                break;
            }
            wall = w;
        }
        best
    }

    /// The next `count` fire times strictly after `after`, in zone `tz`.
    pub fn upcoming(&self, tz: Tz, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        let mut out = BTreeSet::new();
        let mut t = after;
        while out.len() < count {
            match self.next_after(tz, t) {
                Some(n) => {
                    out.insert(n);
                    t = n;
                }
                None => break,
            }
        }
        out.into_iter().collect()
    }
}

fn offset_secs(tz: Tz, t: DateTime<Utc>) -> i32 {
    tz.offset_from_utc_datetime(&t.naive_utc())
        .fix()
        .local_minus_utc()
}

/// A wall-clock time as an instant in `tz`: the time itself; in a repeated hour, its first
/// occurrence; in a skipped hour, shifted forward by the gap.
fn localize(tz: Tz, wall: NaiveDateTime) -> DateTime<Utc> {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(a, b) => a.min(b).with_timezone(&Utc),
        LocalResult::None => {
            // Read with the offset in force before the gap: 02:30 at -05:00 is 03:30 at -04:00.
            let before = offset_secs(tz, wall.and_utc() - Span::hours(12));
            (wall - Span::seconds(i64::from(before))).and_utc()
        }
    }
}

#[cfg(test)]
mod tests;
