//! `flotilla node start`: runs a cluster node until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use flotilla_actors::node::{self, NodeConfig, Role, Seed};
use flotilla_runtime::NodeId;

use crate::config::{FileConfig, duration};

/// Node commands.
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Start a node: join the cluster, run flow runs placed on it, until Ctrl-C or SIGTERM.
    Start(StartArgs),
}

/// `node start`: every flag also from `FLOTILLA_*` and the config file.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The node's name (its certificate's).
    #[arg(long, env = "FLOTILLA_NAME")]
    name: Option<String>,
    /// Where it listens (QUIC over UDP), host:port.
    #[arg(long, env = "FLOTILLA_LISTEN")]
    listen: Option<String>,
    /// Its data directory.
    #[arg(long, env = "FLOTILLA_DATA")]
    data: Option<PathBuf>,
    /// The cluster's certificates directory (from `cluster init`).
    #[arg(long, env = "FLOTILLA_CERTS")]
    certs: Option<PathBuf>,
    /// Seeds to join (the control node's address), comma separated.
    #[arg(long, env = "FLOTILLA_JOIN", value_delimiter = ',')]
    join: Vec<String>,
    /// `control` (holds the control state) or `worker` [default: control without --join, else worker].
    /// With --voters, the voters hold it and the role is theirs.
    #[arg(long, env = "FLOTILLA_ROLE")]
    role: Option<String>,
    /// The nodes that hold the control state, replicated (the same list on every node),
    /// comma-separated: a majority of them keeps the cluster going; the others are workers.
    #[arg(long, env = "FLOTILLA_VOTERS", value_delimiter = ',')]
    voters: Vec<String>,
    /// Flow runs it runs at once [default: 64].
    #[arg(long, env = "FLOTILLA_SLOTS")]
    slots: Option<usize>,
    /// How often it reports to the control node [default: 250ms].
    #[arg(long, env = "FLOTILLA_HEARTBEAT")]
    heartbeat: Option<String>,
    /// A member silent this long is marked unreachable [default: 1s].
    #[arg(long, env = "FLOTILLA_UNREACHABLE_AFTER")]
    unreachable_after: Option<String>,
    /// A run not started this long after its scheduled time is marked Late [default: 15s].
    #[arg(long, env = "FLOTILLA_LATE_AFTER")]
    late_after: Option<String>,
    /// The largest request or reply, in bytes; larger ones are refused with `payload_too_large`
    /// (results travel apart, up to 16 MiB) [default: 1048576].
    #[arg(long, env = "FLOTILLA_MESSAGE_LIMIT", value_name = "BYTES")]
    message_limit: Option<usize>,
    /// A voter takes a snapshot (a durable checkpoint of its store, behind which its Raft
    /// log is purged) after this many log entries, and keeps half as many behind it
    /// [default: 100000].
    #[arg(long, env = "FLOTILLA_SNAPSHOT_EVERY", value_name = "ENTRIES")]
    snapshot_every: Option<u64>,
    /// Where large results go, every node reading them: `file:///PATH` (a directory every node
    /// mounts) or `s3://BUCKET/PREFIX?block=s3/NAME` (an S3-compatible store, credentials from
    /// the `s3` block; `&endpoint=URL&region=R` over the block's; without a block, from the
    /// AWS_* environment) [default: the control node's result store].
    #[arg(long, env = "FLOTILLA_RESULT_STORE", value_name = "URL")]
    result_store: Option<String>,
    /// How long a worker tries its seeds before giving up [default: 60s].
    #[arg(long, env = "FLOTILLA_JOIN_TIMEOUT")]
    join_timeout: Option<String>,
    /// The scheduler keeps at least this many runs of each deployment created ahead [default: 3].
    #[arg(long, env = "FLOTILLA_SCHEDULE_AHEAD_RUNS")]
    schedule_ahead_runs: Option<usize>,
    /// ...and at least this far ahead [default: 1h] (never more than 100 runs).
    #[arg(long, env = "FLOTILLA_SCHEDULE_AHEAD")]
    schedule_ahead: Option<String>,
    /// The work queues its worker serves, comma-separated [default: all].
    #[arg(long, env = "FLOTILLA_QUEUES", value_delimiter = ',')]
    queues: Option<Vec<String>>,
    /// Events older than this are forgotten, but the state changes of runs still kept (their
    /// histories) [default: 7d].
    #[arg(long, env = "FLOTILLA_RETENTION_EVENTS")]
    retention_events: Option<String>,
    /// Log lines older than this are forgotten [default: 7d].
    #[arg(long, env = "FLOTILLA_RETENTION_LOGS")]
    retention_logs: Option<String>,
    /// Flow runs that ended longer ago than this are forgotten, with their task runs, histories
    /// and logs [default: 30d].
    #[arg(long, env = "FLOTILLA_RETENTION_RUNS")]
    retention_runs: Option<String>,
    /// Hold at most about this many flow and task runs in memory: runs that have not ended
    /// always are; those that ended longest ago beyond it are read from disk [default: 100000].
    #[arg(long, env = "FLOTILLA_MEMORY_RUNS")]
    memory_runs: Option<usize>,
    /// Remember the answers to at most this many mutating requests, so that a request sent
    /// again gets its first answer [default: 100000].
    #[arg(long, env = "FLOTILLA_REQUEST_ANSWERS_MAX")]
    request_answers_max: Option<usize>,
    /// ...each for this long [default: 24h].
    #[arg(long, env = "FLOTILLA_REQUEST_ANSWERS_KEEP")]
    request_answers_keep: Option<String>,
    /// Do not print flow and task log lines on stderr (they are recorded either way).
    #[arg(long)]
    quiet_runs: bool,
    /// A TOML config file with any of the keys above.
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
}

