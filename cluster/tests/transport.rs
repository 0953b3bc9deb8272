//! Certificates, mutual TLS and QUIC on 127.0.0.1: three nodes connect to each other; a node
//! or client with a certificate from another CA is refused, even when it trusts the cluster CA.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on what they set up

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use flotilla_cluster::frame;
use flotilla_cluster::wire::{Envelope, PROTOCOL_VERSION, Request, Response};
use flotilla_cluster::{ALPN_CLIENT, ALPN_NODE, Identity, QuicEndpoint, TransportSettings, certs};
use proptest::prelude::*;

const WAIT: Duration = Duration::from_secs(10);

fn cluster(dir: &std::path::Path, nodes: &[&str]) {
    let names: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
    certs::init(dir, &names, &[]).unwrap();
}

#[test]
fn init_writes_private_files_0600_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["n1", "n2"]);
    for f in ["ca.key", "n1.key", "n2.key", "admin.key", "cookie"] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    for f in ["ca.pem", "n1.pem", "admin.pem"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    let err = certs::init(dir.path(), &["n3".to_string()], &[]).unwrap_err();
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    certs::add_node(dir.path(), "n3", &["db.example".into()]).unwrap();
    assert!(certs::add_node(dir.path(), "n3", &[]).is_err());
    assert!(certs::add_node(dir.path(), "bad name", &[]).is_err());
    assert!(certs::cookie(dir.path()).unwrap().len() >= 32);
}

async fn serve_echo(ep: QuicEndpoint) {
    while let Some((conn, alpn)) = ep.accept().await {
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let env: Envelope = frame::read(&mut recv).await.unwrap();
                let reply = if alpn == ALPN_CLIENT {
                    Response::Done
                } else {
                    Response::Status(Default::default())
                };
                assert_eq!(env.request, Request::Status);
                frame::write(&mut send, &reply).await.unwrap();
                send.finish().unwrap();
            }
        });
    }
}

async fn ask(
    ep: &QuicEndpoint,
    addr: std::net::SocketAddr,
    name: &str,
    alpn: &[u8],
) -> Result<Response, String> {
    let conn = ep.connect(addr, name, alpn).await.map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    frame::write(
        &mut send,
        &Envelope {
            version: PROTOCOL_VERSION,
            request: Request::Status,
            request_id: None,
            stale: false,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    frame::read(&mut recv).await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_connect_over_mutual_tls_and_strangers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    cluster(dir.path(), &["n1", "n2", "n3"]);
    let other = tempfile::tempdir().unwrap();
    cluster(other.path(), &["x1"]);
    let mut eps = Vec::new();
    for n in ["n1", "n2", "n3"] {
        let ep = QuicEndpoint::bind(
            ([127, 0, 0, 1], 0).into(),
            Identity::load(dir.path(), n).unwrap(),
            TransportSettings::default(),
        )
        .unwrap();
        tokio::spawn(serve_echo(ep.clone()));
        eps.push(ep);
    }
    // Every node reaches every other, by name, on both ALPNs.
    for (i, from) in eps.iter().enumerate() {
        for (j, to) in eps.iter().enumerate() {
            if i != j {
                let addr = to.local_addr().unwrap();
                let r = tokio::time::timeout(WAIT, ask(from, addr, &format!("n{}", j + 1), ALPN_NODE))
                    .await
                    .unwrap();
                assert_eq!(r, Ok(Response::Status(Default::default())));
            }
        }
    }
    let n1 = eps[0].local_addr().unwrap();
    // The admin client, dialling by IP.
    let admin = QuicEndpoint::client(
        Identity::load(dir.path(), "admin").unwrap(),
        TransportSettings::default(),
    )
    .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, ask(&admin, n1, "127.0.0.1", ALPN_CLIENT))
            .await
            .unwrap(),
        Ok(Response::Done)
    );
    // A node of another cluster is refused.
    let stranger = QuicEndpoint::client(
        Identity::load(other.path(), "x1").unwrap(),
        TransportSettings::default(),
    )
    .unwrap();
    assert!(
        tokio::time::timeout(WAIT, ask(&stranger, n1, "n1", ALPN_NODE))
            .await
            .unwrap()
            .is_err()
    );
    // A client that trusts the cluster CA but whose certificate another CA signed is refused
    // by the server.
    let mixed = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("ca.pem"), mixed.path().join("ca.pem")).unwrap();
    std::fs::copy(other.path().join("admin.pem"), mixed.path().join("admin.pem")).unwrap();
    std::fs::copy(other.path().join("admin.key"), mixed.path().join("admin.key")).unwrap();
    let mixed_client = QuicEndpoint::client(
        Identity::load(mixed.path(), "admin").unwrap(),
        TransportSettings::default(),
    )
    .unwrap();
    let r = tokio::time::timeout(WAIT, ask(&mixed_client, n1, "n1", ALPN_CLIENT))
        .await
        .unwrap();
    assert!(r.is_err(), "a certificate from another CA was accepted: {r:?}");
    // A certificate for another name does not pass as n2.
    let r = tokio::time::timeout(WAIT, ask(&admin, n1, "n2", ALPN_CLIENT))
        .await
        .unwrap();
    assert!(r.is_err(), "n1's certificate passed as n2");
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = frame::decode_all::<Envelope>(&bytes);
        let _ = frame::decode_all::<Response>(&bytes);
    }

    #[test]
    fn damaged_frames_never_panic(at in 0usize..400, val: u8) {
        let mut buf = Vec::new();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(frame::write(&mut buf, &Envelope { version: PROTOCOL_VERSION, request: Request::Logs { run: flotilla_runtime::FlowRunId::from_bytes([1; 16]), after: None, limit: 10 }, request_id: None, stale: false })).unwrap();
        let i = at % buf.len();
        buf[i] = val;
        let _ = frame::decode_all::<Envelope>(&buf);
    }
}

