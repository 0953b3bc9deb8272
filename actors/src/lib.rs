//! # flotilla-actors
//!
//! Flotilla's ractor actors: thin IO shells around `flotilla-runtime`'s machines.
//!
//! - [`persistence`]: the persistence actor, the only writer of the control state — a durable
//!   command log with group commit, the derived state in sled behind it, recovery on open.
//!
//! The execution tree (node supervisor, flow runs, task runs, workers, work queues, scheduler)
//! joins it in later steps.

pub mod engine;
pub mod node;
pub mod persistence;
mod read_helpers;
pub mod replication;
