//! Events found with one filter, on a `flotilla node` process: a Failed run of a deployment is
//! found by its related deployment; a user's event is emitted, durable, and found by its
//! resource; `flow-run ls --deployment` names the deployment; bad filters and bad events are
//! refused with a code, and nothing is recorded.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla::{Client, StateType};
use flotilla_runtime::{CollisionStrategy, DeploymentSpec};

mod common;
use common::*;

/// Runs the CLI against the node on `port`: its stdout, or its stderr and stdout on failure.
fn cli(dir: &Path, port: u16, args: &[&str]) -> Result<String, String> {
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

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn command_deployment(name: &str, command: &str) -> DeploymentSpec {
    DeploymentSpec {
        name: name.into(),
        flow_name: "command".into(),
        parameters: serde_json::json!({ "command": command }),
        schedules: vec![],
        work_queue: None,
        tags: vec!["nightly-jobs".into()],
        concurrency_limit: None,
        collision: CollisionStrategy::Enqueue,
        paused: false,
        result_storage: None,
    }
}

async fn ended(client: &Client, id: flotilla::FlowRunId) -> StateType {
    tokio::time::timeout(Duration::from_secs(60), client.wait(id))
        .await
        .expect("the run ends in time")
        .expect("the run")
        .lifecycle
        .state
        .kind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_found_by_name_resource_and_related_and_users_emit_their_own() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    init_certs(dir, "n1");
    let port = free_udp_port();
    let mut nodes = Nodes::new(dir);
    nodes.start("n1", port, None, &[]);
    let client = connect(dir, port, 1).await;

    client
        .put_deployment(command_deployment("fails", "exit 1"))
        .await
        .expect("a deployment");
    client
        .put_deployment(command_deployment("works", "true"))
        .await
        .expect("a deployment");
    let failed = client
        .run_deployment("fails", serde_json::Value::Null)
        .await
        .expect("a run");
    let worked = client
        .run_deployment("works", serde_json::Value::Null)
        .await
        .expect("a run");
    assert_eq!(ended(&client, failed).await, StateType::Failed);
    assert_eq!(ended(&client, worked).await, StateType::Completed);

    // The Failed run is found by its related deployment, with the related resources it carries.
    let out = cli(
        dir,
        port,
        &[
            "events",
            "ls",
            "--event",
            "flotilla.flow-run.*",
            "--exclude",
            "*.Running",
            "--related",
            "deployment:flotilla.resource.name=fail*",
            "--json",
        ],
    )
    .expect("events ls");
    let events = json(&out);
    let names: Vec<&str> = events
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    assert!(names.contains(&"flotilla.flow-run.Failed"), "{names:?}");
    assert!(
        !names.contains(&"flotilla.flow-run.Running"),
        "excluded: {names:?}"
    );
    assert!(
        !names.contains(&"flotilla.flow-run.Completed"),
        "the other deployment's: {names:?}"
    );
    let failed_event = events
        .as_array()
        .and_then(|a| a.iter().find(|e| e["event"] == "flotilla.flow-run.Failed"))
        .expect("the Failed event");
    assert_eq!(
        failed_event["resource"]["flotilla.resource.id"],
        format!("flotilla.flow-run.{failed}").as_str()
    );
    let roles: Vec<&str> = failed_event["related"]
        .as_array()
        .expect("related resources")
        .iter()
        .filter_map(|r| r["flotilla.resource.role"].as_str())
        .collect();
    for role in ["deployment", "tag"] {
        assert!(roles.contains(&role), "no {role} among {roles:?}");
    }
    let out = cli(
        dir,
        port,
        &[
            "events",
            "ls",
            "--related",
            "tag:flotilla.resource.name=nightly-jobs",
            "--event",
            "*.Failed",
            "--json",
        ],
    )
    .expect("events ls by tag");
    assert_eq!(json(&out).as_array().map(Vec::len), Some(1), "{out}");

    // `flow-run ls --deployment` names the deployment.
    let out = cli(dir, port, &["flow-run", "ls", "--deployment", "fails", "--json"]).expect("flow-run ls");
    let runs = json(&out);
    assert_eq!(runs.as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(runs[0]["deployment"], "fails");
    assert_eq!(runs[0]["id"], failed.to_string().as_str());

    // A user's event: emitted (durable once answered), found by its resource, its payload kept.
    let out = cli(
        dir,
        port,
        &[
            "events",
            "emit",
            "app.heartbeat",
            "--resource",
            "flotilla.resource.id=app.pump",
            "--related",
            "site:flotilla.resource.id=site.lyon,flotilla.resource.name=Lyon",
            "--payload-json",
            r#"{"pressure": 3}"#,
            "--json",
        ],
    )
    .expect("events emit");
    let id = json(&out)["id"].as_str().expect("an id").to_owned();
    let out = cli(
        dir,
        port,
        &[
            "events",
            "ls",
            "--event",
            "app.*",
            "--resource",
            "flotilla.resource.id=app.p*",
            "--related",
            "site:flotilla.resource.name=Lyon",
            "--json",
        ],
    )
    .expect("events ls");
    let found = json(&out);
    assert_eq!(found.as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(found[0]["id"], id.as_str());
    assert_eq!(found[0]["payload"]["Data"]["pressure"], 3, "{out}");
    // Through the SDK, the same filter finds it too.
    let mut filter = flotilla_runtime::EventFilter {
        event: vec!["app.heartbeat".into()],
        ..Default::default()
    };
    filter.resource.add("flotilla.resource.id", "app.pump");
    let (page, _) = client
        .find_events(None, filter, 10, Duration::ZERO)
        .await
        .expect("find_events");
    assert_eq!(page.len(), 1);

    // Bad input is refused with a code, and records nothing.
    for (args, code) in [
        (
            vec!["events", "ls", "--related", "deployment", "--json"],
            "invalid",
        ),
        (vec!["events", "ls", "--until", "sometime", "--json"], "invalid"),
        (
            vec!["events", "emit", "app.x", "--resource", "team=data", "--json"],
            "invalid",
        ),
        (
            vec![
                "events",
                "emit",
                "app.x",
                "--resource",
                "flotilla.resource.id=a",
                "--payload-json",
                "{nope",
                "--json",
            ],
            "invalid",
        ),
    ] {
        let err = cli(dir, port, &args).expect_err("refused");
        let e = json(err.lines().find(|l| l.starts_with('{')).unwrap_or(&err));
        assert_eq!(e["error"]["code"], code, "{args:?}: {err}");
    }
    let big = format!(r#"{{"x": "{}"}}"#, "y".repeat(300 * 1024));
    let path = dir.join("big.json");
    std::fs::write(&path, big).expect("a file");
    let err = cli(
        dir,
        port,
        &[
            "events",
            "emit",
            "app.x",
            "--resource",
            "flotilla.resource.id=a",
            "--payload-json",
            &format!("@{}", path.display()),
            "--json",
        ],
    )
    .expect_err("too large");
    assert!(err.contains("payload_too_large"), "{err}");
    let out = cli(dir, port, &["events", "ls", "--event", "app.x", "--json"]).expect("events ls");
    assert_eq!(json(&out).as_array().map(Vec::len), Some(0), "{out}");
}
