//! The answers a node gave to mutating requests, by the client's request id: a request sent
//! again (its answer was lost, the client retried) gets the first answer instead of acting
//! twice, and one that arrives while the first is under way waits for it. Bounded by count
//! (the most recent win) and by age.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_cluster::wire::Response;
use flotilla_runtime::control::RequestId;
use tokio::sync::OnceCell;

/// By default, at most this many answers are remembered.
pub const REPLIES_MAX: usize = 100_000;
/// By default, an answer is remembered this long.
pub const REPLIES_KEEP: Duration = Duration::from_secs(24 * 3600);

/// How many answers to mutating requests are remembered, and how long (the count wins under
/// heavy load).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnswerBounds {
    /// At most this many.
    pub max: usize,
    /// Each at most this long.
    pub keep: Duration,
}

impl Default for AnswerBounds {
    /// 100,000 answers, 24 hours.
    fn default() -> Self {
        AnswerBounds {
            max: REPLIES_MAX,
            keep: REPLIES_KEEP,
        }
    }
}

type Slot = Arc<OnceCell<Response>>;

#[derive(Debug)]
struct Inner {
    by_id: HashMap<RequestId, Slot>,
    order: VecDeque<(Instant, RequestId)>,
}

/// Remembered answers.
#[derive(Clone, Debug)]
pub struct Replies {
    inner: Arc<Mutex<Inner>>,
    max: usize,
    keep: Duration,
}

impl Default for Replies {
    fn default() -> Self {
        Replies::new(REPLIES_MAX, REPLIES_KEEP)
    }
}

impl Replies {
    /// At most `max` answers, each at most `keep`.
    pub fn new(max: usize, keep: Duration) -> Self {
        Replies {
            inner: Arc::new(Mutex::new(Inner {
                by_id: HashMap::new(),
                order: VecDeque::new(),
            })),
            max: max.max(1),
            keep,
        }
    }

    /// The answer to request `id`: the one given before, or `answer`'s (computed once, however
    /// many times the request arrives).
    pub async fn once<F: Future<Output = Response>>(&self, id: RequestId, answer: F) -> Response {
        let slot = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            while let Some((at, old)) = inner.order.front().copied() {
                if now.duration_since(at) <= self.keep {
                    break;
                }
                inner.order.pop_front();
                inner.by_id.remove(&old);
            }
            match inner.by_id.get(&id) {
                Some(slot) => slot.clone(),
                None => {
                    // Room for it: the oldest go.
                    while inner.order.len() >= self.max {
                        if let Some((_, old)) = inner.order.pop_front() {
                            inner.by_id.remove(&old);
                        }
                    }
                    let slot = Slot::default();
                    inner.by_id.insert(id, slot.clone());
                    inner.order.push_back((now, id));
                    slot
                }
            }
        };
        slot.get_or_init(|| answer).await.clone()
    }

    /// How many answers are remembered.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).by_id.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn id(n: u8) -> RequestId {
        RequestId::from_uuid(*flotilla_runtime::FlowRunId::from_bytes([n; 16]).as_uuid())
    }

    #[tokio::test]
    async fn a_request_sent_again_gets_the_first_answer_without_acting_again() {
        let replies = Replies::default();
        let acted = Arc::new(AtomicU32::new(0));
        let act = |n: u32| {
            let acted = acted.clone();
            async move {
                acted.fetch_add(1, Ordering::SeqCst);
                Response::Error(flotilla_cluster::wire::WireError::new(
                    flotilla_cluster::wire::ErrorKind::Conflict,
                    format!("answer {n}"),
                ))
            }
        };
        let (a, b) = tokio::join!(replies.once(id(1), act(1)), replies.once(id(1), act(2)));
        assert_eq!(a, b, "a resend while the first was under way got another answer");
        let c = replies.once(id(1), act(3)).await;
        assert_eq!(a, c);
        assert_eq!(acted.load(Ordering::SeqCst), 1);
        replies.once(id(2), act(4)).await;
        assert_eq!(acted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_most_recent_answers_are_kept() {
        let replies = Replies::new(2, REPLIES_KEEP);
        for n in 0..5 {
            replies.once(id(n), async { Response::Done }).await;
        }
        assert_eq!(replies.len(), 2);
    }
}
