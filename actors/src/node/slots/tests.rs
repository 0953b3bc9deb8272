use super::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;

fn ids(n: usize) -> Vec<TaskRunId> {
    let mut rng = SmallRng::seed_from_u64(3);
    let t = flotilla_runtime::Timestamp::from_micros(1_800_000_000_000_000);
    (0..n).map(|_| TaskRunId::new(t, &mut rng)).collect()
}

fn node(n: &str) -> NodeId {
    n.parse().expect("a node name")
}

const TTL: Duration = Duration::from_secs(2);

#[test]
fn at_most_the_limit_hold_and_a_release_serves_the_oldest_waiter() {
    let now = Instant::now();
    let mut s: Slots<usize> = Slots::default();
    s.put("db", 2, TTL, now);
    let h = ids(4);
    assert!(s.acquire(h[0], node("a"), vec!["db".into()], now, 0).is_some());
    assert!(
        s.acquire(h[1], node("a"), vec!["db".into(), "other".into()], now, 1)
            .is_some()
    );
    assert!(s.acquire(h[2], node("b"), vec!["db".into()], now, 2).is_none());
    assert!(s.acquire(h[3], node("b"), vec!["db".into()], now, 3).is_none());
    assert_eq!(s.waiting(), 2);
    let served = s.release(&[h[0]], now);
    assert_eq!(served, vec![(2, SlotGrant::Held { ttl: TTL })]);
    assert_eq!(
        s.describe(now, flotilla_runtime::Timestamp::from_micros(0))[0]
            .leases
            .len(),
        2
    );
}

#[test]
fn untagged_or_unlimited_tags_hold_nothing() {
    let now = Instant::now();
    let mut s: Slots<()> = Slots::default();
    s.put("db", 1, TTL, now);
    let h = ids(2);
    assert_eq!(
        s.acquire(h[0], node("a"), vec!["web".into()], now, ()),
        Some(((), SlotGrant::Unlimited))
    );
    assert_eq!(
        s.acquire(h[1], node("a"), vec![], now, ()),
        Some(((), SlotGrant::Unlimited))
    );
}

#[test]
fn a_lease_not_renewed_lapses_and_its_slot_returns() {
    let t0 = Instant::now();
    let mut s: Slots<u8> = Slots::default();
    s.put("db", 1, TTL, t0);
    let h = ids(3);
    assert!(s.acquire(h[0], node("dead"), vec!["db".into()], t0, 0).is_some());
    assert!(s.acquire(h[1], node("live"), vec!["db".into()], t0, 1).is_none());
    // Renewed: still held after the first TTL.
    s.renew(&[h[0]], t0 + Duration::from_secs(1));
    assert!(s.expire(t0 + Duration::from_millis(2500)).is_empty());
    // Not renewed again: it lapses, the waiter gets it.
    let served = s.expire(t0 + Duration::from_millis(3100));
    assert_eq!(served, vec![(1, SlotGrant::Held { ttl: TTL })]);
}

#[test]
fn asking_again_keeps_what_is_held_and_replaces_a_wait() {
    let now = Instant::now();
    let mut s: Slots<u8> = Slots::default();
    s.put("db", 1, TTL, now);
    let h = ids(2);
    assert!(s.acquire(h[0], node("a"), vec!["db".into()], now, 0).is_some());
    assert!(s.acquire(h[0], node("a"), vec!["db".into()], now, 1).is_some());
    assert!(s.acquire(h[1], node("a"), vec!["db".into()], now, 2).is_none());
    assert!(s.acquire(h[1], node("a"), vec!["db".into()], now, 3).is_none());
    assert_eq!(s.waiting(), 1);
    // A later waiter stays behind the one that asked again.
    let h2 = ids(3)[2];
    assert!(s.acquire(h2, node("b"), vec!["db".into()], now, 4).is_none());
    assert!(s.acquire(h[1], node("a"), vec!["db".into()], now, 5).is_none());
    assert_eq!(s.release(&[h[0]], now), vec![(5, SlotGrant::Held { ttl: TTL })]);
}

#[test]
fn several_tags_are_taken_together_and_a_reset_frees_a_tag() {
    let now = Instant::now();
    let mut s: Slots<u8> = Slots::default();
    s.put("a", 1, TTL, now);
    s.put("b", 1, TTL, now);
    let h = ids(3);
    assert!(s.acquire(h[0], node("n"), vec!["a".into()], now, 0).is_some());
    // Needs a and b: waits for a, holds no b meanwhile.
    assert!(
        s.acquire(h[1], node("n"), vec!["a".into(), "b".into()], now, 1)
            .is_none()
    );
    assert!(
        s.acquire(h[2], node("n"), vec!["b".into()], now, 2).is_none(),
        "waits behind the older waiter on b"
    );
    let served = s.reset("a", now);
    assert_eq!(served.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![1]);
    // A deleted limit lets its waiters go.
    let served = s.delete("b", now);
    assert_eq!(served, vec![(2, SlotGrant::Unlimited)]);
}
