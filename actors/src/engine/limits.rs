//! Tag concurrency limits: at most N running task runs carry a tag. On one node a slot is a
//! semaphore permit; in a cluster it is a lease from the control node (see
//! `node::slots`), renewed while the attempt runs. Either way it is held for the attempt and
//! given back when dropped, whatever the exit (success, failure, panic, cancellation, timeout).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_runtime::TaskRunId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::BoxFuture;

/// Cluster-wide slots, from the control node.
pub trait SlotService: std::fmt::Debug + Send + Sync + 'static {
    /// Waits until `holder` holds one slot of every limited tag among `tags`; the lease's TTL,
    /// or None when no tag is limited.
    fn acquire(&self, holder: TaskRunId, tags: Vec<String>) -> BoxFuture<Option<Duration>>;
    /// Keeps the leases of these holders.
    fn renew(&self, holders: Vec<TaskRunId>);
    /// Gives their slots back.
    fn release(&self, holders: Vec<TaskRunId>);
}

/// The node's tag limits.
#[derive(Clone, Default)]
pub struct TagLimits {
    sems: BTreeMap<String, Arc<Semaphore>>,
    cluster: Option<Arc<dyn SlotService>>,
}

impl std::fmt::Debug for TagLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TagLimits")
            .field("local", &self.sems.keys().collect::<Vec<_>>())
            .field("cluster", &self.cluster.is_some())
            .finish()
    }
}

/// Held slots; dropping them gives them back.
#[derive(Debug, Default)]
pub struct Slots {
    #[allow(dead_code)]
    permits: Vec<OwnedSemaphorePermit>,
    #[allow(dead_code)]
    lease: Option<Lease>,
}

/// A cluster lease: renewed by a task of its own until dropped, then released.
struct Lease {
    holder: TaskRunId,
    service: Arc<dyn SlotService>,
    renewer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("holder", &self.holder).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
        self.service.release(vec![self.holder]);
    }
}

impl TagLimits {
    /// Limits from tag to slot count, on this node.
    pub fn new(limits: &BTreeMap<String, usize>) -> Self {
        TagLimits {
            sems: limits
                .iter()
                .map(|(t, n)| (t.clone(), Arc::new(Semaphore::new(*n))))
                .collect(),
            cluster: None,
        }
    }

    /// Also the cluster's limits, from a slot service.
    pub fn with_cluster(mut self, service: Arc<dyn SlotService>) -> Self {
        self.cluster = Some(service);
        self
    }

    /// Whether any of these tags may be limited.
    pub fn limits_any(&self, tags: &[String]) -> bool {
        (self.cluster.is_some() && !tags.is_empty()) || tags.iter().any(|t| self.sems.contains_key(t))
    }

    /// Takes a slot of every limited tag among `tags`, waiting as long as it takes (local
    /// limits in tag order, so two callers never hold one slot each of what the other waits
    /// for; cluster limits all at once).
    pub fn acquire(&self, holder: TaskRunId, tags: &[String]) -> BoxFuture<Slots> {
        let mut names: Vec<&String> = tags.iter().filter(|t| self.sems.contains_key(*t)).collect();
        names.sort();
        names.dedup();
        let wanted: Vec<Arc<Semaphore>> = names.iter().filter_map(|t| self.sems.get(*t).cloned()).collect();
        let cluster = self.cluster.clone();
        let tags = tags.to_vec();
        Box::pin(async move {
            let mut permits = Vec::with_capacity(wanted.len());
            for sem in wanted {
                if let Ok(p) = sem.acquire_owned().await {
                    permits.push(p);
                }
            }
            let lease = match cluster {
                Some(service) if !tags.is_empty() => match service.acquire(holder, tags).await {
                    Some(ttl) => {
                        let s = service.clone();
                        let renewer = tokio::spawn(async move {
                            let mut every = tokio::time::interval((ttl / 3).max(Duration::from_millis(10)));
                            every.tick().await;
                            loop {
                                every.tick().await;
                                s.renew(vec![holder]);
                            }
                        });
                        Some(Lease {
                            holder,
                            service,
                            renewer,
                        })
                    }
                    None => None,
                },
                _ => None,
            };
            Slots { permits, lease }
        })
    }

    /// Free slots of a tag on this node (None: not limited here).
    pub fn available(&self, tag: &str) -> Option<usize> {
        self.sems.get(tag).map(|s| s.available_permits())
    }
}
