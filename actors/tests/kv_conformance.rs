//! One conformance suite for both stores (sled and memory), plus a model test: random
//! operations with reboots against a `BTreeMap`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on what they set up

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use flotilla_actors::persistence::{KvOp, KvStore, MemKv, SledKv, Tree};
use proptest::prelude::*;

/// A store that can be "rebooted": dropped and opened again on the same data.
trait Bench {
    fn store(&self) -> Arc<dyn KvStore>;
    fn reboot(&mut self);
}

struct SledBench {
    dir: tempfile::TempDir,
    kv: Option<Arc<dyn KvStore>>,
}

impl SledBench {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kv: Arc<dyn KvStore> = Arc::new(SledKv::open(dir.path()).unwrap());
        SledBench { dir, kv: Some(kv) }
    }
}

impl Bench for SledBench {
    fn store(&self) -> Arc<dyn KvStore> {
        self.kv.clone().unwrap()
    }
    fn reboot(&mut self) {
        self.kv.take().unwrap().checkpoint().unwrap();
        self.kv = Some(Arc::new(SledKv::open(self.dir.path()).unwrap()));
    }
}

struct MemBench(MemKv);

impl Bench for MemBench {
    fn store(&self) -> Arc<dyn KvStore> {
        Arc::new(self.0.clone())
    }
    fn reboot(&mut self) {
        self.0 = self.0.clone();
    }
}

fn put(t: Tree, k: &[u8], v: &[u8]) -> KvOp {
    KvOp::Put(t, k.to_vec(), v.to_vec())
}

fn keys(v: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<Vec<u8>> {
    v.into_iter().map(|(k, _)| k).collect()
}

fn suite(b: &mut dyn Bench) {
    let kv = b.store();
    // Trees are separate key spaces.
    kv.apply(&[put(Tree::FlowRuns, b"a", b"1"), put(Tree::Events, b"a", b"2")])
        .unwrap();
    assert_eq!(kv.get(Tree::FlowRuns, b"a").unwrap(), Some(b"1".to_vec()));
    assert_eq!(kv.get(Tree::Events, b"a").unwrap(), Some(b"2".to_vec()));
    assert_eq!(kv.get(Tree::TaskRuns, b"a").unwrap(), None);
    // Replace and delete.
    kv.apply(&[
        put(Tree::FlowRuns, b"a", b"3"),
        KvOp::Delete(Tree::Events, b"a".to_vec()),
        KvOp::Delete(Tree::Events, b"zz".to_vec()),
    ])
    .unwrap();
    assert_eq!(kv.get(Tree::FlowRuns, b"a").unwrap(), Some(b"3".to_vec()));
    assert_eq!(kv.get(Tree::Events, b"a").unwrap(), None);
    // Scans: prefix, bounds, limit, order.
    let ops: Vec<KvOp> = [b"p1".as_slice(), b"p3", b"p2", b"q1", b"o9"]
        .iter()
        .map(|k| put(Tree::Logs, k, k))
        .collect();
    kv.apply(&ops).unwrap();
    assert_eq!(
        keys(kv.scan(Tree::Logs, b"p", Bound::Unbounded, 10).unwrap()),
        [b"p1".to_vec(), b"p2".to_vec(), b"p3".to_vec()]
    );
    assert_eq!(
        keys(kv.scan(Tree::Logs, b"p", Bound::Excluded(b"p1"), 10).unwrap()),
        [b"p2".to_vec(), b"p3".to_vec()]
    );
    assert_eq!(
        keys(kv.scan(Tree::Logs, b"p", Bound::Included(b"p2"), 1).unwrap()),
        [b"p2".to_vec()]
    );
    assert_eq!(
        keys(kv.scan(Tree::Logs, b"", Bound::Unbounded, 10).unwrap()).len(),
        5
    );
    assert!(
        kv.scan(Tree::History, b"", Bound::Unbounded, 10)
            .unwrap()
            .is_empty()
    );
    // Floor: the greatest key at or before, within the tree.
    assert_eq!(
        kv.floor(Tree::Logs, b"p25").unwrap().map(|(k, _)| k),
        Some(b"p2".to_vec())
    );
    assert_eq!(
        kv.floor(Tree::Logs, b"p2").unwrap().map(|(k, _)| k),
        Some(b"p2".to_vec())
    );
    assert_eq!(kv.floor(Tree::Logs, b"a").unwrap(), None);
    assert_eq!(kv.floor(Tree::History, b"zzz").unwrap(), None);
    // Everything survives a reboot after a checkpoint.
    kv.checkpoint().unwrap();
    drop(kv);
    b.reboot();
    let kv = b.store();
    assert_eq!(kv.get(Tree::FlowRuns, b"a").unwrap(), Some(b"3".to_vec()));
    assert_eq!(
        keys(kv.scan(Tree::Logs, b"", Bound::Unbounded, 10).unwrap()).len(),
        5
    );
}

#[test]
fn sled_store_conforms() {
    suite(&mut SledBench::new());
}

#[test]
fn memory_store_conforms() {
    suite(&mut MemBench(MemKv::new()));
}

#[derive(Clone, Debug)]
enum Op {
    Batch(Vec<(u8, u8, Option<u8>)>),
    Reboot,
    Checkpoint,
    Scan(u8, u8),
}

const TREES: [Tree; 4] = [Tree::FlowRuns, Tree::TaskRuns, Tree::Events, Tree::Logs];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => proptest::collection::vec((0u8..4, 0u8..32, proptest::option::of(any::<u8>())), 1..8).prop_map(Op::Batch),
        1 => Just(Op::Reboot),
        1 => Just(Op::Checkpoint),
        2 => (0u8..4, 0u8..32).prop_map(|(t, k)| Op::Scan(t, k)),
    ]
}

