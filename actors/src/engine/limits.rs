//! Tag concurrency limits on one node: at most N running task runs carry a tag. A slot is a
//! semaphore permit held for the attempt and released when it is dropped, whatever the exit
//! (success, failure, panic, cancellation, timeout).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::BoxFuture;

/// The node's tag limits.
#[derive(Debug, Clone, Default)]
pub struct TagLimits {
    sems: BTreeMap<String, Arc<Semaphore>>,
}

/// Held slots; dropping them gives them back.
#[derive(Debug, Default)]
pub struct Slots(#[allow(dead_code)] Vec<OwnedSemaphorePermit>);

impl TagLimits {
    /// Limits from tag to slot count.
    pub fn new(limits: &BTreeMap<String, usize>) -> Self {
        TagLimits {
            sems: limits
                .iter()
                .map(|(t, n)| (t.clone(), Arc::new(Semaphore::new(*n))))
                .collect(),
        }
    }

    /// Whether any of these tags is limited.
    pub fn limits_any(&self, tags: &[String]) -> bool {
        tags.iter().any(|t| self.sems.contains_key(t))
    }

    /// Takes a slot of every limited tag among `tags`, waiting as long as it takes (in tag
    /// order, so two callers never hold one slot each of what the other waits for).
    pub fn acquire(&self, tags: &[String]) -> BoxFuture<Slots> {
        let mut names: Vec<&String> = tags.iter().filter(|t| self.sems.contains_key(*t)).collect();
        names.sort();
        names.dedup();
        let wanted: Vec<Arc<Semaphore>> = names.iter().filter_map(|t| self.sems.get(*t).cloned()).collect();
        Box::pin(async move {
            let mut permits = Vec::with_capacity(wanted.len());
            for sem in wanted {
                if let Ok(p) = sem.acquire_owned().await {
                    permits.push(p);
                }
            }
            Slots(permits)
        })
    }

    /// Free slots of a tag (None: not limited).
    pub fn available(&self, tag: &str) -> Option<usize> {
        self.sems.get(tag).map(|s| s.available_permits())
    }
}
