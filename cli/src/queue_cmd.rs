//! `flotilla work-queue …` and `flotilla concurrency-limit …`.

use std::io::Write;
use std::time::Duration;

use clap::Subcommand;
use flotilla::{LimitChange, QueueChange, QueueInfo};
use flotilla_runtime::{ConcurrencyLimit, QueueEdit};

use crate::config::{Conn, duration};

/// Work queue commands.
#[derive(Debug, Subcommand)]
pub enum WorkQueueCmd {
    /// Create a work queue.
    Create {
        /// Its unique name.
        name: String,
        /// 1 is the highest priority.
        #[arg(long, default_value_t = 1)]
        priority: u32,
        /// At most this many of its runs at once.
        #[arg(long)]
        concurrency_limit: Option<u32>,
        /// Created paused (it hands out nothing until resumed).
        #[arg(long)]
        paused: bool,
        /// Print the queue as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the work queues with their waiting and running runs.
    Ls {
        /// One JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one work queue.
    Inspect {
        /// Its name.
        name: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop handing out its runs.
    Pause {
        /// Its name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Hand out its runs again.
    Resume {
        /// Its name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Set (or with `none`, lift) how many of its runs may run at once.
    SetConcurrencyLimit {
        /// Its name.
        name: String,
        /// A number, or `none`.
        limit: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Set its priority (1 is the highest).
    SetPriority {
        /// Its name.
        name: String,
        /// The priority.
        priority: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a work queue (its runs go on as in a queue with default settings).
    Delete {
        /// Its name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Tag concurrency limit commands.
#[derive(Debug, Subcommand)]
pub enum LimitCmd {
    /// Limit how many running task runs across the cluster carry a tag (or change the limit).
    Create {
        /// The tag.
        tag: String,
        /// The number of slots.
        limit: u32,
        /// How long a slot stays held without its holder renewing it (a dead node's slots
        /// come back after this long).
        #[arg(long, default_value = "30s")]
        lease_ttl: String,
        /// Print the limit as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the tag limits with the slots held.
    Ls {
        /// One JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a tag limit and who holds its slots.
    Inspect {
        /// The tag.
        tag: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Free every slot of a tag now.
    Reset {
        /// The tag.
        tag: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a tag limit.
    Delete {
        /// The tag.
        tag: String,
        #[command(flatten)]
        conn: Conn,
    },
}

fn queue_json(q: &QueueInfo) -> serde_json::Value {
    serde_json::to_value(crate::output::QueueOut::from(q)).unwrap_or_default()
}

fn print_queues(all: &[QueueInfo], json: bool) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::Value::Array(all.iter().map(queue_json).collect())
        );
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<24} {:>8} {:>6} {:>7} {:>8} {:>8}",
        "NAME", "PRIORITY", "LIMIT", "PAUSED", "WAITING", "RUNNING"
    )?;
    for q in all {
        writeln!(
            out,
            "{:<24} {:>8} {:>6} {:>7} {:>8} {:>8}",
            q.queue.name,
            q.queue.priority,
            q.queue
                .concurrency_limit
                .map_or("-".to_owned(), |l| l.to_string()),
            if q.queue.paused { "yes" } else { "no" },
            q.waiting,
            q.active
        )?;
    }
    Ok(())
}

fn limit_json(l: &ConcurrencyLimit) -> serde_json::Value {
    serde_json::to_value(crate::output::LimitOut::from(l)).unwrap_or_default()
}

fn print_limits(all: &[ConcurrencyLimit], json: bool, leases: bool) -> anyhow::Result<()> {
    if json {
        if leases && all.len() == 1 {
            println!("{}", limit_json(&all[0]));
        } else {
            println!(
                "{}",
                serde_json::Value::Array(all.iter().map(limit_json).collect())
            );
        }
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<24} {:>6} {:>6} {:>10}",
        "TAG", "LIMIT", "HELD", "LEASE TTL"
    )?;
    for l in all {
        writeln!(
            out,
            "{:<24} {:>6} {:>6} {:>10}",
            l.tag,
            l.limit,
            l.leases.len(),
            humantime::format_duration(l.lease_ttl).to_string()
        )?;
        if leases {
            for s in &l.leases {
                writeln!(out, "  task run {} on {} until {}", s.holder, s.node, s.expires)?;
            }
        }
    }
    Ok(())
}

pub async fn work_queue(cmd: WorkQueueCmd) -> anyhow::Result<bool> {
    let (conn, name, change, json) = match cmd {
        WorkQueueCmd::Ls { json, conn } => {
            let s = conn.connect().await?;
            let all = s.client.work_queues().await.map_err(|e| s.fail(e))?;
            print_queues(&all, json)?;
            return Ok(true);
        }
        WorkQueueCmd::Create {
            name,
            priority,
            concurrency_limit,
            paused,
            json,
            conn,
        } => {
            anyhow::ensure!(priority >= 1, "--priority is 1 (the highest) or more");
            anyhow::ensure!(
                concurrency_limit != Some(0),
                "--concurrency-limit is at least 1 (pause the queue to stop it)"
            );
            let change = QueueChange::Edit(QueueEdit::Create {
                priority,
                concurrency_limit,
                paused,
            });
            (conn, name, change, json)
        }
        WorkQueueCmd::Inspect { name, json, conn } => (conn, name, QueueChange::Inspect, json),
        WorkQueueCmd::Pause { name, conn } => (conn, name, QueueChange::Edit(QueueEdit::Pause), false),
        WorkQueueCmd::Resume { name, conn } => (conn, name, QueueChange::Edit(QueueEdit::Resume), false),
        WorkQueueCmd::SetConcurrencyLimit { name, limit, conn } => {
            let limit = match limit.as_str() {
                "none" => None,
                n => Some(n.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    anyhow::anyhow!("limit {n:?}: expected a number of at least 1, or none")
                })?),
            };
            (
                conn,
                name,
                QueueChange::Edit(QueueEdit::SetConcurrencyLimit(limit)),
                false,
            )
        }
        WorkQueueCmd::SetPriority { name, priority, conn } => {
            anyhow::ensure!(priority >= 1, "a priority is 1 (the highest) or more");
            (
                conn,
                name,
                QueueChange::Edit(QueueEdit::SetPriority(priority)),
                false,
            )
        }
        WorkQueueCmd::Delete { name, conn } => (conn, name, QueueChange::Delete, false),
    };
    let verb = match &change {
        QueueChange::Edit(QueueEdit::Create { .. }) => "created",
        QueueChange::Edit(QueueEdit::Pause) => "paused",
        QueueChange::Edit(QueueEdit::Resume) => "resumed",
        QueueChange::Edit(QueueEdit::SetConcurrencyLimit(_) | QueueEdit::SetPriority(_)) => "updated",
        QueueChange::Delete => "deleted",
        QueueChange::Inspect => "",
    };
    let s = conn.connect().await?;
    let q = s.client.work_queue(&name, change).await.map_err(|e| s.fail(e))?;
    match q {
        Some(q) if json => println!("{}", queue_json(&q)),
        Some(q) if verb.is_empty() => print_queues(std::slice::from_ref(&q), false)?,
        _ => println!("{verb} work queue {name}"),
    }
    Ok(true)
}

pub async fn limit(cmd: LimitCmd) -> anyhow::Result<bool> {
    let (conn, tag, change, json) = match cmd {
        LimitCmd::Ls { json, conn } => {
            let s = conn.connect().await?;
            let all = s.client.concurrency_limits().await.map_err(|e| s.fail(e))?;
            print_limits(&all, json, false)?;
            return Ok(true);
        }
        LimitCmd::Create {
            tag,
            limit,
            lease_ttl,
            json,
            conn,
        } => {
            anyhow::ensure!(limit >= 1, "a limit is at least 1 slot");
            let ttl = duration("--lease-ttl", &lease_ttl)?;
            anyhow::ensure!(
                ttl >= Duration::from_millis(100) && ttl <= Duration::from_secs(3600),
                "--lease-ttl is between 100ms and 1h"
            );
            let change = LimitChange::Put {
                limit,
                lease_ttl_ms: ttl.as_millis() as u64,
            };
            (conn, tag, change, json)
        }
        LimitCmd::Inspect { tag, json, conn } => (conn, tag, LimitChange::Inspect, json),
        LimitCmd::Reset { tag, conn } => (conn, tag, LimitChange::Reset, false),
        LimitCmd::Delete { tag, conn } => (conn, tag, LimitChange::Delete, false),
    };
    let verb = match &change {
        LimitChange::Put { .. } => "set",
        LimitChange::Reset => "reset",
        LimitChange::Delete => "deleted",
        LimitChange::Inspect => "",
    };
    let s = conn.connect().await?;
    let l = s
        .client
        .concurrency_limit(&tag, change)
        .await
        .map_err(|e| s.fail(e))?;
    match l {
        Some(l) if verb.is_empty() || json => print_limits(std::slice::from_ref(&l), json, true)?,
        _ => println!("{verb} concurrency limit on tag {tag}"),
    }
    Ok(true)
}
