//! Automations and blocks on `flotilla node` processes, driven through the CLI: a Failed run
//! starts a deployment; compound and sequence triggers; a proactive trigger fires after silence
//! and not before; a webhook arrives signed; a bad file is refused whole; a firing across a
//! SIGKILL of the control node happens exactly once; a secret reaches a command's environment and
//! is written nowhere in plain text.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::Duration;

use flotilla::{Client, StateType};
use flotilla_runtime::{CollisionStrategy, DeploymentSpec};
use hmac::Mac;

mod common;
use common::*;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn deployment(name: &str, command: &str) -> DeploymentSpec {
    DeploymentSpec {
        name: name.into(),
        flow_name: "command".into(),
        parameters: serde_json::json!({ "command": command }),
        schedules: vec![],
        work_queue: None,
        tags: vec![],
        concurrency_limit: None,
        collision: CollisionStrategy::Enqueue,
        paused: false,
        result_storage: None,
    }
}

async fn runs_of(client: &Client, deployment: &str) -> usize {
    client
        .flow_runs(flotilla::RunFilter::All, None, 1000)
        .await
        .expect("flow runs")
        .iter()
        .filter(|r| r.deployment_name.as_deref() == Some(deployment))
        .count()
}

/// Waits until automation `name` has fired `n` times with every action reported.
async fn fired(dir: &Path, port: u16, name: &str, n: u64) -> serde_json::Value {
    eventually(
        &format!("{name} fired {n} times"),
        Duration::from_secs(20),
        || async {
            let a = json(&run_cli(dir, port, &["automation", "inspect", name, "--json"]).ok()?);
            let done = a["recent"].as_array()?.iter().all(|r| r["done"] == true);
            (a["firings"].as_u64()? >= n && done).then_some(a)
        },
    )
    .await
}

/// A one-request HTTP server: the signature header and the body it received.
fn webhook_server() -> (u16, std::sync::mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        let (mut signature, mut length) = (String::new(), 0usize);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("x-flotilla-signature:") {
                signature = line["x-flotilla-signature:".len()..].trim().to_owned();
            }
        }
        let mut body = vec![0; length];
        let _ = reader.read_exact(&mut body);
        let _ = reader
            .get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        let _ = tx.send((signature, body));
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automations_act_on_events_once_across_a_restart_of_the_control_node() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1");
    let port = free_udp_port();
    let mut nodes = Nodes::new(dir);
    nodes.start("n1", port, None, &[]);
    let client = connect(dir, port, 1).await;
    for (name, command) in [
        ("fails", "exit 1"),
        ("on-fail", "true"),
        ("on-both", "true"),
        ("on-silence", "true"),
    ] {
        client
            .put_deployment(deployment(name, command))
            .await
            .expect("a deployment");
    }
    let (hook_port, hooks) = webhook_server();
    run_cli(
        dir,
        port,
        &[
            "block",
            "create",
            "webhook",
            "ops",
            "--field",
            &format!("url=http://127.0.0.1:{hook_port}/h"),
            "--field",
            "secret=sign-it",
        ],
    )
    .expect("a webhook block");

    // A bad file is refused whole, naming the automation, the key and the reason.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[[automation]]
name = "fine"
trigger = { type = "event", expect = ["x"] }
actions = [{ type = "do-nothing" }]

