//! Replication of the control state with openraft: the type configuration and the Raft log
//! store (the command log, with log ids, a vote and purging).

pub mod book;
pub mod counting;
pub mod local;
pub mod log_store;
pub mod machine;
pub mod network;
mod types;
pub mod voter;

#[cfg(test)]
mod replica_tests;

pub use log_store::RaftLogStore;
pub use network::{QuicRaftNetwork, hello, serve, serve_with};
pub use types::{Applied, Control, Logged, Member};
