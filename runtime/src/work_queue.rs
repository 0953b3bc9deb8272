//! Work queues: named, prioritised, limited, pausable lines of runs waiting for workers.

use serde::{Deserialize, Serialize};

use crate::ids::WorkQueueId;

/// A work queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkQueue {
    /// The queue's id.
    pub id: WorkQueueId,
    /// Its unique name.
    pub name: String,
    /// 1 is the highest priority.
    pub priority: u32,
    /// At most this many of its runs at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_limit: Option<u32>,
    /// A paused queue hands out nothing.
    #[serde(default)]
    pub paused: bool,
}

/// One change to one work queue, applied in order with every other change to it (so two
/// changes sent at once never overwrite each other).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueEdit {
    /// Create it (refused if it exists).
    Create {
        /// 1 is the highest.
        priority: u32,
        /// At most this many of its runs at once.
        concurrency_limit: Option<u32>,
        /// Created paused.
        paused: bool,
    },
    /// Hand out nothing.
    Pause,
    /// Hand out again.
    Resume,
    /// Change (or, with None, lift) its concurrency limit.
    SetConcurrencyLimit(Option<u32>),
    /// Change its priority.
    SetPriority(u32),
}

impl QueueEdit {
    /// The queue after this edit (`current` is None when it does not exist).
    pub fn edit(&self, current: Option<&WorkQueue>, name: &str, id: WorkQueueId) -> Option<WorkQueue> {
        let base = || WorkQueue {
            id,
            name: name.to_owned(),
            priority: 1,
            concurrency_limit: None,
            paused: false,
        };
        let mut q = match (self, current) {
            (QueueEdit::Create { .. }, Some(_)) => return None,
            (QueueEdit::Create { .. }, None) => base(),
            (_, Some(q)) => q.clone(),
            // The default queue exists before anyone creates it.
            (_, None) if name == DEFAULT_QUEUE => base(),
            (_, None) => return None,
        };
        match *self {
            QueueEdit::Create {
                priority,
                concurrency_limit,
                paused,
            } => {
                q.priority = priority;
                q.concurrency_limit = concurrency_limit;
                q.paused = paused;
            }
            QueueEdit::Pause => q.paused = true,
            QueueEdit::Resume => q.paused = false,
            QueueEdit::SetConcurrencyLimit(l) => q.concurrency_limit = l,
            QueueEdit::SetPriority(p) => q.priority = p,
        }
        Some(q)
    }

    /// A short name of the field it changes.
    pub fn field(&self) -> &'static str {
        match self {
            QueueEdit::Create { .. } => "create",
            QueueEdit::Pause | QueueEdit::Resume => "paused",
            QueueEdit::SetConcurrencyLimit(_) => "concurrency-limit",
            QueueEdit::SetPriority(_) => "priority",
        }
    }
}

/// The queue a run without one goes to.
pub const DEFAULT_QUEUE: &str = "default";

/// A control-plane setting other than a deployment, stored by its [`Setting::key`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Setting {
    /// A work queue.
    WorkQueue(WorkQueue),
    /// A cluster-wide tag limit (its leases are not stored: they live on the control node).
    ConcurrencyLimit(crate::concurrency::ConcurrencyLimit),
    /// An automation.
    Automation(Box<crate::automation::AutomationRecord>),
    /// A block (its secret fields sealed).
    Block(Box<crate::block::BlockRecord>),
}

impl Setting {
    /// `work-queue/NAME` or `concurrency-limit/TAG`.
    pub fn key(&self) -> String {
        match self {
            Setting::WorkQueue(q) => queue_key(&q.name),
            Setting::ConcurrencyLimit(l) => limit_key(&l.tag),
            Setting::Automation(a) => automation_key(&a.spec.name),
            Setting::Block(b) => crate::block::block_key(b.kind, &b.name),
        }
    }

    /// The resource kind in event names: `work-queue` or `concurrency-limit`.
    pub fn kind(&self) -> &'static str {
        match self {
            Setting::WorkQueue(_) => "work-queue",
            Setting::ConcurrencyLimit(_) => "concurrency-limit",
            Setting::Automation(_) => "automation",
            Setting::Block(_) => "block",
        }
    }

    /// The queue or tag name.
    pub fn name(&self) -> &str {
        match self {
            Setting::WorkQueue(q) => &q.name,
            Setting::ConcurrencyLimit(l) => &l.tag,
            Setting::Automation(a) => &a.spec.name,
            Setting::Block(b) => &b.name,
        }
    }
}

/// The setting key of a work queue.
pub fn queue_key(name: &str) -> String {
    format!("work-queue/{name}")
}

/// The setting key of an automation.
pub fn automation_key(name: &str) -> String {
    format!("automation/{name}")
}

/// The setting key of a tag limit.
pub fn limit_key(tag: &str) -> String {
    format!("concurrency-limit/{tag}")
}

/// The longest a tag-limit lease lasts without renewal.
pub const LEASE_TTL_MAX: std::time::Duration = std::time::Duration::from_secs(3600);
