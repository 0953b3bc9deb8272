use chrono::{Datelike, NaiveDate, Timelike};
use proptest::prelude::*;

use super::*;

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("a test timestamp")
        .with_timezone(&Utc)
}

fn next_n(expr: &str, tz: &str, after: &str, n: usize) -> Vec<String> {
    let e = CronExpr::parse(expr).expect("valid");
    let tz = parse_timezone(tz).expect("a zone");
    e.upcoming(tz, utc(after), n)
        .iter()
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .collect()
}

#[test]
fn plain_expressions() {
    assert_eq!(
        next_n("*/15 * * * *", "UTC", "2026-03-01T10:07:00Z", 3),
        [
            "2026-03-01T10:15:00Z",
            "2026-03-01T10:30:00Z",
            "2026-03-01T10:45:00Z"
        ]
    );
    assert_eq!(
        next_n("0 9 * * MON-FRI", "UTC", "2026-03-06T12:00:00Z", 3),
        [
            "2026-03-09T09:00:00Z",
            "2026-03-10T09:00:00Z",
            "2026-03-11T09:00:00Z"
        ]
    );
    // `after` itself is excluded.
    assert_eq!(
        next_n("0 * * * *", "UTC", "2026-03-01T10:00:00Z", 1),
        ["2026-03-01T11:00:00Z"]
    );
    // Numbers for days: 1-5 is Monday to Friday; 0 and 7 are Sunday.
    assert_eq!(
        next_n("0 9 * * 1-5", "UTC", "2026-03-06T12:00:00Z", 1),
        ["2026-03-09T09:00:00Z"]
    );
    assert_eq!(
        next_n("0 9 * * 0", "UTC", "2026-03-06T12:00:00Z", 1),
        ["2026-03-08T09:00:00Z"]
    );
    assert_eq!(
        next_n("0 9 * * 7", "UTC", "2026-03-06T12:00:00Z", 1),
        ["2026-03-08T09:00:00Z"]
    );
    // A wrapping day range.
    assert_eq!(
        next_n("0 9 * * FRI-MON", "UTC", "2026-03-05T12:00:00Z", 4),
        [
            "2026-03-06T09:00:00Z",
            "2026-03-07T09:00:00Z",
            "2026-03-08T09:00:00Z",
            "2026-03-09T09:00:00Z"
        ]
    );
    // Month names, lists, steps from a value.
    assert_eq!(
        next_n("0 0 1 jan,JUL *", "UTC", "2026-03-01T00:00:00Z", 2),
        ["2026-07-01T00:00:00Z", "2027-01-01T00:00:00Z"]
    );
    assert_eq!(
        next_n("5/20 * * * *", "UTC", "2026-03-01T10:06:00Z", 3),
        [
            "2026-03-01T10:25:00Z",
            "2026-03-01T10:45:00Z",
            "2026-03-01T11:05:00Z"
        ]
    );
    // Six fields: seconds first.
    assert_eq!(
        next_n("*/10 * * * * *", "UTC", "2026-03-01T10:00:05Z", 2),
        ["2026-03-01T10:00:10Z", "2026-03-01T10:00:20Z"]
    );
}

#[test]
fn aliases() {
    for (alias, same) in [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@MIDNIGHT", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
    ] {
        assert_eq!(
            next_n(alias, "UTC", "2026-03-04T10:07:00Z", 3),
            next_n(same, "UTC", "2026-03-04T10:07:00Z", 3),
            "{alias}"
        );
    }
}

