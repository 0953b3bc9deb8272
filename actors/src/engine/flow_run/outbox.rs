//! The write-behind queue of a flow run's actor.

use std::collections::HashMap;

use flotilla_runtime::{Command, NewTaskRun, Proposal, TaskRunId};

/// The write-behind queue: commands in order, one batch in flight.
#[derive(Default)]
pub(super) struct Outbox {
    pub(super) queue: Vec<Command>,
    /// Where each task run's open record is in the queue (records after the last flow-level
    /// command only, so coalescing never reorders a task's transition past it).
    pub(super) open: HashMap<TaskRunId, usize>,
    pub(super) next_seq: u64,
    pub(super) in_flight: bool,
    pub(super) acked: u64,
}

impl Outbox {
    pub(super) fn task(&mut self, run: TaskRunId, create: Option<NewTaskRun>, proposal: Option<Proposal>) {
        if let Some(&i) = self.open.get(&run)
            && let Some(Command::RecordTaskRun {
                create: c, proposals, ..
            }) = self.queue.get_mut(i)
        {
            if c.is_none() {
                *c = create;
            }
            proposals.extend(proposal);
            return;
        }
        self.open.insert(run, self.queue.len());
        self.queue.push(Command::RecordTaskRun {
            create,
            run,
            proposals: proposal.into_iter().collect(),
        });
    }

    pub(super) fn push(&mut self, command: Command) {
        self.queue.push(command);
        self.open.clear();
    }

    /// The sequence number the queued commands will be written under.
    pub(super) fn pending_seq(&self) -> u64 {
        self.next_seq
    }
}