/// Frames over an in-memory stream cut at every position: the reader gets a typed error (never
/// a hang, never a panic), and a whole frame before the cut is still read.
#[tokio::test]
async fn a_stream_cut_anywhere_is_an_error_not_a_hang() {
    let env = Envelope {
        version: PROTOCOL_VERSION,
        request: Request::RunFlow {
            flow: "f".into(),
            params: serde_json::json!({"a": [1, 2, 3]}),
            id: None,
            idempotency_key: Some("k".into()),
        },
        request_id: Some(flotilla_runtime::control::RequestId::from_uuid(
            *flotilla_runtime::FlowRunId::from_bytes([9; 16]).as_uuid(),
        )),
        stale: false,
    };
    let mut whole = Vec::new();
    frame::write(&mut whole, &env).await.unwrap();
    for cut in 0..whole.len() {
        let (mut a, mut b) = tokio::io::duplex(16);
        let part = whole[..cut].to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = a.write_all(&part).await;
            // `a` dropped: the cut.
        });
        let r = tokio::time::timeout(WAIT, frame::read::<Envelope, _>(&mut b))
            .await
            .expect("no hang");
        match (cut, r) {
            (0, Err(frame::FrameError::End)) => {}
            (_, Err(frame::FrameError::Io(e))) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
            (_, Err(frame::FrameError::End)) if cut < 4 => {}
            (c, other) => panic!("cut at {c}: {other:?}"),
        }
        writer.await.unwrap();
    }
    // Two frames, the second cut: the first is read whole, the second fails.
    let (mut a, mut b) = tokio::io::duplex(1024);
    let mut two = whole.clone();
    two.extend_from_slice(&whole[..whole.len() / 2]);
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = a.write_all(&two).await;
    });
    let first: Envelope = tokio::time::timeout(WAIT, frame::read(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.request, env.request);
    assert!(
        tokio::time::timeout(WAIT, frame::read::<Envelope, _>(&mut b))
            .await
            .unwrap()
            .is_err()
    );
    // A length over the cap is refused before anything is allocated.
    let (mut a, mut b) = tokio::io::duplex(64);
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = a.write_all(&u32::MAX.to_be_bytes()).await;
    });
    assert!(matches!(
        tokio::time::timeout(WAIT, frame::read::<Envelope, _>(&mut b))
            .await
            .unwrap(),
        Err(frame::FrameError::TooLarge(_))
    ));
}
