//! TLS for every connection: rustls with the `ring` provider chosen explicitly (two providers
//! are compiled into the binary, so rustls cannot pick one by itself), TLS 1.3, and mutual
//! authentication against the cluster CA — a peer whose certificate the CA did not sign is
//! refused at the handshake, even if it trusts the CA itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// ALPN of node-to-node connections (ractor_cluster sessions).
pub const ALPN_NODE: &[u8] = b"flotilla-node/1";
/// ALPN of client connections (the request/response protocol).
pub const ALPN_CLIENT: &[u8] = b"flotilla-client/1";
/// ALPN of Raft connections between voters (replication of the control state).
pub const ALPN_RAFT: &[u8] = b"flotilla-raft/1";

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The configuration does not hold together.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A certificate chain and its key, trusted against a CA.
#[derive(Debug)]
pub struct Identity {
    /// The CA that signs every member's certificate.
    pub ca: CertificateDer<'static>,
    /// This member's certificate.
    pub cert: CertificateDer<'static>,
    /// Its key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

impl Identity {
    /// Loads `ca.pem` and `<name>.pem`/`<name>.key` from a certificates directory.
    pub fn load(dir: &Path, name: &str) -> Result<Self, TlsError> {
        let ca_path = dir.join("ca.pem");
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        let ca = CertificateDer::from_pem_file(&ca_path).map_err(|e| file_err(&ca_path, e))?;
        let cert = CertificateDer::from_pem_file(&cert_path).map_err(|e| file_err(&cert_path, e))?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_err(&key_path, e))?;
        Ok(Identity { ca, cert, key })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| TlsError::Config(format!("the CA certificate: {e}")))?;
        Ok(Arc::new(roots))
    }
}

/// The crypto provider used everywhere.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: requires a client certificate signed by the cluster CA; speaks every ALPN.
pub fn server_config(id: &Identity) -> Result<ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(id.roots()?, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![ALPN_NODE.to_vec(), ALPN_CLIENT.to_vec(), ALPN_RAFT.to_vec()];
    Ok(cfg)
}

/// The client side, presenting `id`'s certificate, for connections of kind `alpn`.
pub fn client_config(id: &Identity, alpn: &[u8]) -> Result<ClientConfig, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}
