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
    /// Renews a holder's leases (its tags with it, so a lapsed lease can be taken again):
    /// Some(true) while it holds them, Some(false) when it lost them, None when no answer came.
    fn renew(&self, holder: TaskRunId, tags: Vec<String>) -> BoxFuture<Option<bool>>;
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

/// A holder stops using its lease this far into the TTL without an acknowledged renewal
/// (counted from when the acknowledged request was sent): the control node lets the lease go
/// only at the whole TTL, so no task runs on a slot that another holder may have.
pub const LEASE_KEEP_FRACTION: f64 = 0.8;

/// Held slots; dropping them gives them back.
#[derive(Debug, Default)]
pub struct Slots {
    #[allow(dead_code)]
    permits: Vec<OwnedSemaphorePermit>,
    #[allow(dead_code)]
    lease: Option<Lease>,
}

impl Slots {
    /// Resolves when the cluster lease was lost (not renewed in time, or taken back): the
    /// attempt holding it must stop. Never resolves for local slots.
    pub fn lost(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.lease.as_ref().map(|l| l.lost.clone())
    }
}

/// Waits until a lease's `lost` flag is set; forever when there is none (or its renewer ended
/// without losing it).
pub async fn lease_lost(lost: Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(mut rx) = lost
        && rx.wait_for(|l| *l).await.is_ok()
    {
        return;
    }
    std::future::pending::<()>().await
}

/// A cluster lease: renewed by a task of its own until dropped, then released.
struct Lease {
    holder: TaskRunId,
    service: Arc<dyn SlotService>,
    renewer: tokio::task::JoinHandle<()>,
    lost: tokio::sync::watch::Receiver<bool>,
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
                Some(service) if !tags.is_empty() => match service.acquire(holder, tags.clone()).await {
                    Some(ttl) => {
                        let (lost_tx, lost) = tokio::sync::watch::channel(false);
                        let renewer = tokio::spawn(renew(service.clone(), holder, tags, ttl, lost_tx));
                        Some(Lease {
                            holder,
                            service,
                            renewer,
                            lost,
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

/// Renews a lease every third of its TTL. Each acknowledged renewal keeps it until
/// [`LEASE_KEEP_FRACTION`] of the TTL after that renewal was sent; past that deadline with no
/// acknowledgement, or told the lease was lost, it sets `lost` and stops (fix 6: renewals were
/// fire-and-forget, so a holder cut off from the control node ran on a slot given to another).
async fn renew(
    service: Arc<dyn SlotService>,
    holder: TaskRunId,
    tags: Vec<String>,
    ttl: Duration,
    lost: tokio::sync::watch::Sender<bool>,
) {
    let keep = ttl.mul_f64(LEASE_KEEP_FRACTION);
    let every = (ttl / 3).max(Duration::from_millis(10));
    // The grant's delivery is taken as instant: the margin to the TTL covers it.
    let mut deadline = tokio::time::Instant::now() + keep;
    loop {
        let next = (tokio::time::Instant::now() + every).min(deadline);
        tokio::time::sleep_until(next).await;
        let sent = tokio::time::Instant::now();
        if sent >= deadline {
            tracing::warn!(%holder, "a slot's lease was not renewed in time; its task run stops");
            let _ = lost.send(true);
            return;
        }
        match tokio::time::timeout(deadline - sent, service.renew(holder, tags.clone())).await {
            Ok(Some(true)) => deadline = sent + keep,
            Ok(Some(false)) => {
                tracing::warn!(%holder, "a slot's lease was lost; its task run stops");
                let _ = lost.send(true);
                return;
            }
            // No answer: asked again at the next turn, the deadline as it was.
            Ok(None) | Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Grants every slot with a 1 s lease; answers renewals as told.
    #[derive(Debug)]
    struct Service {
        answer: Option<bool>,
        renewals: AtomicU32,
    }

    impl SlotService for Service {
        fn acquire(&self, _holder: TaskRunId, _tags: Vec<String>) -> BoxFuture<Option<Duration>> {
            Box::pin(async { Some(Duration::from_secs(1)) })
        }
        fn renew(&self, _holder: TaskRunId, _tags: Vec<String>) -> BoxFuture<Option<bool>> {
            self.renewals.fetch_add(1, Ordering::SeqCst);
            let answer = self.answer;
            Box::pin(async move { answer })
        }
        fn release(&self, _holders: Vec<TaskRunId>) {}
    }

    async fn lose_within(answer: Option<bool>, within: Duration) -> (bool, u32) {
        let service = Arc::new(Service {
            answer,
            renewals: AtomicU32::new(0),
        });
        let limits = TagLimits::default().with_cluster(service.clone());
        let slots = limits
            .acquire(TaskRunId::from_bytes([1; 16]), &["db".into()])
            .await;
        let lost = tokio::time::timeout(within, lease_lost(slots.lost()))
            .await
            .is_ok();
        (lost, service.renewals.load(Ordering::SeqCst))
    }

    /// Regression (fix 6): renewals were fire-and-forget, so a holder cut off from the control
    /// node ran on. Unacknowledged, the lease is given up at 80 % of its TTL.
    #[tokio::test(start_paused = true)]
    async fn a_lease_whose_renewals_go_unanswered_is_lost_before_its_ttl() {
        let (lost, renewals) = lose_within(None, Duration::from_millis(999)).await;
        assert!(lost, "the holder kept a lease no renewal confirmed");
        assert!(renewals >= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_told_lost_is_lost_at_its_next_renewal() {
        let (lost, renewals) = lose_within(Some(false), Duration::from_millis(400)).await;
        assert!(lost);
        assert_eq!(renewals, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_lease_is_kept() {
        let (lost, renewals) = lose_within(Some(true), Duration::from_secs(10)).await;
        assert!(!lost, "a renewed lease was given up");
        assert!(renewals >= 25, "renewed {renewals} times in 10 s of a 1 s lease");
    }
}
