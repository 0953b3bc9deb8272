//! A QUIC bidirectional stream as a ractor_cluster transport: node sessions ride on QUIC, with
//! its TLS, instead of ractor_cluster's own TCP.

use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream};

/// One bidirectional QUIC stream carrying a ractor_cluster session.
#[derive(Debug)]
pub struct QuicBidi {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    peer: String,
    local: String,
    ended: tokio::sync::oneshot::Sender<()>,
}

/// Resolves when the session on a [`QuicBidi`] has ended (ractor_cluster dropped its reading
/// half): the connection under it is then to be closed, so the dialling side dials again.
pub type SessionEnded = tokio::sync::oneshot::Receiver<()>;

impl QuicBidi {
    /// A stream between `local` and `peer` (an address, or a verified name), and what tells
    /// when its session ends.
    pub fn new(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        peer: String,
        local: String,
    ) -> (Self, SessionEnded) {
        let (ended, rx) = tokio::sync::oneshot::channel();
        (
            QuicBidi {
                send,
                recv,
                peer,
                local,
                ended,
            },
            rx,
        )
    }
}

/// The reading half, which says when it is dropped.
struct Guarded {
    recv: quinn::RecvStream,
    _ended: tokio::sync::oneshot::Sender<()>,
}

impl tokio::io::AsyncRead for Guarded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl ClusterBidiStream for QuicBidi {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let recv = Guarded {
            recv: self.recv,
            _ended: self.ended,
        };
        (Box::new(recv), Box::new(self.send))
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.peer.clone())
    }

    fn local_label(&self) -> Option<String> {
        Some(self.local.clone())
    }
}
