//! Seeded simulation of the control machine (`runtime::control::ControlMachine`), driven the
//! way the control actor drives it: a command log applied by the real `apply`, worker nodes,
//! clients that retry, a scheduler firing, virtual time, and one seeded PRNG injecting message
//! loss, duplication, reordering and delay, node crashes and restarts, partitions, control
//! restarts and lease expiry. Invariants are checked after every step (see `simulation/machine.rs`).
//!
//! `FLOTILLA_SIM_SEEDS` (default 1000) seeds run; `FLOTILLA_SIM_SEED=<seed>` replays one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "simulation/machine.rs"]
mod machine;

use std::time::Duration;

/// splitmix64: the one source of randomness of a simulated run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(one) = std::env::var("FLOTILLA_SIM_SEED") {
        return vec![one.trim().parse().expect("FLOTILLA_SIM_SEED is a number")];
    }
    let n = std::env::var("FLOTILLA_SIM_SEEDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1000);
    (0..n).collect()
}

fn run_seed(seed: u64) -> machine::Sim {
    let mut sim = machine::Sim::new(seed);
    if let Err(what) = sim.run() {
        panic!(
            "simulation seed {seed} failed: {what}\nreplay: FLOTILLA_SIM_SEED={seed} cargo test -p flotilla-runtime --test simulation\nlast {} events:\n{}",
            sim.trace.len(),
            sim.trace.join("\n")
        );
    }
    sim
}

#[test]
fn the_control_machine_keeps_its_invariants_under_faults() {
    let started = std::time::Instant::now();
    let (mut runs, mut restarts, mut moves, mut answers) = (0, 0, 0, 0);
    for seed in seeds() {
        let sim = run_seed(seed);
        runs += sim.runs();
        restarts += sim.control_restarts;
        moves += sim.leader_changes;
        answers += sim.deposed_answers;
    }
    eprintln!(
        "{runs} runs, {restarts} control restarts, {moves} leader changes ({answers} slot answers from deposed leaders), {:?}",
        started.elapsed()
    );
    assert!(moves > 0, "no seed moved the lead");
}

#[test]
fn a_seed_replays_the_same() {
    let (a, b) = (run_seed(7), run_seed(7));
    assert_eq!(a.digest(), b.digest());
    assert_eq!(a.trace, b.trace);
    assert_ne!(a.digest(), run_seed(8).digest(), "two seeds, two histories");
}
