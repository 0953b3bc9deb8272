//! Concurrency limits: cluster-wide slots by tag, held as leases.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, TaskRunId};
use crate::time::Timestamp;

/// One held slot: a lease its holder renews; when it lapses the slot comes back by itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotLease {
    /// The task run holding the slot.
    pub holder: TaskRunId,
    /// The node running it.
    pub node: NodeId,
    /// When the lease lapses unless renewed.
    pub expires: Timestamp,
}

/// A limit on how many running task runs may carry a tag.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConcurrencyLimit {
    /// The tag.
    pub tag: String,
    /// The number of slots.
    pub limit: u32,
    /// How long a lease lasts between renewals.
    pub lease_ttl: Duration,
    /// The slots held now.
    #[serde(default)]
    pub leases: Vec<SlotLease>,
}
