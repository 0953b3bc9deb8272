//! The one timestamp type of Flotilla: microseconds since the Unix epoch, UTC.
//!
//! `runtime` never reads the clock: every function that needs "now" takes a [`Timestamp`].

use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// An instant in UTC with microsecond precision.
///
/// Encoded as a signed count of microseconds since 1970-01-01T00:00:00Z in binary formats
/// (compact on disk and on the wire) and as RFC 3339 in human-readable ones (JSON); displayed
/// and parsed as RFC 3339.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_i64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            i64::deserialize(d).map(Timestamp)
        }
    }
}

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp from microseconds since the Unix epoch.
    pub const fn from_micros(micros: i64) -> Self {
        Timestamp(micros)
    }

    /// A timestamp from milliseconds since the Unix epoch.
    pub const fn from_millis(millis: i64) -> Self {
        Timestamp(millis.saturating_mul(1000))
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Milliseconds since the Unix epoch (rounded towards negative infinity).
    pub const fn as_millis(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// This instant as a chrono `DateTime<Utc>`.
    pub fn to_datetime(self) -> DateTime<Utc> {
        Utc.timestamp_micros(self.0)
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// The time from `earlier` to `self`, or zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        if self.0 <= earlier.0 {
            Duration::ZERO
        } else {
            Duration::from_micros((self.0 - earlier.0) as u64)
        }
    }

    /// The later of two instants.
    pub fn max(self, other: Timestamp) -> Timestamp {
        if self >= other { self } else { other }
    }
}

fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, rhs: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_micros(rhs)))
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, rhs: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(duration_micros(rhs)))
    }
}

impl From<DateTime<Utc>> for Timestamp {
    fn from(dt: DateTime<Utc>) -> Self {
        Timestamp(dt.timestamp_micros())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_datetime().to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

/// A timestamp that is not RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an RFC 3339 timestamp: {input:?} ({reason})")]
pub struct TimestampParseError {
    input: String,
    reason: String,
}

impl FromStr for Timestamp {
    type Err = TimestampParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DateTime::parse_from_rfc3339(s)
            .map(|dt| Timestamp::from(dt.with_timezone(&Utc)))
            .map_err(|e| TimestampParseError {
                input: s.to_owned(),
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_and_parses_rfc3339() {
        let t = Timestamp::from_micros(1_767_225_600_123_456);
        let s = t.to_string();
        assert_eq!(s, "2026-01-01T00:00:00.123456Z");
        assert_eq!(s.parse::<Timestamp>(), Ok(t));
        assert!("yesterday".parse::<Timestamp>().is_err());
    }

    #[test]
    fn serializes_as_micros_in_binary_and_rfc3339_in_json() {
        let t = Timestamp::from_micros(1_767_225_600_000_000);
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"2026-01-01T00:00:00Z\"");
        assert_eq!(
            serde_json::from_str::<Timestamp>("\"2026-01-01T00:00:00Z\"").unwrap(),
            t
        );
        let bin = rmp_serde::to_vec(&t).unwrap();
        assert_eq!(rmp_serde::from_slice::<Timestamp>(&bin).unwrap(), t);
        assert!(bin.len() <= 9, "a compact integer in msgpack");
    }

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_millis(1000);
        assert_eq!(t + Duration::from_millis(5), Timestamp::from_millis(1005));
        assert_eq!(t - Duration::from_millis(5), Timestamp::from_millis(995));
        assert_eq!(t.saturating_since(Timestamp::from_millis(2000)), Duration::ZERO);
        assert_eq!(
            Timestamp::from_millis(2000).saturating_since(t),
            Duration::from_secs(1)
        );
        assert_eq!(
            Timestamp::from_micros(i64::MAX) + Duration::from_secs(1),
            Timestamp::from_micros(i64::MAX)
        );
    }
}
