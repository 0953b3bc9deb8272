//! `flotilla flow-run …`: create, list, inspect, follow, cancel and retry flow runs on a cluster.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::Subcommand;
use flotilla::{FlowRun, FlowRunId, LogLine, RunFilter, StateType};
use flotilla_runtime::LogCursor;

use crate::config::{Conn, Session};
use crate::output::RunOut;

/// Flow run commands.
#[derive(Debug, Subcommand)]
pub enum FlowRunCmd {
    /// Create a run of a flow; the cluster places it on a node that runs the flow.
    Create {
        /// The flow's name (`command` runs a program).
        flow: String,
        /// A parameter, key=value (the value read as JSON when it parses, else as a string).
        #[arg(long = "param", value_name = "KEY=VALUE", conflicts_with = "params_json")]
        params: Vec<String>,
        /// Every parameter as one JSON object (`@FILE` reads it from a file, `@-` from
        /// standard input).
        #[arg(long, value_name = "JSON")]
        params_json: Option<String>,
        /// A key of yours: creating again with a key already used returns the existing run
        /// (remembered as long as the run exists).
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// Follow the run until it ends (as `flow-run watch`).
        #[arg(long)]
        watch: bool,
        /// Print the run's id as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List flow runs, oldest first.
    Ls {
        /// Only those in this state type (SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED,
        /// CANCELLING, CANCELLED, CRASHED, PAUSED).
        #[arg(long, conflicts_with = "deployment")]
        state: Option<String>,
        /// Only the runs of this deployment (by name).
        #[arg(long)]
        deployment: Option<String>,
        /// At most this many (1 to 1,000; the next page's cursor is printed on stderr when
        /// more remain).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Where a previous page ended (its `next cursor:`).
        #[arg(long)]
        cursor: Option<String>,
        /// A JSON array on stdout.
        #[arg(long)]
        json: bool,
        /// Read from the replica of the node asked, which may lag the leader (faster; without
        /// it the leader answers after confirming it leads).
        #[arg(long)]
        stale: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// One flow run: its state history and its task runs.
    Inspect {
        /// The run's id.
        id: String,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// A flow run's log lines.
    Logs {
        /// The run's id.
        id: String,
        /// Keep printing new lines until the run ends.
        #[arg(long, conflicts_with_all = ["limit", "cursor"])]
        follow: bool,
        /// One page of at most this many lines (1 to 1,000; the next page's cursor is printed on
        /// stderr when more remain) [default: every line].
        #[arg(long)]
        limit: Option<usize>,
        /// Where a previous page ended (its `next cursor:`); pages of 100 unless --limit says.
        #[arg(long)]
        cursor: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a flow run; waits until it is Cancelled.
    Cancel {
        /// The run's id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a Failed, Crashed or Cancelled flow run again.
    Retry {
        /// The run's id.
        id: String,
        /// Follow the run until it ends.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Follow a flow run: its state and log lines until it ends. Exits 0 only when it
    /// completed.
    Watch {
        /// The run's id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// The most items one page of a listing holds.
const PAGE_MAX: usize = 1000;

/// A listing's cursor: opaque to users (`r` and the last run's id, without dashes).
fn run_cursor(last: FlowRunId) -> String {
    format!("r{}", last.as_uuid().simple())
}

fn cursor_run(cursor: &str) -> anyhow::Result<FlowRunId> {
    cursor
        .strip_prefix('r')
        .and_then(|hex| uuid::Uuid::try_parse(hex).ok())
        .map(FlowRunId::from_uuid)
        .ok_or_else(|| anyhow::anyhow!("--cursor {cursor:?} is not a cursor this command printed"))
}

/// A log page's cursor: opaque to users (`l`, the batch id, `.`, the line within it).
fn log_cursor(c: LogCursor) -> String {
    format!("l{}.{}", c.batch.as_uuid().simple(), c.line)
}

fn cursor_log(cursor: &str) -> anyhow::Result<LogCursor> {
    cursor
        .strip_prefix('l')
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(batch, line)| {
            Some(LogCursor {
                batch: flotilla_runtime::LogBatchId::from_uuid(uuid::Uuid::try_parse(batch).ok()?),
                line: line.parse().ok()?,
            })
        })
        .ok_or_else(|| anyhow::anyhow!("--cursor {cursor:?} is not a cursor this command printed"))
}

fn run_id(s: &str) -> anyhow::Result<FlowRunId> {
    s.parse()
        .map_err(|e| anyhow::anyhow!("{s:?} is not a flow run id: {e}"))
}

/// The most `--params-json @FILE` reads (the node refuses what is over its message limit).
const PARAMS_FILE_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// The text of a JSON flag (`flag`): as given, or read from `@FILE` (`@-`: standard input).
pub(crate) fn json_text<'a>(flag: &str, arg: &'a str) -> anyhow::Result<std::borrow::Cow<'a, str>> {
    use std::io::Read;
    let Some(path) = arg.strip_prefix('@') else {
        return Ok(std::borrow::Cow::Borrowed(arg));
    };
    let mut text = String::new();
    let read = if path == "-" {
        std::io::stdin()
            .take(PARAMS_FILE_BYTES_MAX + 1)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(PARAMS_FILE_BYTES_MAX + 1).read_to_string(&mut text))
    };
    read.map_err(|e| anyhow::anyhow!("{flag} {arg}: cannot read it: {e}"))?;
    anyhow::ensure!(
        text.len() as u64 <= PARAMS_FILE_BYTES_MAX,
        "{flag} {arg}: over {PARAMS_FILE_BYTES_MAX} bytes"
    );
    Ok(std::borrow::Cow::Owned(text))
}

/// The parameters from `--param k=v…` or `--params-json` (JSON, `@FILE` or `@-`).
pub(crate) fn parameters(params: &[String], json: Option<&str>) -> anyhow::Result<serde_json::Value> {
    if let Some(j) = json {
        let text = json_text("--params-json", j)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--params-json is not JSON: {e}"))?;
        anyhow::ensure!(
            v.is_object(),
            "--params-json must be a JSON object, such as {{\"count\": 3}}"
        );
        return Ok(v);
    }
    let mut m = serde_json::Map::new();
    for p in params {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--param {p:?}: expected KEY=VALUE"))?;
        anyhow::ensure!(!k.is_empty(), "--param {p:?}: the key is empty");
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_owned()));
        if m.insert(k.to_owned(), value).is_some() {
            anyhow::bail!("--param {k} is given twice");
        }
    }
    Ok(serde_json::Value::Object(m))
}

pub async fn run(cmd: FlowRunCmd) -> anyhow::Result<bool> {
    match cmd {
        FlowRunCmd::Create {
            flow,
            params,
            params_json,
            idempotency_key,
            watch: follow,
            json,
            conn,
        } => {
            let params = parameters(&params, params_json.as_deref())?;
            let s = conn.connect().await?;
            let id = match idempotency_key.as_deref() {
                Some(key) => s.client.run_with_key(&flow, params, key).await,
                None => s.client.run(&flow, params).await,
            }
            .map_err(|e| s.fail(e))?;
            if json {
                crate::output::print(&crate::output::IdOut { id: id.to_string() })?;
            } else {
                println!("{id}");
            }
            if follow {
                return watch(&s, id).await;
            }
            Ok(true)
        }
        FlowRunCmd::Ls {
            state,
            deployment,
            limit,
            cursor,
            json,
            stale,
            conn,
        } => {
            anyhow::ensure!(
                (1..=PAGE_MAX).contains(&limit),
                "--limit {limit}: from 1 to {PAGE_MAX} (follow `next cursor:` for more)"
            );
            let after = cursor.as_deref().map(cursor_run).transpose()?;
            let filter = match state {
                None => RunFilter::All,
                Some(s) => RunFilter::State(
                    s.to_uppercase()
                        .parse::<StateType>()
                        .map_err(|e| anyhow::anyhow!("--state {s:?}: {e}"))?,
                ),
            };
            let mut s = conn.connect().await?;
            let filter = match deployment {
                Some(name) => {
                    RunFilter::Deployment(s.client.deployment(&name).await.map_err(|e| s.fail(e))?.id)
                }
                None => filter,
            };
            if stale {
                s.client = s.client.stale_reads();
            }
            let runs = s
                .client
                .flow_runs(filter.clone(), after, limit)
                .await
                .map_err(|e| s.fail(e))?;
            // A full page: say where the next one starts, if there is one.
            if runs.len() == limit
                && let Some(last) = runs.last()
                && !s
                    .client
                    .flow_runs(filter.clone(), Some(last.id), 1)
                    .await
                    .map_err(|e| s.fail(e))?
                    .is_empty()
            {
                eprintln!("next cursor: {}", run_cursor(last.id));
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&runs.iter().map(RunOut::from).collect::<Vec<_>>())?
                );
            } else {
                print_runs(&runs);
            }
            Ok(true)
        }
        FlowRunCmd::Inspect { id, json, conn } => {
            let id = run_id(&id)?;
            let s = conn.connect().await?;
            let run = s.client.flow_run(id).await.map_err(|e| s.fail(e))?;
            let history = s.client.history(id).await.map_err(|e| s.fail(e))?;
            let tasks = s.client.task_runs(id).await.map_err(|e| s.fail(e))?;
            if json {
                crate::output::print(&crate::output::InspectOut {
                    run: RunOut::from(&run),
                    parameters: &run.parameters,
                    history: history.iter().map(Into::into).collect(),
                    task_runs: tasks.iter().map(Into::into).collect(),
                })?;
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "flow run  {}", run.id)?;
                writeln!(out, "flow      {}", run.flow_name)?;
                writeln!(out, "state     {}", run.lifecycle.state)?;
                writeln!(
                    out,
                    "node      {}",
                    run.owner.as_ref().map_or("-", |n| n.as_str())
                )?;
                writeln!(out, "params    {}", run.parameters)?;
                if let Some(storage) = &run.result_storage {
                    writeln!(out, "results   {storage}")?;
                }
                writeln!(out, "created   {}", run.created)?;
                if run.lifecycle.state.kind == StateType::Completed {
                    match s.client.result::<serde_json::Value>(id).await {
                        Ok(v) => writeln!(out, "result    {v}")?,
                        Err(e) => writeln!(out, "result    ({e})")?,
                    }
                }
                writeln!(out, "\nHISTORY")?;
                for st in &history {
                    writeln!(
                        out,
                        "  {}  {:<12} {}",
                        st.timestamp,
                        st.name.to_string(),
                        st.message.as_deref().unwrap_or("")
                    )?;
                }
                writeln!(out, "\nTASK RUNS ({})", tasks.len())?;
                for t in &tasks {
                    writeln!(
                        out,
                        "  {}  {}[{}]  {:<10} runs {}  {}",
                        t.id,
                        t.key.task_key,
                        t.key.call_index,
                        t.lifecycle.state.name.to_string(),
                        t.lifecycle.run_count,
                        t.lifecycle.state.message.as_deref().unwrap_or("")
                    )?;
                }
            }
            Ok(true)
        }
        FlowRunCmd::Logs {
            id,
            follow,
            limit,
            cursor,
            json,
            conn,
        } => {
            let id = run_id(&id)?;
            if limit.is_some() || cursor.is_some() {
                let limit = limit.unwrap_or(100);
                anyhow::ensure!(
                    (1..=PAGE_MAX).contains(&limit),
                    "--limit {limit}: from 1 to {PAGE_MAX} (follow `next cursor:` for more)"
                );
                let after = cursor.as_deref().map(cursor_log).transpose()?;
                let s = conn.connect().await?;
                let (lines, next) = s
                    .client
                    .logs_page(id, after, limit)
                    .await
                    .map_err(|e| s.fail(e))?;
                let mut out = std::io::stdout().lock();
                for l in &lines {
                    print_line(&mut out, l, json);
                }
                if lines.len() == limit
                    && let Some(next) = next
                {
                    eprintln!("next cursor: {}", log_cursor(next));
                }
                return Ok(true);
            }
            let s = conn.connect().await?;
            let mut out = std::io::stdout().lock();
            let mut cursor = None;
            loop {
                let run = if follow {
                    Some(
                        s.client
                            .wait_for(id, Duration::from_millis(250))
                            .await
                            .map_err(|e| s.fail(e))?,
                    )
                } else {
                    None
                };
                cursor = drain_logs(&s, id, cursor, |l| print_line(&mut out, l, json)).await?;
                if run.is_none_or(|r| {
                    r.still_going(flotilla_runtime::Timestamp::from(chrono::Utc::now()))
                        .is_none()
                }) {
                    // A run that ended has every line recorded before its final state (a run
                    // Crashed that resumes elsewhere has not ended: its logs go on).
                    if follow {
                        drain_logs(&s, id, cursor, |l| print_line(&mut out, l, json)).await?;
                    }
                    break;
                }
            }
            Ok(true)
        }
        FlowRunCmd::Cancel { id, conn } => {
            let id = run_id(&id)?;
            let s = conn.connect().await?;
            let state = s.client.cancel(id).await.map_err(|e| s.fail(e))?;
            println!("{id} {state}");
            Ok(true)
        }
        FlowRunCmd::Retry {
            id,
            watch: follow,
            conn,
        } => {
            let id = run_id(&id)?;
            let s = conn.connect().await?;
            let state = s.client.retry(id).await.map_err(|e| s.fail(e))?;
            println!("{id} {state}");
            if follow {
                return watch(&s, id).await;
            }
            Ok(true)
        }
        FlowRunCmd::Watch { id, conn } => {
            let id = run_id(&id)?;
            let s = conn.connect().await?;
            watch(&s, id).await
        }
    }
}

