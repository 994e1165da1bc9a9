use crate::rng::uniform_between;
use std::time::Duration;

/// How the delay between attempts grows. Every kind is capped by [`max_delay`](Backoff::max_delay)
/// and never overflows, whatever the attempt number.
///
/// ```
/// use palisade::retry::Backoff;
/// use std::time::Duration;
///
/// let backoff = Backoff::exponential(Duration::from_millis(100), 2.0).max_delay(Duration::from_secs(1));
/// let delays: Vec<_> = (0..6).map(|retry| backoff.delay(retry).as_millis()).collect();
/// assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
/// assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(1));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[must_use = "a backoff does nothing until it is given to a retry policy"]
pub struct Backoff {
    kind: Kind,
    max_delay: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Constant(Duration),
    Linear { initial: Duration, step: Duration },
    Exponential { base: Duration, factor: f64 },
}

impl Backoff {
    /// The same delay before every retry.
    pub fn constant(delay: Duration) -> Self {
        Backoff {
            kind: Kind::Constant(delay),
            max_delay: delay,
        }
    }

    /// `initial`, then `initial + step`, `initial + 2 * step`, ... (capped at 30 s by default).
    pub fn linear(initial: Duration, step: Duration) -> Self {
        Backoff {
            kind: Kind::Linear { initial, step },
            max_delay: Duration::from_secs(30).max(initial),
        }
    }

    /// `base`, then `base * factor`, `base * factor²`, ... (capped at 30 s by default).
    ///
    /// # Panics
    /// If `factor` is below 1 or not finite.
    pub fn exponential(base: Duration, factor: f64) -> Self {
        assert!(
            factor.is_finite() && factor >= 1.0,
            "exponential backoff factor must be a finite number ≥ 1, got {factor}"
        );
        Backoff {
            kind: Kind::Exponential { base, factor },
            max_delay: Duration::from_secs(30).max(base),
        }
    }

    /// Caps every delay, jittered or not, at `max_delay`.
    pub fn max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay;
        self
    }

    /// The cap.
    pub fn max(&self) -> Duration {
        self.max_delay
    }

    /// The first delay (the `base` of decorrelated jitter).
    pub fn initial(&self) -> Duration {
        self.delay(0)
    }

    /// The delay before retry number `retry` (0 is the first retry), without jitter.
    pub fn delay(&self, retry: u32) -> Duration {
        let raw = match self.kind {
            Kind::Constant(delay) => delay,
            Kind::Linear { initial, step } => initial.saturating_add(step.saturating_mul(retry)),
            Kind::Exponential { base, .. } if base.is_zero() || retry == 0 => base,
            Kind::Exponential { base, factor } => {
                let exponent = i32::try_from(retry).unwrap_or(i32::MAX);
                let secs = base.as_secs_f64() * factor.powi(exponent);
                // Finite but beyond `Duration`'s range is the cap, never a panic (and anything
                // above the cap is clamped below).
                Duration::try_from_secs_f64(secs).unwrap_or(self.max_delay)
            }
        };
        raw.min(self.max_delay)
    }
}

/// Randomisation of backoff delays, so that clients that failed together do not retry together.
///
/// The formulas are AWS's ("Exponential Backoff And Jitter"), with the backoff curve as the
/// un-jittered delay `d` and its cap as `cap`:
///
/// | jitter | delay |
/// | --- | --- |
/// | `None` | `d` |
/// | `Full` | uniform in `[0, d]` |
/// | `Equal` | `d/2` + uniform in `[0, d/2]` |
/// | `Decorrelated` | `min(cap, uniform in [base, 3 * previous delay])` |
///
/// A jittered delay never exceeds the backoff's [`max_delay`](Backoff::max_delay).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Jitter {
    /// No randomisation.
    None,
    /// Uniform between zero and the backoff delay (the default: spreads retries the most).
    #[default]
    Full,
    /// Half the backoff delay plus a uniform share of the other half.
    Equal,
    /// Each delay drawn between the base and three times the previous delay.
    Decorrelated,
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl Jitter {
    /// The delay before retry number `retry`, given the previous delay (for `Decorrelated`; use the
    /// backoff's initial delay before the first retry) and a random 64-bit value.
    pub fn delay(self, backoff: &Backoff, retry: u32, previous: Duration, random: u64) -> Duration {
        let cap = backoff.max();
        let delay = match self {
            Jitter::None => backoff.delay(retry),
            Jitter::Full => {
                Duration::from_nanos(uniform_between(random, 0, nanos(backoff.delay(retry))))
            }
            Jitter::Equal => {
                let full = nanos(backoff.delay(retry));
                let half = full / 2;
                Duration::from_nanos(half + uniform_between(random, 0, full - half))
            }
            Jitter::Decorrelated => {
                let base = nanos(backoff.initial());
                let high = nanos(previous).saturating_mul(3).max(base);
                Duration::from_nanos(uniform_between(random, base, high))
            }
        };
        delay.min(cap)
    }
}
