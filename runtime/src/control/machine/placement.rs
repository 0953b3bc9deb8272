//! The machine's placement: Scheduled runs wait in a queue ordered by their work queue's
//! priority and due time, and go to the live member that runs their flow with the least load.

use std::collections::BTreeMap;

use super::{ControlMachine, Flight, WaitKey};
use crate::control::command::ControlCommand;
use crate::control::effect::Effect;
use crate::control::state::ControlState;
use crate::ids::{FlowRunId, NodeId};
use crate::state::StateType;
use crate::time::Timestamp;
use crate::view::StateView;
use crate::work_queue::{DEFAULT_QUEUE, Setting, queue_key};

impl ControlMachine {
    /// Keeps the placement queue in step with a run's applied state.
    pub(super) fn index_run<V: StateView>(&mut self, state: &ControlState<V>, run: FlowRunId) {
        if let Some(old) = self.queued.remove(&run) {
            self.queue.remove(&old);
        }
        let Some(r) = state.run(&run) else { return };
        if r.lifecycle.state.kind != StateType::Scheduled || r.owner.is_some() {
            return;
        }
        let queue = r.work_queue.as_deref().unwrap_or(DEFAULT_QUEUE);
        let priority = match state.view().hot().setting(&queue_key(queue)) {
            Some(Setting::WorkQueue(q)) => q.priority,
            _ => 1,
        };
        let due = r
            .lifecycle
            .state
            .details
            .scheduled_time
            .unwrap_or(r.lifecycle.state.timestamp);
        let key = (priority, due, run);
        self.queue.insert(key);
        self.queued.insert(run, key);
    }

    /// Places due runs on live members with room: highest queue priority first, then oldest.
    pub(super) fn place<V: StateView>(
        &mut self,
        now: Timestamp,
        state: &ControlState<V>,
        out: &mut Vec<Effect>,
    ) {
        if self.queue.is_empty() {
            return;
        }
        let mut load: BTreeMap<NodeId, u32> = BTreeMap::new();
        for (node, m) in self.members.iter() {
            let held = state
                .held_by(node)
                .map(|(_, h)| h.incarnation)
                .collect::<Vec<_>>();
            // A node whose earlier incarnation still holds runs takes none until they are gone.
            let l = if held.iter().any(|i| *i != m.incarnation) {
                u32::MAX
            } else {
                (held.len() as u32).saturating_add(m.placing)
            };
            load.insert(node.clone(), l);
        }
        let mut placed = 0;
        let keys: Vec<WaitKey> = self.queue.iter().copied().collect();
        for (_, due, run) in keys {
            if placed >= self.config.placements_per_pass_max {
                break;
            }
            if due > now || self.in_flight.contains(&Flight::Assign(run)) {
                continue;
            }
            let Some(r) = state.run(&run) else { continue };
            let queue = r.work_queue.as_deref().unwrap_or(DEFAULT_QUEUE);
            if let Some(Setting::WorkQueue(q)) = state.view().hot().setting(&queue_key(queue))
                && q.paused
            {
                continue;
            }
            let Some((node, incarnation)) = self
                .members
                .pick(&r.flow_name, |n, _| load.get(n).copied().unwrap_or(u32::MAX))
            else {
                continue;
            };
            if let Some(l) = load.get_mut(&node) {
                *l = l.saturating_add(1);
            }
            if let Some(m) = self.members.get_mut(&node) {
                m.placing = m.placing.saturating_add(1);
            }
            placed += 1;
            let command = ControlCommand::Assign {
                run,
                node,
                incarnation,
                epoch: r.epoch,
            };
            self.append_once(Flight::Assign(run), command, out);
        }
    }
}
