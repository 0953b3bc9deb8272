//! What the CLI prints with `--json`: one serde type per shape, with the field names scripts
//! rely on. Timestamps are RFC 3339 strings, ids their canonical text.

use flotilla::{FlowRun, LogLine, State, TaskRun};
use flotilla_cluster::wire::{MemberStatus, QueueInfo};
use flotilla_runtime::{ConcurrencyLimit, Deployment};
use serde::Serialize;

/// Prints a value as one line of JSON on stdout.
pub fn print(v: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// The id of what a command made.
#[derive(Debug, Serialize)]
pub struct IdOut {
    pub id: String,
}

/// A failure, for scripts.
#[derive(Debug, Serialize)]
pub struct ErrorOut<'a> {
    pub error: ErrorBody<'a>,
}

/// Its code and message.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub code: &'a str,
    pub message: String,
}

/// A flow run, as listed.
#[derive(Debug, Serialize)]
pub struct RunOut<'a> {
    pub id: String,
    pub flow: &'a str,
    pub state: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: Option<&'a str>,
    pub node: Option<&'a str>,
    /// The deployment that made it, by name.
    pub deployment: Option<&'a str>,
    pub created: String,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    pub run_count: u32,
    /// Where its large results go (`s3/NAME`), when its deployment names a store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_storage: Option<&'a str>,
}

impl<'a> From<&'a FlowRun> for RunOut<'a> {
    fn from(r: &'a FlowRun) -> Self {
        RunOut {
            id: r.id.to_string(),
            flow: &r.flow_name,
            state: r.lifecycle.state.name.to_string(),
            kind: r.lifecycle.state.kind.to_string(),
            message: r.lifecycle.state.message.as_deref(),
            node: r.owner.as_ref().map(|n| n.as_str()),
            deployment: r.deployment_name.as_deref(),
            created: r.created.to_string(),
            start_time: r.lifecycle.start_time.map(|t| t.to_string()),
            end_time: r.lifecycle.end_time.map(|t| t.to_string()),
            run_count: r.lifecycle.run_count,
            result_storage: r.result_storage.as_deref(),
        }
    }
}

/// One state of a history.
#[derive(Debug, Serialize)]
pub struct StateOut<'a> {
    pub state: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub timestamp: String,
    pub message: Option<&'a str>,
}

impl<'a> From<&'a State> for StateOut<'a> {
    fn from(s: &'a State) -> Self {
        StateOut {
            state: s.name.to_string(),
            kind: s.kind.to_string(),
            timestamp: s.timestamp.to_string(),
            message: s.message.as_deref(),
        }
    }
}

/// A task run, as inspected.
#[derive(Debug, Serialize)]
pub struct TaskRunOut<'a> {
    pub id: String,
    pub task: &'a str,
    pub call: u32,
    pub state: String,
    pub runs: u32,
    pub message: Option<&'a str>,
}

impl<'a> From<&'a TaskRun> for TaskRunOut<'a> {
    fn from(t: &'a TaskRun) -> Self {
        TaskRunOut {
            id: t.id.to_string(),
            task: &t.key.task_key,
            call: t.key.call_index,
            state: t.lifecycle.state.name.to_string(),
            runs: t.lifecycle.run_count,
            message: t.lifecycle.state.message.as_deref(),
        }
    }
}

/// A flow run with its parameters, history and task runs.
#[derive(Debug, Serialize)]
pub struct InspectOut<'a> {
    pub run: RunOut<'a>,
    pub parameters: &'a serde_json::Value,
    pub history: Vec<StateOut<'a>>,
    pub task_runs: Vec<TaskRunOut<'a>>,
}

/// A log line.
#[derive(Debug, Serialize)]
pub struct LogLineOut<'a> {
    pub timestamp: String,
    pub level: String,
    pub task_run: Option<String>,
    pub message: &'a str,
}

impl<'a> From<&'a LogLine> for LogLineOut<'a> {
    fn from(l: &'a LogLine) -> Self {
        LogLineOut {
            timestamp: l.timestamp.to_string(),
            level: l.level.to_string(),
            task_run: l.task_run.map(|t| t.to_string()),
            message: &l.message,
        }
    }
}

/// A member of the cluster.
#[derive(Debug, Serialize)]
pub struct MemberOut<'a> {
    pub name: &'a str,
    pub addr: &'a str,
    pub role: &'a str,
    pub reachable: bool,
    pub slots_used: u32,
    pub slots_total: u32,
    pub flows: &'a [String],
    pub last_heartbeat: Option<String>,
    /// A voter of the replicated control state.
    pub voter: bool,
    /// The last log index it holds (the leader: has applied), when replicated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
    /// How far it is behind the leader's log, when replicated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
}

