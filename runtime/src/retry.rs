//! Retry policy: how many times, after what delay, and for which failures a run is retried.
//!
//! Deterministic: the jitter's randomness comes from the RNG passed in.

use std::time::Duration;

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

/// The most retries a policy may allow.
pub const RETRIES_MAX: u32 = 10_000;
/// The longest delay a policy may produce (a week).
pub const RETRY_DELAY_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// The largest jitter factor accepted.
pub const JITTER_FACTOR_MAX: f64 = 100.0;
/// The most entries in a delay list.
pub const DELAY_LIST_LEN_MAX: usize = 1_000;

/// The delay before each retry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RetryDelay {
    /// Retry at once.
    None,
    /// The same delay before every retry.
    Fixed(Duration),
    /// The n-th retry waits the n-th delay; the last one repeats.
    List(Vec<Duration>),
    /// `base × factor^(n-1)` before the n-th retry, at most `max`.
    Exponential {
        /// The first delay.
        base: Duration,
        /// The growth factor (≥ 1).
        factor: f64,
        /// The cap.
        max: Duration,
    },
}

/// Which failures are retried.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetryCondition {
    /// Every failure (unless the proposer marked it not retriable).
    #[default]
    Always,
    /// Only failures whose message contains one of these strings.
    MessageContains(Vec<String>),
}

/// A policy that does not hold together.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RetryPolicyError {
    /// Too many retries.
    #[error("retries = {0} is more than the maximum of {RETRIES_MAX}")]
    TooManyRetries(u32),
    /// A delay over the maximum.
    #[error("a retry delay of {0:?} is longer than the maximum of {RETRY_DELAY_MAX:?}")]
    DelayTooLong(Duration),
    /// A jitter factor that is negative, not finite or too large.
    #[error("jitter factor {0} must be a finite number between 0 and {JITTER_FACTOR_MAX}")]
    BadJitter(f64),
    /// An exponential factor below 1 or not finite.
    #[error("backoff factor {0} must be a finite number of at least 1")]
    BadFactor(f64),
    /// An empty or too long delay list.
    #[error("a retry delay list must hold between 1 and {DELAY_LIST_LEN_MAX} delays, not {0}")]
    BadDelayList(usize),
}

/// How a run is retried after a failure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// How many times a failed run is retried (0: never).
    pub retries: u32,
    /// The delay before each retry.
    pub delay: RetryDelay,
    /// Jitter as Prefect's `retry_jitter_factor`: the delay is drawn from an exponential
    /// distribution with the nominal delay as its mean, clamped to at most
    /// `delay × (1 + factor)`. `None` or 0: no jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_factor: Option<f64>,
    /// Which failures are retried.
    #[serde(default)]
    pub condition: RetryCondition,
}

impl RetryPolicy {
    /// Whether this is the policy of no retries (skipped when stored).
    pub fn is_none(&self) -> bool {
        *self == RetryPolicy::none()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::none()
    }
}

impl RetryPolicy {
    /// No retries.
    pub const fn none() -> Self {
        RetryPolicy {
            retries: 0,
            delay: RetryDelay::None,
            jitter_factor: None,
            condition: RetryCondition::Always,
        }
    }

    /// `retries` retries with a fixed delay.
    pub fn fixed(retries: u32, delay: Duration) -> Self {
        RetryPolicy {
            retries,
            delay: RetryDelay::Fixed(delay),
            ..RetryPolicy::none()
        }
    }

