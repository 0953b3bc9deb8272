//! Replication of the control state with openraft: the type configuration and the Raft log
//! store (the command log, with log ids, a vote and purging).

pub mod counting;
pub mod local;
pub mod log_store;
pub mod network;
mod types;

pub use log_store::RaftLogStore;
pub use network::{QuicRaftNetwork, serve};
pub use types::{Applied, Control, Logged, Member};
