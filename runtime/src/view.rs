//! What `apply` reads and changes: the hot state, plus the two questions it asks of the cold,
//! append-only records (has this event, this log batch, been stored already?).

use std::collections::BTreeMap;

use crate::event::Event;
use crate::hot_state::HotState;
use crate::ids::{EventId, FlowRunId, LogBatchId, RunId};
use crate::lifecycle::Lifecycle;
use crate::log_line::LogLine;

/// The control state as `apply` sees it.
pub trait StateView {
    /// The hot state.
    fn hot(&self) -> &HotState;
    /// The hot state, to change.
    fn hot_mut(&mut self) -> &mut HotState;
    /// Whether an event with this id is stored.
    fn event_exists(&self, id: &EventId) -> bool;
    /// Whether this log batch of this flow run is stored.
    fn log_batch_exists(&self, flow_run: &FlowRunId, batch: &LogBatchId) -> bool;
}

/// A control state held wholly in memory: the reference `StateView` for tests and models.
#[derive(Debug, Default, Clone)]
pub struct MemState {
    /// Runs, task runs, deployments.
    pub hot: HotState,
    /// Every event, by id.
    pub events: BTreeMap<EventId, Event>,
    /// Every log batch.
    pub logs: BTreeMap<(FlowRunId, LogBatchId), Vec<LogLine>>,
    /// Archived history blocks.
    pub history_blocks: BTreeMap<(RunId, u32), Vec<EventId>>,
}

impl MemState {
    /// An empty state.
    pub fn new() -> Self {
        MemState::default()
    }

    /// Stores what an outcome says to store besides the hot state (events and logs); the hot
    /// state was changed by `apply` itself.
    pub fn store(&mut self, writes: Vec<crate::apply::Write>) {
        for w in writes {
            match w {
                crate::apply::Write::Event(e) => {
                    self.events.insert(e.id, e);
                }
                crate::apply::Write::Logs {
                    flow_run,
                    batch,
                    lines,
                } => {
                    self.logs.insert((flow_run, batch), lines);
                }
                crate::apply::Write::HistoryBlock { run, block, events } => {
                    self.history_blocks.insert((run, block), events);
                }
                _ => {}
            }
        }
    }
}

impl MemState {
    /// The whole state history of a run (archived blocks, then the window).
    pub fn history(&self, run: RunId) -> Vec<EventId> {
        let lifecycle: Option<&Lifecycle> = match run {
            RunId::Flow(id) => self.hot.flow_run(&id).map(|r| &r.lifecycle),
            RunId::Task(id) => self.hot.task_run(&id).map(|r| &r.lifecycle),
        };
        let Some(l) = lifecycle else { return Vec::new() };
        let mut out: Vec<EventId> = (0..l.archived_blocks)
            .flat_map(|b| self.history_blocks.get(&(run, b)).cloned().unwrap_or_default())
            .collect();
        out.extend_from_slice(&l.history);
        out
    }
}

impl StateView for MemState {
    fn hot(&self) -> &HotState {
        &self.hot
    }
    fn hot_mut(&mut self) -> &mut HotState {
        &mut self.hot
    }
    fn event_exists(&self, id: &EventId) -> bool {
        self.events.contains_key(id)
    }
    fn log_batch_exists(&self, flow_run: &FlowRunId, batch: &LogBatchId) -> bool {
        self.logs.contains_key(&(*flow_run, *batch))
    }
}
