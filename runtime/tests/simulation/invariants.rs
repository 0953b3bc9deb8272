//! The invariants: on each applied command, after every step, once quiet, and on user keys.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

impl Sim {
    /// Invariants on each applied command.
    pub(super) fn check_applied(
        &mut self,
        cmd: &ControlCommand,
        outcome: &flotilla_runtime::control::ControlOutcome,
        before: Option<flotilla_runtime::control::Holder>,
    ) -> Check {
        let wrote = !outcome.writes.is_empty();
        match (cmd, &outcome.reply) {
            (
                ControlCommand::Client { request_id, .. },
                ControlReply::Client(Ok(ClientReply::RunCreated { run, created })),
            ) => {
                self.note(format!("applied create {request_id} -> {run} created={created}"));
                if *created && let Some(first) = self.created.insert(*request_id, *run) {
                    return Err(format!(
                        "(4) request {request_id} created two runs: {first} and {run}"
                    ));
                }
            }
            (
                ControlCommand::Propose {
                    run,
                    node,
                    incarnation,
                    epoch,
                    ..
                },
                ControlReply::Proposed { decision, .. },
            ) => {
                self.note(format!(
                    "applied propose {run} by {node} {incarnation} {epoch:?}: {decision:?}"
                ));
                if wrote {
                    let holds = before.as_ref().is_some_and(|h| {
                        h.node == *node && h.incarnation == *incarnation && Some(h.epoch) == *epoch
                    });
                    if !holds {
                        return Err(format!(
                            "(5) flow run {run} changed by {node} {incarnation} under {epoch:?}, not its holder {before:?}"
                        ));
                    }
                }
                if wrote
                    && let Ok(Decision::Accept(s)) = decision
                    && s.kind == StateType::Completed
                {
                    let n = self.completed.entry(*run).or_insert(0);
                    *n += 1;
                    if *n > 1 {
                        return Err(format!("flow run {run} Completed twice"));
                    }
                }
            }
            (c, r) => self.note(format!("applied {} -> {r:?}", c.kind())),
        }
        Ok(())
    }

    /// Invariants after every step.
    pub(super) fn check_step(&self) -> Check {
        let mut copies: BTreeMap<(FlowRunId, Epoch), usize> = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.up) {
            for (run, c) in &n.copies {
                if let Some(j) = copies.insert((*run, c.epoch), i) {
                    return Err(format!(
                        "nodes {j} and {i} both run flow run {run} under {}",
                        c.epoch
                    ));
                }
            }
        }
        for (tag, limit, _) in LIMITS {
            let believers = self
                .nodes
                .iter()
                .filter(|n| n.up)
                .flat_map(|n| n.tasks.values())
                .filter(|t| t.believes(self.now) && t.tags.iter().any(|x| x == tag))
                .count();
            let live = self.state.leases().live(tag, self.now);
            if believers > limit as usize || live > limit as usize {
                return Err(format!(
                    "(6) tag {tag}: {believers} holders believe they hold a slot, {live} live leases; the limit is {limit}"
                ));
            }
        }
        Ok(())
    }

    /// Whether everything is done: returns what is not.
    pub(super) fn unsettled(&self) -> Option<String> {
        if let Some(r) = self.requests.iter().find(|r| r.reply.is_none()) {
            return Some(format!("request {} is not answered", r.id));
        }
        for r in self.state.view().hot.flow_runs() {
            let runnable = self.nodes.iter().any(|n| n.flows.contains(&r.flow_name));
            let kind = r.lifecycle.state.kind;
            if !kind.is_terminal() && (kind != StateType::Scheduled || runnable) {
                return Some(format!(
                    "flow run {} ({}) is {} under {}, owned by {:?}",
                    r.id, r.flow_name, r.lifecycle.state, r.epoch, r.owner
                ));
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some((run, c)) = n.copies.iter().next() {
                return Some(format!(
                    "node {i} still runs {run} under {} (a leaked slot)",
                    c.epoch
                ));
            }
            if !n.tasks.is_empty() {
                return Some(format!("node {i} still has {} lease tasks", n.tasks.len()));
            }
        }
        for (tag, _, _) in LIMITS {
            if self.state.leases().live(tag, self.now) > 0 {
                return Some(format!("tag {tag} still has live leases (a leaked lease)"));
            }
        }
        None
    }

    /// One run per user key.
    pub(super) fn check_keys(&self) -> Check {
        let mut keys = BTreeMap::new();
        for r in self.state.view().hot.flow_runs() {
            if let Some(k) = &r.idempotency_key
                && let Some(other) = keys.insert(k.clone(), r.id)
            {
                return Err(format!("(4) key {k} made two runs: {other} and {}", r.id));
            }
        }
        Ok(())
    }
}
