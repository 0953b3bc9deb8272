//! Cluster-wide tag limits: at most N running task runs carry a tag. A slot is a lease with a
//! TTL that its holder renews; a lease not renewed lapses and its slot comes back by itself, so
//! the slots of a dead node return with no manual reset. A task run takes one slot of every
//! limited tag it carries at once, or waits for all of them (so two task runs never each hold
//! what the other waits for); waiters are served oldest first among those that fit.
//!
//! Plain data, generic over the waiter's reply (the driver's reply port, or a test's token).
//! Time is an argument: nothing here reads a clock.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::concurrency::{ConcurrencyLimit, SlotLease};
use crate::ids::{NodeId, TaskRunId};
use crate::time::Timestamp;

/// What a task run asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotRequest {
    /// One slot of every limited tag among `tags`, for `holder` on `node`.
    Acquire {
        /// The task run.
        holder: TaskRunId,
        /// Its node.
        node: NodeId,
        /// Its tags.
        tags: Vec<String>,
    },
    /// Keep this holder's leases (its tags with it: a lease that lapsed is taken again if a
    /// slot is free). Answered with whether it holds them.
    Renew {
        /// The task run.
        holder: TaskRunId,
        /// Its node.
        node: NodeId,
        /// Its tags.
        tags: Vec<String>,
    },
    /// Give these slots back.
    Release(Vec<TaskRunId>),
}

/// The answer to an acquire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotGrant {
    /// No tag is limited: nothing to hold.
    Unlimited,
    /// Held: renew within this long.
    Held {
        /// The lease's TTL (the shortest among the tags).
        ttl: Duration,
    },
}

struct Lease {
    node: NodeId,
    expires: Timestamp,
}

struct Limit {
    limit: u32,
    ttl: Duration,
    held: BTreeMap<TaskRunId, Lease>,
}

struct Waiter<R> {
    holder: TaskRunId,
    node: NodeId,
    tags: Vec<String>,
    reply: R,
}

/// The tag limits and who holds their slots.
pub struct Slots<R> {
    limits: BTreeMap<String, Limit>,
    waiters: VecDeque<Waiter<R>>,
    /// After a restart of the control node its leases are gone from memory while their holders
    /// still run: until then no slot is given to a new holder, only taken again by one that
    /// renews (every holder that does not has stopped by itself before).
    new_holders_from: Option<Timestamp>,
}

impl<R> Default for Slots<R> {
    fn default() -> Self {
        Slots {
            limits: BTreeMap::new(),
            waiters: VecDeque::new(),
            new_holders_from: None,
        }
    }
}

impl<R> std::fmt::Debug for Slots<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("limits", &self.limits.len())
            .field("waiters", &self.waiters.len())
            .finish()
    }
}

/// A waiter served: its reply and what it got.
pub type Served<R> = Vec<(R, SlotGrant)>;

impl<R> Slots<R> {
    /// Puts a limit (its leases stay; a lower limit lets no new holder in until enough end).
    pub fn put(&mut self, tag: &str, limit: u32, ttl: Duration, now: Timestamp) -> Served<R> {
        let l = self.limits.entry(tag.to_owned()).or_insert_with(|| Limit {
            limit,
            ttl,
            held: BTreeMap::new(),
        });
        l.limit = limit;
        l.ttl = ttl;
        self.serve(now)
    }

    /// Makes the limits these (from the store): the others are deleted.
    pub fn set_all(&mut self, limits: &[ConcurrencyLimit], now: Timestamp) -> Served<R> {
        self.limits.retain(|tag, _| limits.iter().any(|l| l.tag == *tag));
        let mut out = Vec::new();
        for l in limits {
            out.extend(self.put(&l.tag, l.limit, l.lease_ttl, now));
        }
        out.extend(self.serve(now));
        out
    }

    /// Deletes a limit: its waiters are let go.
    pub fn delete(&mut self, tag: &str, now: Timestamp) -> Served<R> {
        self.limits.remove(tag);
        self.serve(now)
    }

    /// Frees every slot of a tag.
    pub fn reset(&mut self, tag: &str, now: Timestamp) -> Served<R> {
        if let Some(l) = self.limits.get_mut(tag) {
            l.held.clear();
        }
        self.serve(now)
    }

