use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

/// A breaker's name, shown in errors, events and metrics.
///
/// Names are interned: each distinct name is stored once for the life of the process, so a `Name`
/// is one pointer, `Copy`, and free to put into every [`CircuitOpen`](super::CircuitOpen)
/// rejection. Breaker names come from configuration (a service, a pattern), a bounded set; do not
/// generate a fresh name per request.
#[derive(Clone, Copy)]
pub struct Name(&'static Interned);

struct Interned(Box<str>);

static NAMES: Mutex<Option<HashMap<&'static str, &'static Interned>>> = Mutex::new(None);

impl Name {
    /// The interned name for `name`.
    pub fn new(name: &str) -> Name {
        let mut names = NAMES
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let names = names.get_or_insert_with(HashMap::new);
        if let Some(interned) = names.get(name) {
            return Name(interned);
        }
        let interned: &'static Interned = Box::leak(Box::new(Interned(name.into())));
        names.insert(&interned.0, interned);
        Name(interned)
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &'static str {
        &self.0.0
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Name {
    fn from(name: &str) -> Self {
        Name::new(name)
    }
}

impl From<String> for Name {
    fn from(name: String) -> Self {
        Name::new(&name)
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Name {}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a closed circuit opens.
#[derive(Clone, Debug, PartialEq)]
pub enum TripRule {
    /// Open when at least `max_failures` failures happened within the last `ttl` (NestJS's
    /// `ttl` / `maxFailures`). Exact: the breaker keeps the timestamps of the last
    /// `max_failures` failures. A failure exactly `ttl` old no longer counts; successes do not
    /// erase failures.
    FailuresWithin {
        /// How many failures open the circuit.
        max_failures: u32,
        /// The window in which failures are counted.
        ttl: Duration,
    },
    /// Open after `threshold` failures in a row; any success starts the count again.
    ConsecutiveFailures {
        /// How many failures in a row open the circuit.
        threshold: u32,
    },
    /// Open when, over the last `window`, at least `min_calls` calls completed and the share of
    /// failures reached `threshold` (or the share of slow calls reached the slow-call threshold).
    ///
    /// The window is kept as ten buckets of `window / 10`, so a call leaves the window between
    /// `0.9 * window` and `window` after it completed.
    FailureRate {
        /// The failure share (0 < threshold ≤ 1) that opens the circuit.
        threshold: f64,
        /// The rolling window.
        window: Duration,
        /// No verdict until this many calls completed within the window.
        min_calls: u32,
        /// Optionally, treat slow calls as a second trip condition.
        slow_calls: Option<SlowCalls>,
    },
}

/// Slow-call detection for [`TripRule::FailureRate`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowCalls {
    /// A call taking at least this long is slow.
    pub duration: Duration,
    /// The slow share (0 < threshold ≤ 1) that opens the circuit.
    pub threshold: f64,
}

/// Growth of the open time when a circuit re-opens straight from half-open.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OpenBackoff {
    /// Each consecutive re-open multiplies the open time by this factor (≥ 1).
    pub multiplier: f64,
    /// The open time never exceeds this.
    pub max: Duration,
}

/// Configuration of a circuit breaker, in NestJS's terms.
///
/// ```
/// use palisade::circuit_breaker::CircuitBreakerConfig;
/// use std::time::Duration;
///
/// let config = CircuitBreakerConfig::new("user-service")
///     .ttl(Duration::from_secs(5))          // failures count for 5 s
///     .max_failures(3)                       // 3 of them open the circuit
///     .reset_timeout(Duration::from_secs(10)); // after 10 s a trial call is let through
/// # let _ = config;
/// ```
///
/// Defaults: 5 failures within 10 s open the circuit; it stays open 30 s; one trial call at a
/// time in half-open, and one success closes it again.
#[derive(Clone, Debug)]
pub struct CircuitBreakerConfig {
    pub(crate) name: Name,
    pub(crate) rule: TripRule,
    pub(crate) reset_timeout: Duration,
    pub(crate) half_open_max_calls: u32,
    pub(crate) success_threshold: u32,
    pub(crate) trial_timeout: Option<Duration>,
    pub(crate) open_backoff: Option<OpenBackoff>,
}

impl CircuitBreakerConfig {
    /// A configuration with the defaults and the given name.
    pub fn new(name: impl Into<Name>) -> Self {
        CircuitBreakerConfig {
            name: name.into(),
            rule: TripRule::FailuresWithin {
                max_failures: 5,
                ttl: Duration::from_secs(10),
            },
            reset_timeout: Duration::from_secs(30),
            half_open_max_calls: 1,
            success_threshold: 1,
            trial_timeout: None,
            open_backoff: None,
        }
    }

    /// The same configuration under another name (used by
    /// [`CircuitBreakerRegistry`](super::CircuitBreakerRegistry) to stamp out breakers).
    pub fn with_name(mut self, name: impl Into<Name>) -> Self {
        self.name = name.into();
        self
    }

    /// The breaker's name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    fn failures_within(&mut self) -> (&mut u32, &mut Duration) {
        if !matches!(self.rule, TripRule::FailuresWithin { .. }) {
            self.rule = TripRule::FailuresWithin {
                max_failures: 5,
                ttl: Duration::from_secs(10),
            };
        }
        match &mut self.rule {
            TripRule::FailuresWithin { max_failures, ttl } => (max_failures, ttl),
            _ => unreachable!("the rule was just set to FailuresWithin"),
        }
    }

    /// The window in which failures are counted (selects [`TripRule::FailuresWithin`]).
    ///
    /// # Panics
    /// If `ttl` is zero.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        assert!(
            !ttl.is_zero(),
            "circuit breaker ttl must be greater than zero"
        );
        *self.failures_within().1 = ttl;
        self
    }

    /// How many failures within `ttl` open the circuit (selects [`TripRule::FailuresWithin`]).
    ///
    /// # Panics
    /// If `max_failures` is zero.
    pub fn max_failures(mut self, max_failures: u32) -> Self {
        assert!(
            max_failures > 0,
            "circuit breaker max_failures must be at least 1"
        );
        *self.failures_within().0 = max_failures;
        self
    }

    /// Open after `threshold` consecutive failures instead (selects
    /// [`TripRule::ConsecutiveFailures`]).
    ///
    /// # Panics
    /// If `threshold` is zero.
    pub fn consecutive_failures(mut self, threshold: u32) -> Self {
        assert!(
            threshold > 0,
            "consecutive failure threshold must be at least 1"
        );
        self.rule = TripRule::ConsecutiveFailures { threshold };
        self
    }

    /// Open when the failure share over `window` reaches `threshold`, once at least `min_calls`
    /// calls completed in the window (selects [`TripRule::FailureRate`]).
    ///
    /// # Panics
    /// If `threshold` is not in `(0, 1]`, `window` is zero or `min_calls` is zero.
    pub fn failure_rate(mut self, threshold: f64, window: Duration, min_calls: u32) -> Self {
        assert!(
            threshold > 0.0 && threshold <= 1.0,
            "failure rate threshold must be in (0, 1], got {threshold}"
        );
        assert!(
            !window.is_zero(),
            "failure rate window must be greater than zero"
        );
        assert!(min_calls > 0, "failure rate min_calls must be at least 1");
        let slow_calls = match &self.rule {
            TripRule::FailureRate { slow_calls, .. } => *slow_calls,
            _ => None,
        };
        self.rule = TripRule::FailureRate {
            threshold,
            window,
            min_calls,
            slow_calls,
        };
        self
    }

    /// Also open when the share of calls slower than `duration` reaches `threshold`.
    /// Applies to [`TripRule::FailureRate`] (selecting it with a 100% failure threshold, 60 s window
    /// and 10 minimum calls if another rule was chosen). In half-open, a slow trial is a failure.
    ///
    /// # Panics
    /// If `threshold` is not in `(0, 1]` or `duration` is zero.
    pub fn slow_calls(mut self, duration: Duration, threshold: f64) -> Self {
        assert!(
            threshold > 0.0 && threshold <= 1.0,
            "slow call threshold must be in (0, 1], got {threshold}"
        );
        assert!(
            !duration.is_zero(),
            "slow call duration must be greater than zero"
        );
        if !matches!(self.rule, TripRule::FailureRate { .. }) {
            self = self.failure_rate(1.0, Duration::from_secs(60), 10);
        }
        if let TripRule::FailureRate { slow_calls, .. } = &mut self.rule {
            *slow_calls = Some(SlowCalls {
                duration,
                threshold,
            });
        }
        self
    }

    /// Sets the trip rule directly.
    pub fn trip_rule(mut self, rule: TripRule) -> Self {
        self.rule = rule;
        self
    }

    /// How long the circuit stays open before a trial call is let through.
    pub fn reset_timeout(mut self, reset_timeout: Duration) -> Self {
        self.reset_timeout = reset_timeout;
        self
    }

    /// How many trial calls may be in flight at once in half-open (default 1).
    ///
    /// # Panics
    /// If `max_calls` is zero.
    pub fn half_open_max_calls(mut self, max_calls: u32) -> Self {
        assert!(max_calls > 0, "half_open_max_calls must be at least 1");
        self.half_open_max_calls = max_calls;
        self
    }

    /// How many successful trials close the circuit (default 1).
    ///
    /// # Panics
    /// If `successes` is zero.
    pub fn success_threshold(mut self, successes: u32) -> Self {
        assert!(successes > 0, "success_threshold must be at least 1");
        self.success_threshold = successes;
        self
    }

    /// How long a trial call may run before its slot is given to a new trial (default: the reset
    /// timeout). A hung trial therefore never wedges the breaker in half-open; its late result is
    /// disregarded.
    pub fn trial_timeout(mut self, timeout: Duration) -> Self {
        self.trial_timeout = Some(timeout);
        self
    }

    /// Grow the open time on each consecutive re-open from half-open: `reset_timeout *
    /// multiplier^n`, capped at `max`. The growth resets once the circuit closes.
    ///
    /// # Panics
    /// If `multiplier` is below 1 or not finite.
    pub fn open_backoff(mut self, multiplier: f64, max: Duration) -> Self {
        assert!(
            multiplier.is_finite() && multiplier >= 1.0,
            "open backoff multiplier must be a finite number ≥ 1, got {multiplier}"
        );
        self.open_backoff = Some(OpenBackoff { multiplier, max });
        self
    }

    /// The trip rule in force.
    pub fn rule(&self) -> &TripRule {
        &self.rule
    }

    pub(crate) fn effective_trial_timeout(&self) -> Duration {
        self.trial_timeout.unwrap_or(self.reset_timeout)
    }

    /// How long the circuit stays open after `reopens` consecutive re-opens from half-open.
    pub(crate) fn open_duration(&self, reopens: u32) -> Duration {
        match self.open_backoff {
            None => self.reset_timeout,
            Some(OpenBackoff { multiplier, max }) => {
                let factor = multiplier.powi(reopens.min(1_000) as i32);
                let secs = self.reset_timeout.as_secs_f64() * factor;
                if !secs.is_finite() || secs >= max.as_secs_f64() {
                    max.max(self.reset_timeout)
                } else {
                    Duration::from_secs_f64(secs)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_backoff_grows_and_caps_without_overflow() {
        let config = CircuitBreakerConfig::new("b")
            .reset_timeout(Duration::from_secs(1))
            .open_backoff(2.0, Duration::from_secs(10));
        let durations: Vec<u64> = (0..6).map(|n| config.open_duration(n).as_secs()).collect();
        assert_eq!(durations, [1, 2, 4, 8, 10, 10]);
        assert_eq!(config.open_duration(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn rule_setters_select_their_rule() {
        let config = CircuitBreakerConfig::new("b")
            .consecutive_failures(3)
            .ttl(Duration::from_secs(2));
        assert_eq!(
            config.rule,
            TripRule::FailuresWithin {
                max_failures: 5,
                ttl: Duration::from_secs(2)
            }
        );
        let config = CircuitBreakerConfig::new("b").slow_calls(Duration::from_millis(100), 0.5);
        assert!(matches!(
            config.rule,
            TripRule::FailureRate {
                slow_calls: Some(_),
                ..
            }
        ));
    }
}