impl<'a> MemberOut<'a> {
    /// `m`, with what the replication status says of it.
    pub fn with(m: &'a MemberStatus, r: Option<&flotilla_cluster::wire::ReplicationStatus>) -> Self {
        let mut out = MemberOut::from(m);
        if let Some(r) = r {
            let replica = r.members.iter().find(|x| x.name == m.name.as_str());
            out.voter = replica.is_some_and(|x| x.voter);
            out.applied = replica.and_then(|x| x.applied);
            out.lag = match (r.last_index, out.applied) {
                (Some(last), Some(a)) => Some(last.saturating_sub(a)),
                (Some(last), None) if replica.is_some() => Some(last + 1),
                _ => None,
            };
        } else {
            out.voter = m.role == "control";
        }
        out
    }
}

impl<'a> From<&'a MemberStatus> for MemberOut<'a> {
    fn from(m: &'a MemberStatus) -> Self {
        MemberOut {
            voter: false,
            applied: None,
            lag: None,
            name: m.name.as_str(),
            addr: &m.addr,
            role: &m.role,
            reachable: m.reachable,
            slots_used: m.slots_used,
            slots_total: m.slots_total,
            flows: &m.flows,
            last_heartbeat: m.last_heartbeat.map(|t| t.to_string()),
        }
    }
}

/// The cluster's members.
#[derive(Debug, Serialize)]
pub struct StatusOut<'a> {
    /// The leader of the control state (the control node when it is not replicated).
    pub leader: Option<&'a str>,
    /// The leader's term (0 when not replicated).
    pub term: u64,
    /// The last index of the leader's last snapshot, and through which its log is purged
    /// (absent when not replicated or none yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_purged: Option<u64>,
    pub nodes: Vec<MemberOut<'a>>,
}

/// A deployment, with its next fire times.
#[derive(Debug, Serialize)]
pub struct DeploymentOut<'a> {
    pub id: String,
    pub name: &'a str,
    pub flow: &'a str,
    pub parameters: &'a serde_json::Value,
    pub schedules: Vec<String>,
    pub queue: Option<&'a str>,
    pub tags: &'a [String],
    pub concurrency_limit: Option<u32>,
    pub collision: &'static str,
    pub paused: bool,
    /// Where its runs' large results go (`s3/NAME`), when it names a store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_storage: Option<&'a str>,
    pub created: String,
    pub updated: String,
    pub next: Vec<String>,
}

impl<'a> DeploymentOut<'a> {
    /// `d` with its schedules described and its next fire times.
    pub fn new(d: &'a Deployment, schedules: Vec<String>, next: Vec<String>) -> Self {
        DeploymentOut {
            id: d.id.to_string(),
            name: &d.name,
            flow: &d.flow_name,
            parameters: &d.parameters,
            schedules,
            queue: d.work_queue.as_deref(),
            tags: &d.tags,
            concurrency_limit: d.concurrency_limit,
            collision: match d.collision {
                flotilla_runtime::CollisionStrategy::Enqueue => "enqueue",
                flotilla_runtime::CollisionStrategy::CancelNew => "cancel-new",
            },
            paused: d.paused,
            result_storage: d.result_storage.as_deref(),
            created: d.created.to_string(),
            updated: d.updated.to_string(),
            next,
        }
    }
}

/// A work queue and how busy it is.
#[derive(Debug, Serialize)]
pub struct QueueOut<'a> {
    pub name: &'a str,
    pub id: String,
    pub priority: u32,
    pub concurrency_limit: Option<u32>,
    pub paused: bool,
    pub waiting: u32,
    pub running: u32,
}

impl<'a> From<&'a QueueInfo> for QueueOut<'a> {
    fn from(q: &'a QueueInfo) -> Self {
        QueueOut {
            name: &q.queue.name,
            id: q.queue.id.to_string(),
            priority: q.queue.priority,
            concurrency_limit: q.queue.concurrency_limit,
            paused: q.queue.paused,
            waiting: q.waiting,
            running: q.active,
        }
    }
}

/// A tag limit with its leases.
#[derive(Debug, Serialize)]
pub struct LimitOut<'a> {
    pub tag: &'a str,
    pub limit: u32,
    pub lease_ttl_ms: u64,
    pub held: usize,
    pub leases: Vec<LeaseOut>,
}

/// A slot's lease.
#[derive(Debug, Serialize)]
pub struct LeaseOut {
    pub task_run: String,
    pub node: String,
    pub expires: String,
}

impl<'a> From<&'a ConcurrencyLimit> for LimitOut<'a> {
    fn from(l: &'a ConcurrencyLimit) -> Self {
        LimitOut {
            tag: &l.tag,
            limit: l.limit,
            lease_ttl_ms: u64::try_from(l.lease_ttl.as_millis()).unwrap_or(u64::MAX),
            held: l.leases.len(),
            leases: l
                .leases
                .iter()
                .map(|s| LeaseOut {
                    task_run: s.holder.to_string(),
                    node: s.node.to_string(),
                    expires: s.expires.to_string(),
                })
                .collect(),
        }
    }
}

/// A schedule's next fire times.
#[derive(Debug, Serialize)]
pub struct PreviewOut<'a> {
    pub expression: &'a str,
    pub timezone: &'a str,
    pub next: Vec<String>,
}
