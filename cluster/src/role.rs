//! What a certificate may do. Every certificate the cluster issues names its role in a subject
//! alternative name under the reserved `.invalid` domain: a node's speaks the node protocol (and,
//! to ship results, that one request of the client protocol), a client's only the client
//! protocol, a read-only client's only its reads. A certificate issued before roles existed
//! carries none and keeps working as it did.

use rustls::pki_types::{CertificateDer, ServerName};

/// The name that marks a node's certificate.
pub const NODE_MARK: &str = "role-node.flotilla.invalid";
/// The name that marks a client's certificate.
pub const CLIENT_MARK: &str = "role-client.flotilla.invalid";
/// The name that marks a read-only client's certificate.
pub const READ_ONLY_MARK: &str = "role-read-only.flotilla.invalid";

/// What a peer's certificate allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRole {
    /// A cluster node.
    Node,
    /// A client: every request.
    Client,
    /// A client whose requests may only read.
    ReadOnlyClient,
    /// Issued before roles: everything, as before.
    Unmarked,
}

impl CertRole {
    /// The role a certificate carries (read from its subject alternative names).
    pub fn of(cert: &CertificateDer<'_>) -> CertRole {
        let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
            return CertRole::Unmarked;
        };
        let has = |mark: &'static str| {
            ServerName::try_from(mark).is_ok_and(|name| ee.verify_is_valid_for_subject_name(&name).is_ok())
        };
        if has(READ_ONLY_MARK) {
            CertRole::ReadOnlyClient
        } else if has(CLIENT_MARK) {
            CertRole::Client
        } else if has(NODE_MARK) {
            CertRole::Node
        } else {
            CertRole::Unmarked
        }
    }

    /// The role of a QUIC connection's peer (its first certificate).
    pub fn of_peer(conn: &quinn::Connection) -> CertRole {
        conn.peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|certs| certs.first().map(CertRole::of))
            .unwrap_or(CertRole::Unmarked)
    }

    /// Whether it may open node sessions.
    pub fn may_join(self) -> bool {
        matches!(self, CertRole::Node | CertRole::Unmarked)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rustls::pki_types::pem::PemObject;

    use super::*;

    #[test]
    fn issued_certificates_carry_their_role() {
        let dir = tempfile::tempdir().unwrap();
        crate::certs::init(dir.path(), &["n1".into()], &[]).unwrap();
        crate::certs::add_client(dir.path(), "viewer", true).unwrap();
        crate::certs::add_client(dir.path(), "ops", false).unwrap();
        let role = |name: &str| {
            let cert = CertificateDer::from_pem_file(dir.path().join(format!("{name}.pem"))).unwrap();
            CertRole::of(&cert)
        };
        assert_eq!(role("n1"), CertRole::Node);
        assert_eq!(role("admin"), CertRole::Client);
        assert_eq!(role("ops"), CertRole::Client);
        assert_eq!(role("viewer"), CertRole::ReadOnlyClient);
        assert!(role("n1").may_join() && !role("admin").may_join() && !role("viewer").may_join());
        assert_eq!(
            CertRole::of(&CertificateDer::from(vec![1, 2, 3])),
            CertRole::Unmarked
        );
    }

    #[test]
    fn a_read_only_certificate_reads_and_a_node_certificate_only_ships_results() {
        use crate::wire::{QueueChange, Request};
        let read = Request::Deployments;
        let write = Request::WorkQueue {
            name: "q".into(),
            change: QueueChange::Delete,
        };
        let inspect = Request::WorkQueue {
            name: "q".into(),
            change: QueueChange::Inspect,
        };
        let ship = Request::PutResult {
            key: "k".into(),
            bytes: vec![],
        };
        assert!(read.forbidden_for(CertRole::ReadOnlyClient).is_none());
        assert!(inspect.forbidden_for(CertRole::ReadOnlyClient).is_none());
        let e = write.forbidden_for(CertRole::ReadOnlyClient).unwrap();
        assert_eq!(e.kind.code(), "forbidden");
        assert!(write.forbidden_for(CertRole::Client).is_none());
        assert!(write.forbidden_for(CertRole::Unmarked).is_none());
        assert!(read.forbidden_for(CertRole::Node).is_some());
        assert!(ship.forbidden_for(CertRole::Node).is_none());
        let beat = Request::Heartbeat(Box::new(crate::wire::MemberStatus {
            name: "n2".parse().unwrap(),
            addr: String::new(),
            role: "worker".into(),
            reachable: true,
            slots_used: 0,
            slots_total: 1,
            flows: vec![],
            queues: vec![],
            last_heartbeat: None,
            incarnation: 1,
            holds: vec![],
            flow_options: Default::default(),
        }));
        assert!(beat.forbidden_for(CertRole::Node).is_none());
        assert!(
            beat.forbidden_for(CertRole::Client).is_some(),
            "a client reported a heartbeat"
        );
        // Blocks' secrets go to nodes over the cluster's sessions, never over the client
        // protocol, whatever the certificate.
        let secrets = Request::ResolveBlocks {
            flow_run: flotilla_runtime::FlowRunId::from_bytes([1; 16]),
            epoch: flotilla_runtime::Epoch::FIRST,
            refs: vec!["secret/a".into()],
        };
        for role in [
            CertRole::Client,
            CertRole::ReadOnlyClient,
            CertRole::Unmarked,
            CertRole::Node,
        ] {
            assert!(
                secrets.forbidden_for(role).is_some(),
                "{role:?} may ask for secrets"
            );
        }
    }
}