    /// A task run asks for slots: granted now (`Some`) or it waits (None, the reply kept).
    /// A holder that holds its slots already (it asked again) gets them again.
    pub fn acquire(
        &mut self,
        holder: TaskRunId,
        node: NodeId,
        tags: Vec<String>,
        now: Timestamp,
        reply: R,
    ) -> Option<(R, SlotGrant)> {
        let mut tags: Vec<String> = tags.into_iter().filter(|t| self.limits.contains_key(t)).collect();
        tags.sort();
        tags.dedup();
        if tags.is_empty() {
            return Some((reply, SlotGrant::Unlimited));
        }
        // Asked again after a timed-out wait: it keeps its place in line, with the new reply.
        if let Some(w) = self.waiters.iter_mut().find(|w| w.holder == holder) {
            w.reply = reply;
            return None;
        }
        let holds_all = tags
            .iter()
            .all(|t| self.limits.get(t).is_some_and(|l| l.held.contains_key(&holder)));
        // Oldest first: a waiter for one of these tags goes before.
        let queued = self
            .waiters
            .iter()
            .any(|w| w.tags.iter().any(|t| tags.contains(t)));
        let open = self.new_holders_from.is_none_or(|t| now >= t);
        if holds_all || (open && !queued && self.fits(&tags, holder)) {
            let grant = self.take(&tags, holder, &node, now);
            return Some((reply, grant));
        }
        self.waiters.push_back(Waiter {
            holder,
            node,
            tags,
            reply,
        });
        None
    }

    /// Takes back the holdings recorded before a restart of the control node, each counted from
    /// `now` (its holder renews it, or it lapses a TTL from now). Holdings of tags no longer
    /// limited are dropped.
    pub fn restore(&mut self, holds: &[(String, TaskRunId, NodeId)], now: Timestamp) {
        for (tag, holder, node) in holds {
            if let Some(l) = self.limits.get_mut(tag) {
                l.held.insert(
                    *holder,
                    Lease {
                        node: node.clone(),
                        expires: now + l.ttl,
                    },
                );
            }
        }
    }

    /// Whether new holders still wait after a restart (see [`Slots::restarted`]).
    pub fn waiting_after_restart(&self, now: Timestamp) -> bool {
        self.new_holders_from.is_some_and(|t| now < t)
    }

    /// Whether `holder` holds a slot of each of the limited tags among `tags`.
    pub fn holds_all(&self, holder: TaskRunId, tags: &[String]) -> bool {
        tags.iter()
            .filter_map(|t| self.limits.get(t))
            .all(|l| l.held.contains_key(&holder))
    }

    /// What `holder` holds: its node and the tags (None: nothing).
    pub fn holding(&self, holder: TaskRunId) -> Option<(NodeId, Vec<String>)> {
        let mut node = None;
        let mut tags = Vec::new();
        for (tag, l) in &self.limits {
            if let Some(lease) = l.held.get(&holder) {
                node = Some(lease.node.clone());
                tags.push(tag.clone());
            }
        }
        tags.sort();
        node.map(|n| (n, tags))
    }

    /// Every holding: (tag, holder, node).
    pub fn holdings(&self) -> Vec<(String, TaskRunId, NodeId)> {
        let mut out: Vec<(String, TaskRunId, NodeId)> = self
            .limits
            .iter()
            .flat_map(|(tag, l)| {
                l.held
                    .iter()
                    .map(|(h, lease)| (tag.clone(), *h, lease.node.clone()))
            })
            .collect();
        out.sort();
        out
    }

