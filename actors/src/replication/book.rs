//! Where the voters are: an address book of node names and their cluster addresses, learned by
//! greeting (`Hello`) the seeds and every node learned of, and the record a voter keeps of the
//! peers it has seen holding a Raft log — so that a voter whose data directory was wiped is
//! recognised when it comes back, and refused rather than silently made anew.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::Member;

/// Node names and their addresses (cheap to clone: shared).
#[derive(Clone, Debug, Default)]
pub struct AddressBook {
    inner: Arc<RwLock<BTreeMap<String, String>>>,
    /// The nodes that hold a replica (started among the voters), as they said.
    replicas: Arc<RwLock<BTreeSet<String>>>,
    /// The voters, as a voter said last.
    voters: Arc<RwLock<Vec<String>>>,
    /// Nodes this one may not reach (fault injection: a partition).
    cut: Arc<RwLock<BTreeSet<String>>>,
}

impl AddressBook {
    /// The address of `name`, when known.
    pub fn get(&self, name: &str) -> Option<String> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Records where `name` listens; whether that is news.
    pub fn put(&self, name: &str, addr: &str) -> bool {
        if name.is_empty() || addr.is_empty() {
            return false;
        }
        let mut map = self
            .inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(name.to_owned(), addr.to_owned()).as_deref() != Some(addr)
    }

    /// Notes that `name` holds a replica (it runs Raft and may become a voter).
    pub fn note_replica(&self, name: &str) {
        self.replicas
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned());
    }

    /// Whether `name` holds a replica.
    pub fn is_replica(&self, name: &str) -> bool {
        self.replicas
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(name)
    }

    /// The nodes known to hold a replica.
    pub fn replicas(&self) -> Vec<String> {
        self.replicas
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Records the voters as a voter said.
    pub fn set_voters(&self, voters: Vec<String>) {
        *self
            .voters
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = voters;
    }

    /// The voters as a voter said last.
    pub fn voters(&self) -> Vec<String> {
        self.voters
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Cuts this node off from `name` (`true`) or heals the cut: Raft calls to it fail as
    /// unreachable. For fault injection (a partition is a cut on both sides).
    pub fn cut(&self, name: &str, cut: bool) {
        let mut set = self
            .cut
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cut {
            set.insert(name.to_owned());
        } else {
            set.remove(name);
        }
    }

    /// Whether this node is cut off from `name`.
    pub fn is_cut(&self, name: &str) -> bool {
        self.cut
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(name)
    }

    /// Every node known.
    pub fn all(&self) -> Vec<Member> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(name, addr)| Member {
                name: name.clone(),
                addr: addr.clone(),
            })
            .collect()
    }
}

/// The peers a voter has seen holding a Raft log, kept in a file of names (one per line,
/// rewritten whole and synced at each addition).
#[derive(Debug)]
pub struct SeenWithLog {
    path: PathBuf,
    names: Mutex<BTreeSet<String>>,
}

impl SeenWithLog {
    /// The record in `dir` (none yet: empty).
    pub fn open(dir: &Path) -> std::io::Result<SeenWithLog> {
        let path = dir.join("voters-seen");
        let names = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(e),
        };
        Ok(SeenWithLog {
            path,
            names: Mutex::new(names),
        })
    }

    /// Notes that `name` greeted with (`has_log`) or without a log. Answers why it is refused:
    /// it was seen with a log before and has none now.
    pub fn note(&self, name: &str, has_log: bool) -> Option<String> {
        let mut names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !has_log {
            return names.contains(name).then(|| {
                format!(
                    "the voter {name} comes back with an empty Raft log, but it held one before: its data directory was \
                     wiped or replaced. It is refused until it is removed (`flotilla cluster remove-voter {name}`) and \
                     added again (`flotilla cluster add-voter {name}`)"
                )
            });
        }
        if names.insert(name.to_owned())
            && let Err(e) = self.write(&names)
        {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot record the voters seen");
        }
        None
    }

    /// Forgets `name` (it was removed from the voters).
    pub fn forget(&self, name: &str) {
        let mut names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if names.remove(name)
            && let Err(e) = self.write(&names)
        {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot record the voters seen");
        }
    }

    fn write(&self, names: &BTreeSet<String>) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        for n in names {
            writeln!(f, "{n}")?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// What a node that serves Raft answers a greeting with.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    /// The nodes it knows.
    pub book: AddressBook,
    /// Its record of the voters seen with a log (a voter's).
    pub seen: Option<Arc<SeenWithLog>>,
    /// Its Raft node's view of the leader, by name (a voter's).
    pub leader: Arc<RwLock<Option<String>>>,
}

impl Peers {
    /// The leader this node knows of.
    pub fn leader(&self) -> Option<String> {
        self.leader
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sets the leader this node knows of.
    pub fn set_leader(&self, leader: Option<String>) {
        *self
            .leader
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = leader;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voter_seen_with_a_log_is_refused_without_one_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let seen = SeenWithLog::open(dir.path()).unwrap();
        assert_eq!(seen.note("n2", false), None, "never seen with a log: welcome");
        assert_eq!(seen.note("n2", true), None);
        // The record survives a restart.
        let seen = SeenWithLog::open(dir.path()).unwrap();
        let why = seen.note("n2", false).expect("a wiped voter is refused");
        assert!(why.contains("remove-voter n2"), "{why}");
        seen.forget("n2");
        let seen = SeenWithLog::open(dir.path()).unwrap();
        assert_eq!(seen.note("n2", false), None);
    }

    #[test]
    fn the_book_says_whether_an_address_is_news() {
        let book = AddressBook::default();
        assert!(book.put("n1", "127.0.0.1:1"));
        assert!(!book.put("n1", "127.0.0.1:1"));
        assert!(book.put("n1", "127.0.0.1:2"));
        assert!(!book.put("", "x"));
        assert_eq!(book.get("n1").as_deref(), Some("127.0.0.1:2"));
    }
}