    /// Checks the bounds of every field.
    pub fn validate(&self) -> Result<(), RetryPolicyError> {
        if self.retries > RETRIES_MAX {
            return Err(RetryPolicyError::TooManyRetries(self.retries));
        }
        let check = |d: Duration| {
            if d > RETRY_DELAY_MAX {
                Err(RetryPolicyError::DelayTooLong(d))
            } else {
                Ok(())
            }
        };
        match &self.delay {
            RetryDelay::None => {}
            RetryDelay::Fixed(d) => check(*d)?,
            RetryDelay::List(list) => {
                if list.is_empty() || list.len() > DELAY_LIST_LEN_MAX {
                    return Err(RetryPolicyError::BadDelayList(list.len()));
                }
                list.iter().try_for_each(|d| check(*d))?;
            }
            RetryDelay::Exponential { base, factor, max } => {
                if !factor.is_finite() || *factor < 1.0 {
                    return Err(RetryPolicyError::BadFactor(*factor));
                }
                check(*base)?;
                check(*max)?;
            }
        }
        if let Some(j) = self.jitter_factor
            && (!j.is_finite() || !(0.0..=JITTER_FACTOR_MAX).contains(&j))
        {
            return Err(RetryPolicyError::BadJitter(j));
        }
        Ok(())
    }

    /// Whether a run that has failed after `attempts` attempts (runs) may be retried, given the
    /// failure's message and the proposer's verdict on it.
    pub fn should_retry(&self, attempts: u32, message: Option<&str>, retriable: Option<bool>) -> bool {
        if retriable == Some(false) || attempts > self.retries {
            return false;
        }
        match &self.condition {
            RetryCondition::Always => true,
            RetryCondition::MessageContains(needles) => {
                let message = message.unwrap_or("");
                needles.iter().any(|n| message.contains(n.as_str()))
            }
        }
    }

    /// The nominal delay (before jitter) before retry number `retry` (1-based).
    pub fn nominal_delay(&self, retry: u32) -> Duration {
        let retry = retry.max(1);
        let d = match &self.delay {
            RetryDelay::None => Duration::ZERO,
            RetryDelay::Fixed(d) => *d,
            RetryDelay::List(list) => {
                let i = usize::try_from(retry - 1).unwrap_or(usize::MAX);
                list.get(i).or(list.last()).copied().unwrap_or(Duration::ZERO)
            }
            RetryDelay::Exponential { base, factor, max } => {
                let exp = i32::try_from(retry - 1).unwrap_or(i32::MAX);
                let secs = base.as_secs_f64() * factor.powi(exp);
                let capped = secs.min(max.as_secs_f64()).min(RETRY_DELAY_MAX.as_secs_f64());
                Duration::try_from_secs_f64(capped).unwrap_or(*max)
            }
        };
        d.min(RETRY_DELAY_MAX)
    }

    /// The delay before retry number `retry` (1-based), with jitter drawn from `rng`.
    pub fn delay(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let nominal = self.nominal_delay(retry);
        match self.jitter_factor {
            Some(j) if j > 0.0 && j.is_finite() && !nominal.is_zero() => {
                jittered(nominal, j.min(JITTER_FACTOR_MAX), rng.random::<f64>())
            }
            _ => nominal,
        }
    }
}

