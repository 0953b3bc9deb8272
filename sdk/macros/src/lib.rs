//! # flotilla-macros
//!
//! The procedural macros of the Flotilla SDK: `#[flow]` and `#[task]`, which turn plain async
//! Rust functions into registered flows and tasks with retries, timeouts, caching and tags.
//! Re-exported by the `flotilla` crate.
