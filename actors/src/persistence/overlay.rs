//! Cold records (events, log batches) that were applied but are not yet in the store: reads
//! look here first, so they see every acknowledged write while the store lags behind the log.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

use flotilla_runtime::LogIndex;

use super::kv::Tree;

/// Applied-but-unstored records of the cold trees, by key, in log order.
#[derive(Debug)]
pub struct Overlay<V = Vec<u8>> {
    records: BTreeMap<(Tree, Vec<u8>), (LogIndex, V)>,
    order: VecDeque<(LogIndex, Tree, Vec<u8>)>,
}

impl<V> Default for Overlay<V> {
    fn default() -> Self {
        Overlay {
            records: BTreeMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V: Clone> Overlay<V> {
    /// Remembers a record written at `index`.
    pub fn put(&mut self, index: LogIndex, tree: Tree, key: Vec<u8>, value: V) {
        self.order.push_back((index, tree, key.clone()));
        self.records.insert((tree, key), (index, value));
    }

    /// Forgets the records the store now holds (written at or before `upto`).
    pub fn stored_through(&mut self, upto: LogIndex) {
        while let Some((index, _, _)) = self.order.front() {
            if *index > upto {
                break;
            }
            let Some((_, tree, key)) = self.order.pop_front() else {
                break;
            };
            let k = (tree, key);
            if let Some((i, _)) = self.records.get(&k)
                && *i <= upto
            {
                self.records.remove(&k);
            }
        }
    }

    /// A record, if it is here.
    pub fn get(&self, tree: Tree, key: &[u8]) -> Option<&V> {
        self.records.get(&(tree, key.to_vec())).map(|(_, v)| v)
    }

    /// Up to `limit` records of `tree` whose keys start with `prefix`, from `start` on.
    pub fn scan(&self, tree: Tree, prefix: &[u8], start: Bound<&[u8]>, limit: usize) -> Vec<(Vec<u8>, V)> {
        let lower = match start {
            Bound::Included(k) if k >= prefix => Bound::Included((tree, k.to_vec())),
            Bound::Excluded(k) if k >= prefix => Bound::Excluded((tree, k.to_vec())),
            _ => Bound::Included((tree, prefix.to_vec())),
        };
        self.records
            .range((lower, Bound::Unbounded))
            .take_while(|((t, k), _)| *t == tree && k.starts_with(prefix))
            .take(limit)
            .map(|((_, k), (_, v))| (k.clone(), v.clone()))
            .collect()
    }

    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_only_what_is_stored() {
        let mut o: Overlay = Overlay::default();
        o.put(LogIndex::new(1), Tree::Events, b"a".to_vec(), b"1".to_vec());
        o.put(LogIndex::new(2), Tree::Events, b"b".to_vec(), b"2".to_vec());
        o.put(LogIndex::new(3), Tree::Logs, b"a".to_vec(), b"3".to_vec());
        assert_eq!(o.scan(Tree::Events, b"", Bound::Unbounded, 10).len(), 2);
        assert_eq!(
            o.scan(Tree::Events, b"", Bound::Excluded(b"a"), 10),
            vec![(b"b".to_vec(), b"2".to_vec())]
        );
        o.stored_through(LogIndex::new(1));
        assert_eq!(o.get(Tree::Events, b"a"), None);
        assert_eq!(o.get(Tree::Events, b"b"), Some(&b"2".to_vec()));
        o.stored_through(LogIndex::new(3));
        assert!(o.is_empty());
    }
}

/// Events applied but not yet in the store, sorted by id (the order they are appended in,
/// except user events with ids of their own, which are put in place).
#[derive(Debug, Default)]
pub struct RecentEvents {
    events: VecDeque<(LogIndex, std::sync::Arc<flotilla_runtime::Event>)>,
}

impl RecentEvents {
    /// Remembers an event applied at `index`.
    pub fn push(&mut self, index: LogIndex, event: std::sync::Arc<flotilla_runtime::Event>) {
        match self.events.back() {
            Some((_, last)) if last.id > event.id => {
                let at = self.events.partition_point(|(_, e)| e.id < event.id);
                self.events.insert(at, (index, event));
            }
            _ => self.events.push_back((index, event)),
        }
    }

    /// An event by id, if it is here.
    pub fn get(&self, id: &flotilla_runtime::EventId) -> Option<&std::sync::Arc<flotilla_runtime::Event>> {
        let at = self.events.partition_point(|(_, e)| e.id < *id);
        self.events.get(at).filter(|(_, e)| e.id == *id).map(|(_, e)| e)
    }

    /// Up to `limit` events after `after`, in id order.
    pub fn after(
        &self,
        after: Option<flotilla_runtime::EventId>,
        limit: usize,
    ) -> impl Iterator<Item = &std::sync::Arc<flotilla_runtime::Event>> {
        let at = after.map_or(0, |a| self.events.partition_point(|(_, e)| e.id <= a));
        self.events.range(at..).take(limit).map(|(_, e)| e)
    }

    /// Forgets the events the store now holds.
    pub fn stored_through(&mut self, upto: LogIndex) {
        while self.events.front().is_some_and(|(i, _)| *i <= upto) {
            self.events.pop_front();
        }
    }
}
