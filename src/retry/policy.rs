use super::{Backoff, Jitter, RetryBudget};
use crate::classify::FailureKind;
use crate::rng::SharedRng;
use crate::timeout::{DeadlineSource, Elapsed, NoDeadline, RequestDeadline};
use std::borrow::Cow;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// A predicate's answer: stop, or try again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Return this result to the caller.
    Stop,
    /// Try again after the backoff delay.
    Retry {
        /// Why (for the retry event).
        reason: Cow<'static, str>,
    },
    /// Try again after `after` instead of the backoff delay (a server's or breaker's hint).
    RetryAfter {
        /// The hinted wait.
        after: Duration,
        /// Why (for the retry event).
        reason: Cow<'static, str>,
        /// The call was rejected locally without reaching the service (an open circuit): retry
        /// only if the wait fits before the request's deadline.
        rejection: bool,
    },
}

/// Decides from a whole `Result` — errors *and* responses — whether to try again.
///
/// Implemented by [`TransientErrors`] (the default) and by any `Fn(&Result<Res, E>) -> bool`
/// (`true` = retry):
///
/// ```
/// use palisade::retry::RetryPolicy;
///
/// // Retry on a "busy" response as well as on errors.
/// let policy = RetryPolicy::new(4).retry_if(|result: &Result<u16, std::io::Error>| {
///     matches!(result, Ok(503) | Err(_))
/// });
/// # let _ = policy;
/// ```
pub trait Predicate<Res, E> {
    /// Looks at one attempt's result.
    fn check(&self, result: &Result<Res, E>) -> Verdict;
}

impl<Res, E, F> Predicate<Res, E> for F
where
    F: Fn(&Result<Res, E>) -> bool,
{
    fn check(&self, result: &Result<Res, E>) -> Verdict {
        if self(result) {
            Verdict::Retry {
                reason: Cow::Borrowed("the retry predicate matched"),
            }
        } else {
            Verdict::Stop
        }
    }
}

/// The default predicate: retries only what is safe to retry — errors whose [`FailureKind`] says
/// they are transient (connection failures, attempt timeouts, `Unavailable` and other transient
/// RPC codes) — never a response, and never a request the deadline has no room for.
///
/// An error's [retry-after hint](crate::classify::FailureKind::retry_after) replaces the backoff delay. The policy
/// waits that long only if it fits before the request's deadline — or, with no deadline, if it is
/// within the backoff's `max_delay`; a longer hint ends the retries and the caller gets the error.
/// A local rejection ([`CircuitOpen`](crate::circuit_breaker::CircuitOpen)) is retried only when
/// its retry-after fits before the request's deadline: with no deadline it is returned at once.
#[derive(Clone, Copy, Debug, Default)]
pub struct TransientErrors;

impl<Res, E> Predicate<Res, E> for TransientErrors
where
    E: FailureKind + fmt::Display,
{
    fn check(&self, result: &Result<Res, E>) -> Verdict {
        let Err(error) = result else {
            return Verdict::Stop;
        };
        if !error.is_transient() {
            return Verdict::Stop;
        }
        let reason = Cow::Owned(error.to_string());
        match error.retry_after() {
            Some(after) => Verdict::RetryAfter {
                after,
                reason,
                rejection: error.is_rejection(),
            },
            None if error.is_rejection() => Verdict::Stop,
            None => Verdict::Retry { reason },
        }
    }
}

/// What happens when the next attempt would not fit before the deadline: [`NoDeadline`] keeps the
/// last error; [`RequestDeadline`] replaces it with [`Elapsed`] naming that last error.
pub trait DeadlineStop<E> {
    /// The error to return instead of the last one, if any.
    fn stop_error(&self, attempts: u32, last: &str) -> Option<E>;
}

impl<E> DeadlineStop<E> for NoDeadline {
    fn stop_error(&self, _: u32, _: &str) -> Option<E> {
        None
    }
}