fn run_model(b: &mut dyn Bench, ops: Vec<Op>) {
    let mut model: BTreeMap<(usize, Vec<u8>), Vec<u8>> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Batch(items) => {
                let kv = b.store();
                let batch: Vec<KvOp> = items
                    .iter()
                    .map(|(t, k, v)| match v {
                        Some(v) => KvOp::Put(TREES[*t as usize], vec![*k], vec![*v; 3]),
                        None => KvOp::Delete(TREES[*t as usize], vec![*k]),
                    })
                    .collect();
                kv.apply(&batch).unwrap();
                for (t, k, v) in items {
                    match v {
                        Some(v) => model.insert((t as usize, vec![k]), vec![v; 3]),
                        None => model.remove(&(t as usize, vec![k])),
                    };
                }
            }
            Op::Reboot => b.reboot(),
            Op::Checkpoint => b.store().checkpoint().unwrap(),
            Op::Scan(t, k) => {
                let got = b
                    .store()
                    .scan(TREES[t as usize], b"", Bound::Included(&[k]), 5)
                    .unwrap();
                let want: Vec<(Vec<u8>, Vec<u8>)> = model
                    .range((t as usize, vec![k])..(t as usize + 1, vec![]))
                    .take(5)
                    .map(|((_, k), v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(got, want);
            }
        }
        let kv = b.store();
        for (t, tree) in TREES.iter().enumerate() {
            let got = kv.scan(*tree, b"", Bound::Unbounded, 1000).unwrap();
            let want: Vec<(Vec<u8>, Vec<u8>)> = model
                .range((t, vec![])..(t + 1, vec![]))
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(got, want, "tree {tree:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn sled_matches_the_model_across_reboots(ops in proptest::collection::vec(op(), 1..40)) {
        run_model(&mut SledBench::new(), ops);
    }

    #[test]
    fn memory_matches_the_model_across_reboots(ops in proptest::collection::vec(op(), 1..40)) {
        run_model(&mut MemBench(MemKv::new()), ops);
    }
}
