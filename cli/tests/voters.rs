//! The control state replicated on three voters, each a `flotilla node` process on 127.0.0.1:
//! the leader SIGKILLed while clients write loses nothing acknowledged and a new leader takes
//! writes within seconds; a voter whose data directory was wiped is refused until it is removed
//! and added again, then catches up from the leader's store (its log purged behind a snapshot);
//! every voter restarted in turn under load loses nothing and makes no fire time of a schedule
//! run twice. Voters take a snapshot every 64 entries here, so that each of these also crosses
//! snapshots, purges and installs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{BIN, Nodes, eventually, free_udp_port, init_certs, spawn_node};
use flotilla::{Client, FlowRunId, NOOP_FLOW};

const VOTERS: &str = "n1,n2,n3";

/// Starts voter `name` on `port`, greeting the other voters' `seeds`.
fn start_voter(dir: &Path, name: &str, port: u16, seeds: &[u16]) -> Child {
    let join: Vec<String> = seeds.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    spawn_node(
        dir,
        name,
        port,
        &[
            "--voters",
            VOTERS,
            "--join",
            &join.join(","),
            "--snapshot-every",
            "64",
        ],
    )
}

/// Waits until the replica of the voter on `port` (read stale, without the leader) holds every
/// run of `ids`.
async fn replica_holds(dir: &Path, port: u16, ids: &BTreeSet<FlowRunId>) {
    let replica = Client::connect(&format!("127.0.0.1:{port}"), &dir.join("certs"))
        .await
        .expect("a client of one voter")
        .stale_reads();
    eventually(
        "the replica holds every acknowledged run",
        Duration::from_secs(30),
        || async {
            let mut held = BTreeSet::new();
            let mut after = None;
            loop {
                let page = replica
                    .flow_runs(flotilla::RunFilter::All, after, 1000)
                    .await
                    .ok()?;
                let Some(last) = page.last().map(|r| r.id) else {
                    break;
                };
                held.extend(page.iter().map(|r| r.id));
                after = Some(last);
            }
            ids.is_subset(&held).then_some(())
        },
    )
    .await;
}

/// Three voters n1-n3, each greeting the two others.
fn three_voters(dir: &Path) -> (Nodes, [u16; 3]) {
    init_certs(dir, VOTERS);
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let mut nodes = Nodes::new(dir);
    for (i, name) in ["n1", "n2", "n3"].iter().enumerate() {
        let seeds = all_but(&ports, i);
        let child = start_voter(dir, name, ports[i], &seeds);
        nodes.children.push(((*name).to_owned(), child));
    }
    (nodes, ports)
}

/// Every port but the `i`th.
fn all_but(ports: &[u16], i: usize) -> Vec<u16> {
    ports
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, p)| *p)
        .collect()
}