#[test]
fn day_of_month_or_day_of_week_when_both_are_restricted() {
    // The 13th, or any Friday.
    assert_eq!(
        next_n("0 0 13 * FRI", "UTC", "2026-03-01T00:00:00Z", 4),
        [
            "2026-03-06T00:00:00Z",
            "2026-03-13T00:00:00Z",
            "2026-03-20T00:00:00Z",
            "2026-03-27T00:00:00Z"
        ]
    );
    assert_eq!(
        next_n("0 0 12 * FRI", "UTC", "2026-03-06T01:00:00Z", 2),
        ["2026-03-12T00:00:00Z", "2026-03-13T00:00:00Z"]
    );
    // With `*` or `?` in one of them, the other alone decides.
    assert_eq!(
        next_n("0 0 * * FRI", "UTC", "2026-03-06T01:00:00Z", 1),
        ["2026-03-13T00:00:00Z"]
    );
    assert_eq!(
        next_n("0 0 13 * ?", "UTC", "2026-03-06T01:00:00Z", 1),
        ["2026-03-13T00:00:00Z"]
    );
}

#[test]
fn errors_say_which_field_and_why() {
    let cases = [
        ("61 * * * *", "minute field \"61\": 61 is out of range 0–59"),
        ("* 24 * * *", "hour field"),
        ("* * 0 * *", "day-of-month field \"0\": 0 is out of range 1–31"),
        ("* * * 13 *", "month field"),
        ("* * * * 8", "day-of-week field \"8\": 8 is out of range 0–7"),
        ("* * * * MOO", "is not a number or a name (SUN–SAT)"),
        ("*/0 * * * *", "step 0 must be between 1 and 60"),
        ("*/61 * * * *", "step 61"),
        ("10-2 * * * *", "range 10-2 goes backwards"),
        ("* * * *", "4 fields"),
        ("@often", "unknown alias"),
        ("0 0 31 2 *", "never fires"),
        ("? * * * *", "? is only for day-of-month and day-of-week"),
        ("1,,2 * * * *", "minute field"),
    ];
    for (expr, want) in cases {
        let e = CronExpr::parse(expr).expect_err(expr).to_string();
        assert!(e.contains(want), "{expr}: {e}");
    }
    assert!(
        parse_timezone("Mars/Olympus")
            .unwrap_err()
            .to_string()
            .contains("IANA")
    );
}

#[test]
fn new_york_spring_forward_and_fall_back() {
    // 2026-03-08: 02:00 EST becomes 03:00 EDT. A 02:30 job runs at 03:30 that day.
    assert_eq!(
        next_n("30 2 * * *", "America/New_York", "2026-03-07T12:00:00Z", 3),
        [
            "2026-03-08T07:30:00Z",
            "2026-03-09T06:30:00Z",
            "2026-03-10T06:30:00Z"
        ]
    );
    // Every 30 minutes across the gap: no time lost, none twice.
    assert_eq!(
        next_n("*/30 * * * *", "America/New_York", "2026-03-08T06:00:00Z", 4),
        [
            "2026-03-08T06:30:00Z",
            "2026-03-08T07:00:00Z",
            "2026-03-08T07:30:00Z",
            "2026-03-08T08:00:00Z"
        ]
    );
    // 2026-11-01: 02:00 EDT becomes 01:00 EST; 01:30 happens twice and runs once, the first time.
    assert_eq!(
        next_n("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", 3),
        [
            "2026-11-01T05:30:00Z",
            "2026-11-02T06:30:00Z",
            "2026-11-03T06:30:00Z"
        ]
    );
    assert_eq!(
        next_n("*/30 * * * *", "America/New_York", "2026-11-01T04:10:00Z", 4),
        [
            "2026-11-01T04:30:00Z",
            "2026-11-01T05:00:00Z",
            "2026-11-01T05:30:00Z",
            "2026-11-01T07:00:00Z"
        ]
    );
}

#[test]
fn london_spring_forward_and_fall_back() {
    // 2026-03-29: 01:00 GMT becomes 02:00 BST; a 01:30 job runs at 02:30 BST.
    assert_eq!(
        next_n("30 1 * * *", "Europe/London", "2026-03-28T12:00:00Z", 2),
        ["2026-03-29T01:30:00Z", "2026-03-30T00:30:00Z"]
    );
    // 2026-10-25: 02:00 BST becomes 01:00 GMT; 01:30 runs once, at 01:30 BST.
    assert_eq!(
        next_n("30 1 * * *", "Europe/London", "2026-10-24T12:00:00Z", 2),
        ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
    );
    assert_eq!(
        next_n("0 * * * *", "Europe/London", "2026-10-24T22:30:00Z", 5),
        [
            "2026-10-24T23:00:00Z",
            "2026-10-25T00:00:00Z",
            "2026-10-25T02:00:00Z",
            "2026-10-25T03:00:00Z",
            "2026-10-25T04:00:00Z"
        ]
    );
}

