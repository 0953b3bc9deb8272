//! Settings from the command line, the `FLOTILLA_*` environment variables and a TOML config
//! file, in that order of precedence, then the defaults.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The address `cluster local` gives its first node, and the client's default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7101";
/// Where `cluster local` keeps its certificates and data by default.
pub const DEFAULT_LOCAL_DIR: &str = ".flotilla-local";
/// A config file's size limit.
const CONFIG_BYTES_MAX: u64 = 1024 * 1024;

/// A config file (`flotilla.toml`): every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// A node's name.
    pub name: Option<String>,
    /// Where a node listens.
    pub listen: Option<String>,
    /// A node's data directory.
    pub data: Option<PathBuf>,
    /// The certificates directory (nodes and clients).
    pub certs: Option<PathBuf>,
    /// Seeds a node joins.
    pub join: Option<Vec<String>>,
    /// `control` or `worker`.
    pub role: Option<String>,
    /// The voters of a replicated control state, by name.
    pub voters: Option<Vec<String>>,
    /// Flow runs a node runs at once.
    pub slots: Option<usize>,
    /// How often a node reports (`"250ms"`).
    pub heartbeat: Option<String>,
    /// A member silent this long is unreachable (`"1s"`).
    pub unreachable_after: Option<String>,
    /// A run not started this long after its time is Late (`"15s"`).
    pub late_after: Option<String>,
    /// The largest request or reply a node takes, in bytes.
    pub message_limit: Option<usize>,
    /// A voter's snapshot interval, in log entries.
    pub snapshot_every: Option<u64>,
    /// Where large results go (`file:///PATH`, `s3://BUCKET/PREFIX?block=s3/NAME`).
    pub result_store: Option<String>,
    /// How long a worker tries its seeds (`"60s"`).
    pub join_timeout: Option<String>,
    /// Runs of each deployment the scheduler keeps created ahead.
    pub schedule_ahead_runs: Option<usize>,
    /// How far ahead the scheduler creates runs (`"1h"`).
    pub schedule_ahead: Option<String>,
    /// The work queues a node's worker serves (all when absent).
    pub queues: Option<Vec<String>>,
    /// How long events are kept (`"7d"`).
    pub retention_events: Option<String>,
    /// How long log lines are kept (`"7d"`).
    pub retention_logs: Option<String>,
    /// How long terminal runs are kept (`"30d"`).
    pub retention_runs: Option<String>,
    /// How many flow and task runs a node holds in memory.
    pub memory_runs: Option<usize>,
    /// How many answers to mutating requests a node remembers.
    pub request_answers_max: Option<usize>,
    /// How long it remembers them (`"24h"`).
    pub request_answers_keep: Option<String>,
    /// Whether a node prints flow and task logs on stderr.
    pub log_to_stderr: Option<bool>,
    /// The node a client talks to.
    pub addr: Option<String>,
}

impl FileConfig {
    /// Reads the config file, if one is given.
    pub fn load(path: Option<&Path>) -> anyhow::Result<FileConfig> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        if meta.len() > CONFIG_BYTES_MAX {
            anyhow::bail!(
                "the config file {} is over {CONFIG_BYTES_MAX} bytes",
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("the config file {} is invalid: {e}", path.display()))
    }
}

/// Parses a duration such as `250ms` or `60s`.
pub fn duration(what: &str, s: &str) -> anyhow::Result<std::time::Duration> {
    humantime::parse_duration(s)
        .map_err(|e| anyhow::anyhow!("{what} {s:?} is not a duration such as \"250ms\" or \"60s\": {e}"))
}

/// How a client reaches a node.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// A node's address, host:port [default: 127.0.0.1:7101]; several, separated by commas,
    /// are tried in turn (any node of the cluster answers).
    #[arg(long, env = "FLOTILLA_ADDR", global = true)]
    pub addr: Option<String>,
    /// The certificates directory: ca.pem, admin.pem, admin.key [default: .flotilla-local/certs].
    #[arg(long, env = "FLOTILLA_CERTS", global = true)]
    pub certs: Option<PathBuf>,
    /// A TOML config file (keys `addr`, `certs`).
    #[arg(long, env = "FLOTILLA_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// The client certificate to use: NAME.pem and NAME.key in the certificates directory
    /// [default: admin].
    #[arg(long, env = "FLOTILLA_IDENTITY", global = true)]
    pub identity: Option<String>,
}

impl Conn {
    /// Connects to the node.
    pub async fn connect(&self) -> anyhow::Result<Session> {
        let file = FileConfig::load(self.config.as_deref())?;
        let addr = self
            .addr
            .clone()
            .or(file.addr)
            .unwrap_or_else(|| DEFAULT_ADDR.to_owned());
        let certs = self
            .certs
            .clone()
            .or(file.certs)
            .unwrap_or_else(|| Path::new(DEFAULT_LOCAL_DIR).join("certs"));
        let identity = self.identity.as_deref().unwrap_or("admin");
        if !certs.join(format!("{identity}.pem")).is_file() {
            anyhow::bail!(
                "no client certificate in {} (expected ca.pem, {identity}.pem and {identity}.key): pass --certs or set FLOTILLA_CERTS",
                certs.display()
            );
        }
        match flotilla::Client::connect_as(&addr, &certs, identity).await {
            Ok(client) => Ok(Session { client, addr }),
            Err(e) => Err(client_error(&addr, e)),
        }
    }
}

/// A client connected to a node.
#[derive(Debug, Clone)]
pub struct Session {
    /// The client.
    pub client: flotilla::Client,
    /// The node's address.
    pub addr: String,
}

impl Session {
    /// One clear line for an error of this session.
    pub fn fail(&self, e: flotilla::Error) -> anyhow::Error {
        client_error(&self.addr, e)
    }
}

/// An error with a stable machine-readable code, printed by `--json` as
/// `{"error": {"code": …, "message": …}}`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CodedError {
    /// `not_found`, `conflict`, `invalid`, `payload_too_large`, `forbidden`, `unavailable`…
    pub code: &'static str,
    /// One line for a person.
    pub message: String,
}

/// The code of an error: its own when it carries one, else `invalid` (the CLI's own checks of
/// its input).
pub fn error_code(e: &anyhow::Error) -> &'static str {
    e.downcast_ref::<CodedError>().map_or("invalid", |c| c.code)
}

/// One clear line for a client error, with its code.
pub fn client_error(addr: &str, e: flotilla::Error) -> anyhow::Error {
    let code = e.code();
    let message = match e {
        flotilla::Error::Unreachable(m)
            if m.contains("handshake") || m.contains("certificate") || m.contains("Certificate") =>
        {
            format!("certificate rejected talking to {addr}: {m}")
        }
        flotilla::Error::Unreachable(m) => format!("cannot reach node {addr}: {m}"),
        flotilla::Error::NotFound(id) => format!("no such run: {id}"),
        other => other.to_string(),
    };
    anyhow::Error::new(CodedError { code, message })
}
