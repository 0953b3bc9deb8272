//! Typed identifiers: newtypes with `Display`/`FromStr`, never type aliases.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::time::Timestamp;

/// A string that is not a valid identifier of the named kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {input:?} ({reason})")]
pub struct IdParseError {
    kind: &'static str,
    input: String,
    reason: String,
}

/// A UUID v7 whose 48-bit millisecond prefix is `now` and whose other bits come from `rng`.
pub fn uuid_v7(now: Timestamp, rng: &mut impl Rng) -> Uuid {
    let mut random = [0u8; 10];
    rng.fill_bytes(&mut random);
    uuid_v7_from(now, random)
}

/// A UUID v7 from a millisecond timestamp and the 74 other bits given as 10 bytes (some are
/// overwritten by the version and variant). Deterministic: used where replay must reproduce ids.
pub fn uuid_v7_from(now: Timestamp, random: [u8; 10]) -> Uuid {
    let millis = u64::try_from(now.as_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new id: UUID v7 from `now` and `rng`, so ids sort by creation time.
            pub fn new(now: Timestamp, rng: &mut impl Rng) -> Self {
                $name(uuid_v7(now, rng))
            }
            /// Wraps an existing UUID.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                $name(uuid)
            }
            /// The UUID inside.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
            /// The 16 bytes of the UUID, big-endian (sorts as the id sorts).
            pub const fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
            /// The id from its 16 bytes.
            pub const fn from_bytes(bytes: [u8; 16]) -> Self {
                $name(Uuid::from_bytes(bytes))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map($name).map_err(|e| IdParseError {
                    kind: $kind,
                    input: s.to_owned(),
                    reason: e.to_string(),
                })
            }
        }
    };
}

uuid_id!(
    /// One flow run.
    FlowRunId,
    "flow run id"
);
uuid_id!(
    /// One task run (one call of a task inside a flow run, with all its attempts).
    TaskRunId,
    "task run id"
);
uuid_id!(
    /// A deployment.
    DeploymentId,
    "deployment id"
);
uuid_id!(
    /// A work queue.
    WorkQueueId,
    "work queue id"
);
uuid_id!(
    /// An event.
    EventId,
    "event id"
);
uuid_id!(
    /// A state transition, chosen by the proposer: a resent proposal carries the same id, which
    /// makes it idempotent.
    TransitionId,
    "transition id"
);
uuid_id!(
    /// A batch of log lines, chosen by the sender: a resent batch is stored once.
    LogBatchId,
    "log batch id"
);

/// A flow run or a task run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RunId {
    /// A flow run.
    Flow(FlowRunId),
    /// A task run.
    Task(TaskRunId),
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunId::Flow(id) => write!(f, "flow-run/{id}"),
            RunId::Task(id) => write!(f, "task-run/{id}"),
        }
    }
}

/// The longest node name accepted.
pub const NODE_ID_LEN_MAX: usize = 63;

/// A node's name within its cluster (`n1`, `worker-eu-3`): 1–63 characters of ASCII letters,
/// digits, `-`, `_` and `.`, starting with a letter or digit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| IdParseError {
            kind: "node name",
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        if s.is_empty() {
            return Err(err("empty"));
        }
        if s.len() > NODE_ID_LEN_MAX {
            return Err(err("longer than 63 characters"));
        }
        if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(err("must start with a letter or digit"));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(err("only letters, digits, '-', '_' and '.' are allowed"));
        }
        Ok(NodeId(s.to_owned()))
    }
}

impl TryFrom<String> for NodeId {
    type Error = IdParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

/// The generation of a flow run's ownership. It grows each time the run is (re)assigned to a
/// worker; every proposal from a worker carries it, and one with a stale epoch is refused, so a
/// node that was declared dead can never overwrite its successor's work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(u64);

impl Epoch {
    /// The epoch of a newly created run.
    pub const FIRST: Epoch = Epoch(1);