impl<E: From<Elapsed>> DeadlineStop<E> for RequestDeadline {
    fn stop_error(&self, attempts: u32, last: &str) -> Option<E> {
        Some(E::from(Elapsed::deadline().with_context(format!(
            "no time left for another attempt after {attempts}; last error: {last}"
        ))))
    }
}

/// One retry about to happen, passed to [`RetryPolicy::on_retry`] hooks.
#[derive(Clone, Debug)]
pub struct RetryEvent<'a> {
    /// The attempt that just failed (1 is the first call).
    pub attempt: u32,
    /// How long retry waits before the next attempt.
    pub delay: Duration,
    /// Why it retries (the error, or the predicate that matched).
    pub reason: &'a str,
}

type Hook = dyn Fn(&RetryEvent<'_>) + Send + Sync;

/// What clones of a policy share. Absent unless a budget, hook or seed is configured, so that the
/// default policy clones (once per request, inside tower's `Retry`) without touching an `Arc`.
#[derive(Default)]
struct Shared {
    budget: Option<Arc<RetryBudget>>,
    rng: Option<SharedRng>,
    hook: Option<Box<Hook>>,
}

/// The jitter source of policies without a seed of their own.
fn process_rng() -> &'static SharedRng {
    static RNG: std::sync::OnceLock<SharedRng> = std::sync::OnceLock::new();
    RNG.get_or_init(|| SharedRng::seeded(SharedRng::entropy()))
}

/// A [`tower::retry::Policy`] with backoff, jitter, a retry budget, deadlines and hooks.
///
/// Use it with `tower::ServiceBuilder::retry(policy)`, [`RetryPolicy::layer`], or the
/// [resilience preset](crate::builder::Resilience).
///
/// ```
/// use palisade::retry::{Backoff, Jitter, RetryBudget, RetryPolicy};
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let policy = RetryPolicy::new(5) // at most 5 attempts in all
///     .backoff(Backoff::exponential(Duration::from_millis(50), 2.0).max_delay(Duration::from_secs(2)))
///     .jitter(Jitter::Equal)
///     .budget(Arc::new(RetryBudget::new(Duration::from_secs(10), 10, 0.2)))
///     .on_retry(|event| eprintln!("retry after attempt {}: {}", event.attempt, event.reason));
/// let layer = policy.layer();
/// # let _ = layer;
/// # }
/// ```
pub struct RetryPolicy<P = TransientErrors, D = NoDeadline> {
    settings: &'static Settings,
    predicate: P,
    deadline: D,
    shared: Option<Arc<Shared>>,
    /// Per request: attempts made so far, and the previous delay in nanoseconds (decorrelated
    /// jitter). Kept small: the policy is cloned into every response future.
    attempts: u32,
    previous_delay_nanos: u64,
}

/// A policy's immutable settings, interned: tower clones the policy into every response future, and
/// a clone that copies one pointer instead of the whole configuration keeps retry as cheap as
/// tower's own example policy. Each distinct combination is stored once for the life of the process.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Settings {
    max_attempts: u32,
    backoff: Backoff,
    jitter: Jitter,
}

impl Settings {
    fn intern(self) -> &'static Settings {
        static INTERNED: std::sync::Mutex<Vec<&'static Settings>> =
            std::sync::Mutex::new(Vec::new());
        let mut interned = INTERNED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(existing) = interned.iter().find(|s| ***s == self) {
            return existing;
        }
        let leaked: &'static Settings = Box::leak(Box::new(self));
        interned.push(leaked);
        leaked
    }
}