/// Prefect's clamped Poisson interval: an exponential variate with mean `mean`, restricted to
/// `[0, mean × (1 + clamp)]` by inverse-CDF sampling of `u ∈ [0, 1)`.
fn jittered(mean: Duration, clamp: f64, u: f64) -> Duration {
    let m = mean.as_secs_f64();
    let upper = m * (1.0 + clamp);
    let cdf_upper = 1.0 - (-upper / m).exp();
    let x = -m * (1.0 - u.clamp(0.0, 1.0) * cdf_upper).ln();
    Duration::try_from_secs_f64(x.clamp(0.0, upper)).unwrap_or(mean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn fixed_delay() {
        let p = RetryPolicy::fixed(3, secs(2));
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(p.delay(1, &mut rng), secs(2));
        assert_eq!(p.delay(3, &mut rng), secs(2));
    }

    #[test]
    fn delay_list_repeats_its_last_entry() {
        let p = RetryPolicy {
            retries: 5,
            delay: RetryDelay::List(vec![secs(1), secs(10), secs(60)]),
            ..RetryPolicy::none()
        };
        let got: Vec<_> = (1..=5).map(|n| p.nominal_delay(n)).collect();
        assert_eq!(got, [secs(1), secs(10), secs(60), secs(60), secs(60)]);
    }

    #[test]
    fn exponential_backoff_grows_and_caps() {
        let p = RetryPolicy {
            retries: 10,
            delay: RetryDelay::Exponential {
                base: secs(1),
                factor: 2.0,
                max: secs(60),
            },
            ..RetryPolicy::none()
        };
        let got: Vec<_> = (1..=8).map(|n| p.nominal_delay(n)).collect();
        assert_eq!(
            got,
            [
                secs(1),
                secs(2),
                secs(4),
                secs(8),
                secs(16),
                secs(32),
                secs(60),
                secs(60)
            ]
        );
        assert_eq!(p.nominal_delay(u32::MAX), secs(60));
    }

    #[test]
    fn jitter_is_deterministic_given_the_rng_and_clamped() {
        let p = RetryPolicy {
            jitter_factor: Some(0.5),
            ..RetryPolicy::fixed(3, secs(10))
        };
        let draw = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..50).map(|_| p.delay(1, &mut rng)).collect::<Vec<_>>()
        };
        let (a, b) = (draw(42), draw(42));
        assert_eq!(a, b);
        assert!(a.iter().all(|d| *d <= secs(15)), "{a:?}");
        assert!(a.iter().any(|d| *d != secs(10)), "jitter changed nothing");
    }

    #[test]
    fn attempts_are_bounded_and_conditions_apply() {
        let p = RetryPolicy::fixed(2, secs(1));
        assert!(p.should_retry(1, None, None));
        assert!(p.should_retry(2, None, None));
        assert!(!p.should_retry(3, None, None));
        assert!(!p.should_retry(1, None, Some(false)));
        let q = RetryPolicy {
            condition: RetryCondition::MessageContains(vec!["timeout".into()]),
            ..p
        };
        assert!(q.should_retry(1, Some("connect timeout"), None));
        assert!(!q.should_retry(1, Some("bad input"), None));
        assert!(!q.should_retry(1, None, None));
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut p = RetryPolicy::fixed(RETRIES_MAX + 1, secs(1));
        assert_eq!(
            p.validate(),
            Err(RetryPolicyError::TooManyRetries(RETRIES_MAX + 1))
        );
        p.retries = 1;
        p.jitter_factor = Some(f64::NAN);
        assert!(matches!(p.validate(), Err(RetryPolicyError::BadJitter(_))));
        p.jitter_factor = Some(-1.0);
        assert!(matches!(p.validate(), Err(RetryPolicyError::BadJitter(_))));
        p.jitter_factor = None;
        p.delay = RetryDelay::Exponential {
            base: secs(1),
            factor: 0.5,
            max: secs(2),
        };
        assert!(matches!(p.validate(), Err(RetryPolicyError::BadFactor(_))));
        p.delay = RetryDelay::List(vec![]);
        assert!(matches!(p.validate(), Err(RetryPolicyError::BadDelayList(0))));
        p.delay = RetryDelay::Fixed(RETRY_DELAY_MAX + secs(1));
        assert!(matches!(p.validate(), Err(RetryPolicyError::DelayTooLong(_))));
    }

    proptest! {
        #[test]
        fn jittered_delay_never_exceeds_its_clamp(
            base_ms in 1u64..100_000, clamp in 0.0f64..5.0, seed: u64, retry in 1u32..20
        ) {
            let p = RetryPolicy {
                jitter_factor: Some(clamp),
                ..RetryPolicy::fixed(20, Duration::from_millis(base_ms))
            };
            let mut rng = SmallRng::seed_from_u64(seed);
            let d = p.delay(retry, &mut rng);
            let upper = Duration::from_millis(base_ms).as_secs_f64() * (1.0 + clamp);
            prop_assert!(d.as_secs_f64() <= upper + 1e-6);
        }
    }
}