fn addrs(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A client given every voter's address, once a leader is named and `n` members are reachable.
async fn client(dir: &Path, ports: &[u16], n: usize) -> Client {
    let (addrs, certs) = (addrs(ports), dir.join("certs"));
    let client = eventually("a client connects", Duration::from_secs(30), || async {
        Client::connect(&addrs, &certs).await.ok()
    })
    .await;
    eventually(
        "a leader and every member reachable",
        Duration::from_secs(30),
        || async {
            let s = client.cluster_status().await.ok()?;
            let leader = s.replication.as_ref()?.leader.clone()?;
            (s.nodes.iter().filter(|m| m.reachable).count() >= n).then_some(leader)
        },
    )
    .await;
    client
}

async fn leader(client: &Client) -> String {
    eventually("a leader", Duration::from_secs(30), || async {
        client.cluster_status().await.ok()?.replication?.leader
    })
    .await
}

/// The CLI against the cluster; its output, or its error output when it failed.
fn cli(dir: &Path, ports: &[u16], args: &[&str]) -> Result<String, String> {
    let out = Command::new(BIN)
        .args(args)
        .args(["--addr", &addrs(ports)])
        .arg("--certs")
        .arg(dir.join("certs"))
        .env_remove("FLOTILLA_CONFIG")
        .output()
        .expect("the CLI runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        // `--json` prints its error on standard output.
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// Clients creating runs under keys until `stop`: each key's acknowledged run id.
fn writers(
    client: &Client,
    n: usize,
    tag: &str,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<(String, FlowRunId)>>> {
    (0..n)
        .map(|w| {
            let (client, stop, tag) = (client.clone(), stop.clone(), tag.to_owned());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut j = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("{tag}-{w}-{j}");
                    let deadline = Instant::now() + Duration::from_secs(30);
                    loop {
                        match client
                            .run_with_key(NOOP_FLOW, serde_json::Value::Null, &key)
                            .await
                        {
                            Ok(id) => {
                                acked.push((key.clone(), id));
                                break;
                            }
                            Err(e) => {
                                assert!(
                                    Instant::now() < deadline,
                                    "{key} not acknowledged within 30 s: {e}"
                                );
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                    j += 1;
                }
                acked
            })
        })
        .collect()
}

/// Every acknowledged run is there, and no key made two runs.
async fn every_acknowledged_run_is_there(client: &Client, acked: &[(String, FlowRunId)]) {
    let mut by_key: BTreeMap<&str, BTreeSet<FlowRunId>> = BTreeMap::new();
    for (key, id) in acked {
        by_key.entry(key).or_default().insert(*id);
    }
    let twice: Vec<_> = by_key.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "keys that made two runs: {twice:?}");
    for (key, id) in acked {
        let run = client.flow_run(*id).await;
        assert!(
            run.is_ok(),
            "the acknowledged run {id} ({key}) is missing: {run:?}"
        );
    }
}

/// Waits until every run of `ids` has Completed; fails naming those that have not, and their
/// states.
async fn every_run_completes(client: &Client, ids: &BTreeSet<FlowRunId>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut left = BTreeMap::new();
        for id in ids {
            match client.flow_run(*id).await {
                Ok(r) if r.lifecycle.state.kind == flotilla::StateType::Completed => {}
                Ok(r) => {
                    left.insert(*id, format!("{:?} on {:?}", r.lifecycle.state.name, r.owner));
                }
                Err(e) => {
                    left.insert(*id, e.to_string());
                }
            }
        }
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} runs not Completed within {within:?}: {left:?}",
            left.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_under_writes_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let (mut nodes, ports) = three_voters(dir);
    let client = client(dir, &ports, 3).await;
    let old = leader(&client).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tasks = writers(&client, 4, "leader-loss", &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let i = nodes
        .children
        .iter()
        .position(|(n, _)| *n == old)
        .expect("the leader is a node");
    nodes.children[i].1.kill().expect("the leader is killed");
    let killed = Instant::now();
    // A new leader, and a write it acknowledges, soon (2 s here; 10 s allowed on a loaded host).
    let others = all_but(&ports, i);
    let survivor = Client::connect(&addrs(&others), &dir.join("certs"))
        .await
        .expect("a client of the others");
    let new = eventually(
        "a write acknowledged by a new leader",
        Duration::from_secs(10),
        || async {
            let s = survivor.cluster_status().await.ok()?;
            let l = s.replication?.leader.filter(|l| *l != old)?;
            survivor.run(NOOP_FLOW, serde_json::Value::Null).await.ok()?;
            Some(l)
        },
    )
    .await;
    let failover = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("a writer"));
    }
    assert!(acked.len() >= 20, "only {} writes acknowledged", acked.len());
    every_acknowledged_run_is_there(&survivor, &acked).await;
    // Each runs to its end: those the dead leader held resume elsewhere, and none made around
    // the change of leader is left waiting unplaced.
    let ids: BTreeSet<FlowRunId> = acked.iter().map(|(_, id)| *id).collect();
    every_run_completes(&survivor, &ids, Duration::from_secs(60)).await;
    // The new leader lists the dead one unreachable (it never heard from it), declares it
    // dead once it stays silent, and then it can be removed.
    eventually(
        "the dead leader listed unreachable",
        Duration::from_secs(20),
        || async {
            let s = survivor.cluster_status().await.ok()?;
            s.nodes
                .iter()
                .any(|m| m.name.to_string() == old && !m.reachable)
                .then_some(())
        },
    )
    .await;
    eventually(
        "the dead leader declared dead and removed",
        Duration::from_secs(20),
        || async { cli(dir, &others, &["cluster", "remove-node", &old]).ok() },
    )
    .await;
    let s = survivor.cluster_status().await.expect("status");
    assert!(
        s.nodes.iter().all(|m| m.name.to_string() != old),
        "the removed leader is still listed"
    );
    eprintln!(
        "{new} leads {failover:?} after {old} was killed; {} writes acknowledged",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_voter_is_refused_until_removed_and_added_again() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let (mut nodes, ports) = three_voters(dir);
    let client = client(dir, &ports, 3).await;
    let mut ids = BTreeSet::new();
    for k in 0..60 {
        ids.insert(
            client
                .run_with_key(NOOP_FLOW, serde_json::Value::Null, &format!("before-{k}"))
                .await
                .expect("a run"),
        );
    }
    // A voter that is not the leader loses its data directory.
    let l = leader(&client).await;
    let i = nodes
        .children
        .iter()
        .position(|(n, _)| *n != l)
        .expect("a follower");
    let name = nodes.children[i].0.clone();
    nodes.children[i].1.kill().expect("the voter is killed");
    let _ = nodes.children[i].1.wait();
    std::fs::remove_dir_all(dir.join(&name)).expect("its data directory removed");
    let seeds = all_but(&ports, i);

    // Back, it is refused with a clear error, and exits.
    let mut back = start_voter(dir, &name, ports[i], &seeds);
    let status = eventually("the wiped voter exits", Duration::from_secs(30), || {
        let s = back.try_wait().expect("its status");
        async move { s }
    })
    .await;
    assert!(!status.success(), "a wiped voter must not start");
    let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).expect("its log");
    assert!(
        log.contains("its data directory was wiped"),
        "the refusal names the cause: {log}"
    );

    // Removed, it starts (holding no vote); added again, it catches up.
    let removed = cli(dir, &ports, &["cluster", "remove-voter", &name, "--json"]).expect("remove-voter");
    assert!(
        !removed.contains(&format!("\"{name}\"")),
        "{name} is no longer a voter: {removed}"
    );
    nodes.restart(i, || start_voter(dir, &name, ports[i], &seeds));
    eventually("the voter added again", Duration::from_secs(30), || async {
        cli(dir, &ports, &["cluster", "add-voter", &name]).ok()
    })
    .await;
    eventually("the voter caught up", Duration::from_secs(30), || async {
        let s = client.cluster_status().await.ok()?;
        let r = s.replication?;
        let me = r.members.iter().find(|m| m.name == name)?;
        (me.voter && me.applied.is_some() && me.applied >= r.last_index.map(|x| x.saturating_sub(2)))
            .then_some(())
    })
    .await;
    // The voter added again may still be settling its links to the others for a moment, and
    // answer `unavailable` when asked first.
    let json = eventually("cluster status --json", Duration::from_secs(30), || async {
        cli(dir, &ports, &["cluster", "status", "--json"]).ok()
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&json).expect("status JSON");
    let node = v["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["name"] == name.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(node["voter"], true, "{json}");
    assert!(
        v["leader"].is_string() && v["term"].as_u64().is_some_and(|t| t >= 1),
        "{json}"
    );
    // The leader's log was purged behind a snapshot long before: the voter added again was
    // sent the leader's store, and its own replica holds every run.
    assert!(v["log_purged"].as_u64().is_some_and(|p| p > 0), "{json}");
    replica_holds(dir, ports[i], &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_restarted_one_by_one_under_load_lose_nothing_and_fire_each_time_once() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let (mut nodes, ports) = three_voters(dir);
    let client = client(dir, &ports, 3).await;
    cli(
        dir,
        &ports,
        &[
            "deployment",
            "create",
            "tick",
            "--flow",
            "noop",
            "--interval",
            "1s",
        ],
    )
    .expect("a deployment");

    let stop = Arc::new(AtomicBool::new(false));
    let tasks = writers(&client, 4, "rolling", &stop);
    let written = |client: Client| async move {
        client
            .flow_runs(flotilla::RunFilter::All, None, 1000)
            .await
            .map(|r| r.len())
            .unwrap_or(0)
    };
    for i in 0..3 {
        let name = nodes.children[i].0.clone();
        let terminated = Command::new("kill")
            .args(["-TERM", &nodes.children[i].1.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(terminated.success());
        let _ = nodes.children[i].1.wait();
        let seeds = all_but(&ports, i);
        nodes.restart(i, || start_voter(dir, &name, ports[i], &seeds));
        // Back, and caught up with what was written meanwhile, before the next goes.
        let before = written(client.clone()).await;
        eventually("more runs written", Duration::from_secs(30), || async {
            (written(client.clone()).await >= before + 20).then_some(())
        })
        .await;
        let target = eventually("the leader's log", Duration::from_secs(30), || async {
            client.cluster_status().await.ok()?.replication?.last_index
        })
        .await;
        eventually(
            "the restarted voter caught up",
            Duration::from_secs(30),
            || async {
                let r = client.cluster_status().await.ok()?.replication?;
                let me = r.members.iter().find(|m| m.name == name)?;
                me.applied.is_some_and(|a| a >= target).then_some(())
            },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("a writer"));
    }
    assert!(acked.len() >= 20, "only {} writes acknowledged", acked.len());
    every_acknowledged_run_is_there(&client, &acked).await;
    // Each voter's own replica (stale reads, answered without the leader) holds them all too.
    let ids: BTreeSet<FlowRunId> = acked.iter().map(|(_, id)| *id).collect();
    for port in ports {
        replica_holds(dir, port, &ids).await;
    }

    // No fire time of the schedule made two runs.
    let mut fired: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut after = None;
    loop {
        let page = client
            .flow_runs(flotilla::RunFilter::All, after, 1000)
            .await
            .expect("a page of flow runs");
        let Some(last) = page.last().map(|r| r.id) else {
            break;
        };
        for r in &page {
            if let Some(d) = r.deployment_id {
                *fired
                    .entry((d.to_string(), r.expected_start_time.to_string()))
                    .or_default() += 1;
            }
        }
        after = Some(last);
    }
    assert!(!fired.is_empty(), "the schedule made runs");
    let twice: Vec<_> = fired.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "fire times with two runs: {twice:?}");
}

/// Waits until automation `name` has fired `n` times, every action reported.
async fn automation_fired(dir: &Path, ports: &[u16], name: &str, n: u64) {
    eventually(
        &format!("{name} fired {n} times"),
        Duration::from_secs(30),
        || async {
            let out = cli(dir, ports, &["automation", "inspect", name, "--json"]).ok()?;
            let a: serde_json::Value = serde_json::from_str(&out).ok()?;
            let done = a["recent"].as_array()?.iter().all(|r| r["done"] == true);
            (a["firings"].as_u64()? >= n && done).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automation_fires_once_across_a_leader_kill() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path();
    let (mut nodes, ports) = three_voters(dir);
    let client = client(dir, &ports, 3).await;
    let spec = flotilla_runtime::DeploymentSpec {
        name: "on-ping".into(),
        flow_name: "command".into(),
        parameters: serde_json::json!({ "command": "true" }),
        schedules: vec![],
        work_queue: None,
        tags: vec![],
        concurrency_limit: None,
        collision: flotilla_runtime::CollisionStrategy::Enqueue,
        paused: false,
        result_storage: None,
    };
    client.put_deployment(spec).await.expect("a deployment");
    let file = dir.join("auto.toml");
    std::fs::write(
        &file,
        r#"
[[automation]]
name = "ping"
trigger = { type = "event", expect = ["app.ping"] }
actions = [{ type = "run-deployment", deployment = "on-ping" }]

[[automation]]
name = "barrier"
trigger = { type = "event", expect = ["test.barrier"] }
actions = [{ type = "do-nothing" }]
"#,
    )
    .expect("a file");
    cli(
        dir,
        &ports,
        &["automation", "create", "-f", file.to_str().expect("utf-8")],
    )
    .expect("created");
    let emit = |c: &Client, name: &'static str| {
        let c = c.clone();
        async move {
            c.emit_event(
                name,
                flotilla_runtime::Resource::new("app", None),
                vec![],
                serde_json::Value::Null,
            )
            .await
        }
    };
    emit(&client, "app.ping").await.expect("emit");
    automation_fired(dir, &ports, "ping", 1).await;

    // The leader dies; the next one replays the recent events and repeats nothing.
    let old = leader(&client).await;
    let i = nodes
        .children
        .iter()
        .position(|(n, _)| *n == old)
        .expect("the leader is a node");
    nodes.children[i].1.kill().expect("the leader is killed");
    let others = all_but(&ports, i);
    let survivor = Client::connect(&addrs(&others), &dir.join("certs"))
        .await
        .expect("a client of the others");
    eventually(
        "a ping accepted by a new leader",
        Duration::from_secs(10),
        || async {
            let s = survivor.cluster_status().await.ok()?;
            s.replication?.leader.filter(|l| *l != old)?;
            emit(&survivor, "app.ping").await.ok()
        },
    )
    .await;
    automation_fired(dir, &others, "ping", 2).await;
    emit(&survivor, "test.barrier").await.expect("emit");
    automation_fired(dir, &others, "barrier", 1).await;
    let out = cli(dir, &others, &["automation", "inspect", "ping", "--json"]).expect("inspect");
    let a: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(a["firings"], 2, "{a}");
    let runs: BTreeSet<FlowRunId> = survivor
        .flow_runs(flotilla::RunFilter::All, None, 1000)
        .await
        .expect("runs")
        .iter()
        .filter(|r| r.deployment_name.as_deref() == Some("on-ping"))
        .map(|r| r.id)
        .collect();
    assert_eq!(runs.len(), 2, "one run of on-ping per ping");
    // Both run to their end, the one the new leader placed included.
    every_run_completes(&survivor, &runs, Duration::from_secs(30)).await;
}
