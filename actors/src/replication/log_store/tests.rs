//! openraft's storage conformance suite against the log store (with a small state machine that
//! applies nothing but membership, as the suite needs), and the log reopened after each kind of
//! change.

use super::*;
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

use crate::replication::counting::CountingMachine;

use crate::persistence::log_io::DirIo;

/// A log on disk keeping this many entries in memory.
struct OnDisk(usize);

impl StoreBuilder<Control, RaftLogStore, CountingMachine, tempfile::TempDir> for OnDisk {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, RaftLogStore, CountingMachine), StorageError<Control>> {
        let failed =
            |e| StorageError::from_io_error(openraft::ErrorSubject::Store, openraft::ErrorVerb::Read, e);
        let dir = tempfile::tempdir().map_err(failed)?;
        let store = RaftLogStore::open_keeping(Box::new(DirIo::new(dir.path()).map_err(failed)?), self.0)
            .map_err(failed)?;
        Ok((dir, store, CountingMachine::default()))
    }
}

/// Appends and waits until the entries are on disk.
async fn append(log: &mut RaftLogStore, batch: Vec<Entry>) -> io::Result<()> {
    use openraft::type_config::TypeConfigExt;
    let (tx, rx) = Control::oneshot();
    log.append(batch, IOFlushed::signal(tx)).await?;
    rx.await.map_err(|_| io::Error::other("no completion"))?
}

fn open(dir: &std::path::Path) -> io::Result<RaftLogStore> {
    RaftLogStore::open(Box::new(DirIo::new(dir)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_store_passes_openraft_s_conformance_suite() {
    Suite::test_all(OnDisk(MEMORY_ENTRIES))
        .await
        .expect("the suite passes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_store_passes_the_suite_keeping_two_entries_in_memory() {
    // Every other read goes back to the segments.
    Suite::test_all(OnDisk(2)).await.expect("the suite passes");
}

/// With four entries in memory, a hundred entries read back whole, before and after a
/// reopen, and after a cut far below what memory keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_beyond_memory_are_read_back_from_the_segments() {
    let dir = tempfile::tempdir().unwrap();
    let keep = |d: &std::path::Path| RaftLogStore::open_keeping(Box::new(DirIo::new(d).unwrap()), 4).unwrap();
    let mut log = keep(dir.path());
    for i in 0..10u64 {
        append(&mut log, (i * 10..i * 10 + 10).map(|k| entry(1, k)).collect())
            .await
            .unwrap();
    }
    let all = |v: Vec<Entry>| v.iter().map(|e| e.index()).collect::<Vec<_>>();
    assert_eq!(
        all(log.try_get_log_entries(..).await.unwrap()),
        (0..100).collect::<Vec<_>>()
    );
    assert_eq!(
        all(log.try_get_log_entries(37..42).await.unwrap()),
        (37..42).collect::<Vec<_>>()
    );
    log.close();
    let mut log = keep(dir.path());
    assert_eq!(
        all(log.try_get_log_entries(..).await.unwrap()),
        (0..100).collect::<Vec<_>>()
    );
    // A cut far below memory: the latest kept is read back; appends go on after it.
    log.truncate_after(Some(entry(1, 20).log_id())).await.unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id.map(|l| l.index),
        Some(20)
    );
    append(&mut log, (21..30).map(|k| entry(2, k)).collect())
        .await
        .unwrap();
    log.close();
    let mut log = keep(dir.path());
    let back = log.try_get_log_entries(..).await.unwrap();
    assert_eq!(all(back.clone()), (0..30).collect::<Vec<_>>());
    assert!(
        back.iter()
            .filter(|e| e.index() > 20)
            .all(|e| e.log_id().leader_id.term == 2)
    );
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id.map(|l| l.index),
        Some(29)
    );
}

fn entry(term: u64, index: u64) -> Entry {
    use openraft::vote::RaftLeaderIdExt;
    Entry::new_blank(LogId::new(
        <Control as openraft::RaftTypeConfig>::LeaderId::new_committed(term, 0),
        index,
    ))
}

/// What a reopened log holds: its state, vote and entries.
async fn reopened(dir: &std::path::Path) -> (LogState<Control>, Option<Vote>, Vec<u64>) {
    let mut log = open(dir).unwrap();
    let state = log.get_log_state().await.unwrap();
    let vote = log.read_vote().await.unwrap();
    let entries = log.try_get_log_entries(..).await.unwrap();
    (state, vote, entries.iter().map(|e| e.index()).collect())
}

/// Every change survives a reopen: appends, a cut in the middle of a batch, a purge, and the
/// vote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_cuts_purges_and_votes_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path()).unwrap();
    for batch in 0..10u64 {
        let entries: Vec<Entry> = (batch * 10..batch * 10 + 10).map(|i| entry(1, i)).collect();
        append(&mut log, entries).await.unwrap();
    }
    let vote = Vote::new(3, 1);
    log.save_vote(&vote).await.unwrap();
    // A cut inside the batch of entries 50..=59: 50..=54 stay.
    log.truncate_after(Some(entry(1, 54).log_id())).await.unwrap();
    append(&mut log, (55..60).map(|i| entry(2, i)).collect())
        .await
        .unwrap();
    let (state, got_vote, indexes) = reopened(dir.path()).await;
    assert_eq!(got_vote, Some(vote));
    assert_eq!(indexes, (0..60).collect::<Vec<_>>());
    assert_eq!(state.last_log_id, Some(entry(2, 59).log_id()));
    // A purge inside a frame: the rest stays readable after a reopen.
    let mut log = open(dir.path()).unwrap();
    log.purge(entry(1, 33).log_id()).await.unwrap();
    log.truncate_after(Some(entry(2, 56).log_id())).await.unwrap();
    let (state, _, indexes) = reopened(dir.path()).await;
    assert_eq!(state.last_purged_log_id, Some(entry(1, 33).log_id()));
    assert_eq!(indexes, (34..57).collect::<Vec<_>>());
    // Many votes: the meta file moves to a new generation, the last vote wins.
    let mut log = open(dir.path()).unwrap();
    for term in 4..2000 {
        log.save_vote(&Vote::new(term, 2)).await.unwrap();
    }
    let (state, got_vote, _) = reopened(dir.path()).await;
    assert_eq!(got_vote, Some(Vote::new(1999, 2)));
    assert_eq!(state.last_purged_log_id, Some(entry(1, 33).log_id()));
}