    /// The holders of a tag's slots.
    pub fn holders_of(&self, tag: &str) -> Vec<TaskRunId> {
        self.limits
            .get(tag)
            .map(|l| l.held.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The leases that have lapsed at `now`: (tag, holder).
    pub fn lapsed(&self, now: Timestamp) -> Vec<(String, TaskRunId)> {
        let mut out = Vec::new();
        for (tag, l) in &self.limits {
            for (h, lease) in &l.held {
                if lease.expires <= now {
                    out.push((tag.clone(), *h));
                }
            }
        }
        out
    }

    /// The control node restarted with holders possibly running: new holders wait one lease
    /// TTL (the longest), while those that renew take their slots again.
    pub fn restarted(&mut self, now: Timestamp) {
        let ttl = self.limits.values().map(|l| l.ttl).max().unwrap_or_default();
        if !ttl.is_zero() {
            self.new_holders_from = Some(now + ttl);
        }
    }

    /// Renews a holder's leases: true while it holds a slot of each of its limited tags. A
    /// lease that lapsed (or was forgotten by a restart) is taken again if a slot is free and
    /// nobody waits for it; otherwise the holder is told it lost its slots (and holds none).
    pub fn renew(&mut self, holder: TaskRunId, node: NodeId, tags: &[String], now: Timestamp) -> bool {
        let mut tags: Vec<String> = tags
            .iter()
            .filter(|t| self.limits.contains_key(*t))
            .cloned()
            .collect();
        tags.sort();
        tags.dedup();
        let holds_all = tags
            .iter()
            .all(|t| self.limits.get(t).is_some_and(|l| l.held.contains_key(&holder)));
        if holds_all {
            for t in &tags {
                if let Some(l) = self.limits.get_mut(t)
                    && let Some(lease) = l.held.get_mut(&holder)
                {
                    lease.expires = now + l.ttl;
                }
            }
            return true;
        }
        // Waiters go first, except while a restart holds new holders back: then the holders
        // of before take their slots again first.
        let open = self.new_holders_from.is_none_or(|t| now >= t);
        let queued = open
            && self
                .waiters
                .iter()
                .any(|w| w.holder != holder && w.tags.iter().any(|t| tags.contains(t)));
        if !queued && self.fits(&tags, holder) {
            self.take(&tags, holder, &node, now);
            return true;
        }
        // Lost: whatever it still holds goes back.
        for l in self.limits.values_mut() {
            l.held.remove(&holder);
        }
        false
    }

    /// Gives slots back.
    pub fn release(&mut self, holders: &[TaskRunId], now: Timestamp) -> Served<R> {
        for l in self.limits.values_mut() {
            for h in holders {
                l.held.remove(h);
            }
        }
        self.waiters.retain(|w| !holders.contains(&w.holder));
        self.serve(now)
    }

    /// Lets lapsed leases go (and, once a restart's wait is over, serves the waiters).
    pub fn expire(&mut self, now: Timestamp) -> Served<R> {
        let mut any = false;
        if self.new_holders_from.is_some_and(|t| now >= t) {
            self.new_holders_from = None;
            any = true;
        }
        for l in self.limits.values_mut() {
            l.held.retain(|_, lease| {
                let keep = lease.expires > now;
                any |= !keep;
                keep
            });
        }
        if any { self.serve(now) } else { Vec::new() }
    }

    /// Every limit with its leases.
    pub fn describe(&self) -> Vec<ConcurrencyLimit> {
        let mut out: Vec<ConcurrencyLimit> = self
            .limits
            .iter()
            .map(|(tag, l)| ConcurrencyLimit {
                tag: tag.clone(),
                limit: l.limit,
                lease_ttl: l.ttl,
                leases: l
                    .held
                    .iter()
                    .map(|(h, lease)| SlotLease {
                        holder: *h,
                        node: lease.node.clone(),
                        expires: lease.expires,
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.tag.cmp(&b.tag));
        out
    }

    /// How many wait.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    fn fits(&self, tags: &[String], holder: TaskRunId) -> bool {
        tags.iter().all(|t| {
            self.limits
                .get(t)
                .is_none_or(|l| l.held.contains_key(&holder) || (l.held.len() as u32) < l.limit)
        })
    }

    fn take(&mut self, tags: &[String], holder: TaskRunId, node: &NodeId, now: Timestamp) -> SlotGrant {
        let mut ttl: Option<Duration> = None;
        for t in tags {
            if let Some(l) = self.limits.get_mut(t) {
                l.held.insert(
                    holder,
                    Lease {
                        node: node.clone(),
                        expires: now + l.ttl,
                    },
                );
                ttl = Some(ttl.map_or(l.ttl, |x| x.min(l.ttl)));
            }
        }
        match ttl {
            Some(ttl) => SlotGrant::Held { ttl },
            None => SlotGrant::Unlimited,
        }
    }

    /// Serves the waiters that fit now, oldest first.
    fn serve(&mut self, now: Timestamp) -> Served<R> {
        let mut out = Vec::new();
        if self.new_holders_from.is_some_and(|t| now < t) {
            return out;
        }
        let mut keep = VecDeque::with_capacity(self.waiters.len());
        // Tags an older waiter still waits for: younger ones wait behind it.
        let mut behind: Vec<String> = Vec::new();
        while let Some(w) = self.waiters.pop_front() {
            let tags: Vec<String> = w
                .tags
                .iter()
                .filter(|t| self.limits.contains_key(*t))
                .cloned()
                .collect();
            if !tags.iter().any(|t| behind.contains(t)) && self.fits(&tags, w.holder) {
                let grant = self.take(&tags, w.holder, &w.node, now);
                out.push((w.reply, grant));
            } else {
                behind.extend(tags);
                keep.push_back(w);
            }
        }
        self.waiters = keep;
        out
    }
}

#[cfg(test)]
mod tests;