impl RetryPolicy {
    /// At most `max_attempts` attempts per request (the first call included), exponential backoff
    /// from 100 ms doubling up to 10 s with full jitter, retrying transient errors.
    ///
    /// # Panics
    /// If `max_attempts` is zero.
    pub fn new(max_attempts: u32) -> Self {
        assert!(
            max_attempts > 0,
            "a retry policy needs at least one attempt"
        );
        RetryPolicy {
            settings: Settings {
                max_attempts,
                backoff: Backoff::exponential(Duration::from_millis(100), 2.0)
                    .max_delay(Duration::from_secs(10)),
                jitter: Jitter::Full,
            }
            .intern(),
            predicate: TransientErrors,
            deadline: NoDeadline,
            shared: None,
            attempts: 0,
            previous_delay_nanos: 0,
        }
    }
}

impl<P, D> RetryPolicy<P, D> {
    fn shared_mut(&mut self) -> &mut Shared {
        let shared = self.shared.get_or_insert_with(Arc::default);
        Arc::get_mut(shared).expect("configure a retry policy before cloning it")
    }

    fn budget_ref(&self) -> Option<&RetryBudget> {
        self.shared.as_ref()?.budget.as_deref()
    }

    /// The backoff curve.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.settings = Settings {
            backoff,
            ..*self.settings
        }
        .intern();
        self
    }

    /// The jitter applied to the backoff.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.settings = Settings {
            jitter,
            ..*self.settings
        }
        .intern();
        self
    }

    /// Seeds the jitter: the same seed and the same sequence of retries give the same delays.
    pub fn seed(mut self, seed: u64) -> Self {
        self.shared_mut().rng = Some(SharedRng::seeded(seed));
        self
    }

    /// Limits retries to a share of recent requests; see [`RetryBudget`]. Share one budget between
    /// every policy that calls the same dependency.
    pub fn budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.shared_mut().budget = Some(budget);
        self
    }

    /// Calls `hook` before every retry (in addition to the `tracing` event).
    pub fn on_retry(mut self, hook: impl Fn(&RetryEvent<'_>) + Send + Sync + 'static) -> Self {
        self.shared_mut().hook = Some(Box::new(hook));
        self
    }

    /// Decide with `predicate` instead of [`TransientErrors`].
    pub fn retry_if<P2>(self, predicate: P2) -> RetryPolicy<P2, D> {
        RetryPolicy {
            settings: self.settings,
            predicate,
            deadline: self.deadline,
            shared: self.shared,
            attempts: 0,
            previous_delay_nanos: 0,
        }
    }

    /// Never sleep past the request's deadline (requests must be
    /// [`HasDeadline`](crate::timeout::HasDeadline)); when the next attempt cannot start before it,
    /// stop with [`Elapsed`] naming the last error.
    pub fn honor_deadline(self) -> RetryPolicy<P, RequestDeadline> {
        RetryPolicy {
            settings: self.settings,
            predicate: self.predicate,
            deadline: RequestDeadline,
            shared: self.shared,
            attempts: 0,
            previous_delay_nanos: 0,
        }
    }

    /// The layer (tower's [`RetryLayer`](tower::retry::RetryLayer)) applying this policy.
    pub fn layer(self) -> tower::retry::RetryLayer<Self> {
        tower::retry::RetryLayer::new(self)
    }

    /// At most this many attempts per request.
    pub fn max_attempts(&self) -> u32 {
        self.settings.max_attempts
    }

    fn next_delay(&mut self) -> Duration {
        let Settings {
            backoff, jitter, ..
        } = *self.settings;
        let previous = if self.attempts <= 1 {
            backoff.initial()
        } else {
            Duration::from_nanos(self.previous_delay_nanos)
        };
        let random = match jitter {
            Jitter::None => 0,
            _ => self
                .shared
                .as_ref()
                .and_then(|shared| shared.rng.as_ref())
                .unwrap_or_else(|| process_rng())
                .next_u64(),
        };
        jitter.delay(&backoff, self.attempts - 1, previous, random)
    }
}

impl<P: Clone, D: Clone> Clone for RetryPolicy<P, D> {
    fn clone(&self) -> Self {
        RetryPolicy {
            settings: self.settings,
            predicate: self.predicate.clone(),
            deadline: self.deadline.clone(),
            shared: self.shared.clone(),
            attempts: self.attempts,
            previous_delay_nanos: self.previous_delay_nanos,
        }
    }
}