/// What a log holds, to compare: the vote, the purged id and every entry's id.
#[derive(Clone, Debug, PartialEq)]
struct Model {
    vote: Option<Vote>,
    purged: Option<LogId>,
    entries: BTreeMap<u64, LogId>,
}

impl Model {
    fn last(&self) -> Option<u64> {
        self.entries
            .keys()
            .next_back()
            .copied()
            .or(self.purged.map(|p| p.index))
    }
}

async fn model_of(log: &mut RaftLogStore) -> Model {
    let state = log.get_log_state().await.unwrap();
    Model {
        vote: log.read_vote().await.unwrap(),
        purged: state.last_purged_log_id,
        entries: log
            .try_get_log_entries(..)
            .await
            .unwrap()
            .iter()
            .map(|e| (e.index(), e.log_id()))
            .collect(),
    }
}

/// Seeded rounds of appends, cuts, purges and votes with the power cut at a random operation
/// (a prefix of the unsynced bytes of one file may survive, damaged): once reopened, the log
/// holds everything acknowledged, and the operation the power cut either whole or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_to_a_power_cut() {
    use rand::{RngExt, SeedableRng};
    for seed in 0..300u64 {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let io = crate::persistence::log_io::SimIo::new();
        let mut log = RaftLogStore::open(Box::new(io.clone())).unwrap();
        let mut acked = Model {
            vote: None,
            purged: None,
            entries: BTreeMap::new(),
        };
        let mut term = 1;
        io.fail_after(rng.random_range(0..200));
        let mut failed_as = None;
        for _ in 0..80 {
            let mut after = acked.clone();
            let result = match rng.random_range(0..10) {
                0..6 => {
                    let from = acked.last().map_or(0, |l| l + 1);
                    let batch: Vec<Entry> = (from..from + rng.random_range(1..6))
                        .map(|i| entry(term, i))
                        .collect();
                    after
                        .entries
                        .extend(batch.iter().map(|e| (e.index(), e.log_id())));
                    append(&mut log, batch).await
                }
                6 => {
                    let (Some(low), Some(high)) = (acked.entries.keys().next().copied(), acked.last()) else {
                        continue;
                    };
                    let at = rng.random_range(low..=high);
                    let id = acked.entries[&at];
                    after.entries.split_off(&(at + 1));
                    term += 1;
                    log.truncate_after(Some(id)).await
                }
                7 => {
                    let Some(&at) = acked
                        .entries
                        .keys()
                        .nth(rng.random_range(0..acked.entries.len().max(1)))
                    else {
                        continue;
                    };
                    let id = acked.entries[&at];
                    after.purged = Some(id);
                    after.entries = after.entries.split_off(&(at + 1));
                    log.purge(id).await
                }
                _ => {
                    term += 1;
                    let vote = Vote::new(term, rng.random_range(0..3));
                    after.vote = Some(vote);
                    log.save_vote(&vote).await
                }
            };
            match result {
                Ok(()) => acked = after,
                Err(_) => {
                    failed_as = Some(after);
                    break;
                }
            }
        }
        log.close();
        io.power_cut(&mut rng);
        let mut log = RaftLogStore::open(Box::new(io.clone()))
            .unwrap_or_else(|e| panic!("seed {seed}: the log does not open after a power cut: {e}"));
        let got = model_of(&mut log).await;
        assert!(
            got == acked || failed_as.as_ref() == Some(&got),
            "seed {seed}: after the power cut {got:?}, acknowledged {acked:?}, the cut operation's {failed_as:?}"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..proptest::prelude::ProptestConfig::default() })]
    /// A damaged log (any byte of a segment or of the meta changed) opens or is refused with an
    /// error, never a panic; what it holds when it opens is a run of entries with no hole.
    #[test]
    fn a_damaged_log_opens_or_is_refused_never_panics(at in 0usize..100_000, bit in 0u8..8, meta in proptest::prelude::any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut log = open(dir.path()).unwrap();
            log.save_vote(&Vote::new(1, 0)).await.unwrap();
            for b in 0..20u64 {
                let batch: Vec<Entry> = (b * 5..b * 5 + 5).map(|i| entry(1, i)).collect();
                append(&mut log, batch).await.unwrap();
            }
            log.truncate_after(Some(entry(1, 77).log_id())).await.unwrap();
        });
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("meta") == meta)
            .unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let i = at % bytes.len();
        bytes[i] ^= 1 << bit;
        std::fs::write(&file, &bytes).unwrap();
        if let Ok(mut log) = open(dir.path()) {
            let indexes: Vec<u64> = rt.block_on(log.try_get_log_entries(..)).unwrap().iter().map(|e| e.index()).collect();
            proptest::prop_assert!(indexes.windows(2).all(|w| w[1] == w[0] + 1), "a hole: {:?}", indexes);
        }
    }
}
