//! Three voters over real stores on 127.0.0.1: commands submitted to the leader's persistence
//! actor are committed, applied by every replica to its store, and answered with the rules'
//! reply; a follower refuses them naming the leader; when the leader stops, the others elect
//! one and every acknowledged run is there; a voter started again from its data directory
//! comes back with its store and catches up; a voter so far behind that the entries it lacks
//! were purged is sent the leader's store (a snapshot) and installs it.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_cluster::certs;
use flotilla_runtime::{Command, FlowRunId, NewFlowRun, Reply, Timestamp};
use openraft::async_runtime::WatchReceiver as _;
use rand::SeedableRng;

use super::Member;
use super::local::{StoreVoter, start_store_voter};
use super::voter::{Snapshots, node_id};
use crate::persistence::{PersistError, RunFilter};

const WAIT: Duration = Duration::from_secs(20);

async fn leader(voters: &BTreeMap<String, StoreVoter>) -> String {
    let any = voters.values().next().unwrap();
    let m = any
        .voter
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| {
                m.current_leader
                    .is_some_and(|l| voters.keys().any(|n| node_id(n) == l))
            },
            "a live leader",
        )
        .await
        .unwrap();
    let id = m.current_leader.unwrap();
    voters.keys().find(|n| node_id(n) == id).unwrap().clone()
}

fn create(id: FlowRunId) -> Command {
    Command::CreateFlowRun(NewFlowRun::new(id, "replicated", serde_json::Value::Null))
}

/// Creates a run through the leader, finding it again while leadership moves (bounded).
async fn create_through_leader(voters: &BTreeMap<String, StoreVoter>, id: FlowRunId) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let l = leader(voters).await;
        match voters[&l].persistence.submit(create(id)).await {
            Ok(Ok(Reply::FlowRunCreated { .. })) => return,
            other if tokio::time::Instant::now() < deadline => {
                tracing::info!(?other, "creating again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("run {id} not created within {WAIT:?}: {other:?}"),
        }
    }
}

async fn applied_everywhere(voters: &BTreeMap<String, StoreVoter>) {
    let l = leader(voters).await;
    let last = voters[&l].voter.raft.metrics().borrow_watched().last_log_index;
    for v in voters.values() {
        v.voter
            .raft
            .wait(Some(WAIT))
            .applied_index_at_least(last, "every voter applies what was written")
            .await
            .unwrap();
    }
}

