use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A breaker's name, shown in errors, events and metrics.
///
/// A shared string: cloning one is a reference-count bump, and its memory is freed when the last
/// breaker, error and event naming it is gone, so names generated per tenant or per host do not
/// accumulate over a process's life.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Arc<str>);

impl Name {
    /// The name `name`.
    pub fn new(name: &str) -> Name {
        Name(Arc::from(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
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
        Name(Arc::from(name))
    }
}

impl From<&Name> for Name {
    fn from(name: &Name) -> Self {
        name.clone()
    }
}

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

/// One condition that opens a closed circuit. A breaker may have several (see
/// [`CircuitBreakerConfig::trip_rule`]); it opens when any of them fires.
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
    /// failures reached `threshold`, or the share of slow calls reached the slow-call threshold.
    /// The verdict is taken after every completed call, success or failure, as Resilience4j does.
    ///
    /// The window is kept as ten buckets of `window / 10`, so a call leaves the window between
    /// `0.9 * window` and `window` after it completed.
    FailureRate {
        /// The failure share (0 < threshold ≤ 1) that opens the circuit; `None` when only slow
        /// calls are counted.
        threshold: Option<f64>,
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

/// The trip rules of one breaker: each kind at most once; the breaker opens when any fires.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Rules {
    pub(crate) failures_within: Option<(u32, Duration)>,
    pub(crate) consecutive: Option<u32>,
    pub(crate) rate: Option<RateRule>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RateRule {
    pub(crate) threshold: Option<f64>,
    pub(crate) window: Duration,
    pub(crate) min_calls: u32,
    pub(crate) slow: Option<SlowCalls>,
}

/// The NestJS defaults: 5 failures within 10 s.
const DEFAULT_MAX_FAILURES: u32 = 5;
const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Resilience4j's defaults for a rate rule given only its slow-call part.
const DEFAULT_RATE_WINDOW: Duration = Duration::from_secs(60);
const DEFAULT_MIN_CALLS: u32 = 10;
/// How long a half-open trial may run before its slot is given to another, unless configured.
pub(crate) const DEFAULT_TRIAL_TIMEOUT: Duration = Duration::from_secs(30);

impl Rules {
    /// The rules in force: those configured, or the NestJS default if none was.
    pub(crate) fn effective(&self) -> Rules {
        if self.failures_within.is_none() && self.consecutive.is_none() && self.rate.is_none() {
            Rules {
                failures_within: Some((DEFAULT_MAX_FAILURES, DEFAULT_TTL)),
                ..Rules::default()
            }
        } else {
            self.clone()
        }
    }

    fn list(&self) -> Vec<TripRule> {
        let mut rules = Vec::new();
        if let Some((max_failures, ttl)) = self.failures_within {
            rules.push(TripRule::FailuresWithin { max_failures, ttl });
        }
        if let Some(threshold) = self.consecutive {
            rules.push(TripRule::ConsecutiveFailures { threshold });
        }
        if let Some(rate) = self.rate {
            rules.push(TripRule::FailureRate {
                threshold: rate.threshold,
                window: rate.window,
                min_calls: rate.min_calls,
                slow_calls: rate.slow,
            });
        }
        rules
    }
}

fn check_share(what: &str, share: f64) {
    assert!(
        share > 0.0 && share <= 1.0,
        "{what} must be in (0, 1], got {share}"
    );
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
/// time in half-open, and one success closes it again; a trial that runs 30 s loses its slot.
///
/// # Trip rules
///
/// Each rule setter configures its own rule and leaves the others as they are, and the breaker
/// opens when *any* configured rule fires: what you write is what you get, nothing is dropped.
/// `.max_failures(3).consecutive_failures(5).ttl(Duration::from_secs(2))` opens on 3 failures
/// within 2 s *or* on 5 in a row. With no rule configured, the NestJS default applies (5 failures
/// within 10 s). [`trip_rule`](Self::trip_rule) sets a rule from a [`TripRule`] value.
///
/// ```
/// use palisade::circuit_breaker::{CircuitBreakerConfig, TripRule};
/// use std::time::Duration;
///
/// let config = CircuitBreakerConfig::new("search")
///     .failure_rate(0.5, Duration::from_secs(30), 20)   // half of ≥ 20 calls within 30 s...
///     .slow_calls(Duration::from_secs(2), 0.8);          // ...or 80% of them taking 2 s or more
/// assert_eq!(config.rules().len(), 1);
/// let config = config.consecutive_failures(10);          // ...or 10 failures in a row
/// assert_eq!(config.rules()[0], TripRule::ConsecutiveFailures { threshold: 10 }); // listed first
/// ```
#[derive(Clone, Debug)]
#[must_use = "a configuration does nothing until it is given to a CircuitBreakerLayer"]
pub struct CircuitBreakerConfig {
    pub(crate) name: Name,
    pub(crate) rules: Rules,
    pub(crate) reset_timeout: Duration,
    pub(crate) half_open_max_calls: u32,
    pub(crate) success_threshold: u32,
    pub(crate) trial_timeout: Duration,
    pub(crate) open_backoff: Option<OpenBackoff>,
}

impl CircuitBreakerConfig {
    /// A configuration with the defaults and the given name.
    pub fn new(name: impl Into<Name>) -> Self {
        CircuitBreakerConfig {
            name: name.into(),
            rules: Rules::default(),
            reset_timeout: Duration::from_secs(30),
            half_open_max_calls: 1,
            success_threshold: 1,
            trial_timeout: DEFAULT_TRIAL_TIMEOUT,
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

    fn failures_within(&mut self) -> &mut (u32, Duration) {
        self.rules
            .failures_within
            .get_or_insert((DEFAULT_MAX_FAILURES, DEFAULT_TTL))
    }

    fn rate(&mut self) -> &mut RateRule {
        self.rules.rate.get_or_insert(RateRule {
            threshold: None,
            window: DEFAULT_RATE_WINDOW,
            min_calls: DEFAULT_MIN_CALLS,
            slow: None,
        })
    }

    /// The window in which failures are counted ([`TripRule::FailuresWithin`]; `max_failures`
    /// stays as set, 5 by default).
    ///
    /// # Panics
    /// If `ttl` is zero.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        assert!(
            !ttl.is_zero(),
            "circuit breaker ttl must be greater than zero"
        );
        self.failures_within().1 = ttl;
        self
    }

    /// How many failures within `ttl` open the circuit ([`TripRule::FailuresWithin`]; `ttl`
    /// stays as set, 10 s by default).
    ///
    /// # Panics
    /// If `max_failures` is zero.
    pub fn max_failures(mut self, max_failures: u32) -> Self {
        assert!(
            max_failures > 0,
            "circuit breaker max_failures must be at least 1"
        );
        self.failures_within().0 = max_failures;
        self
    }

    /// Also open after `threshold` consecutive failures ([`TripRule::ConsecutiveFailures`]).
    ///
    /// # Panics
    /// If `threshold` is zero.
    pub fn consecutive_failures(mut self, threshold: u32) -> Self {
        assert!(
            threshold > 0,
            "consecutive failure threshold must be at least 1"
        );
        self.rules.consecutive = Some(threshold);
        self
    }

    /// Also open when the failure share over `window` reaches `threshold`, once at least
    /// `min_calls` calls completed in the window ([`TripRule::FailureRate`]; a slow-call
    /// condition set by [`slow_calls`](Self::slow_calls) is kept).
    ///
    /// # Panics
    /// If `threshold` is not in `(0, 1]`, `window` is zero or `min_calls` is zero.
    pub fn failure_rate(mut self, threshold: f64, window: Duration, min_calls: u32) -> Self {
        check_share("failure rate threshold", threshold);
        assert!(
            !window.is_zero(),
            "failure rate window must be greater than zero"
        );
        assert!(min_calls > 0, "failure rate min_calls must be at least 1");
        let rate = self.rate();
        rate.threshold = Some(threshold);
        rate.window = window;
        rate.min_calls = min_calls;
        self
    }

    /// Also open when the share of calls taking `duration` or longer reaches `threshold`, over the
    /// window of [`failure_rate`](Self::failure_rate) (60 s and at least 10 calls if that is not
    /// set; a failure-rate threshold is then not set either, and only slow calls count). In
    /// half-open, a slow trial is a failure.
    ///
    /// # Panics
    /// If `threshold` is not in `(0, 1]` or `duration` is zero.
    pub fn slow_calls(mut self, duration: Duration, threshold: f64) -> Self {
        check_share("slow call threshold", threshold);
        assert!(
            !duration.is_zero(),
            "slow call duration must be greater than zero"
        );
        self.rate().slow = Some(SlowCalls {
            duration,
            threshold,
        });
        self
    }

    /// Sets the rule of `rule`'s kind to `rule`, replacing only a rule of the same kind.
    ///
    /// # Panics
    /// If the rule's numbers are out of range (as for the setters).
    pub fn trip_rule(self, rule: TripRule) -> Self {
        match rule {
            TripRule::FailuresWithin { max_failures, ttl } => {
                self.max_failures(max_failures).ttl(ttl)
            }
            TripRule::ConsecutiveFailures { threshold } => self.consecutive_failures(threshold),
            TripRule::FailureRate {
                threshold,
                window,
                min_calls,
                slow_calls,
            } => {
                let mut config = match threshold {
                    Some(threshold) => self.failure_rate(threshold, window, min_calls),
                    None => {
                        assert!(
                            !window.is_zero() && min_calls > 0,
                            "a rate rule needs a window and min_calls"
                        );
                        let mut config = self;
                        let rate = config.rate();
                        rate.threshold = None;
                        rate.window = window;
                        rate.min_calls = min_calls;
                        config
                    }
                };
                config = match slow_calls {
                    Some(slow) => config.slow_calls(slow.duration, slow.threshold),
                    None => {
                        config.rate().slow = None;
                        config
                    }
                };
                assert!(
                    config.rate().threshold.is_some() || config.rate().slow.is_some(),
                    "a failure-rate rule needs a failure threshold or slow calls"
                );
                config
            }
        }
    }

    /// How long the circuit stays open before a trial call is let through. `Duration::MAX` works
    /// (the circuit then stays open until reset by hand, and still reports a `retry_after`).
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

    /// How long a trial call may run before its slot is given to a new trial (default 30 s). A
    /// hung trial therefore never wedges the breaker in half-open; its late result is
    /// disregarded. It counts from the call; a slot taken in `poll_ready` and held this long
    /// without a call (the inner service never got ready) is given to a new trial too.
    ///
    /// Its own setting, not tied to the reset timeout: a short (even zero) reset timeout must
    /// not make every running trial count as hung, which would let any number of trials through.
    /// Values below 1 ms are raised to 1 ms for the same reason.
    pub fn trial_timeout(mut self, timeout: Duration) -> Self {
        self.trial_timeout = timeout.max(Duration::from_millis(1));
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

    /// The trip rules in force (the NestJS default if none was configured), in a fixed order:
    /// failures within a window, consecutive failures, failure rate.
    pub fn rules(&self) -> Vec<TripRule> {
        self.rules.effective().list()
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
    fn rule_setters_combine_and_drop_nothing() {
        let config = CircuitBreakerConfig::new("b")
            .max_failures(3)
            .consecutive_failures(5)
            .ttl(Duration::from_secs(2));
        assert_eq!(
            config.rules(),
            [
                TripRule::FailuresWithin {
                    max_failures: 3,
                    ttl: Duration::from_secs(2)
                },
                TripRule::ConsecutiveFailures { threshold: 5 }
            ]
        );
        let config = CircuitBreakerConfig::new("b")
            .ttl(Duration::from_secs(2))
            .max_failures(4)
            .slow_calls(Duration::from_millis(100), 0.5);
        assert_eq!(
            config.rules(),
            [
                TripRule::FailuresWithin {
                    max_failures: 4,
                    ttl: Duration::from_secs(2)
                },
                TripRule::FailureRate {
                    threshold: None,
                    window: Duration::from_secs(60),
                    min_calls: 10,
                    slow_calls: Some(SlowCalls {
                        duration: Duration::from_millis(100),
                        threshold: 0.5
                    })
                }
            ]
        );
        let config = config.failure_rate(0.25, Duration::from_secs(5), 3);
        assert_eq!(
            config.rules()[1],
            TripRule::FailureRate {
                threshold: Some(0.25),
                window: Duration::from_secs(5),
                min_calls: 3,
                slow_calls: Some(SlowCalls {
                    duration: Duration::from_millis(100),
                    threshold: 0.5
                })
            }
        );
        assert_eq!(
            CircuitBreakerConfig::new("d").rules(),
            [TripRule::FailuresWithin {
                max_failures: 5,
                ttl: Duration::from_secs(10)
            }]
        );
        let explicit = CircuitBreakerConfig::new("e")
            .trip_rule(TripRule::ConsecutiveFailures { threshold: 2 });
        assert_eq!(
            explicit.rules(),
            [TripRule::ConsecutiveFailures { threshold: 2 }]
        );
    }

    #[test]
    fn trial_timeout_has_its_own_default_and_a_floor() {
        let config = CircuitBreakerConfig::new("t").reset_timeout(Duration::ZERO);
        assert_eq!(config.trial_timeout, Duration::from_secs(30));
        let config = config.trial_timeout(Duration::ZERO);
        assert_eq!(config.trial_timeout, Duration::from_millis(1));
    }

    #[test]
    fn names_are_shared_and_freed() {
        let name = Name::new("tenant-42");
        let copy = name.clone();
        assert_eq!(Arc::strong_count(&name.0), 2);
        drop(copy);
        assert_eq!(Arc::strong_count(&name.0), 1);
        assert_eq!(name.as_str(), "tenant-42");
    }
}
