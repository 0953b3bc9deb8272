//! # flotilla-cluster
//!
//! The cluster layer of Flotilla: the cluster's certificates ([`certs`]), mutual TLS with the
//! `ring` provider ([`tls`]), one QUIC endpoint per node ([`endpoint`]), ractor_cluster node
//! sessions carried over QUIC streams ([`bidi`]), and the client protocol ([`wire`], framed by
//! [`frame`]).

pub mod bidi;
pub mod certs;
pub mod endpoint;
pub mod frame;
pub mod identity;
pub mod role;
pub mod secrets;
pub mod tls;
pub mod wire;

pub use endpoint::{ConnectError, QuicEndpoint, TransportSettings};
pub use tls::{ALPN_CLIENT, ALPN_NODE, Identity, TlsError};