fn parse_addr(what: &str, s: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("{what} {s:?} is not an address such as 127.0.0.1:7101: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{what} {s:?} resolves to no address"))
}

impl StartArgs {
    fn into_config(self) -> anyhow::Result<NodeConfig> {
        let file = FileConfig::load(self.config.as_deref())?;
        let name = self
            .name
            .or(file.name)
            .context("a node needs a name: --name, FLOTILLA_NAME or `name` in the config")?;
        let name: NodeId = name.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        let listen = self
            .listen
            .or(file.listen)
            .context("a node needs an address: --listen host:port")?;
        let listen = parse_addr("--listen", &listen)?;
        let data = self
            .data
            .or(file.data)
            .context("a node needs a data directory: --data DIR")?;
        let certs = self
            .certs
            .or(file.certs)
            .context("a node needs the cluster's certificates: --certs DIR")?;
        let join_raw = if self.join.is_empty() {
            file.join.unwrap_or_default()
        } else {
            self.join
        };
        let join = join_raw
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                let s = s.trim();
                let host = s
                    .rsplit_once(':')
                    .map_or(s, |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                Ok(Seed {
                    addr: parse_addr("--join", s)?,
                    host: host.to_owned(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut voters: Vec<String> = if self.voters.is_empty() {
            file.voters.unwrap_or_default()
        } else {
            self.voters
        };
        voters = voters.into_iter().map(|v| v.trim().to_owned()).collect();
        for v in &voters {
            anyhow::ensure!(
                !v.is_empty()
                    && v.len() <= 64
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
                "--voters {v:?}: node names are 1 to 64 letters, digits, '-' or '.'"
            );
        }
        {
            let mut sorted = voters.clone();
            sorted.sort();
            sorted.dedup();
            anyhow::ensure!(sorted.len() == voters.len(), "--voters names a node twice");
            anyhow::ensure!(
                voters.len() <= 7,
                "--voters names {} nodes: at most 7",
                voters.len()
            );
        }
        let is_voter = voters.iter().any(|v| *v == name.as_str());
        let role = match self.role.or(file.role).as_deref() {
            Some("control") if !voters.is_empty() && !is_voter => anyhow::bail!(
                "--role control: with --voters, the voters hold the control state, and {name} is not one of them"
            ),
            Some("control") => Role::Control,
            Some("worker") => Role::Worker,
            None if !voters.is_empty() => {
                if is_voter {
                    Role::Control
                } else {
                    Role::Worker
                }
            }
            None if join.is_empty() => Role::Control,
            None => Role::Worker,
            Some(other) => anyhow::bail!("--role {other:?}: expected control or worker"),
        };
        if join.is_empty() && (role == Role::Worker || voters.len() > 1) {
            anyhow::bail!("a node of a cluster needs another node's address: --join host:port");
        }
        let mut config = NodeConfig::new(name, listen, data, certs);
        config.join = join;
        config.role = role;
        config.voters = voters;
        if let Some(n) = self.slots.or(file.slots) {
            anyhow::ensure!(n >= 1, "--slots must be at least 1");
            config.slots = n;
        }
        if let Some(s) = self.heartbeat.or(file.heartbeat) {
            config.heartbeat_every = duration("--heartbeat", &s)?;
        }
        if let Some(s) = self.late_after.or(file.late_after) {
            config.late_after = duration("--late-after", &s)?;
        }
        if let Some(n) = self.message_limit.or(file.message_limit) {
            anyhow::ensure!(
                (4096..=16 * 1024 * 1024).contains(&n),
                "--message-limit {n}: between 4096 and 16777216 bytes"
            );
            config.message_bytes_max = n;
        }
        if let Some(url) = self.result_store.or(file.result_store) {
            config.result_store = Some(url.parse().map_err(|e: String| anyhow::anyhow!(e))?);
        }
        if let Some(n) = self.snapshot_every.or(file.snapshot_every) {
            anyhow::ensure!(
                (16..=100_000_000).contains(&n),
                "--snapshot-every {n}: between 16 and 100000000 log entries"
            );
            config.snapshots = flotilla_actors::replication::voter::Snapshots {
                every: n,
                keep: n / 2,
            };
        }
        if let Some(s) = self.unreachable_after.or(file.unreachable_after) {
            config.unreachable_after = duration("--unreachable-after", &s)?;
        }
        anyhow::ensure!(
            config.unreachable_after > config.heartbeat_every,
            "--unreachable-after ({:?}) must be longer than --heartbeat ({:?})",
            config.unreachable_after,
            config.heartbeat_every
        );
        if let Some(s) = self.join_timeout.or(file.join_timeout) {
            config.join_timeout = duration("--join-timeout", &s)?;
        }
        if let Some(n) = self.schedule_ahead_runs.or(file.schedule_ahead_runs) {
            anyhow::ensure!(
                (1..=100).contains(&n),
                "--schedule-ahead-runs must be between 1 and 100"
            );
            config.schedule.ahead_runs = n;
        }
        if let Some(s) = self.schedule_ahead.or(file.schedule_ahead) {
            config.schedule.ahead_time = duration("--schedule-ahead", &s)?;
        }
        if let Some(q) = self.queues.or(file.queues) {
            anyhow::ensure!(
                q.iter().all(|n| !n.trim().is_empty() && n.len() <= 128),
                "--queues names 1 to 128 bytes long each"
            );
            config.queues = q.into_iter().map(|n| n.trim().to_owned()).collect();
        }
        for (flag, value, field) in [
            (
                "--retention-events",
                self.retention_events.or(file.retention_events),
                &mut config.retention.events,
            ),
            (
                "--retention-logs",
                self.retention_logs.or(file.retention_logs),
                &mut config.retention.logs,
            ),
            (
                "--retention-runs",
                self.retention_runs.or(file.retention_runs),
                &mut config.retention.runs,
            ),
        ] {
            if let Some(s) = value {
                let d = duration(flag, &s)?;
                anyhow::ensure!(
                    d >= std::time::Duration::from_secs(1),
                    "{flag} {s:?}: at least 1s"
                );
                *field = d;
            }
        }
        if let Some(n) = self.memory_runs.or(file.memory_runs) {
            anyhow::ensure!(n <= 100_000_000, "--memory-runs {n}: at most 100000000");
            config.memory_runs = n;
        }
        if let Some(n) = self.request_answers_max.or(file.request_answers_max) {
            anyhow::ensure!(
                (1..=10_000_000).contains(&n),
                "--request-answers-max {n}: from 1 to 10000000"
            );
            config.answers.max = n;
        }
        if let Some(s) = self.request_answers_keep.or(file.request_answers_keep) {
            let d = duration("--request-answers-keep", &s)?;
            anyhow::ensure!(
                d >= std::time::Duration::from_secs(1),
                "--request-answers-keep {s:?}: at least 1s"
            );
            config.answers.keep = d;
        }
        config.log_to_stderr = !self.quiet_runs && file.log_to_stderr.unwrap_or(true);
        Ok(config)
    }
}

pub async fn run(cmd: NodeCmd) -> anyhow::Result<()> {
    let NodeCmd::Start(args) = cmd;
    let config = args.into_config()?;
    let (name, role) = (config.name.clone(), config.role);
    let role = if config.voters.is_empty() {
        role.as_str()
    } else if config.voters.iter().any(|v| *v == name.as_str()) {
        "voter"
    } else {
        "worker"
    };
    let node = node::start(config, flotilla::builtin_flows()).await?;
    let addr = node
        .endpoint
        .local_addr()
        .map_or_else(|| "?".to_owned(), |a| a.to_string());
    eprintln!("node {name} ({role}) listening on {addr}; Ctrl-C stops it");
    wait_for_stop().await;
    eprintln!("node {name} stopping");
    node.stop().await;
    Ok(())
}

/// Ctrl-C or SIGTERM.
pub async fn wait_for_stop() {
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
