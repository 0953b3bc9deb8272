//! `flotilla deployment …` and `flotilla deploy -f FILE`: deployments and their schedules.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use flotilla_runtime::{CollisionStrategy, Deployment, DeploymentSpec, Schedule, ScheduleKind, Timestamp};
use serde::Deserialize;

use crate::config::{Conn, duration};
use crate::flow_run::parameters;

/// A schedule from flags.
#[derive(Debug, Clone, Args)]
pub struct ScheduleArgs {
    /// A cron expression (5 fields, 6 with seconds first, or @daily…).
    #[arg(long, conflicts_with = "interval")]
    cron: Option<String>,
    /// The IANA time zone of --cron.
    #[arg(long, requires = "cron")]
    timezone: Option<String>,
    /// Every this long (10m, 1h, 30s).
    #[arg(long)]
    interval: Option<String>,
    /// An instant the interval fires at (RFC 3339) [default: now].
    #[arg(long, requires = "interval")]
    anchor: Option<String>,
    /// Run the fire times missed while the control node was down.
    #[arg(long)]
    catchup: bool,
}

impl ScheduleArgs {
    fn schedule(&self) -> anyhow::Result<Option<Schedule>> {
        let kind = match (&self.cron, &self.interval) {
            (Some(c), _) => ScheduleKind::Cron {
                expression: c.clone(),
                timezone: self.timezone.clone(),
            },
            (None, Some(i)) => ScheduleKind::Interval {
                every: duration("--interval", i)?,
                anchor: match &self.anchor {
                    Some(a) => a.parse().map_err(|e| anyhow::anyhow!("--anchor {a:?}: {e}"))?,
                    None => Timestamp::from(chrono::Utc::now()),
                },
            },
            (None, None) => return Ok(None),
        };
        kind.compile()?;
        Ok(Some(Schedule {
            kind,
            active: true,
            parameters: serde_json::Value::Null,
            catchup: self.catchup,
        }))
    }
}

