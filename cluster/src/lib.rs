//! # flotilla-cluster
//!
//! The cluster layer of Flotilla. It will hold the QUIC endpoint (quinn, rustls with the `ring`
//! provider), the cluster CA and node certificates with mutual TLS, ractor_cluster sessions
//! carried over QUIC bidirectional streams, the client request/response protocol, membership
//! with gossip, and failure detection with heartbeats.
