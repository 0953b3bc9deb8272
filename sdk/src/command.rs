//! The built-in `command` flow: runs a program as one task, its stdout and stderr streamed into
//! the run's logs line by line. With it a cluster is useful with no Rust code:
//!
//! ```text
//! flotilla flow-run create command --params-json '{"command": ["sh", "-c", "echo hi"], "timeout": "30s", "retries": 2}' --watch
//! ```
//!
//! Parameters (`command` or `steps` is required): `command` (an argument vector, or a string
//! run by `sh -c`), or `steps` (a list of them, each its own task run `step-1`, `step-2`, …,
//! run in order: a pipeline whose node is lost resumes on another node at the first step not
//! completed), `env` (variables added to the node's environment), `cwd`, `timeout` (per
//! attempt, `"30s"`), `retries`, `retry_delay`, `tags` (the task's tags: cluster-wide
//! concurrency limits on a tag hold it until a slot frees), `resume` (default true: a run whose
//! node is lost resumes elsewhere; false leaves it Crashed). The run completes with
//! `{"exit_code": 0, "lines": N}`; it fails on a non-zero exit, a signal, a timeout, or a
//! program that cannot be started, with the reason (and the step) in its state's message.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use flotilla_actors::engine::{
    BoxFuture, FlowEnv, FlowFn, FlowOptions, TaskAttempt, TaskBody, TaskFailure, TaskSpec,
};
use flotilla_runtime::RetryPolicy;
use flotilla_runtime::retry::RetryPolicyError;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// The built-in flow's name.
pub const COMMAND_FLOW: &str = "command";

/// The longest argument vector accepted, in bytes.
const COMMAND_BYTES_MAX: usize = 64 * 1024;
/// The most steps accepted.
const STEPS_MAX: usize = 1_000;
/// The most environment variables accepted.
const ENV_VARS_MAX: usize = 256;
/// A longer output line is cut here (the rest of it is dropped, and the cut said).
const LINE_BYTES_MAX: usize = 16 * 1024;

/// The program to run: an argument vector, or one string for `sh -c`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
enum Program {
    Argv(Vec<String>),
    Shell(String),
}

/// The parameters of a `command` run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandParams {
    #[serde(default)]
    command: Option<Program>,
    #[serde(default)]
    steps: Vec<Program>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Environment variables from blocks, resolved when the run starts: `env/NAME` (every
    /// variable of an `env` block), `secret/NAME:VAR`, `TYPE/NAME#FIELD:VAR`.
    #[serde(default)]
    env_from_blocks: Vec<String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retries: u32,
    #[serde(default)]
    retry_delay: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    /// Read when the run is made (the flow's `resume_param`).
    #[serde(default)]
    resume: Option<bool>,
}

/// The parameters, checked.
#[derive(Clone, Debug)]
struct Checked {
    /// One argument vector per step (one for `command`).
    steps: Vec<Vec<String>>,
    /// Whether they came as `steps` (each task run named `step-N`).
    named_steps: bool,
    env: BTreeMap<String, String>,
    env_from_blocks: Vec<BlockEnv>,
    cwd: Option<String>,
    timeout: Option<Duration>,
    retry: RetryPolicy,
    tags: Vec<String>,
}

/// What a completed `command` run returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutput {
    /// The program's exit code (0).
    pub exit_code: i32,
    /// How many lines it wrote (stdout and stderr).
    pub lines: u64,
}

fn duration(field: &str, s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{field} {s:?} is not a duration such as \"30s\" or \"5m\": {e}"))
}

/// A program's argument vector, checked; `what` names it in errors.
fn argv_of(program: Program, what: &str) -> Result<Vec<String>, String> {
    let argv = match program {
        Program::Argv(v) => v,
        Program::Shell(s) => vec!["sh".to_owned(), "-c".to_owned(), s],
    };
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(format!("flow command: {what} is empty"));
    }
    let bytes: usize = argv.iter().map(String::len).sum();
    if bytes > COMMAND_BYTES_MAX {
        return Err(format!(
            "flow command: {what} is {bytes} bytes, over the limit of {COMMAND_BYTES_MAX}"
        ));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(format!("flow command: an argument of {what} contains a NUL byte"));
    }
    Ok(argv)
}