fn print_runs(runs: &[FlowRun]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<36}  {:<20} {:<11} {:<8} {:<27} MESSAGE",
        "ID", "FLOW", "STATE", "NODE", "CREATED"
    );
    for r in runs {
        let _ = writeln!(
            out,
            "{:<36}  {:<20} {:<11} {:<8} {:<27} {}",
            r.id.to_string(),
            r.flow_name,
            r.lifecycle.state.name.to_string(),
            r.owner.as_ref().map_or("-", |n| n.as_str()),
            r.created.to_string(),
            r.lifecycle.state.message.as_deref().unwrap_or("")
        );
    }
}

fn format_line(l: &LogLine) -> String {
    let t = l.timestamp.to_datetime().format("%H:%M:%S%.3f");
    let who = match (l.target.as_str(), l.task_run) {
        (t @ ("stdout" | "stderr"), _) => t,
        (_, Some(_)) => "task",
        (_, None) => "flow",
    };
    format!("{t} {:<5} {who} | {}", l.level.to_string(), l.message)
}

fn print_line(out: &mut impl Write, l: &LogLine, json: bool) {
    let _ = if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string(&crate::output::LogLineOut::from(l)).unwrap_or_default()
        )
    } else {
        writeln!(out, "{}", format_line(l))
    };
}

