//! # flotilla-runtime
//!
//! Flotilla's pure domain: typed ids, models (flow runs, task runs, states, deployments,
//! schedules, work queues, concurrency limits, events, log lines), the orchestration rules,
//! the retry policy, the commands and the deterministic `apply` that is the state machine of the
//! control state, and the encodings of everything stored or sent.
//!
//! Nothing here does IO or reads the clock: time (`now`) and randomness are arguments. The
//! actors (`flotilla-actors`) are thin shells that feed messages to these machines and carry out
//! what they return.

pub mod apply;
pub mod automation;
pub mod block;
pub mod codec;
pub mod command;
pub mod concurrency;
pub mod control;
pub mod cron;
pub mod deployment;
pub mod event;
pub mod event_filter;
pub mod flow_run;
pub mod frame;
pub mod hot_state;
pub mod ids;
pub mod lifecycle;
pub mod log_line;
pub mod retry;
pub mod rules;
pub mod state;
pub mod task_run;
pub mod time;
pub mod view;
pub mod work_queue;

pub use apply::{ApplyContext, Outcome, PrunedRun, Refusal, Reply, Write, apply, apply_shadow};
pub use command::{
    Command, IdempotencyKey, NewFlowRun, NewTaskRun, Prune, RememberedOutcome, RetryRequest, SlotChange,
};
pub use concurrency::ConcurrencyLimit;
pub use deployment::{CollisionStrategy, Deployment, DeploymentSpec, Schedule, ScheduleKind};
pub use event::{Event, EventPayload, Resource};
pub use event_filter::{EventFilter, LabelSpec};
pub use flow_run::FlowRun;
pub use hot_state::{HotState, RememberedAnswer};
pub use ids::{
    DeploymentId, Epoch, EventId, FlowRunId, LogBatchId, LogIndex, NodeId, RunId, TaskRunId, TransitionId,
    WorkQueueId,
};
pub use lifecycle::Lifecycle;
pub use log_line::{LogCursor, LogLevel, LogLine};
pub use retry::{RetryCondition, RetryDelay, RetryPolicy};
pub use rules::{AbortReason, Decision, Proposal, RunKind};
pub use state::{ResultRef, State, StateDetails, StateName, StateType};
pub use task_run::{TaskRun, TaskRunKey};
pub use time::Timestamp;
pub use view::{MemState, StateView};
pub use work_queue::{DEFAULT_QUEUE, QueueEdit, Setting, WorkQueue};
