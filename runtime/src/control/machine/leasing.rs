//! The machine's tag-limit leases: requests that wait for a slot, served oldest first per tag.

use std::collections::VecDeque;

use super::{ControlMachine, Flight, Waiter};
use crate::control::command::{ControlCommand, LeaseCommand, LeaseReply};
use crate::control::effect::{Effect, ToNodeMsg};
use crate::control::leases::limited;
use crate::control::state::ControlState;
use crate::time::Timestamp;
use crate::view::StateView;

impl ControlMachine {
    /// Slots promised by acquires in flight, per tag.
    pub(super) fn promised(&self, tag: &str) -> usize {
        self.acquiring
            .values()
            .filter(|t| t.iter().any(|x| x == tag))
            .count()
    }

    pub(super) fn acquire<V: StateView>(
        &mut self,
        now: Timestamp,
        state: &ControlState<V>,
        w: Waiter,
        out: &mut Vec<Effect>,
    ) {
        let tags = limited(&w.tags, &|t| state.tag_limit(t));
        if tags.is_empty() {
            let msg = ToNodeMsg::LeaseGranted {
                holder: w.holder,
                ttl: None,
                sent_at: w.sent_at,
            };
            return Self::send(out, &w.node, w.incarnation, msg);
        }
        if self.acquiring.contains_key(&w.holder) {
            return;
        }
        if let Some(old) = self.waiters.iter_mut().find(|x| x.holder == w.holder) {
            old.sent_at = old.sent_at.max(w.sent_at); // keeps its place in line
            return;
        }
        let ahead = self
            .waiters
            .iter()
            .any(|x| x.tags.iter().any(|t| tags.iter().any(|(l, _)| l == t)));
        if !ahead && state.leases().fits(&tags, &w.holder, now, &|t| self.promised(t)) {
            self.append_acquire(w, tags.into_iter().map(|(t, _)| t).collect(), out);
        } else if self.waiters.len() < self.config.lease_waiters_max {
            self.waiters.push_back(w);
        }
    }

    pub(super) fn append_acquire(&mut self, w: Waiter, tags: Vec<String>, out: &mut Vec<Effect>) {
        self.acquiring.insert(w.holder, tags);
        out.push(Effect::Append(ControlCommand::Lease(LeaseCommand::Acquire {
            holder: w.holder,
            node: w.node,
            incarnation: w.incarnation,
            tags: w.tags,
            sent_at: w.sent_at,
        })));
    }

    /// Serves the waiting lease requests that fit now, oldest first per tag.
    pub(super) fn serve_waiters<V: StateView>(
        &mut self,
        now: Timestamp,
        state: &ControlState<V>,
        out: &mut Vec<Effect>,
    ) {
        let mut blocked: Vec<String> = Vec::new();
        let mut keep = VecDeque::with_capacity(self.waiters.len());
        while let Some(w) = self.waiters.pop_front() {
            let tags = limited(&w.tags, &|t| state.tag_limit(t));
            let free = !tags.iter().any(|(t, _)| blocked.contains(t))
                && !self.acquiring.contains_key(&w.holder)
                && state.leases().fits(&tags, &w.holder, now, &|t| self.promised(t));
            if free {
                self.append_acquire(w, tags.into_iter().map(|(t, _)| t).collect(), out);
            } else {
                blocked.extend(tags.into_iter().map(|(t, _)| t));
                keep.push_back(w);
            }
        }
        self.waiters = keep;
    }

    pub(super) fn lease_applied<V: StateView>(
        &mut self,
        now: Timestamp,
        state: &ControlState<V>,
        cmd: LeaseCommand,
        reply: &LeaseReply,
        out: &mut Vec<Effect>,
    ) {
        let (holder, node, incarnation, tags, sent_at, acquire) = match cmd {
            LeaseCommand::Acquire {
                holder,
                node,
                incarnation,
                tags,
                sent_at,
            } => (holder, node, incarnation, tags, sent_at, true),
            LeaseCommand::Renew {
                holder,
                node,
                incarnation,
                tags,
                sent_at,
            } => (holder, node, incarnation, tags, sent_at, false),
            LeaseCommand::Release { .. } | LeaseCommand::Expire { .. } => {
                self.in_flight.remove(&Flight::Expire);
                return self.serve_waiters(now, state, out);
            }
        };
        if acquire {
            self.acquiring.remove(&holder);
        }
        let msg = match reply {
            LeaseReply::Granted { ttl, .. } => ToNodeMsg::LeaseGranted {
                holder,
                ttl: Some(*ttl),
                sent_at,
            },
            LeaseReply::Unlimited => ToNodeMsg::LeaseGranted {
                holder,
                ttl: None,
                sent_at,
            },
            LeaseReply::Full if acquire => {
                // Lost the race to another request: it waits in line again.
                let w = Waiter {
                    holder,
                    node,
                    incarnation,
                    tags,
                    sent_at,
                };
                if self.waiters.len() < self.config.lease_waiters_max {
                    self.waiters.push_front(w);
                }
                return;
            }
            LeaseReply::Full | LeaseReply::Lost | LeaseReply::Removed { .. } => {
                ToNodeMsg::LeaseLost { holder }
            }
        };
        Self::send(out, &node, incarnation, msg);
    }
}
