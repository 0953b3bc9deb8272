//! The ids of the control machine: client request ids, node incarnations, and ids derived
//! deterministically from what they are about.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::IdParseError;

/// A client's id for one request, chosen once by the client: a resent request carries the same
/// one and gets the first outcome. A created run's id is derived from it, so that even a resend
/// the control plane no longer remembers makes no second run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(Uuid);

impl RequestId {
    /// Wraps a UUID (clients use UUID v7).
    pub const fn from_uuid(uuid: Uuid) -> Self {
        RequestId(uuid)
    }

    /// The UUID inside.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl FromStr for RequestId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Parsed as a flow run id (the same UUID syntax), for its error type.
        s.parse::<crate::ids::FlowRunId>()
            .map(|id| RequestId(*id.as_uuid()))
    }
}

/// One life of a node process: a node that restarts comes back with a higher incarnation, and
/// one declared dead must come back with a higher one too. Written `i3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Incarnation(u64);

impl Incarnation {
    /// An incarnation from its number.
    pub const fn new(n: u64) -> Self {
        Incarnation(n)
    }

    /// The number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The next one.
    pub const fn next(self) -> Incarnation {
        Incarnation(self.0.saturating_add(1))
    }
}

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "i{}", self.0)
    }
}

impl FromStr for Incarnation {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix('i').unwrap_or(s).parse().map(Incarnation)
    }
}

/// A UUID (version 8) derived from a key such as `reclaim/{run}/{epoch}`: the same key always
/// gives the same id, so a command the machine makes again (after a restart, a lost append) is
/// recognised as the same one. A 128-bit FNV-1a hash; not a secret.
pub fn derived_id(key: &str) -> Uuid {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut h = OFFSET;
    for b in key.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(PRIME);
    }
    uuid::Builder::from_custom_bytes(h.to_be_bytes()).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = derived_id("reclaim/x/e1");
        assert_eq!(a, derived_id("reclaim/x/e1"));
        assert_ne!(a, derived_id("reclaim/x/e2"));
        assert_eq!(a.get_version_num(), 8);
    }

    #[test]
    fn incarnations_and_request_ids_display_and_parse() {
        assert_eq!(Incarnation::new(3).to_string(), "i3");
        assert_eq!("i3".parse::<Incarnation>(), Ok(Incarnation::new(3)));
        let r = RequestId::from_uuid(derived_id("r"));
        assert_eq!(r.to_string().parse::<RequestId>(), Ok(r));
        assert!("nope".parse::<RequestId>().is_err());
    }
}
