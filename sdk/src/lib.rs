//! # flotilla
//!
//! The Rust SDK of Flotilla. It will hold `#[flow]` and `#[task]` (from `flotilla-macros`),
//! `FlowContext` (run id, logger, parameters), the `Client` (deployments, runs, states, logs,
//! events) and `Node::builder()` to embed a node with the user's flows in their own binary.
//!
//! Today it re-exports the domain model of [`flotilla_runtime`].

pub use flotilla_runtime as runtime;