impl<P, D> fmt::Debug for RetryPolicy<P, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.settings.max_attempts)
            .field("backoff", &self.settings.backoff)
            .field("jitter", &self.settings.jitter)
            .field("budget", &self.budget_ref())
            .finish_non_exhaustive()
    }
}

impl<Req, Res, E, P, D> tower::retry::Policy<Req, Res, E> for RetryPolicy<P, D>
where
    Req: Clone,
    P: Predicate<Res, E>,
    D: DeadlineSource<Req> + DeadlineStop<E>,
{
    /// Boxed: tower embeds the policy's future in every response future, and an inline `Sleep`
    /// would make every call's future several times larger. Only an actual retry allocates.
    type Future = Pin<Box<Sleep>>;

    #[inline]
    fn retry(&mut self, request: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        // The common case — a result that is not retried — stays inline and small.
        match self.predicate.check(result) {
            Verdict::Stop => None,
            verdict => self.plan_retry(request, result, verdict),
        }
    }

    #[inline]
    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        if self.attempts == 0 {
            // A fresh request (retries run on the future's own copy of the policy, whose count is
            // above zero), so it pays into the budget exactly once.
            if let Some(budget) = self.budget_ref() {
                budget.deposit();
            }
        }
        (self.attempts + 1 < self.settings.max_attempts).then(|| request.clone())
    }
}

impl<P, D> RetryPolicy<P, D> {
    /// Decides whether and when a retryable result is retried.
    #[inline(never)]
    fn plan_retry<Req, E>(
        &mut self,
        request: &Req,
        result: &mut Result<impl Sized, E>,
        verdict: Verdict,
    ) -> Option<Pin<Box<Sleep>>>
    where
        D: DeadlineSource<Req> + DeadlineStop<E>,
    {
        let (hint, reason, rejection) = match verdict {
            Verdict::Stop => return None,
            Verdict::Retry { reason } => (None, reason, false),
            Verdict::RetryAfter {
                after,
                reason,
                rejection,
            } => (Some(after), reason, rejection),
        };
        self.attempts += 1;
        if self.attempts >= self.settings.max_attempts {
            tracing::debug!(attempts = self.attempts, last_error = %reason, "retries exhausted");
            return None;
        }
        let deadline = self.deadline.deadline_of(request);
        let delay = match hint {
            Some(_) if rejection && deadline.is_none() => {
                tracing::debug!(%reason, "not retrying a local rejection without a deadline to fit it in");
                return None;
            }
            Some(after)
                if !rejection && deadline.is_none() && after > self.settings.backoff.max() =>
            {
                tracing::debug!(retry_after = ?after, "retry-after hint exceeds the maximum delay");
                return None;
            }
            Some(after) => after,
            None => self.next_delay(),
        };
        if let Some(deadline) = deadline
            && Instant::now() + delay >= deadline.instant()
        {
            tracing::debug!(attempts = self.attempts, ?delay, last_error = %reason, "no time left for another attempt");
            if !rejection && let Some(error) = self.deadline.stop_error(self.attempts, &reason) {
                *result = Err(error);
            }
            return None;
        }
        if let Some(budget) = self.budget_ref()
            && !budget.withdraw()
        {
            tracing::warn!(attempts = self.attempts, last_error = %reason, "retry budget exhausted; not retrying");
            return None;
        }
        self.previous_delay_nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        tracing::info!(attempt = self.attempts, ?delay, %reason, "retrying");
        if let Some(hook) = self.shared.as_ref().and_then(|shared| shared.hook.as_ref()) {
            hook(&RetryEvent {
                attempt: self.attempts,
                delay,
                reason: &reason,
            });
        }
        Some(Box::pin(tokio::time::sleep(delay)))
    }
}