/// Prints every log line after `cursor`; returns the new cursor.
async fn drain_logs(
    s: &Session,
    id: FlowRunId,
    mut cursor: Option<LogCursor>,
    mut each: impl FnMut(&LogLine),
) -> anyhow::Result<Option<LogCursor>> {
    loop {
        let (lines, next) = s
            .client
            .logs_page(id, cursor, 1000)
            .await
            .map_err(|e| s.fail(e))?;
        if lines.is_empty() {
            return Ok(cursor);
        }
        lines.iter().for_each(&mut each);
        cursor = next.or(cursor);
    }
}

/// Follows a run to its end: a spinner with its state and task runs on a terminal, and its
/// log lines, all on stderr. True when it completed.
pub async fn watch(s: &Session, id: FlowRunId) -> anyhow::Result<bool> {
    let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    if std::io::stderr().is_terminal() {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
    }
    let started = Instant::now();
    let mut cursor = None;
    let mut last_state = String::new();
    let run = loop {
        let run = s
            .client
            .wait_for(id, Duration::from_millis(200))
            .await
            .map_err(|e| s.fail(e))?;
        // Crashed with its node is not the end of a run that resumes elsewhere.
        let terminal = run
            .still_going(flotilla_runtime::Timestamp::from(chrono::Utc::now()))
            .is_none();
        let mut announce = |run: &FlowRun| {
            let state = run.lifecycle.state.name.to_string();
            if state != last_state {
                let node = run
                    .owner
                    .as_ref()
                    .map_or_else(String::new, |n| format!(" on {n}"));
                bar.suspend(|| eprintln!("{} {state}{node}", run.flow_name));
                last_state = state;
            }
        };
        // A run's lines are all recorded before its final state: they print before it.
        if !terminal {
            announce(&run);
        }
        cursor = drain_logs(s, id, cursor, |l| bar.suspend(|| eprintln!("{}", format_line(l)))).await?;
        if terminal {
            announce(&run);
            break run;
        }
        let tasks = s.client.task_runs(id).await.map(|t| t.len()).unwrap_or(0);
        bar.set_message(format!(
            "{} {} · {tasks} task runs",
            run.flow_name, run.lifecycle.state.name
        ));
    };
    bar.finish_and_clear();
    let st = &run.lifecycle.state;
    let took = started.elapsed();
    match st.message.as_deref() {
        Some(m) => eprintln!("flow run {id} {} after {took:.2?}: {m}", st.name),
        None => eprintln!("flow run {id} {} after {took:.2?}", st.name),
    }
    Ok(st.kind == StateType::Completed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_from_flags() {
        let v = parameters(&["n=3".into(), "name=abc".into(), "xs=[1,2]".into()], None).unwrap();
        assert_eq!(v, serde_json::json!({"n": 3, "name": "abc", "xs": [1, 2]}));
        assert!(parameters(&["novalue".into()], None).is_err());
        assert!(parameters(&["a=1".into(), "a=2".into()], None).is_err());
        assert!(parameters(&[], Some("[1]")).is_err());
        assert!(parameters(&[], Some("{nope")).is_err());
        assert_eq!(
            parameters(&[], Some("{\"a\":1}")).unwrap(),
            serde_json::json!({"a": 1})
        );
    }
}