[[automation]]
name = "nowhere"
trigger = { type = "event", expect = ["y"] }
actions = [{ type = "run-deployment", deployment = "no-such-deployment" }]
"#,
    )
    .expect("a file");
    let err = run_cli(
        dir,
        port,
        &["automation", "create", "-f", bad.to_str().expect("utf-8")],
    )
    .expect_err("refused");
    assert!(
        err.contains("nowhere") && err.contains("no-such-deployment"),
        "{err}"
    );
    let all = json(&run_cli(dir, port, &["automation", "ls", "--json"]).expect("ls"));
    assert_eq!(all.as_array().map(Vec::len), Some(0), "nothing created: {all}");

    let file = dir.join("auto.toml");
    std::fs::write(
        &file,
        r#"
[[automation]]
name = "recover"
trigger = { type = "event", posture = "reactive", expect = ["flotilla.flow-run.Failed"], match_related = { "flotilla.resource.role" = "deployment", "flotilla.resource.name" = "fails" }, threshold = 1, within = "0s" }
actions = [{ type = "run-deployment", deployment = "on-fail", parameters = { command = "test {{ event.event }} = flotilla.flow-run.Failed" } }]

[[automation]]
name = "both"
trigger = { type = "compound", require = "all", within = "1m", triggers = [{ type = "event", expect = ["app.one"] }, { type = "event", expect = ["app.two"] }] }
actions = [{ type = "run-deployment", deployment = "on-both" }]

[[automation]]
name = "in-order"
trigger = { type = "sequence", within = "1m", triggers = [{ type = "event", expect = ["seq.first"] }, { type = "event", expect = ["seq.second"] }] }
actions = [{ type = "send-webhook", block = "ops", body = '{"what": "{{ event.event }}", "who": "{{ event.resource["flotilla.resource.id"] }}"}' }]

[[automation]]
name = "barrier"
trigger = { type = "event", expect = ["test.barrier"] }
actions = [{ type = "do-nothing" }]
"#,
    )
    .expect("a file");
    let out = json(
        &run_cli(
            dir,
            port,
            &[
                "automation",
                "create",
                "-f",
                file.to_str().expect("utf-8"),
                "--json",
            ],
        )
        .expect("created"),
    );
    assert_eq!(out["created"], 4, "{out}");

    // Reactive: a Failed run of `fails` starts `on-fail`, its parameters templated.
    let failed = client
        .run_deployment("fails", serde_json::Value::Null)
        .await
        .expect("a run");
    let a = fired(dir, port, "recover", 1).await;
    assert_eq!(a["recent"][0]["outcomes"][0]["ok"], true, "{a}");
    let on_fail = eventually("a run of on-fail", Duration::from_secs(20), || async {
        client
            .flow_runs(flotilla::RunFilter::All, None, 1000)
            .await
            .ok()?
            .into_iter()
            .find(|r| r.deployment_name.as_deref() == Some("on-fail"))
    })
    .await;
    let ended = tokio::time::timeout(Duration::from_secs(30), client.wait(on_fail.id))
        .await
        .expect("in time")
        .expect("ends");
    assert_eq!(
        ended.lifecycle.state.kind,
        StateType::Completed,
        "its templated command ran"
    );
    assert_ne!(on_fail.id, failed);

    // Compound: both events, in either order, within the window.
    for e in ["app.two", "app.one"] {
        run_cli(
            dir,
            port,
            &["events", "emit", e, "--resource", "flotilla.resource.id=app.x"],
        )
        .expect("emit");
    }
    fired(dir, port, "both", 1).await;
    // Sequence: second before first does not fire; first then second does, and posts the
    // webhook, signed.
    for e in ["seq.second", "seq.first", "seq.second"] {
        run_cli(
            dir,
            port,
            &["events", "emit", e, "--resource", "flotilla.resource.id=app.seq"],
        )
        .expect("emit");
    }
    fired(dir, port, "in-order", 1).await;
    let (signature, body) = hooks.recv_timeout(Duration::from_secs(20)).expect("a webhook");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"sign-it").expect("a key");
    mac.update(&body);
    assert_eq!(
        signature,
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    );
    let sent = json(std::str::from_utf8(&body).expect("utf-8"));
    assert_eq!(sent, serde_json::json!({"what": "seq.second", "who": "app.seq"}));
    run_cli(
        dir,
        port,
        &[
            "events",
            "emit",
            "test.barrier",
            "--resource",
            "flotilla.resource.id=t",
        ],
    )
    .expect("emit");
    fired(dir, port, "barrier", 1).await;
    let seq = json(&run_cli(dir, port, &["automation", "inspect", "in-order", "--json"]).expect("inspect"));
    assert_eq!(seq["firings"], 1, "second-before-first did not fire: {seq}");

    // SIGKILL the control node; it comes back with its automations, and one more Failed run
    // fires once: the firing before the kill is not repeated by the replay.
    nodes.restart(0, || start_node(dir, "n1", port, None, &[]));
    let client = connect(dir, port, 1).await;
    let names = json(&run_cli(dir, port, &["automation", "ls", "--json"]).expect("ls"));
    let mut names: Vec<&str> = names
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["barrier", "both", "in-order", "recover"]);
    client
        .run_deployment("fails", serde_json::Value::Null)
        .await
        .expect("a run");
    fired(dir, port, "recover", 2).await;
    // Every event before the barrier's has been evaluated once its firing is recorded.
    run_cli(
        dir,
        port,
        &[
            "events",
            "emit",
            "test.barrier",
            "--resource",
            "flotilla.resource.id=t",
        ],
    )
    .expect("emit");
    fired(dir, port, "barrier", 2).await;
    let recover =
        json(&run_cli(dir, port, &["automation", "inspect", "recover", "--json"]).expect("inspect"));
    assert_eq!(recover["firings"], 2, "{recover}");
    assert_eq!(runs_of(&client, "on-fail").await, 2);
    let both = json(&run_cli(dir, port, &["automation", "inspect", "both", "--json"]).expect("inspect"));
    assert_eq!(both["firings"], 1, "{both}");
    assert_eq!(runs_of(&client, "on-both").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proactive_trigger_fires_after_silence_and_not_before() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1");
    let port = free_udp_port();
    let mut nodes = Nodes::new(dir);
    nodes.start("n1", port, None, &[]);
    let client = connect(dir, port, 1).await;
    client
        .put_deployment(deployment("on-silence", "true"))
        .await
        .expect("a deployment");
    let file = dir.join("silence.toml");
    std::fs::write(
        &file,
        r#"
[[automation]]
name = "silence"
trigger = { type = "event", posture = "proactive", expect = ["app.heartbeat"], threshold = 1, within = "1s" }
actions = [{ type = "run-deployment", deployment = "on-silence" }, { type = "pause-automation" }]
"#,
    )
    .expect("a file");
    run_cli(
        dir,
        port,
        &["automation", "create", "-f", file.to_str().expect("utf-8")],
    )
    .expect("created");
    // Heartbeats every 300 ms for 2.4 s: no firing.
    let mut interval = tokio::time::interval(Duration::from_millis(300));
    let mut last = std::time::Instant::now();
    for _ in 0..8 {
        interval.tick().await;
        last = std::time::Instant::now();
        client
            .emit_event(
                "app.heartbeat",
                flotilla_runtime::Resource::new("app.pump", None),
                vec![],
                serde_json::Value::Null,
            )
            .await
            .expect("emit");
    }
    let a = json(&run_cli(dir, port, &["automation", "inspect", "silence", "--json"]).expect("inspect"));
    assert_eq!(a["firings"], 0, "fired while heartbeats came: {a}");
    // Then silence: it fires, a window after the last heartbeat, and pauses itself.
    let a = fired(dir, port, "silence", 1).await;
    assert!(
        last.elapsed() >= Duration::from_millis(950),
        "fired {:?} after the last heartbeat",
        last.elapsed()
    );
    assert_eq!(a["paused"], true, "{a}");
    assert_eq!(a["recent"][0]["outcomes"][1]["action"], "pause-automation", "{a}");
    assert_eq!(runs_of(&client, "on-silence").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reaches_a_command_and_is_written_nowhere() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1,n2");
    let (port, port2) = (free_udp_port(), free_udp_port());
    let mut nodes = Nodes::new(dir);
    nodes.start("n1", port, None, &[]);
    nodes.start("n2", port2, Some(port), &[]);
    let client = connect(dir, port, 2).await;
    let secret = format!("s3cr3t-{}-value", std::process::id());
    let mut outputs = String::new();
    outputs += &run_cli(
        dir,
        port,
        &[
            "block",
            "create",
            "secret",
            "api-token",
            "--field",
            &format!("value={secret}"),
            "--json",
        ],
    )
    .expect("a block");
    outputs += &run_cli(
        dir,
        port,
        &[
            "block",
            "create",
            "env",
            "prod",
            "--field",
            "REGION=eu-west-1",
            "--field",
            &format!("TOKEN={secret}"),
        ],
    )
    .expect("a block");
    outputs += &run_cli(dir, port, &["block", "ls", "--json"]).expect("ls");
    let shown = run_cli(dir, port, &["block", "inspect", "secret/api-token", "--json"]).expect("inspect");
    assert_eq!(json(&shown)["fields"]["value"], "********");
    outputs += &shown;
    outputs += &run_cli(dir, port, &["block", "inspect", "env/prod"]).expect("inspect");
    // Unknown and missing fields are refused, naming them.
    let err = run_cli(
        dir,
        port,
        &["block", "create", "secret", "x", "--field", "valu=1"],
    )
    .expect_err("refused");
    assert!(err.contains("valu"), "{err}");
    let err =
        run_cli(dir, port, &["block", "create", "s3", "x", "--field", "bucket=b"]).expect_err("refused");
    assert!(err.contains("access_key_id"), "{err}");
    outputs += &err;
    let types = json(&run_cli(dir, port, &["block", "types", "--json"]).expect("types"));
    assert_eq!(types.as_array().map(Vec::len), Some(5));

    // Runs on each node get the secret in their environment (checked by its hash).
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(secret.as_bytes()));
    for _ in 0..2 {
        let params = serde_json::json!({
            "command": ["sh", "-c", format!("test \"$(printf %s \"$API_TOKEN\" | sha256sum | cut -c1-64)\" = {digest} && test \"$TOKEN\" = \"$API_TOKEN\" && test \"$REGION\" = eu-west-1")],
            "env_from_blocks": ["secret/api-token:API_TOKEN", "env/prod"],
        });
        let id = client.run("command", params).await.expect("a run");
        completed(&client, id).await;
    }
    // A placeholder in the parameters is resolved on the worker, for the run, and stored as
    // written.
    let params = serde_json::json!({
        "command": ["sh", "-c", format!("test \"$(printf %s \"$T\" | sha256sum | cut -c1-64)\" = {digest}")],
        "env": { "T": "{{ flotilla.blocks.secret.api-token }}" },
    });
    let id = client.run("command", params).await.expect("a run");
    let run = completed(&client, id).await;
    assert_eq!(
        run.parameters["env"]["T"],
        "{{ flotilla.blocks.secret.api-token }}"
    );
    // A block that does not exist fails the run, naming it.
    let id = client
        .run(
            "command",
            serde_json::json!({"command": "true", "env_from_blocks": ["secret/nope:X"]}),
        )
        .await
        .expect("a run");
    let run = tokio::time::timeout(Duration::from_secs(30), client.wait(id))
        .await
        .expect("in time")
        .expect("ends");
    assert_eq!(run.lifecycle.state.kind, StateType::Failed);
    assert!(
        run.lifecycle
            .state
            .message
            .as_deref()
            .unwrap_or("")
            .contains("secret/nope"),
        "{:?}",
        run.lifecycle.state
    );
    outputs += &run_cli(dir, port, &["events", "ls", "--json", "--limit", "1000"]).expect("events");

    assert!(!outputs.contains(&secret), "the secret appears in CLI output");
    drop(nodes);
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret appears in plain text in {}",
            entry.display()
        );
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