/// Deployment commands.
#[derive(Debug, Subcommand)]
pub enum DeploymentCmd {
    /// Create a deployment: a flow with parameters, a schedule, a queue, tags and limits.
    Create {
        /// Its unique name.
        name: String,
        /// The flow it runs.
        #[arg(long)]
        flow: String,
        /// A default parameter, key=value (JSON when it parses, else a string).
        #[arg(long = "param", value_name = "KEY=VALUE", conflicts_with = "params_json")]
        params: Vec<String>,
        /// Every default parameter as one JSON object.
        #[arg(long)]
        params_json: Option<String>,
        #[command(flatten)]
        schedule: ScheduleArgs,
        /// The work queue its runs go to.
        #[arg(long)]
        queue: Option<String>,
        /// A tag for its runs (repeat for more).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// At most this many of its runs at once.
        #[arg(long)]
        concurrency_limit: Option<u32>,
        /// What a run over the limit does: enqueue (wait for a slot) or cancel-new.
        #[arg(long, default_value = "enqueue")]
        collision: String,
        /// Create it paused.
        #[arg(long)]
        paused: bool,
        /// Large results of its runs go to this s3 block's object store (s3/NAME).
        #[arg(long, value_name = "s3/NAME")]
        result_storage: Option<String>,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List deployments.
    Ls {
        /// A JSON array on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// One deployment, with its next 5 scheduled times.
    Inspect {
        /// Its name.
        name: String,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// An ad-hoc run of a deployment.
    Run {
        /// Its name.
        name: String,
        /// A parameter over the deployment's, key=value.
        #[arg(long = "param", value_name = "KEY=VALUE", conflicts_with = "params_json")]
        params: Vec<String>,
        /// Parameters over the deployment's, as one JSON object (`@FILE` reads it from a file,
        /// `@-` from standard input).
        #[arg(long)]
        params_json: Option<String>,
        /// A key of yours: running again with a key already used returns the existing run.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// Follow the run until it ends.
        #[arg(long)]
        watch: bool,
        /// Print the run's id as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Pause a deployment: its schedules create no runs, its runs not started are cancelled.
    Pause {
        /// Its name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Resume a paused deployment.
    Resume {
        /// Its name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Replace a deployment's schedule (no schedule flag: remove it).
    SetSchedule {
        /// Its name.
        name: String,
        #[command(flatten)]
        schedule: ScheduleArgs,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a deployment; its runs not started are cancelled.
    Delete {
        /// Its name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `deploy -f FILE`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// A TOML file of `[[deployment]]` tables.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    #[command(flatten)]
    conn: Conn,
}

/// One `[[deployment]]` of a deploy file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDeployment {
    name: String,
    flow: String,
    #[serde(default)]
    params: Option<toml::Table>,
    cron: Option<String>,
    timezone: Option<String>,
    interval: Option<String>,
    anchor: Option<String>,
    #[serde(default)]
    catchup: bool,
    queue: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    concurrency_limit: Option<u32>,
    collision: Option<String>,
    #[serde(default)]
    paused: bool,
    /// `s3/NAME`: large results go to that block's object store.
    result_storage: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployFile {
    #[serde(default)]
    deployment: Vec<FileDeployment>,
    /// Read on their own, after the deployments they may name are applied.
    #[serde(default)]
    automation: Vec<toml::Table>,
}

fn collision(s: &str) -> anyhow::Result<CollisionStrategy> {
    match s {
        "enqueue" => Ok(CollisionStrategy::Enqueue),
        "cancel-new" => Ok(CollisionStrategy::CancelNew),
        other => anyhow::bail!("collision strategy {other:?}: expected enqueue or cancel-new"),
    }
}

impl FileDeployment {
    fn spec(self) -> anyhow::Result<DeploymentSpec> {
        let schedule = ScheduleArgs {
            cron: self.cron,
            timezone: self.timezone,
            interval: self.interval,
            anchor: self.anchor,
            catchup: self.catchup,
        };
        anyhow::ensure!(
            !(schedule.cron.is_some() && schedule.interval.is_some()),
            "deployment {}: cron and interval are exclusive",
            self.name
        );
        let parameters = match self.params {
            Some(t) => serde_json::to_value(t)?,
            None => serde_json::json!({}),
        };
        let spec = DeploymentSpec {
            name: self.name.clone(),
            flow_name: self.flow,
            parameters,
            schedules: schedule
                .schedule()
                .with_context(|| format!("deployment {}", self.name))?
                .into_iter()
                .collect(),
            work_queue: self.queue,
            tags: self.tags,
            concurrency_limit: self.concurrency_limit,
            collision: collision(self.collision.as_deref().unwrap_or("enqueue"))?,
            paused: self.paused,
            result_storage: self.result_storage,
        };
        spec.check()
            .map_err(|e| anyhow::anyhow!("deployment {}: {e}", self.name))?;
        Ok(spec)
    }
}

fn describe_schedule(s: &Schedule) -> String {
    let what = match &s.kind {
        ScheduleKind::Cron { expression, timezone } => {
            format!("cron {expression:?} ({})", timezone.as_deref().unwrap_or("UTC"))
        }
        ScheduleKind::Interval { every, anchor } => {
            format!("every {} from {anchor}", humantime::format_duration(*every))
        }
    };
    if s.catchup {
        format!("{what}, catch-up")
    } else {
        what
    }
}

fn next_times(d: &Deployment, n: usize) -> Vec<Timestamp> {
    let from = Timestamp::from(chrono::Utc::now());
    let mut all: Vec<Timestamp> = d
        .schedules
        .iter()
        .filter(|s| s.active)
        .filter_map(|s| s.kind.compile().ok())
        .flat_map(|c| c.upcoming(from, n))
        .collect();
    all.sort();
    all.dedup();
    all.truncate(n);
    all
}

fn deployment_json(d: &Deployment) -> serde_json::Value {
    let next = if d.paused {
        Vec::new()
    } else {
        next_times(d, 5).iter().map(ToString::to_string).collect()
    };
    let out = crate::output::DeploymentOut::new(d, d.schedules.iter().map(describe_schedule).collect(), next);
    serde_json::to_value(out).unwrap_or_default()
}

pub async fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    let meta =
        std::fs::metadata(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    anyhow::ensure!(
        meta.len() <= 4 * 1024 * 1024,
        "{} is over 4 MiB",
        args.file.display()
    );
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let file: DeployFile =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{} is invalid: {e}", args.file.display()))?;
    anyhow::ensure!(
        !file.deployment.is_empty() || !file.automation.is_empty(),
        "{} has no [[deployment]] or [[automation]] table",
        args.file.display()
    );
    // Checked before anything is applied, like the deployments.
    let automations = if file.automation.is_empty() {
        Vec::new()
    } else {
        flotilla_runtime::automation::parse_file(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}; nothing was applied", args.file.display()))?
    };
    // Every entry is checked before any is applied.
    let specs = file
        .deployment
        .into_iter()
        .map(FileDeployment::spec)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut names = std::collections::BTreeSet::new();
    for s in &specs {
        anyhow::ensure!(
            names.insert(s.name.clone()),
            "deployment {} appears twice",
            s.name
        );
    }
    let s = args.conn.connect().await?;
    for spec in specs {
        let name = spec.name.clone();
        let before = match s.client.deployment(&name).await {
            Ok(d) => Some(d),
            Err(flotilla::Error::Cluster {
                code: "not_found", ..
            }) => None,
            Err(e) => return Err(s.fail(e)),
        };
        let what = match &before {
            Some(d) if d.spec() == spec => "unchanged",
            Some(_) => "updated",
            None => "created",
        };
        if what != "unchanged" {
            s.client.put_deployment(spec).await.map_err(|e| s.fail(e))?;
        }
        println!("{name}: {what}");
    }
    if !automations.is_empty() {
        crate::automation_cmd::put(&args.conn, automations, false).await?;
    }
    Ok(())
}

pub async fn run(cmd: DeploymentCmd) -> anyhow::Result<bool> {
    match cmd {
        DeploymentCmd::Create {
            name,
            flow,
            params,
            params_json,
            schedule,
            queue,
            tags,
            concurrency_limit,
            collision: strategy,
            paused,
            result_storage,
            json,
            conn,
        } => {
            let spec = DeploymentSpec {
                name: name.clone(),
                flow_name: flow,
                parameters: parameters(&params, params_json.as_deref())?,
                schedules: schedule.schedule()?.into_iter().collect(),
                work_queue: queue,
                tags,
                concurrency_limit,
                collision: collision(&strategy)?,
                paused,
                result_storage,
            };
            spec.check().map_err(|e| anyhow::anyhow!(e))?;
            let s = conn.connect().await?;
            match s.client.deployment(&name).await {
                Ok(_) => anyhow::bail!(
                    "a deployment named {name:?} exists (change it with set-schedule, pause, resume, or deploy -f)"
                ),
                Err(flotilla::Error::Cluster {
                    code: "not_found", ..
                }) => {}
                Err(e) => return Err(s.fail(e)),
            }
            let d = s.client.put_deployment(spec).await.map_err(|e| s.fail(e))?;
            if json {
                println!("{}", deployment_json(&d));
            } else {
                println!("created deployment {} ({})", d.name, d.id);
            }
        }
        DeploymentCmd::Ls { json, conn } => {
            let s = conn.connect().await?;
            let all = s.client.deployments().await.map_err(|e| s.fail(e))?;
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(all.iter().map(deployment_json).collect())
                );
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "{:<24} {:<16} {:<8} {:<40} NEXT",
                    "NAME", "FLOW", "PAUSED", "SCHEDULE"
                )?;
                for d in &all {
                    let sched = d
                        .schedules
                        .iter()
                        .map(describe_schedule)
                        .collect::<Vec<_>>()
                        .join("; ");
                    let next = if d.paused {
                        "-".to_owned()
                    } else {
                        next_times(d, 1).first().map_or("-".into(), ToString::to_string)
                    };
                    writeln!(
                        out,
                        "{:<24} {:<16} {:<8} {:<40} {next}",
                        d.name,
                        d.flow_name,
                        if d.paused { "yes" } else { "no" },
                        sched
                    )?;
                }
            }
        }
        DeploymentCmd::Inspect { name, json, conn } => {
            let s = conn.connect().await?;
            let d = s.client.deployment(&name).await.map_err(|e| s.fail(e))?;
            let v = deployment_json(&d);
            if json {
                println!("{v}");
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "deployment  {} ({})", d.name, d.id)?;
                writeln!(out, "flow        {}", d.flow_name)?;
                writeln!(out, "parameters  {}", d.parameters)?;
                for sch in &d.schedules {
                    writeln!(out, "schedule    {}", describe_schedule(sch))?;
                }
                writeln!(
                    out,
                    "queue       {}",
                    d.work_queue.as_deref().unwrap_or("default")
                )?;
                writeln!(out, "tags        {}", d.tags.join(", "))?;
                if let Some(n) = d.concurrency_limit {
                    writeln!(
                        out,
                        "limit       {n} at once ({})",
                        v["collision"].as_str().unwrap_or("")
                    )?;
                }
                writeln!(out, "paused      {}", if d.paused { "yes" } else { "no" })?;
                if let Some(storage) = &d.result_storage {
                    writeln!(out, "results     {storage}")?;
                }
                writeln!(out, "next runs")?;
                for t in v["next"].as_array().into_iter().flatten() {
                    writeln!(out, "  {}", t.as_str().unwrap_or(""))?;
                }
            }
        }
        DeploymentCmd::Run {
            name,
            params,
            params_json,
            idempotency_key,
            watch,
            json,
            conn,
        } => {
            let p = parameters(&params, params_json.as_deref())?;
            let s = conn.connect().await?;
            let id = match idempotency_key.as_deref() {
                Some(key) => s.client.run_deployment_with_key(&name, p, key).await,
                None => s.client.run_deployment(&name, p).await,
            }
            .map_err(|e| s.fail(e))?;
            if json {
                crate::output::print(&crate::output::IdOut { id: id.to_string() })?;
            } else {
                println!("{id}");
            }
            if watch {
                return crate::flow_run::watch(&s, id).await;
            }
        }
        DeploymentCmd::Pause { name, conn } => set_paused(&name, &conn, true).await?,
        DeploymentCmd::Resume { name, conn } => set_paused(&name, &conn, false).await?,
        DeploymentCmd::SetSchedule { name, schedule, conn } => {
            let s = conn.connect().await?;
            let d = s.client.deployment(&name).await.map_err(|e| s.fail(e))?;
            let mut spec = d.spec();
            spec.schedules = schedule.schedule()?.into_iter().collect();
            s.client.put_deployment(spec).await.map_err(|e| s.fail(e))?;
            println!("{name}: schedule set");
        }
        DeploymentCmd::Delete { name, conn } => {
            let s = conn.connect().await?;
            s.client.delete_deployment(&name).await.map_err(|e| s.fail(e))?;
            println!("deleted {name}");
        }
    }
    Ok(true)
}

/// Pauses or resumes a deployment.
pub async fn set_paused(name: &str, conn: &Conn, paused: bool) -> anyhow::Result<()> {
    let s = conn.connect().await?;
    let d = s.client.deployment(name).await.map_err(|e| s.fail(e))?;
    let mut spec = d.spec();
    if spec.paused == paused {
        println!("{name} is already {}", if paused { "paused" } else { "active" });
        return Ok(());
    }
    spec.paused = paused;
    s.client.put_deployment(spec).await.map_err(|e| s.fail(e))?;
    println!("{name} {}", if paused { "paused" } else { "resumed" });
    Ok(())
}
