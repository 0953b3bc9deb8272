//! A joining node is who its certificate says: the name it claims in ractor_cluster's handshake
//! must be one its certificate (verified by mutual TLS) is valid for, or its session is closed.
//! Each incoming node connection is labelled, and its certificate kept under the label until
//! the session authenticates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ractor_cluster::node::NodeServerSessionInformation;
use rustls::pki_types::{CertificateDer, ServerName};

/// The certificates of incoming node connections, by their session label.
#[derive(Clone, Debug, Default)]
pub struct PeerCerts(Arc<Mutex<HashMap<String, CertificateDer<'static>>>>);

impl PeerCerts {
    /// Keeps `conn`'s certificate under a label of its own, which its sessions carry.
    pub fn label(&self, conn: &quinn::Connection) -> String {
        let label = format!("{}/c{}", conn.remote_address(), conn.stable_id());
        let cert = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|certs| certs.first().cloned());
        if let Some(cert) = cert {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(label.clone(), cert);
        }
        label
    }

    /// Forgets a connection's certificate (it closed).
    pub fn forget(&self, label: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(label);
    }

    /// Whether the certificate of the connection labelled `label` is valid for `name` (a
    /// ractor_cluster name, `node@host`: the part before `@`).
    pub fn allows(&self, label: &str, name: &str) -> bool {
        let node = name.split('@').next().unwrap_or(name);
        let certs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(cert) = certs.get(label) else {
            return false;
        };
        let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
            return false;
        };
        ServerName::try_from(node).is_ok_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok())
    }
}

/// Closes incoming sessions whose claimed name is not their certificate's.
#[derive(Debug)]
pub struct CheckNames(pub PeerCerts);

impl ractor_cluster::NodeEventSubscription for CheckNames {
    fn node_session_opened(&self, _ses: NodeServerSessionInformation) {}

    fn node_session_disconnected(&self, _ses: NodeServerSessionInformation) {}

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        if !ses.is_server {
            return;
        }
        let Some(name) = ses.peer_name.as_ref().map(|n| n.name.clone()) else {
            return;
        };
        if !self.0.allows(&ses.peer_addr, &name) {
            tracing::warn!(claimed = %name, connection = %ses.peer_addr, "refused a node whose certificate is not for the name it claims");
            ses.actor
                .stop(Some(format!("the certificate is not valid for {name}")));
        }
    }
}
