//! One QUIC endpoint per node (and one per client): quinn with the TLS of [`crate::tls`],
//! keep-alive and idle timeout short enough to notice a dead peer within a second or so.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::tls::{self, Identity, TlsError};

/// How fast a silent peer is given up.
#[derive(Clone, Copy, Debug)]
pub struct TransportSettings {
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            keep_alive: Duration::from_millis(250),
            idle_timeout: Duration::from_secs(1),
        }
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The endpoint could not be created.
    #[error("cannot open a QUIC endpoint on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The peer could not be reached, or the handshake failed (for example a certificate the
    /// peer does not accept).
    #[error("cannot reach {addr}: {reason}")]
    Unreachable {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

fn transport(t: &TransportSettings) -> Arc<quinn::TransportConfig> {
    let mut cfg = quinn::TransportConfig::default();
    cfg.keep_alive_interval(Some(t.keep_alive));
    cfg.max_idle_timeout(quinn::IdleTimeout::try_from(t.idle_timeout).ok());
    cfg.max_concurrent_bidi_streams(1024u32.into());
    Arc::new(cfg)
}

/// A QUIC endpoint: accepts connections (when it has a server identity) and dials peers.
#[derive(Debug, Clone)]
pub struct QuicEndpoint {
    endpoint: quinn::Endpoint,
    id: Arc<Identity>,
    settings: TransportSettings,
}

impl QuicEndpoint {
    /// A node's endpoint on `addr`: it accepts node and client connections and dials peers.
    pub fn bind(addr: SocketAddr, id: Identity, settings: TransportSettings) -> Result<Self, ConnectError> {
        let server_tls = tls::server_config(&id)?;
        let qsc = QuicServerConfig::try_from(server_tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(qsc));
        server.transport_config(transport(&settings));
        let endpoint = quinn::Endpoint::server(server, addr).map_err(|e| ConnectError::Bind {
            addr,
            reason: e.to_string(),
        })?;
        Ok(QuicEndpoint {
            endpoint,
            id: Arc::new(id),
            settings,
        })
    }

    /// A client's endpoint (dials only) on an IPv4 port of the system's choosing.
    pub fn client(id: Identity, settings: TransportSettings) -> Result<Self, ConnectError> {
        Self::client_on(([0, 0, 0, 0], 0).into(), id, settings)
    }

    /// A client's endpoint (dials only) bound to `addr` (`[::]:0` to dial IPv6 peers).
    pub fn client_on(
        addr: SocketAddr,
        id: Identity,
        settings: TransportSettings,
    ) -> Result<Self, ConnectError> {
        let endpoint = quinn::Endpoint::client(addr).map_err(|e| ConnectError::Bind {
            addr,
            reason: e.to_string(),
        })?;
        Ok(QuicEndpoint {
            endpoint,
            id: Arc::new(id),
            settings,
        })
    }

    /// The local address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Dials `addr`, expecting a certificate valid for `server_name` (a node's name when it is
    /// known, else the address's host), for connections of kind `alpn`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
        alpn: &[u8],
    ) -> Result<quinn::Connection, ConnectError> {
        let tls = tls::client_config(&self.id, alpn)?;
        let qcc = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(qcc));
        cfg.transport_config(transport(&self.settings));
        let connecting =
            self.endpoint
                .connect_with(cfg, addr, server_name)
                .map_err(|e| ConnectError::Unreachable {
                    addr,
                    reason: e.to_string(),
                })?;
        connecting.await.map_err(|e| ConnectError::Unreachable {
            addr,
            reason: e.to_string(),
        })
    }

    /// The next incoming connection that completes its handshake, with its ALPN. Refused
    /// handshakes (a certificate the CA did not sign, among others) are logged with the reason.
    pub async fn accept(&self) -> Option<(quinn::Connection, Vec<u8>)> {
        loop {
            let incoming = self.accept_incoming().await?;
            if let Some(accepted) = handshake(incoming).await {
                return Some(accepted);
            }
        }
    }

    /// The next incoming connection, before its TLS handshake: a server hands each to a task
    /// of its own ([`handshake`]) so that a slow client never stalls the others.
    pub async fn accept_incoming(&self) -> Option<quinn::Incoming> {
        self.endpoint.accept().await
    }

    /// Closes the endpoint.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// Completes an incoming connection's TLS handshake: the connection and its ALPN protocol, or
/// None (and a log line) when the handshake failed.
pub async fn handshake(incoming: quinn::Incoming) -> Option<(quinn::Connection, Vec<u8>)> {
    let remote = incoming.remote_address();
    match incoming.await {
        Ok(conn) => {
            let alpn = conn
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol)
                .unwrap_or_default();
            Some((conn, alpn))
        }
        Err(e) => {
            tracing::warn!(peer = %remote, reason = %e, "refused a connection at the TLS handshake");
            None
        }
    }
}