fn check(params: &serde_json::Value) -> Result<Checked, String> {
    let p: CommandParams = serde_json::from_value(params.clone()).map_err(|e| {
        format!("flow command: {e} (expected {{\"command\": [\"prog\", \"arg\", …] or \"shell line\", or \"steps\": [[…], …], \"env\": {{…}}, \"cwd\": \"…\", \"timeout\": \"30s\", \"retries\": 2, \"retry_delay\": \"1s\", \"tags\": [\"db\"], \"resume\": true}})")
    })?;
    let (programs, named_steps) = match (p.command, p.steps.is_empty()) {
        (Some(c), true) => (vec![c], false),
        (None, false) if p.steps.len() <= STEPS_MAX => (p.steps, true),
        (None, false) => {
            return Err(format!(
                "flow command: {} steps, over the limit of {STEPS_MAX}",
                p.steps.len()
            ));
        }
        (Some(_), false) => return Err("flow command: give \"command\" or \"steps\", not both".to_owned()),
        (None, true) => return Err("flow command: \"command\" or \"steps\" is required".to_owned()),
    };
    let mut steps = Vec::with_capacity(programs.len());
    for (i, program) in programs.into_iter().enumerate() {
        let what = if named_steps {
            format!("step {}", i + 1)
        } else {
            "the command".to_owned()
        };
        steps.push(argv_of(program, &what)?);
    }
    if p.env.len() > ENV_VARS_MAX {
        return Err(format!(
            "flow command: {} environment variables, over the limit of {ENV_VARS_MAX}",
            p.env.len()
        ));
    }
    if let Some(k) = p.env.keys().find(|k| k.is_empty() || k.contains(['=', '\0'])) {
        return Err(format!("flow command: {k:?} is not an environment variable name"));
    }
    if p.env_from_blocks.len() > ENV_VARS_MAX {
        return Err(format!("flow command: at most {ENV_VARS_MAX} env_from_blocks"));
    }
    let env_from_blocks = p
        .env_from_blocks
        .iter()
        .map(|r| BlockEnv::parse(r).map_err(|e| format!("flow command: env_from_blocks: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = p.timeout.as_deref().map(|s| duration("timeout", s)).transpose()?;
    if timeout == Some(Duration::ZERO) {
        return Err("flow command: a timeout of zero would never let it run".to_owned());
    }
    let delay = p
        .retry_delay
        .as_deref()
        .map(|s| duration("retry_delay", s))
        .transpose()?;
    let retry = RetryPolicy::fixed(p.retries, delay.unwrap_or(Duration::ZERO));
    retry
        .validate()
        .map_err(|e: RetryPolicyError| format!("flow command: {e}"))?;
    if p.tags.len() > 32 || p.tags.iter().any(|t| t.is_empty() || t.len() > 128) {
        return Err("flow command: at most 32 tags, each 1 to 128 bytes long".to_owned());
    }
    Ok(Checked {
        steps,
        named_steps,
        env: p.env,
        env_from_blocks,
        cwd: p.cwd,
        timeout,
        retry,
        tags: p.tags,
    })
}

/// Environment variables taken from a block.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BlockEnv {
    /// `TYPE/NAME`.
    block: String,
    /// One field into one variable (none: every variable of an `env` block).
    field: Option<(String, String)>,
}

impl BlockEnv {
    /// `env/NAME`, `secret/NAME:VAR` or `TYPE/NAME#FIELD:VAR`.
    fn parse(s: &str) -> Result<BlockEnv, String> {
        let (reference, var) = match s.rsplit_once(':') {
            Some((r, v)) => (r, Some(v)),
            None => (s, None),
        };
        let (block, field) = match reference.split_once('#') {
            Some((b, f)) => (b, Some(f)),
            None => (reference, None),
        };
        let (kind, _) = flotilla_runtime::block::parse_reference(block)?;
        if let Some(v) = var
            && (v.is_empty() || v.contains(['=', '\0']))
        {
            return Err(format!("{v:?} is not an environment variable name"));
        }
        let field = match (kind, field, var) {
            (flotilla_runtime::block::BlockType::Env, None, None) => None,
            (flotilla_runtime::block::BlockType::Secret, None, Some(v)) => {
                Some(("value".to_owned(), v.to_owned()))
            }
            (_, Some(f), Some(v)) => Some((f.to_owned(), v.to_owned())),
            _ => {
                return Err(format!(
                    "{s:?}: use env/NAME, secret/NAME:VAR or TYPE/NAME#FIELD:VAR"
                ));
            }
        };
        Ok(BlockEnv {
            block: block.to_owned(),
            field,
        })
    }
}

/// The environment a run's blocks give, resolved from the control node.
async fn block_env(env: &FlowEnv, wanted: &[BlockEnv]) -> Result<BTreeMap<String, String>, String> {
    let mut refs: Vec<String> = wanted.iter().map(|w| w.block.clone()).collect();
    refs.sort();
    refs.dedup();
    let blocks: BTreeMap<String, serde_json::Value> = env
        .resolve_blocks(refs)
        .await
        .map_err(|e| format!("env_from_blocks: {e}"))?
        .into_iter()
        .collect();
    let mut out = BTreeMap::new();
    for w in wanted {
        let doc = blocks
            .get(&w.block)
            .ok_or_else(|| format!("env_from_blocks: block {} was not given", w.block))?;
        match &w.field {
            None => {
                for (k, v) in doc.as_object().into_iter().flatten() {
                    out.insert(k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned));
                }
            }
            Some((field, var)) => {
                let v = doc
                    .get(field)
                    .ok_or_else(|| format!("env_from_blocks: block {} has no field {field}", w.block))?;
                out.insert(
                    var.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                );
            }
        }
    }
    Ok(out)
}

/// The built-in `command` flow, to register on a node.
pub fn command_flow() -> Arc<dyn FlowFn> {
    Arc::new(CommandFlow)
}

/// The built-in empty flow's name.
pub const NOOP_FLOW: &str = "noop";

/// The flows of the stock binary: `command`, and `noop` (it runs no task and completes, for
/// checks and benchmarks of the orchestration itself; `{"result_bytes": N}` makes it return N
/// bytes, up to 8 MiB, to exercise large results).
pub fn builtin_flows() -> Vec<Arc<dyn FlowFn>> {
    vec![command_flow(), Arc::new(NoopFlow)]
}

/// The largest result `noop` makes.
const NOOP_RESULT_BYTES_MAX: u64 = 8 * 1024 * 1024;

#[derive(Debug)]
struct NoopFlow;

fn noop_result_bytes(params: &serde_json::Value) -> Result<u64, String> {
    match params {
        serde_json::Value::Null => Ok(0),
        serde_json::Value::Object(m) => {
            if let Some(k) = m.keys().find(|k| *k != "result_bytes") {
                return Err(format!(
                    "flow noop: unknown parameter {k:?} (it takes only result_bytes)"
                ));
            }
            match m.get("result_bytes") {
                None => Ok(0),
                Some(v) => match v.as_u64() {
                    Some(n) if n <= NOOP_RESULT_BYTES_MAX => Ok(n),
                    _ => Err(format!(
                        "flow noop: result_bytes must be a whole number up to {NOOP_RESULT_BYTES_MAX}, not {v}"
                    )),
                },
            }
        }
        other => Err(format!("flow noop: parameters must be an object, not {other}")),
    }
}

impl FlowFn for NoopFlow {
    fn name(&self) -> &str {
        NOOP_FLOW
    }

    fn options(&self) -> FlowOptions {
        FlowOptions::default()
    }

    fn check_params(&self, params: &serde_json::Value) -> Result<(), String> {
        noop_result_bytes(params).map(|_| ())
    }

    fn run(&self, _env: FlowEnv, params: serde_json::Value) -> BoxFuture<Result<Vec<u8>, String>> {
        Box::pin(async move {
            let n = noop_result_bytes(&params)?;
            if n == 0 {
                return rmp_serde::to_vec_named(&()).map_err(|e| e.to_string());
            }
            let bytes: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            rmp_serde::to_vec_named(&serde_bytes::ByteBuf::from(bytes)).map_err(|e| e.to_string())
        })
    }
}

#[derive(Debug)]
struct CommandFlow;

impl FlowFn for CommandFlow {
    fn name(&self) -> &str {
        COMMAND_FLOW
    }

    fn options(&self) -> FlowOptions {
        FlowOptions {
            resume_param: true,
            ..FlowOptions::default()
        }
    }

    fn check_params(&self, params: &serde_json::Value) -> Result<(), String> {
        check(params).map(|_| ())
    }

    fn run(&self, env: FlowEnv, params: serde_json::Value) -> BoxFuture<Result<Vec<u8>, String>> {
        Box::pin(async move {
            let mut c = check(&params)?;
            if !c.env_from_blocks.is_empty() {
                // In memory only, for the programs' environment.
                let extra = block_env(&env, &c.env_from_blocks).await?;
                c.env.extend(extra);
            }
            let c = Arc::new(c);
            if !c.named_steps {
                return step(&env, &c, 0, COMMAND_FLOW.to_owned()).await;
            }
            // In order, each its own task run: resumed, the steps that completed return their
            // recorded results without running again.
            let mut lines = 0;
            for i in 0..c.steps.len() {
                let name = format!("step-{}", i + 1);
                let out = step(&env, &c, i, name)
                    .await
                    .map_err(|e| format!("step {} of {}: {e}", i + 1, c.steps.len()))?;
                lines += rmp_serde::from_slice::<CommandOutput>(&out).map_or(0, |o| o.lines);
            }
            rmp_serde::to_vec_named(&CommandOutput { exit_code: 0, lines })
                .map_err(|e| format!("cannot encode the result: {e}"))
        })
    }
}

/// Runs step `i` of `c` as a task run named `name`.
async fn step(env: &FlowEnv, c: &Arc<Checked>, i: usize, name: String) -> Result<Vec<u8>, String> {
    let spec = TaskSpec {
        name,
        retry: c.retry.clone(),
        timeout: c.timeout,
        tags: c.tags.clone(),
        ..TaskSpec::default()
    };
    let c = c.clone();
    let body: TaskBody = Arc::new(move |attempt| {
        let c = c.clone();
        Box::pin(async move { run_once(&c, &c.steps[i], attempt).await })
    });
    match env.task(spec, body).await {
        Ok(bytes) => Ok(bytes),
        Err(TaskFailure::Failed { message, .. }) => Err(message),
        Err(TaskFailure::TimedOut { after, .. }) => Err(format!(
            "the command timed out after {} and was killed",
            humantime::format_duration(after)
        )),
        Err(other) => Err(other.to_string()),
    }
}

/// Kills the program's whole process group when dropped (a timeout or a cancel drops the
/// attempt), so a shell's children do not outlive it.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            let _ =
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

async fn run_once(c: &Checked, argv: &[String], attempt: TaskAttempt) -> Result<Vec<u8>, String> {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(&c.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);
    if let Some(dir) = &c.cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().map_err(|e| {
        let cwd = c.cwd.as_deref().map(|d| format!(" in {d}")).unwrap_or_default();
        format!("cannot start {:?}{cwd}: {e}", argv[0])
    })?;
    let mut guard = GroupGuard(child.id());
    tracing::debug!(program = %argv[0], attempt = attempt.attempt, pid = ?child.id(), "started");
    let out = child.stdout.take().map(|s| pump(s, false));
    let err = child.stderr.take().map(|s| pump(s, true));
    let (status, n_out, n_err) =
        tokio::join!(child.wait(), async { opt(out).await }, async { opt(err).await });
    let status = status.map_err(|e| format!("cannot wait for the command: {e}"))?;
    guard.0 = None;
    let lines = n_out + n_err;
    match status.code() {
        Some(0) => rmp_serde::to_vec_named(&CommandOutput { exit_code: 0, lines })
            .map_err(|e| format!("cannot encode the result: {e}")),
        Some(code) => Err(format!("the command exited with code {code}")),
        None => {
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt;
                if let Some(sig) = status.signal() {
                    return Err(format!("the command was killed by signal {sig}"));
                }
            }
            Err(format!("the command ended without an exit code ({status})"))
        }
    }
}