async fn runs(v: &StoreVoter) -> Vec<FlowRunId> {
    let mut ids: Vec<FlowRunId> = v
        .persistence
        .flow_runs(RunFilter::All, None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    ids.sort();
    ids
}

/// Three voters n1-n3 over stores in `dir`, formed.
async fn three_voters(dir: &std::path::Path) -> ([String; 3], BTreeMap<String, StoreVoter>) {
    three_voters_with(dir, Snapshots::default()).await
}

/// Three voters n1-n3 over stores in `dir`, formed, taking snapshots as `snapshots` says.
async fn three_voters_with(
    dir: &std::path::Path,
    snapshots: Snapshots,
) -> ([String; 3], BTreeMap<String, StoreVoter>) {
    let names = ["n1", "n2", "n3"].map(String::from);
    certs::init(&dir.join("certs"), &names, &[]).unwrap();
    let mut voters = BTreeMap::new();
    for name in &names {
        voters.insert(
            name.clone(),
            start_store_voter(dir, &dir.join("certs"), name, snapshots)
                .await
                .unwrap(),
        );
    }
    let members: BTreeMap<u64, Member> = voters
        .values()
        .map(|v| (node_id(&v.member.name), v.member.clone()))
        .collect();
    voters["n1"].voter.raft.initialize(members).await.unwrap();
    (names, voters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_apply_the_same_commands_and_survive_their_leader() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut voters) = three_voters(tmp.path()).await;

    let mut rng = rand::rngs::SmallRng::seed_from_u64(16);
    let mut acknowledged = Vec::new();
    for _ in 0..100 {
        let id = FlowRunId::new(Timestamp::from(chrono::Utc::now()), &mut rng);
        create_through_leader(&voters, id).await;
        acknowledged.push(id);
    }
    acknowledged.sort();
    applied_everywhere(&voters).await;
    for v in voters.values() {
        assert_eq!(runs(v).await, acknowledged, "{} holds every run", v.member.name);
    }

    // A follower's persistence refuses commands, naming the leader.
    let l = leader(&voters).await;
    let follower = voters.keys().find(|n| **n != l).unwrap().clone();
    let id = FlowRunId::new(Timestamp::from(chrono::Utc::now()), &mut rng);
    match voters[&follower].persistence.submit(create(id)).await {
        Err(PersistError::NotLeader { leader }) => assert_eq!(leader.as_deref(), Some(l.as_str())),
        other => panic!("a follower answered {other:?}"),
    }

    // The leader stops: the other two elect one of themselves; nothing acknowledged is lost.
    let old = voters.remove(&l).unwrap();
    old.stop().await;
    for _ in 0..20 {
        let id = FlowRunId::new(Timestamp::from(chrono::Utc::now()), &mut rng);
        create_through_leader(&voters, id).await;
        acknowledged.push(id);
    }
    acknowledged.sort();
    applied_everywhere(&voters).await;
    for v in voters.values() {
        assert_eq!(runs(v).await, acknowledged, "{} holds every run", v.member.name);
    }

    // The old leader, started again from its data directory, catches up.
    restart(tmp.path(), &mut voters, &l, Snapshots::default()).await;
    let id = FlowRunId::new(Timestamp::from(chrono::Utc::now()), &mut rng);
    create_through_leader(&voters, id).await;
    acknowledged.push(id);
    acknowledged.sort();
    applied_everywhere(&voters).await;
    assert_eq!(
        runs(&voters[&l]).await,
        acknowledged,
        "the voter started again caught up"
    );
    for (_, v) in voters {
        v.stop().await;
    }
}

/// Starts the voter `name` again from its data directory in `dir`; it listens elsewhere now,
/// so the others learn where (as greetings would tell them) and it learns where they are.
async fn restart(
    dir: &std::path::Path,
    voters: &mut BTreeMap<String, StoreVoter>,
    name: &str,
    snapshots: Snapshots,
) {
    let back = start_store_voter(dir, &dir.join("certs"), name, snapshots)
        .await
        .unwrap();
    for v in voters.values() {
        v.voter.peers.book.put(&back.member.name, &back.member.addr);
        back.voter.peers.book.put(&v.member.name, &v.member.addr);
    }
    voters.insert(name.to_owned(), back);
}

async fn create_many(
    voters: &BTreeMap<String, StoreVoter>,
    n: usize,
    rng: &mut rand::rngs::SmallRng,
    into: &mut Vec<FlowRunId>,
) {
    for _ in 0..n {
        let id = FlowRunId::new(Timestamp::from(chrono::Utc::now()), rng);
        create_through_leader(voters, id).await;
        into.push(id);
    }
    into.sort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_behind_the_purged_log_installs_the_leaders_store() {
    let tmp = tempfile::tempdir().unwrap();
    let snapshots = Snapshots { every: 40, keep: 10 };
    let (_, mut voters) = three_voters_with(tmp.path(), snapshots).await;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(18);
    let mut acknowledged = Vec::new();
    create_many(&voters, 20, &mut rng, &mut acknowledged).await;
    applied_everywhere(&voters).await;

    // A follower stops; the two others go on far past what it holds, and purge their logs.
    let l = leader(&voters).await;
    let behind = voters.keys().find(|n| **n != l).unwrap().clone();
    let stopped = voters.remove(&behind).unwrap();
    let held = stopped.voter.raft.metrics().borrow_watched().last_applied;
    stopped.stop().await;
    create_many(&voters, 300, &mut rng, &mut acknowledged).await;
    let purged = voters[&leader(&voters).await]
        .voter
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.purged > held,
            "the leader purges past what the stopped voter holds",
        )
        .await
        .unwrap()
        .purged;

    // Started again, it is sent the leader's store, installs it and holds every run.
    restart(tmp.path(), &mut voters, &behind, snapshots).await;
    create_many(&voters, 1, &mut rng, &mut acknowledged).await;
    applied_everywhere(&voters).await;
    let m = voters[&behind].voter.raft.metrics().borrow_watched().clone();
    assert!(
        m.snapshot.is_some_and(|s| Some(s) >= purged),
        "{behind} installed a snapshot past the purge ({purged:?}): {:?}",
        m.snapshot
    );
    assert_eq!(
        runs(&voters[&behind]).await,
        acknowledged,
        "{behind} holds every run"
    );

    // Every voter, started again from its data directory (a store installed, logs purged),
    // comes back with everything.
    for name in voters.keys().cloned().collect::<Vec<_>>() {
        voters.remove(&name).unwrap().stop().await;
        restart(tmp.path(), &mut voters, &name, snapshots).await;
    }
    create_many(&voters, 1, &mut rng, &mut acknowledged).await;
    applied_everywhere(&voters).await;
    for v in voters.values() {
        assert_eq!(runs(v).await, acknowledged, "{} holds every run", v.member.name);
    }
    for (_, v) in voters {
        v.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_refuses_writes_and_the_majority_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (names, mut voters) = three_voters(tmp.path()).await;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(17);
    let mut acknowledged = Vec::new();
    for _ in 0..30 {
        let id = FlowRunId::new(Timestamp::from(chrono::Utc::now()), &mut rng);
        create_through_leader(&voters, id).await;
        acknowledged.push(id);
    }

    // The leader is cut off from the two others, both ways.
    let old = leader(&voters).await;
    for (name, v) in &voters {
        for other in &names {
            if (*name == old) != (*other == old) {
                v.voter.peers.book.cut(other, true);
            }
        }
    }
    // The minority refuses writes (once its lease ran out), and never acknowledges one.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let id = FlowRunId::new(Timestamp::from(chrono::Utc::now()), &mut rng);
        let answer = tokio::time::timeout(
            Duration::from_secs(3),
            voters[&old].persistence.submit(create(id)),
        )
        .await;
        match answer {
            Ok(Err(PersistError::NotLeader { .. })) => break,
            Ok(Ok(reply)) => panic!("the cut-off leader acknowledged a write: {reply:?}"),
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "the cut-off leader did not refuse writes within {WAIT:?}"
            ),
        }
    }
    // The majority elects a leader and goes on.
    let cut_off = voters.remove(&old).unwrap();
    for _ in 0..30 {
        let id = FlowRunId::new(Timestamp::from(chrono::Utc::now()), &mut rng);
        create_through_leader(&voters, id).await;
        acknowledged.push(id);
    }
    // Healed: the old leader takes the new leader's log; every replica holds exactly what was
    // acknowledged (nothing the minority was sent while cut off).
    voters.insert(old.clone(), cut_off);
    for v in voters.values() {
        for other in &names {
            v.voter.peers.book.cut(other, false);
        }
    }
    let id = FlowRunId::new(Timestamp::from(chrono::Utc::now()), &mut rng);
    create_through_leader(&voters, id).await;
    acknowledged.push(id);
    acknowledged.sort();
    applied_everywhere(&voters).await;
    for v in voters.values() {
        assert_eq!(
            runs(v).await,
            acknowledged,
            "{} holds what was acknowledged",
            v.member.name
        );
    }
    for (_, v) in voters {
        v.stop().await;
    }
}
