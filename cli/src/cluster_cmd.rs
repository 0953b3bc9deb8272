//! `flotilla cluster …`: certificates, membership, and a local cluster in one command.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use flotilla::ClusterStatus;
use flotilla_cluster::certs;

use crate::config::{Conn, DEFAULT_LOCAL_DIR};

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Create a cluster's certificates: a CA, one certificate per node, an admin client
    /// certificate and the cookie. Refuses to overwrite an existing directory's files.
    Init {
        /// Where to write them.
        #[arg(long)]
        dir: PathBuf,
        /// The nodes' names, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// More names or IPs the node certificates are valid for (real hosts), comma separated.
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
    },
    /// Issue a certificate for one more node.
    AddNode {
        /// The node's name.
        name: String,
        /// The cluster's certificates directory.
        #[arg(long)]
        dir: PathBuf,
        /// More names or IPs its certificate is valid for, comma separated.
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
    },
    /// Write the key that seals blocks' secrets (secrets.key, mode 0600) into a certificates
    /// directory made before `cluster init` wrote one; refuses to overwrite one. Copy it to
    /// every node that holds the control state.
    SecretsKey {
        /// The cluster's certificates directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a client certificate (NAME.pem, NAME.key) from the cluster's CA; use it with
    /// `--identity NAME`.
    AddClient {
        /// The client's name.
        name: String,
        /// The cluster's certificates directory.
        #[arg(long)]
        dir: PathBuf,
        /// Its requests may only read: any other is refused with `forbidden`.
        #[arg(long)]
        read_only: bool,
    },
    /// Every member: address, role, reachable or not, slots, flows, last heartbeat.
    Status {
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Forget a member that is unreachable.
    RemoveNode {
        /// The node's name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Make a node a voter of the replicated control state (it catches up first; joint
    /// consensus). A voter whose data directory was wiped is added again this way, once removed.
    AddVoter {
        /// The node's name (started with --voters and --join).
        name: String,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Make a voter hold no replica any more (it keeps running work).
    RemoveVoter {
        /// The voter's name.
        name: String,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Hand the lead of the control state to a voter.
    TransferLeader {
        /// The voter's name.
        name: String,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Start a cluster of N nodes on 127.0.0.1 as child processes (certificates generated if
    /// needed); Ctrl-C stops them all.
    Local {
        /// How many nodes (n1 holds the control state).
        #[arg(long, default_value_t = 3)]
        nodes: u16,
        /// Where certificates, data and node logs go.
        #[arg(long, default_value = DEFAULT_LOCAL_DIR)]
        dir: PathBuf,
        /// The first node's UDP port; the others follow.
        #[arg(long, default_value_t = 7101)]
        port: u16,
    },
}

pub async fn run(cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Init { dir, nodes, san } => {
            certs::init(&dir, &nodes, &san)?;
            println!(
                "wrote the certificates of {} to {}",
                nodes.join(", "),
                dir.display()
            );
            Ok(())
        }
        ClusterCmd::AddNode { name, dir, san } => {
            certs::add_node(&dir, &name, &san)?;
            println!("wrote {name}.pem and {name}.key to {}", dir.display());
            Ok(())
        }
        ClusterCmd::SecretsKey { dir } => {
            let path = dir.join(flotilla_cluster::secrets::KEY_FILE);
            anyhow::ensure!(
                !path.exists(),
                "{} exists already; refusing to overwrite it",
                path.display()
            );
            let key = flotilla_cluster::secrets::SecretsKey::load_or_create(&dir)?;
            println!("wrote {} (key {})", path.display(), key.id());
            Ok(())
        }
        ClusterCmd::AddClient { name, dir, read_only } => {
            certs::add_client(&dir, &name, read_only)?;
            let what = if read_only { " (read-only)" } else { "" };
            println!("wrote {name}.pem and {name}.key{what} to {}", dir.display());
            Ok(())
        }
        ClusterCmd::Status { json, conn } => {
            let s = conn.connect().await?;
            let status = s.client.cluster_status().await.map_err(|e| s.fail(e))?;
            if json {
                println!("{}", status_json(&status));
            } else {
                print_status(&status);
            }
            Ok(())
        }
        ClusterCmd::RemoveNode { name, conn } => {
            let s = conn.connect().await?;
            s.client.remove_node(&name).await.map_err(|e| s.fail(e))?;
            println!("removed {name}");
            Ok(())
        }
        ClusterCmd::AddVoter { name, json, conn } => {
            change_voters(
                conn,
                flotilla::VoterChange::Add(name.clone()),
                json,
                &format!("{name} is a voter"),
            )
            .await
        }
        ClusterCmd::RemoveVoter { name, json, conn } => {
            change_voters(
                conn,
                flotilla::VoterChange::Remove(name.clone()),
                json,
                &format!("{name} is no longer a voter"),
            )
            .await
        }
        ClusterCmd::TransferLeader { name, json, conn } => {
            change_voters(
                conn,
                flotilla::VoterChange::TransferLeader(name.clone()),
                json,
                &format!("{name} leads"),
            )
            .await
        }
        ClusterCmd::Local { nodes, dir, port } => local(nodes, &dir, port).await,
    }
}

/// Asks the leader for a change of the voters; prints what it says after.
async fn change_voters(
    conn: Conn,
    change: flotilla::VoterChange,
    json: bool,
    done: &str,
) -> anyhow::Result<()> {
    let s = conn.connect().await?;
    let to = match &change {
        flotilla::VoterChange::TransferLeader(name) => Some(name.clone()),
        _ => None,
    };
    let mut r = s.client.change_voters(change).await.map_err(|e| s.fail(e))?;
    if let Some(name) = to {
        // The lead moves once the new leader has the log: watch for it (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(st) = s.client.cluster_status().await
                && st.replication.as_ref().and_then(|r| r.leader.as_deref()) == Some(name.as_str())
            {
                r = st.replication;
                break;
            }
            if Instant::now() >= deadline {
                return Err(s.fail(flotilla::Error::Unavailable(format!(
                    "{name} did not take the lead within 10 s"
                ))));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if json {
        let out = serde_json::json!({
            "leader": r.as_ref().and_then(|r| r.leader.clone()),
            "term": r.as_ref().map_or(0, |r| r.term),
            "voters": r.as_ref().map(|r| r.members.iter().filter(|m| m.voter).map(|m| m.name.clone()).collect::<Vec<_>>()).unwrap_or_default(),
        });
        println!("{out}");
    } else {
        println!("{done}");
    }
    Ok(())
}

/// The status as the JSON the CLI prints.
pub fn status_json(status: &ClusterStatus) -> serde_json::Value {
    let r = status.replication.as_ref();
    let out = crate::output::StatusOut {
        leader: match r {
            Some(r) => r.leader.as_deref(),
            None => status
                .nodes
                .iter()
                .find(|m| m.role == "control")
                .map(|m| m.name.as_str()),
        },
        term: r.map_or(0, |r| r.term),
        snapshot: r.and_then(|r| r.snapshot),
        log_purged: r.and_then(|r| r.purged),
        nodes: status
            .nodes
            .iter()
            .map(|m| crate::output::MemberOut::with(m, r))
            .collect(),
    };
    serde_json::to_value(out).unwrap_or_default()
}

fn print_status(status: &ClusterStatus) {
    let mut out = std::io::stdout().lock();
    if let Some(r) = &status.replication {
        let _ = writeln!(
            out,
            "leader {} (term {}), log at {}, applied {}, snapshot {}, purged through {}",
            r.leader.as_deref().unwrap_or("none"),
            r.term,
            r.last_index.map_or_else(|| "-".to_owned(), |i| i.to_string()),
            r.applied.map_or_else(|| "-".to_owned(), |i| i.to_string()),
            r.snapshot.map_or_else(|| "-".to_owned(), |i| i.to_string()),
            r.purged.map_or_else(|| "-".to_owned(), |i| i.to_string()),
        );
    }
    let _ = writeln!(
        out,
        "{:<12} {:<22} {:<8} {:<11} {:>9}  {:<24} LAST HEARTBEAT",
        "NAME", "ADDRESS", "ROLE", "REACHABLE", "SLOTS", "FLOWS"
    );
    for m in &status.nodes {
        let ago = m.last_heartbeat.map_or_else(
            || "never".to_owned(),
            |t| {
                let ms = (chrono::Utc::now() - t.to_datetime()).num_milliseconds().max(0);
                format!("{t} ({:.1} s ago)", ms as f64 / 1000.0)
            },
        );
        let _ = writeln!(
            out,
            "{:<12} {:<22} {:<8} {:<11} {:>9}  {:<24} {ago}",
            m.name.as_str(),
            m.addr,
            m.role,
            if m.reachable { "yes" } else { "NO" },
            format!("{}/{}", m.slots_used, m.slots_total),
            m.flows.join(",")
        );
    }
}

/// A node started as a child process.
struct Child {
    name: String,
    process: tokio::process::Child,
    log: PathBuf,
}

/// Starts `n` nodes as child processes of this binary: n1 the control node on `port`, the
/// others workers joining it.
async fn spawn_nodes(
    n: u16,
    dir: &Path,
    port: u16,
    extra: &[&str],
    control_extra: &[&str],
    voters: u16,
) -> anyhow::Result<Vec<Child>> {
    anyhow::ensure!(n >= 1, "--nodes must be at least 1");
    anyhow::ensure!(voters <= n, "{voters} voters of {n} nodes");
    anyhow::ensure!(
        u32::from(port) + u32::from(n) <= 65_536,
        "ports {port}+{n} are out of range"
    );
    let certs_dir = dir.join("certs");
    let names: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
    if !certs_dir.join("ca.pem").exists() {
        certs::init(&certs_dir, &names, &[])?;
    } else {
        for name in &names {
            if !certs_dir.join(format!("{name}.pem")).exists() {
                certs::add_node(&certs_dir, name, &[])?;
            }
        }
    }
    let exe = std::env::current_exe().context("cannot find this program to start the nodes")?;
    let mut children = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let listen = format!("127.0.0.1:{}", port + i as u16);
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["node", "start", "--name", name, "--listen", &listen])
            .arg("--data")
            .arg(dir.join(name))
            .arg("--certs")
            .arg(&certs_dir)
            .args(extra)
            .env_remove("FLOTILLA_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        if voters > 0 {
            // Replicated: n1..nV hold the control state; every node greets the voters.
            let names: Vec<String> = (1..=voters).map(|v| format!("n{v}")).collect();
            let seeds: Vec<String> = (0..voters)
                .filter(|v| usize::from(*v) != i)
                .map(|v| format!("127.0.0.1:{}", port + v))
                .collect();
            cmd.args(["--voters", &names.join(",")]);
            if !seeds.is_empty() {
                cmd.args(["--join", &seeds.join(",")]);
            }
            if i < usize::from(voters) {
                cmd.args(control_extra);
            }
        } else if i == 0 {
            cmd.args(["--role", "control"]).args(control_extra);
        } else {
            cmd.args(["--role", "worker", "--join", &format!("127.0.0.1:{port}")]);
        }
        let process = cmd.spawn().with_context(|| format!("cannot start node {name}"))?;
        children.push(Child {
            name: name.clone(),
            process,
            log,
        });
    }
    Ok(children)
}

/// Waits until the control node lists `n` reachable members.
async fn wait_ready(conn: &Conn, n: usize, within: Duration) -> anyhow::Result<flotilla::Client> {
    let deadline = Instant::now() + within;
    let mut last = String::from("no answer yet");
    loop {
        if let Ok(s) = conn.connect().await {
            match s.client.cluster_status().await {
                Ok(st)
                    if st.nodes.iter().filter(|m| m.reachable).count() >= n
                        && st.replication.as_ref().is_none_or(|r| r.leader.is_some()) =>
                {
                    return Ok(s.client);
                }
                Ok(st) => {
                    last = format!(
                        "{} of {n} nodes reachable",
                        st.nodes.iter().filter(|m| m.reachable).count()
                    )
                }
                Err(e) => last = e.to_string(),
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the local cluster did not come up within {within:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn terminate(children: &mut [Child]) {
    for c in children.iter_mut() {
        if let Some(pid) = c.process.id().and_then(|p| i32::try_from(p).ok()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
    }
}

async fn stop_all(children: &mut [Child]) {
    terminate(children);
    for c in children.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), c.process.wait())
            .await
            .is_err()
        {
            let _ = c.process.kill().await;
        }
    }
}

async fn local(n: u16, dir: &Path, port: u16) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot use {}", dir.display()))?;
    // Three voters from three nodes on: the loss of any one leaves the cluster going.
    let voters = if n >= 3 { 3 } else { 0 };
    let mut children = spawn_nodes(n, &dir, port, &[], &[], voters).await?;
    let conn = Conn {
        addr: Some(addrs(port, voters.max(1))),
        certs: Some(dir.join("certs")),
        config: None,
        identity: None,
    };
    let ready = tokio::select! {
        r = wait_ready(&conn, usize::from(n), Duration::from_secs(60)) => r,
        _ = crate::node_cmd::wait_for_stop() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Err(e) = ready {
        stop_all(&mut children).await;
        return Err(e.context(format!("node logs are in {}", dir.display())));
    }
    eprintln!("a local cluster of {n} nodes is up:");
    for c in &children {
        eprintln!(
            "  {}  pid {}  log {}",
            c.name,
            c.process.id().unwrap_or(0),
            c.log.display()
        );
    }
    eprintln!("point the CLI at it with:");
    eprintln!(
        "  export FLOTILLA_ADDR={} FLOTILLA_CERTS={}",
        addrs(port, voters.max(1)),
        dir.join("certs").display()
    );
    eprintln!("Ctrl-C stops every node.");
    let mut running: Vec<bool> = vec![true; children.len()];
    loop {
        let exited = async {
            loop {
                for (i, c) in children.iter_mut().enumerate() {
                    if running[i]
                        && let Ok(Some(status)) = c.process.try_wait()
                    {
                        return (i, status);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            (i, status) = exited => {
                running[i] = false;
                eprintln!("node {} exited ({status}); the others go on", children[i].name);
                if running.iter().all(|r| !r) {
                    anyhow::bail!("every node exited; their logs are in {}", dir.display());
                }
            }
            _ = crate::node_cmd::wait_for_stop() => break,
        }
    }
    eprintln!("stopping {n} nodes");
    stop_all(&mut children).await;
    Ok(())
}

/// The addresses of the first `n` local nodes from `port`, comma-separated.
fn addrs(port: u16, n: u16) -> String {
    (0..n)
        .map(|i| format!("127.0.0.1:{}", port + i))
        .collect::<Vec<_>>()
        .join(",")
}

/// A local cluster for benchmarks and tests: nodes as child processes in `dir`.
pub struct LocalCluster {
    children: Vec<Child>,
    /// Its client, connected to the control node.
    pub client: flotilla::Client,
    /// Its certificates directory.
    pub certs: PathBuf,
}

impl LocalCluster {
    /// Starts `n` nodes in `dir` on ports from `port`, each given `extra` flags, and waits
    /// until they are all reachable.
    pub async fn start(n: u16, dir: &Path, port: u16, extra: &[&str]) -> anyhow::Result<LocalCluster> {
        Self::start_with(n, dir, port, extra, &[]).await
    }

    /// As [`LocalCluster::start`], the control node given `control_extra` flags as well.
    pub async fn start_with(
        n: u16,
        dir: &Path,
        port: u16,
        extra: &[&str],
        control_extra: &[&str],
    ) -> anyhow::Result<LocalCluster> {
        Self::start_voters(n, 0, dir, port, extra, control_extra).await
    }

    /// As [`LocalCluster::start_with`], n1 to n`voters` holding the replicated control state
    /// (given `control_extra`), the client given all their addresses (none: as without).
    pub async fn start_voters(
        n: u16,
        voters: u16,
        dir: &Path,
        port: u16,
        extra: &[&str],
        control_extra: &[&str],
    ) -> anyhow::Result<LocalCluster> {
        let mut children = spawn_nodes(n, dir, port, extra, control_extra, voters).await?;
        let conn = Conn {
            addr: Some(addrs(port, voters.max(1))),
            certs: Some(dir.join("certs")),
            config: None,
            identity: None,
        };
        match wait_ready(&conn, usize::from(n), Duration::from_secs(60)).await {
            Ok(client) => Ok(LocalCluster {
                children,
                client,
                certs: dir.join("certs"),
            }),
            Err(e) => {
                stop_all(&mut children).await;
                Err(e)
            }
        }
    }

    /// Kills node `name` with SIGKILL.
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let c = self
            .children
            .iter_mut()
            .find(|c| c.name == name)
            .context("no such node")?;
        c.process.kill().await.context("cannot kill the node")?;
        Ok(())
    }

    /// Stops every node.
    pub async fn stop(mut self) {
        stop_all(&mut self.children).await;
    }
}