async fn opt(f: Option<impl std::future::Future<Output = u64>>) -> u64 {
    match f {
        Some(f) => f.await,
        None => 0,
    }
}

/// Logs a stream's lines (stdout at info, stderr at warn, the stream as the target); returns
/// how many.
async fn pump(stream: impl AsyncRead + Unpin, is_err: bool) -> u64 {
    let mut r = BufReader::new(stream);
    let mut n = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line_capped(&mut r, &mut line).await {
            Ok(false) => return n,
            Ok(true) => {}
            Err(e) => {
                tracing::warn!("cannot read the command's output: {e}");
                return n;
            }
        }
        n += 1;
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if is_err {
            tracing::warn!(target: "stderr", "{text}");
        } else {
            tracing::info!(target: "stdout", "{text}");
        }
    }
}

/// Reads one line into `line`, keeping at most [`LINE_BYTES_MAX`] bytes of it (the rest is
/// skipped); false at the end of the stream.
async fn read_line_capped(
    r: &mut (impl tokio::io::AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let mut any = false;
    let mut cut = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            if cut {
                line.extend_from_slice(" [line cut]".as_bytes());
            }
            return Ok(any);
        }
        any = true;
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let room = LINE_BYTES_MAX.saturating_sub(line.len());
        if chunk.len() > room {
            cut = true;
        }
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len();
        r.consume(used);
        if done {
            if cut {
                line.extend_from_slice(" [line cut]".as_bytes());
            }
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_checked() {
        let ok = check(&serde_json::json!({"command": ["echo", "hi"], "timeout": "2s", "retries": 2, "retry_delay": "1s"})).unwrap();
        assert_eq!(ok.steps, [["echo", "hi"]]);
        assert!(!ok.named_steps);
        assert_eq!(ok.timeout, Some(Duration::from_secs(2)));
        assert_eq!(ok.retry.retries, 2);
        let sh = check(&serde_json::json!({"command": "exit 3"})).unwrap();
        assert_eq!(sh.steps, [["sh", "-c", "exit 3"]]);
        let steps = check(&serde_json::json!({"steps": [["true"], "echo two"], "resume": false})).unwrap();
        assert_eq!(steps.steps, [vec!["true"], vec!["sh", "-c", "echo two"]]);
        assert!(steps.named_steps);
        for bad in [
            serde_json::json!({}),
            serde_json::json!({"command": []}),
            serde_json::json!({"command": [""]}),
            serde_json::json!({"command": ["x"], "timeout": "soon"}),
            serde_json::json!({"command": ["x"], "timeout": "0s"}),
            serde_json::json!({"command": ["x"], "retries": 100000}),
            serde_json::json!({"command": ["x"], "colour": "red"}),
            serde_json::json!({"command": ["x"], "env": {"A=B": "c"}}),
            serde_json::json!({"command": ["x".repeat(COMMAND_BYTES_MAX + 1)]}),
            serde_json::json!({"command": ["x"], "steps": [["y"]]}),
            serde_json::json!({"steps": [["x"], []]}),
            serde_json::json!({"steps": vec![["true"]; STEPS_MAX + 1]}),
            serde_json::json!({"command": ["x"], "resume": "no"}),
        ] {
            assert!(check(&bad).is_err(), "{bad} was accepted");
        }
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_short_ones_kept() {
        let mut data = vec![b'a'; LINE_BYTES_MAX * 3];
        data.extend_from_slice(b"\nshort\nlast");
        let mut r = BufReader::with_capacity(1024, &data[..]);
        let mut line = Vec::new();
        assert!(read_line_capped(&mut r, &mut line).await.unwrap());
        assert!(line.len() <= LINE_BYTES_MAX + 16 && line.ends_with(b"[line cut]"));
        line.clear();
        assert!(read_line_capped(&mut r, &mut line).await.unwrap());
        assert_eq!(line, b"short\n");
        line.clear();
        assert!(read_line_capped(&mut r, &mut line).await.unwrap());
        assert_eq!(line, b"last");
        line.clear();
        assert!(!read_line_capped(&mut r, &mut line).await.unwrap());
    }
}
