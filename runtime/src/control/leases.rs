//! Tag-limit leases as durable state: at most `limit` live holders per limited tag. A lease is
//! live until its `expires` (the applied command's time + the tag's TTL); a lapsed lease counts
//! for nothing even before an `Expire` command removes it, so the count of live holders never
//! exceeds the limit at any instant, whatever the order in which commands arrive.
//!
//! A holder counts its lease from the moment it *sent* the request that was granted, and stops
//! on its own at 80 % of the TTL unless a renewal is acknowledged: the control plane's lease
//! always outlives the holder's belief in it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::command::{LeaseCommand, LeaseReply};
use super::ids::Incarnation;
use crate::ids::{NodeId, TaskRunId};
use crate::time::Timestamp;

/// One held slot of one tag.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The holder's node.
    pub node: NodeId,
    /// The node's incarnation.
    pub incarnation: Incarnation,
    /// When it lapses unless renewed.
    pub expires: Timestamp,
}

/// The leases of every limited tag.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leases {
    held: BTreeMap<String, BTreeMap<TaskRunId, LeaseRecord>>,
}

/// A tag's limit: how many slots, how long a lease lasts.
pub(super) type TagLimit = (u32, Duration);

impl Leases {
    /// The leases of a tag (live or lapsed).
    pub fn of(&self, tag: &str) -> impl Iterator<Item = (&TaskRunId, &LeaseRecord)> {
        self.held.get(tag).into_iter().flatten()
    }

    /// The tags with leases.
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.held.keys().map(String::as_str)
    }

    /// How many leases of a tag are live at `now`.
    pub fn live(&self, tag: &str, now: Timestamp) -> usize {
        self.of(tag).filter(|(_, l)| l.expires > now).count()
    }

    /// Whether `holder` holds a live lease of `tag` at `now`.
    pub fn holds(&self, tag: &str, holder: &TaskRunId, now: Timestamp) -> bool {
        self.held
            .get(tag)
            .and_then(|h| h.get(holder))
            .is_some_and(|l| l.expires > now)
    }

    /// The leases lapsed at `now`, as `(tag, holder, expires)`, at most `max`.
    pub fn expired(&self, now: Timestamp, max: usize) -> Vec<(String, TaskRunId, Timestamp)> {
        self.held
            .iter()
            .flat_map(|(tag, h)| {
                h.iter()
                    .filter(move |(_, l)| l.expires <= now)
                    .map(move |(holder, l)| (tag.clone(), *holder, l.expires))
            })
            .take(max)
            .collect()
    }

    /// Whether `holder` may hold a slot of every tag at `now`: it holds a live one already, or
    /// the tag has fewer live holders than its limit. `extra` counts slots promised but not yet
    /// applied, per tag.
    pub fn fits(
        &self,
        tags: &[(String, TagLimit)],
        holder: &TaskRunId,
        now: Timestamp,
        extra: &dyn Fn(&str) -> usize,
    ) -> bool {
        tags.iter().all(|(tag, (limit, _))| {
            self.holds(tag, holder, now) || self.live(tag, now) + extra(tag) < *limit as usize
        })
    }

    /// Applies a lease command; `limit_of` gives a tag's limit (None: not limited).
    pub(super) fn apply(
        &mut self,
        cmd: LeaseCommand,
        limit_of: &dyn Fn(&str) -> Option<TagLimit>,
        now: Timestamp,
    ) -> LeaseReply {
        let none = |_: &str| 0;
        match cmd {
            LeaseCommand::Acquire {
                holder,
                node,
                incarnation,
                tags,
                ..
            } => {
                let tags = limited(&tags, limit_of);
                if tags.is_empty() {
                    return LeaseReply::Unlimited;
                }
                if !self.fits(&tags, &holder, now, &none) {
                    return LeaseReply::Full;
                }
                self.take(&tags, holder, &node, incarnation, now)
            }
            LeaseCommand::Renew {
                holder,
                node,
                incarnation,
                tags,
                ..
            } => {
                let tags = limited(&tags, limit_of);
                if tags.is_empty() {
                    return LeaseReply::Unlimited;
                }
                // fix 6: a renewal extends only live leases; a lapsed one is re-taken only if a
                // slot is free, otherwise the holder is told it lost it (its slot may be
                // another's already).
                if !self.fits(&tags, &holder, now, &none) {
                    self.remove(&holder, None);
                    return LeaseReply::Lost;
                }
                self.take(&tags, holder, &node, incarnation, now)
            }
            LeaseCommand::Release { holders, node } => {
                let count = holders.iter().map(|h| self.remove(h, Some(&node))).sum();
                LeaseReply::Removed { count }
            }
            LeaseCommand::Expire { leases } => {
                let mut count = 0;
                for (tag, holder, expires) in leases {
                    if let Some(h) = self.held.get_mut(&tag)
                        && h.get(&holder)
                            .is_some_and(|l| l.expires == expires && expires <= now)
                    {
                        h.remove(&holder);
                        count += 1;
                        if h.is_empty() {
                            self.held.remove(&tag);
                        }
                    }
                }
                LeaseReply::Removed { count }
            }
        }
    }

    fn take(
        &mut self,
        tags: &[(String, TagLimit)],
        holder: TaskRunId,
        node: &NodeId,
        incarnation: Incarnation,
        now: Timestamp,
    ) -> LeaseReply {
        let mut ttl = Duration::MAX;
        for (tag, (_, tag_ttl)) in tags {
            ttl = ttl.min(*tag_ttl);
            self.held.entry(tag.clone()).or_default().insert(
                holder,
                LeaseRecord {
                    node: node.clone(),
                    incarnation,
                    expires: now + *tag_ttl,
                },
            );
        }
        LeaseReply::Granted {
            expires: now + ttl,
            ttl,
        }
    }

    /// Removes a holder's leases (only those of `node` when given); returns how many.
    fn remove(&mut self, holder: &TaskRunId, node: Option<&NodeId>) -> usize {
        let mut count = 0;
        self.held.retain(|_, h| {
            if h.get(holder).is_some_and(|l| node.is_none_or(|n| *n == l.node)) {
                h.remove(holder);
                count += 1;
            }
            !h.is_empty()
        });
        count
    }
}

/// The limited tags among `tags`, sorted, once each, with their limits.
pub(super) fn limited(
    tags: &[String],
    limit_of: &dyn Fn(&str) -> Option<TagLimit>,
) -> Vec<(String, TagLimit)> {
    let mut out: Vec<(String, TagLimit)> = tags
        .iter()
        .filter_map(|t| limit_of(t).map(|l| (t.clone(), l)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    out
}
