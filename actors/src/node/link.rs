//! A node's own QUIC connection to the control node, apart from its cluster session: results
//! ship on one, heartbeats travel on another, so a large transfer never delays a heartbeat
//! and never makes a live node look dead. The control node is the one the node last learned
//! of (its membership view).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use flotilla_cluster::wire::{ClusterStatus, Envelope, PROTOCOL_VERSION, Request, Response};
use flotilla_cluster::{ALPN_CLIENT, QuicEndpoint, frame};

use super::Role;

/// A connection to the control node, dialled when needed and again when lost.
#[derive(Debug)]
pub struct ControlLink {
    endpoint: QuicEndpoint,
    view: Arc<RwLock<ClusterStatus>>,
    /// Replicated: the leader is the control node.
    leader: Option<crate::replication::book::Peers>,
    conn: tokio::sync::Mutex<Option<(SocketAddr, quinn::Connection)>>,
}

impl ControlLink {
    /// A link through `endpoint` to the control node of `view`.
    pub fn new(endpoint: QuicEndpoint, view: Arc<RwLock<ClusterStatus>>) -> Self {
        ControlLink {
            endpoint,
            view,
            leader: None,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// A link through `endpoint` to the leader of a replicated control state, as `peers` know
    /// it.
    pub fn to_leader(endpoint: QuicEndpoint, peers: crate::replication::book::Peers) -> Self {
        ControlLink {
            leader: Some(peers),
            ..ControlLink::new(endpoint, Arc::default())
        }
    }

    /// Whether a control node is known (the node has had a membership view).
    pub fn knows_control(&self) -> bool {
        self.control().is_some()
    }

    fn control(&self) -> Option<(String, String)> {
        if let Some(peers) = &self.leader {
            let name = peers.leader()?;
            return peers.book.get(&name).map(|addr| (addr, name));
        }
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        view.nodes
            .iter()
            .find(|m| m.role == Role::Control.as_str())
            .map(|m| (m.addr.clone(), m.name.to_string()))
    }

    /// One request on a stream of its own; the answer, or why there is none.
    pub async fn ask(&self, request: Request) -> Result<Response, String> {
        let (addr, name) = self.control().ok_or("no control node is known yet")?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| format!("the control node's address {addr:?}: {e}"))?;
        let mut slot = self.conn.lock().await;
        let conn = match slot.as_ref() {
            Some((a, c)) if *a == addr && c.close_reason().is_none() => c.clone(),
            _ => {
                let c = self
                    .endpoint
                    .connect(addr, &name, ALPN_CLIENT)
                    .await
                    .map_err(|e| e.to_string())?;
                *slot = Some((addr, c.clone()));
                c
            }
        };
        drop(slot);
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let envelope = Envelope {
            version: PROTOCOL_VERSION,
            request,
            request_id: None,
            stale: false,
        };
        frame::write(&mut send, &envelope)
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        frame::read::<Response, _>(&mut recv)
            .await
            .map_err(|e| e.to_string())
    }
}
