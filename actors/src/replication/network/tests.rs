//! Three voters on 127.0.0.1, each with its own QUIC endpoint, certificate and log on disk:
//! they elect a leader, replicate commands, go on without the leader once it stops, and bring
//! it back up to date with a snapshot once the log it missed is purged.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_cluster::certs;
use flotilla_runtime::{Command, Timestamp};

use super::*;
use crate::replication::Logged;
use crate::replication::local::{LocalVoter, config, start_voter};

const WAIT: Duration = Duration::from_secs(20);

type Voter = LocalVoter;

async fn voter(dir: &std::path::Path, id: u64, name: &str, addr: Option<SocketAddr>) -> (Voter, Member) {
    let v = start_voter(dir, &dir.join("certs"), id, name, addr, config().unwrap())
        .await
        .unwrap();
    let member = v.member.clone();
    (v, member)
}

fn command(n: u64) -> Logged {
    Logged {
        now: Timestamp::from_millis(1_800_000_000_000 + n as i64),
        command: Command::DeleteSetting {
            key: format!("work-queue/q{n}"),
            at: Timestamp::EPOCH,
        },
    }
}

async fn leader_among(voters: &BTreeMap<u64, Voter>) -> u64 {
    let (_, any) = voters.iter().next().unwrap();
    let m = any
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.current_leader.is_some_and(|l| voters.contains_key(&l)),
            "a live leader",
        )
        .await
        .unwrap();
    m.current_leader.unwrap()
}

/// Writes a command through the leader, finding it again while leadership moves (bounded).
async fn write(voters: &BTreeMap<u64, Voter>, n: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let leader = leader_among(voters).await;
        match voters[&leader].raft.client_write(command(n)).await {
            Ok(written) => return written.log_id.index,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::info!(error = %e, "writing again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("command {n} not written within {WAIT:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_replicate_over_quic_and_go_on_without_their_leader() {
    let tmp = tempfile::tempdir().unwrap();
    let names = ["n1", "n2", "n3"].map(String::from);
    certs::init(&tmp.path().join("certs"), &names, &[]).unwrap();
    let mut voters = BTreeMap::new();
    let mut members: BTreeMap<u64, Member> = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let (v, m) = voter(tmp.path(), i as u64 + 1, name, None).await;
        voters.insert(i as u64 + 1, v);
        members.insert(i as u64 + 1, m);
    }
    voters[&1].raft.initialize(members.clone()).await.unwrap();

    let mut last = 0;
    for n in 0..50 {
        last = write(&voters, n).await;
    }
    for v in voters.values() {
        v.raft
            .wait(Some(WAIT))
            .applied_index_at_least(Some(last), "every voter applies what was written")
            .await
            .unwrap();
    }

    // The leader stops: the other two elect one of themselves and go on.
    let old_id = leader_among(&voters).await;
    let old = voters.remove(&old_id).unwrap();
    old.stop().await;
    for n in 50..60 {
        last = write(&voters, n).await;
    }
    for v in voters.values() {
        v.raft
            .wait(Some(WAIT))
            .applied_index_at_least(Some(last), "both voters left apply what the new leader wrote")
            .await
            .unwrap();
    }
    // The new leader snapshots and purges its log: the old one, back (its state machine empty,
    // its log behind), is brought up to date by a snapshot sent over QUIC, then by the log.
    let leader = leader_among(&voters).await;
    voters[&leader].raft.trigger().snapshot().await.unwrap();
    voters[&leader]
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "a snapshot of everything written",
        )
        .await
        .unwrap();
    voters[&leader].raft.trigger().purge_log(last).await.unwrap();
    voters[&leader]
        .raft
        .wait(Some(WAIT))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= last), "the log purged")
        .await
        .unwrap();
    let addr: SocketAddr = members[&old_id].addr.parse().unwrap();
    let (back, _) = voter(tmp.path(), old_id, &members[&old_id].name, Some(addr)).await;
    voters.insert(old_id, back);
    last = write(&voters, 60).await;
    voters[&old_id]
        .raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.is_some() && m.last_applied.is_some_and(|a| a.index >= last),
            "the old leader caught up through a snapshot",
        )
        .await
        .unwrap();
    for (_, v) in voters {
        v.stop().await;
    }
}

proptest::proptest! {
    /// A request from the network is never trusted: any bytes decode to a request or an error,
    /// never a panic.
    #[test]
    fn decoding_arbitrary_requests_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        let _ = flotilla_runtime::codec::decode::<Request>(&bytes);
        let _ = flotilla_runtime::codec::decode::<Response>(&bytes);
    }
}
