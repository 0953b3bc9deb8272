//! What the tests that drive `flotilla node` processes share.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// The node processes; killed (and their logs shown when the test failed) when dropped.
pub struct Nodes {
    pub children: Vec<(String, Child)>,
    pub dir: PathBuf,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for (name, _) in &self.children {
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(200).collect();
                eprintln!("--- {name}.log (last lines) ---");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Nodes {
    /// No node yet; their logs go to `dir`.
    pub fn new(dir: &Path) -> Self {
        Nodes {
            children: Vec::new(),
            dir: dir.to_owned(),
        }
    }

    /// Starts node `name` (see [`start_node`]).
    pub fn start(&mut self, name: &str, port: u16, join: Option<u16>, extra: &[&str]) {
        let child = start_node(&self.dir, name, port, join, extra);
        self.children.push((name.to_owned(), child));
    }

    /// Replaces node `i`'s process: SIGKILLs and reaps the old one (a no-op when it already
    /// exited), and only then calls `start`, so that the new process never finds its port or
    /// its data directory still held by the old one.
    pub fn restart(&mut self, i: usize, start: impl FnOnce() -> Child) {
        let old = &mut self.children[i].1;
        let _ = old.kill();
        let _ = old.wait();
        self.children[i].1 = start();
    }
}

/// A UDP port free now for a node to listen on. Taken below Linux's ephemeral range (32768 and
/// up), where a port the system handed out could be handed out again, to another test's client
/// socket, before the node binds it (seen as "Address already in use"): a counter keeps this
/// process's ports apart and its process id spreads test processes over the range.
pub fn free_udp_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 400) * 30;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (start + n) % SPAN).expect("below 65536");
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("a free port");
    s.local_addr().expect("its address").port()
}

/// `flotilla cluster init` for `nodes` in `dir/certs`.
pub fn init_certs(dir: &Path, nodes: &str) {
    let init = Command::new(BIN)
        .args(["cluster", "init", "--nodes", nodes, "--dir"])
        .arg(dir.join("certs"))
        .output()
        .expect("cluster init runs");
    assert!(
        init.status.success(),
        "cluster init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
}

/// Starts `flotilla node start` (its log appended to `dir/NAME.log`), with `extra` flags.
pub fn start_node(dir: &Path, name: &str, port: u16, join: Option<u16>, extra: &[&str]) -> Child {
    let role: Vec<String> = match join {
        None => vec!["--role".into(), "control".into()],
        Some(p) => vec![
            "--role".into(),
            "worker".into(),
            "--join".into(),
            format!("127.0.0.1:{p}"),
        ],
    };
    let mut flags: Vec<&str> = vec!["--unreachable-after", "1s", "--heartbeat", "250ms"];
    flags.extend(extra);
    flags.extend(role.iter().map(String::as_str));
    spawn_node(dir, name, port, &flags)
}

/// Starts `flotilla node start --name NAME` on `port` with its data in `dir/NAME` and the
/// cluster's certificates in `dir/certs`, quiet runs, and `flags` (its log appended to
/// `dir/NAME.log`).
pub fn spawn_node(dir: &Path, name: &str, port: u16, flags: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .expect("a log file");
    Command::new(BIN)
        .args([
            "node",
            "start",
            "--name",
            name,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--data")
        .arg(dir.join(name))
        .arg("--certs")
        .arg(dir.join("certs"))
        .arg("--quiet-runs")
        .args(flags)
        .env_remove("FLOTILLA_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("flotilla node starts")
}

/// Polls `f` until it returns Some, at most `within`.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client of the node at `port`, once it answers, and once `n` members are reachable.
pub async fn connect(dir: &Path, port: u16, n: usize) -> Client {
    let addr = format!("127.0.0.1:{port}");
    let certs = dir.join("certs");
    let client = eventually("a client connects", Duration::from_secs(30), || async {
        Client::connect(&addr, &certs).await.ok()
    })
    .await;
    eventually("every member reachable", Duration::from_secs(30), || async {
        let s = client.cluster_status().await.ok()?;
        (s.nodes.iter().filter(|m| m.reachable).count() >= n).then_some(())
    })
    .await;
    client
}

/// Runs the CLI against the node on `port` with the certificates in `dir/certs`: its stdout, or
/// its stderr and stdout when it failed.
pub fn run_cli(dir: &Path, port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new(BIN)
        .args(args)
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .arg("--certs")
        .arg(dir.join("certs"))
        .env_remove("FLOTILLA_CONFIG")
        .output()
        .expect("the CLI runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{}{stdout}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Waits (30 s at most) for run `id` to end, and checks it Completed.
pub async fn completed(client: &flotilla::Client, id: flotilla::FlowRunId) -> flotilla::FlowRun {
    let run = tokio::time::timeout(Duration::from_secs(30), client.wait(id))
        .await
        .expect("in time")
        .expect("ends");
    assert_eq!(
        run.lifecycle.state.kind,
        flotilla::StateType::Completed,
        "{:?}",
        run.lifecycle.state
    );
    run
}
