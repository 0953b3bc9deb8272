//! Large results in object storage, on `flotilla node` processes: an S3-compatible server
//! (s3s-fs) in this test's own process on 127.0.0.1, nodes started with `--result-store
//! s3://BUCKET/PREFIX?block=s3/NAME`; a large result lands in the bucket and is read back after
//! every node's own copy is gone. And the same through `file:///PATH`.

use std::path::Path;
use std::process::Command;

use hyper_util::rt::{TokioExecutor, TokioIo};

mod common;
use common::*;

const BUCKET: &str = "results";

/// An S3-compatible server over `root` (its buckets its subdirectories), on 127.0.0.1.
async fn s3_server(root: &Path) -> std::net::SocketAddr {
    std::fs::create_dir_all(root.join(BUCKET)).expect("the bucket");
    let fs = s3s_fs::FileSystem::new(root).expect("an s3s-fs root");
    let mut b = s3s::service::S3ServiceBuilder::new(fs);
    b.set_auth(s3s::auth::SimpleAuth::from_single(
        "AKTEST",
        "SKTEST-not-a-real-secret",
    ));
    let service = b.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = service.clone();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Every file under `dir` whose name ends with `suffix`.
fn files(dir: &Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out
}

/// Two nodes sharing `store`; a run with a 300 KB result; every node's own copy removed; the
/// result read back (from the store) whole.
async fn large_result_outlives_every_nodes_copy(
    store: &str,
    setup: impl FnOnce(&Path, u16),
) -> (tempfile::TempDir, flotilla::FlowRunId) {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1,n2");
    let (port, port2) = (free_udp_port(), free_udp_port());
    let mut nodes = Nodes::new(dir);
    nodes.start("n1", port, None, &["--result-store", store]);
    nodes.start("n2", port2, Some(port), &["--result-store", store]);
    let client = connect(dir, port, 2).await;
    setup(dir, port);
    let mut ids = Vec::new();
    for _ in 0..4 {
        let id = client
            .run("noop", serde_json::json!({"result_bytes": 300_000}))
            .await
            .expect("a run");
        completed(&client, id).await;
        ids.push(id);
    }
    // No node keeps a copy: the result comes from the store.
    for f in files(&dir.join("n1"), ".bin")
        .into_iter()
        .chain(files(&dir.join("n2"), ".bin"))
    {
        std::fs::remove_file(&f).expect("a node's copy removed");
    }
    for id in &ids {
        let bytes: serde_bytes::ByteBuf = client.result(*id).await.expect("the result, from the store");
        assert_eq!(bytes.len(), 300_000);
        assert!(
            bytes.iter().enumerate().all(|(i, b)| usize::from(*b) == i % 251),
            "the bytes made"
        );
    }
    drop(nodes);
    (tmp, ids[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_live_in_an_s3_bucket_every_node_reads() {
    let root = tempfile::tempdir().expect("a bucket root");
    let addr = s3_server(root.path()).await;
    let endpoint = format!("http://{addr}");
    let (tmp, _) =
        large_result_outlives_every_nodes_copy(&format!("s3://{BUCKET}/runs?block=s3/lake"), |dir, port| {
            create_lake(dir, port, &endpoint)
        })
        .await;
    let stored = files(&root.path().join(BUCKET).join("runs"), ".bin");
    assert!(stored.len() >= 4, "the results are in the bucket: {stored:?}");
    // The block's secret is in no node's files.
    for f in files(tmp.path(), "") {
        let bytes = std::fs::read(&f).unwrap_or_default();
        let secret = b"SKTEST-not-a-real-secret";
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret),
            "{}",
            f.display()
        );
    }
}

/// `s3` block `lake` on the server at `endpoint`, made through the CLI.
fn create_lake(dir: &Path, port: u16, endpoint: &str) {
    run_cli(
        dir,
        port,
        &[
            "block",
            "create",
            "s3",
            "lake",
            "--field",
            &format!("endpoint={endpoint}"),
            "--field",
            &format!("bucket={BUCKET}"),
            "--field",
            "region=us-east-1",
            "--field",
            "access_key_id=AKTEST",
            "--field",
            "secret_access_key=SKTEST-not-a-real-secret",
            "--field",
            "path_style=true",
        ],
    )
    .expect("an s3 block");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_sends_its_large_results_to_the_s3_block_it_names() {
    let root = tempfile::tempdir().expect("a bucket root");
    let endpoint = format!("http://{}", s3_server(root.path()).await);
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1,n2");
    let (port, port2) = (free_udp_port(), free_udp_port());
    // No node-wide result store: only the deployment names one.
    let mut nodes = Nodes::new(dir);
    nodes.start("n1", port, None, &[]);
    nodes.start("n2", port2, Some(port), &[]);
    let client = connect(dir, port, 2).await;
    let file = dir.join("deploy.toml");
    let deploy = |storage: &str| {
        std::fs::write(
            &file,
            format!(
                "[[deployment]]\nname = \"big\"\nflow = \"noop\"\nparams = {{ result_bytes = 300000 }}\nresult_storage = \"{storage}\"\n"
            ),
        )
        .expect("a deploy file");
        run_cli(dir, port, &["deploy", "-f", file.to_str().expect("utf-8")])
    };
    // A block that does not exist, or one that is not s3, is refused naming it.
    let why = deploy("s3/lake").expect_err("no block named lake yet");
    assert!(why.contains("no s3 block named \"lake\""), "{why}");
    let why = deploy("secret/lake").expect_err("not an s3 block");
    assert!(why.contains("result_storage") && why.contains("s3/NAME"), "{why}");
    create_lake(dir, port, &endpoint);
    deploy("s3/lake").expect("deployed");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = client
            .run_deployment("big", serde_json::Value::Null)
            .await
            .expect("a run of big");
        let run = completed(&client, id).await;
        assert_eq!(run.result_storage.as_deref(), Some("s3/lake"));
        ids.push(id);
    }
    let inspect =
        run_cli(dir, port, &["flow-run", "inspect", &ids[0].to_string(), "--json"]).expect("inspect");
    assert!(inspect.contains("\"result_storage\":\"s3/lake\""), "{inspect}");
    // In the bucket, under the run's key; no node keeps a copy that is read instead.
    let stored = files(&root.path().join(BUCKET).join("flow-runs"), ".bin");
    assert_eq!(stored.len(), 3, "one object per run: {stored:?}");
    for f in files(&dir.join("n1"), ".bin")
        .into_iter()
        .chain(files(&dir.join("n2"), ".bin"))
    {
        std::fs::remove_file(&f).expect("a node's copy removed");
    }
    for id in &ids {
        let bytes: serde_bytes::ByteBuf = client.result(*id).await.expect("the result, from the bucket");
        assert_eq!(bytes.len(), 300_000);
        assert!(bytes.iter().enumerate().all(|(i, b)| usize::from(*b) == i % 251));
    }
    // A run of a flow not stored there keeps using the node's store.
    let plain = client
        .run("noop", serde_json::json!({"result_bytes": 300_000}))
        .await
        .expect("a plain run");
    completed(&client, plain).await;
    assert_eq!(
        files(&root.path().join(BUCKET).join("flow-runs"), ".bin").len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_live_in_a_shared_directory_every_node_reads() {
    let shared = tempfile::tempdir().expect("a shared directory");
    let url = format!("file://{}", shared.path().display());
    large_result_outlives_every_nodes_copy(&url, |_, _| {}).await;
    assert!(files(shared.path(), ".bin").len() >= 4);
    // A bad URL is refused at start, naming the flag.
    let out = Command::new(BIN)
        .args([
            "node",
            "start",
            "--name",
            "n1",
            "--listen",
            "127.0.0.1:0",
            "--result-store",
            "ftp://x",
        ])
        .arg("--data")
        .arg(shared.path().join("n1"))
        .arg("--certs")
        .arg(shared.path().join("certs"))
        .env_remove("FLOTILLA_CONFIG")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("--result-store") && why.contains("ftp://x"), "{why}");
}