    /// An epoch from its number.
    pub const fn new(n: u64) -> Self {
        Epoch(n)
    }
    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The next epoch.
    pub const fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

impl FromStr for Epoch {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix('e')
            .unwrap_or(s)
            .parse::<u64>()
            .map(Epoch)
            .map_err(|e| IdParseError {
                kind: "epoch",
                input: s.to_owned(),
                reason: e.to_string(),
            })
    }
}

/// The position of a command in the command log (1-based; 0 means "nothing yet").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LogIndex(u64);

impl LogIndex {
    /// Before the first command.
    pub const ZERO: LogIndex = LogIndex(0);
    /// An index from its number.
    pub const fn new(n: u64) -> Self {
        LogIndex(n)
    }
    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The following index.
    pub const fn next(self) -> LogIndex {
        LogIndex(self.0 + 1)
    }
}

impl fmt::Display for LogIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn uuid_ids_round_trip_and_sort_by_time() {
        let mut rng = SmallRng::seed_from_u64(7);
        let a = FlowRunId::new(Timestamp::from_millis(1_000), &mut rng);
        let b = FlowRunId::new(Timestamp::from_millis(2_000), &mut rng);
        assert!(a < b);
        assert_eq!(a.to_string().parse::<FlowRunId>(), Ok(a));
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert!("not-a-uuid".parse::<FlowRunId>().is_err());
    }

    #[test]
    fn node_names_are_validated() {
        assert!("n1".parse::<NodeId>().is_ok());
        assert!("worker-eu.3_a".parse::<NodeId>().is_ok());
        for bad in ["", "-x", "a b", "é", &"x".repeat(64)] {
            assert!(bad.parse::<NodeId>().is_err(), "{bad:?} accepted");
        }
        let err = "a b".parse::<NodeId>().unwrap_err().to_string();
        assert!(err.contains("node name"), "{err}");
    }

    #[test]
    fn epochs_grow_and_parse() {
        assert!(Epoch::FIRST.next() > Epoch::FIRST);
        assert_eq!("e7".parse::<Epoch>(), Ok(Epoch::new(7)));
        assert_eq!(Epoch::new(7).to_string(), "e7");
    }
}

impl EventId {
    /// The id of the `n`-th event produced by the command at `index`, applied at `now`.
    ///
    /// A UUID v7 whose bits after the millisecond prefix hold the log index and `n`, so that
    /// replaying a command reproduces its event ids and ids sort in log order (the persistence
    /// actor's `now` never goes backwards). Indexes below 2^58 keep their order.
    pub fn at(now: Timestamp, index: LogIndex, n: u16) -> EventId {
        let i = index.get();
        let mut b = [0u8; 10];
        // Bits usable in order: b[0] low nibble, b[1], b[2] low 6 bits, b[3..10].
        b[0] = ((i >> 54) & 0x0f) as u8;
        b[1] = (i >> 46) as u8;
        b[2] = ((i >> 40) & 0x3f) as u8;
        b[3..8].copy_from_slice(&(i & 0xff_ffff_ffff).to_be_bytes()[3..8]);
        b[8..10].copy_from_slice(&n.to_be_bytes());
        EventId(uuid_v7_from(now, b))
    }
    /// The lowest id an event at `t` (to the millisecond) can have: a cursor for "events since".
    pub fn first_at(t: Timestamp) -> EventId {
        EventId(uuid_v7_from(t, [0u8; 10]))
    }
}

#[cfg(test)]
mod event_id_tests {
    use super::*;

    #[test]
    fn event_ids_sort_in_log_order_and_are_deterministic() {
        let t = Timestamp::from_millis(1_700_000_000_000);
        let mut prev = EventId::at(t, LogIndex::new(0), 0);
        for i in [
            1u64,
            2,
            255,
            256,
            65_535,
            1 << 40,
            (1 << 40) + 1,
            1 << 46,
            1 << 54,
            (1 << 58) - 1,
        ] {
            for n in [0u16, 1, 65_535] {
                let id = EventId::at(t, LogIndex::new(i), n);
                assert!(id > prev, "{i} {n}");
                assert_eq!(id, EventId::at(t, LogIndex::new(i), n));
                assert_eq!(id.as_uuid().get_version_num(), 7);
                prev = id;
            }
        }
        assert!(EventId::at(t + std::time::Duration::from_millis(1), LogIndex::new(0), 0) > prev);
    }
}