/// A reference: the fields as sets, the next minute found day by day.
#[derive(Clone, Debug)]
struct Spec {
    minutes: BTreeSet<u32>,
    hours: BTreeSet<u32>,
    dom: Option<BTreeSet<u32>>,
    months: BTreeSet<u32>,
    dow: Option<BTreeSet<u32>>,
}

fn render(set: &BTreeSet<u32>, style: u8) -> String {
    let v: Vec<u32> = set.iter().copied().collect();
    // A contiguous run can be written as a range.
    if style % 2 == 1 && v.len() > 1 && v.windows(2).all(|w| w[1] == w[0] + 1) {
        return format!("{}-{}", v[0], v[v.len() - 1]);
    }
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

impl Spec {
    fn expression(&self, style: u8) -> String {
        format!(
            "{} {} {} {} {}",
            render(&self.minutes, style),
            render(&self.hours, style),
            self.dom.as_ref().map_or("*".into(), |d| render(d, style)),
            render(&self.months, style),
            self.dow.as_ref().map_or("*".into(), |d| render(d, style)),
        )
    }

    fn day_matches(&self, d: NaiveDate) -> bool {
        if !self.months.contains(&d.month()) {
            return false;
        }
        let dom = self.dom.as_ref().is_none_or(|s| s.contains(&d.day()));
        let dow = self
            .dow
            .as_ref()
            .is_none_or(|s| s.contains(&d.weekday().num_days_from_sunday()));
        match (&self.dom, &self.dow) {
            (Some(_), Some(_)) => dom || dow,
            _ => dom && dow,
        }
    }

    fn next_after(&self, after: NaiveDateTime) -> Option<NaiveDateTime> {
        let mut day = after.date();
        for _ in 0..(366 * 9) {
            if self.day_matches(day) {
                for &h in &self.hours {
                    for &m in &self.minutes {
                        let t = day.and_hms_opt(h, m, 0)?;
                        if t > after {
                            return Some(t);
                        }
                    }
                }
            }
            day = day.succ_opt()?;
        }
        None
    }
}

fn set_of(max_len: usize, lo: u32, hi: u32) -> impl Strategy<Value = BTreeSet<u32>> {
    proptest::collection::btree_set(lo..=hi, 1..=max_len)
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        set_of(4, 0, 59),
        set_of(4, 0, 23),
        proptest::option::of(set_of(4, 1, 31)),
        set_of(12, 1, 12),
        proptest::option::of(set_of(3, 0, 6)),
    )
        .prop_map(|(minutes, hours, dom, months, dow)| Spec {
            minutes,
            hours,
            dom,
            months,
            dow,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn next_times_match_a_reference_model(s in spec(), style in 0u8..2, start in 0i64..(40 * 365 * 86_400)) {
        let expr = s.expression(style);
        let after = DateTime::<Utc>::from_timestamp(1_600_000_000 + start, 0).unwrap();
        let want = s.next_after(after.naive_utc());
        match CronExpr::parse(&expr) {
            Ok(e) => {
                let got = e.next_after(Tz::UTC, after).map(|t| t.naive_utc());
                // The crate stops after 2100; the reference looks 9 years ahead.
                if got.is_some() || want.is_some_and(|w| w.year() < 2100) {
                    prop_assert_eq!(got, want, "{} after {}", expr, after);
                }
            }
            Err(e) => {
                // Only an expression that never fires is refused.
                prop_assert!(e.to_string().contains("never fires"), "{}: {}", expr, e);
                prop_assert!(want.is_none());
            }
        }
        let _ = after.minute();
    }
}
