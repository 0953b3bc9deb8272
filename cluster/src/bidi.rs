//! A QUIC bidirectional stream as a ractor_cluster transport: node sessions ride on QUIC, with
//! its TLS, instead of ractor_cluster's own TCP.

use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream};

/// One bidirectional QUIC stream carrying a ractor_cluster session.
#[derive(Debug)]
pub struct QuicBidi {
    /// The sending half.
    pub send: quinn::SendStream,
    /// The receiving half.
    pub recv: quinn::RecvStream,
    /// Who is at the other end (its address, or its verified name).
    pub peer: String,
    /// Who is at this end.
    pub local: String,
}

impl ClusterBidiStream for QuicBidi {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        (Box::new(self.recv), Box::new(self.send))
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.peer.clone())
    }

    fn local_label(&self) -> Option<String> {
        Some(self.local.clone())
    }
}
