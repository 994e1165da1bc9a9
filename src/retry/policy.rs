use super::{Backoff as BackoffCurve, Jitter, RetryBudget};
use crate::classify::FailureKind;
use crate::rng::SharedRng;
use crate::timeout::{AmbientDeadline, DeadlineSource, Elapsed, NoDeadline, RequestDeadline};
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
        /// The call was rejected locally without reaching the service (an open circuit): retried
        /// only with [`RetryPolicy::retry_rejections`], and only if the wait fits before the
        /// request's deadline.
        rejection: bool,
    },
}

impl Verdict {
    /// The verdict for retrying `error`: its [`FailureKind`] decides *when* — after its
    /// retry-after hint if it has one; a local rejection without a hint is not retried.
    pub fn for_error<E: FailureKind + ?Sized>(error: &E, reason: Cow<'static, str>) -> Verdict {
        let rejection = error.is_rejection();
        match error.retry_after() {
            Some(after) => Verdict::RetryAfter {
                after,
                reason,
                rejection,
            },
            // Turned away locally with no idea of when to come back (a shed load): retrying at
            // once would only hammer the same limit.
            None if rejection => Verdict::Stop,
            None => Verdict::Retry { reason },
        }
    }
}

/// Decides from a whole `Result` — errors *and* responses — whether to try again.
///
/// Implemented by [`TransientErrors`] (the default) and by any `Fn(&Result<Res, E>) -> bool`
/// (`true` = retry) whose error type is [`FailureKind`]. A closure decides *whether* to retry;
/// the error still decides *when*: its retry-after hint replaces the backoff delay, and a local
/// rejection (an open circuit) is returned at once unless the policy
/// [retries rejections](RetryPolicy::retry_rejections).
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
///
/// For an error type that is not `FailureKind`, implement `Predicate` on a type of your own.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot decide whether to retry a `Result<{Res}, {E}>`",
    label = "not a retry predicate for `Result<{Res}, {E}>`",
    note = "a closure `|result: &Result<{Res}, {E}>| -> bool` works when `{E}: FailureKind`; `TransientErrors` needs `{E}: FailureKind + Display`"
)]
pub trait Predicate<Res, E> {
    /// Looks at one attempt's result.
    fn check(&self, result: &Result<Res, E>) -> Verdict;

    /// Whether this predicate may ever retry an `Ok` response. `false` lets retry skip the
    /// predicate for every successful call (default: `true`).
    #[inline]
    fn retries_responses(&self) -> bool {
        true
    }
}

impl<Res, E, F> Predicate<Res, E> for F
where
    F: Fn(&Result<Res, E>) -> bool,
    E: FailureKind,
{
    fn check(&self, result: &Result<Res, E>) -> Verdict {
        if !self(result) {
            return Verdict::Stop;
        }
        let reason = Cow::Borrowed("the retry predicate matched");
        match result {
            Ok(_) => Verdict::Retry { reason },
            Err(error) => Verdict::for_error(error, reason),
        }
    }
}

/// The default predicate: retries only what is safe to retry — errors whose [`FailureKind`] says
/// they are transient (connection failures, attempt timeouts, `Unavailable` and other transient
/// RPC codes) — never a response, and never a request the deadline has no room for.
///
/// An error's [retry-after hint](FailureKind::retry_after) replaces the backoff delay. The policy
/// waits that long only if it fits before the request's deadline — or, with no deadline, if it is
/// within the backoff's `max_delay`; a longer hint ends the retries and the caller gets the error.
/// A local rejection ([`CircuitOpen`](crate::circuit_breaker::CircuitOpen)) is returned at once:
/// an open breaker exists to fail fast (see [`RetryPolicy::retry_rejections`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct TransientErrors;

impl<Res, E> Predicate<Res, E> for TransientErrors
where
    E: FailureKind + fmt::Display,
{
    fn check(&self, result: &Result<Res, E>) -> Verdict {
        match result {
            Err(error) if error.is_transient() => {
                Verdict::for_error(error, Cow::Owned(error.to_string()))
            }
            _ => Verdict::Stop,
        }
    }

    #[inline]
    fn retries_responses(&self) -> bool {
        false
    }
}

/// What happens when the next attempt would not fit before the deadline: [`NoDeadline`] and
/// [`AmbientDeadline`] keep the last error; [`RequestDeadline`] replaces it with [`Elapsed`]
/// naming that last error.
pub trait DeadlineStop<E> {
    /// The error to return instead of the last one, if any.
    fn stop_error(&self, attempts: u32, last: &str) -> Option<E>;
}

impl<E> DeadlineStop<E> for NoDeadline {
    fn stop_error(&self, _: u32, _: &str) -> Option<E> {
        None
    }
}

impl<E> DeadlineStop<E> for AmbientDeadline {
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

/// Why retry stopped with a result it would otherwise have retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GiveUpReason {
    /// `max_attempts` attempts were made.
    Exhausted,
    /// The [`RetryBudget`] refused the retry.
    BudgetExhausted,
    /// The next attempt could not start before the request's deadline.
    DeadlineReached,
    /// The error's retry-after hint is longer than the backoff's `max_delay` and no deadline
    /// says how long the caller is willing to wait.
    HintTooLong,
}

impl fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GiveUpReason::Exhausted => "retries exhausted",
            GiveUpReason::BudgetExhausted => "retry budget exhausted",
            GiveUpReason::DeadlineReached => "no time left before the deadline",
            GiveUpReason::HintTooLong => "retry-after hint exceeds the maximum delay",
        })
    }
}

/// Retry gave up on a request whose last result it would have retried; passed to
/// [`RetryPolicy::on_give_up`] hooks. The caller gets the last result (or, at a deadline with
/// [`RequestDeadline`], [`Elapsed`] naming it).
#[derive(Clone, Debug)]
pub struct GiveUp<'a> {
    /// Attempts made (1 is the first call).
    pub attempts: u32,
    /// Why retry stopped.
    pub reason: GiveUpReason,
    /// The last attempt's error (or the predicate's reason for a response).
    pub last_error: &'a str,
}

type Hook = dyn Fn(&RetryEvent<'_>) + Send + Sync;
type GiveUpHook = dyn Fn(&GiveUp<'_>) + Send + Sync;

/// What clones of a policy share. Absent unless a budget, hook or seed is configured, so that the
/// default policy clones (once per request, inside tower's `Retry`) without touching an `Arc`.
/// Configuring a clone copies it first (copy on write): the budget is shared, the rest is not.
#[derive(Default)]
struct Shared {
    budget: Option<Arc<RetryBudget>>,
    rng: Option<SharedRng>,
    hook: Option<Arc<Hook>>,
    give_up: Option<Arc<GiveUpHook>>,
}

impl Clone for Shared {
    fn clone(&self) -> Self {
        Shared {
            budget: self.budget.clone(),
            rng: self.rng.as_ref().map(SharedRng::fork),
            hook: self.hook.clone(),
            give_up: self.give_up.clone(),
        }
    }
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
///     .on_retry(|event| eprintln!("retry after attempt {}: {}", event.attempt, event.reason))
///     .on_give_up(|stop| eprintln!("gave up after {}: {}", stop.attempts, stop.reason));
/// let layer = policy.layer();
/// # let _ = layer;
/// # }
/// ```
///
/// # Defaults, and why
///
/// - **3 attempts** with [`RetryPolicy::new(3)`](RetryPolicy::new); exponential backoff from
///   100 ms doubling up to 10 s, with [full jitter](Jitter::Full) — the AWS recommendation, so
///   that clients that failed together do not retry together.
/// - **A backoff you choose is used as written**: after [`backoff`](Self::backoff), delays are
///   jittered only if you ask with [`jitter`](Self::jitter), as in Polly and Resilience4j (a
///   "constant" backoff stays constant).
/// - **Only transient errors are retried** ([`TransientErrors`]), never a response.
/// - **An open circuit fails fast**: a local rejection is returned at once, not waited out —
///   opt in with [`retry_rejections`](Self::retry_rejections).
/// - **Deadlines are honoured by default** ([`AmbientDeadline`]): inside a
///   [`DeadlineLayer`](crate::timeout::DeadlineLayer) (or the preset, or a client with a
///   timeout), retry never sleeps past the deadline, whatever the request type.
///   [`honor_deadline`](Self::honor_deadline) also reads a deadline the request itself carries.
///
/// # Clones
///
/// Clones share the [`RetryBudget`]. Configuring a clone (say `.clone().on_retry(..)`) gives the
/// clone its own copy of the other settings; the original is unchanged.
#[must_use = "a retry policy does nothing until it is given to a retry layer"]
pub struct RetryPolicy<P = TransientErrors, D = AmbientDeadline> {
    settings: Settings,
    predicate: P,
    deadline: D,
    shared: Option<Arc<Shared>>,
    /// Per request: attempts made so far, and the previous delay in nanoseconds (decorrelated
    /// jitter).
    attempts: u32,
    previous_delay_nanos: u64,
}

/// A policy's settings, kept inline: tower clones the policy into every response future, and
/// copying a few words costs less than touching a shared reference count (which two threads
/// would contend for).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Settings {
    max_attempts: u32,
    /// Whether `jitter` was chosen by the user (otherwise choosing a backoff turns it off).
    jitter_chosen: bool,
    retry_rejections: bool,
    jitter: Jitter,
    backoff: BackoffCurve,
}

impl RetryPolicy {
    /// At most `max_attempts` attempts per request (the first call included), exponential backoff
    /// from 100 ms doubling up to 10 s with full jitter, retrying transient errors, within the
    /// deadline of an enclosing [`DeadlineLayer`](crate::timeout::DeadlineLayer).
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
                jitter_chosen: false,
                retry_rejections: false,
                jitter: Jitter::Full,
                backoff: BackoffCurve::exponential(Duration::from_millis(100), 2.0)
                    .max_delay(Duration::from_secs(10)),
            },
            predicate: TransientErrors,
            deadline: AmbientDeadline,
            shared: None,
            attempts: 0,
            previous_delay_nanos: 0,
        }
    }
}

impl<P, D> RetryPolicy<P, D> {
    fn shared_mut(&mut self) -> &mut Shared {
        Arc::make_mut(self.shared.get_or_insert_with(Arc::default))
    }

    fn shared(&self) -> Option<&Shared> {
        self.shared.as_deref()
    }

    fn budget_ref(&self) -> Option<&RetryBudget> {
        self.shared()?.budget.as_deref()
    }

    /// The backoff curve. Unless [`jitter`](Self::jitter) is set as well, its delays are used as
    /// written (no jitter).
    pub fn backoff(mut self, backoff: BackoffCurve) -> Self {
        self.settings.backoff = backoff;
        if !self.settings.jitter_chosen {
            self.settings.jitter = Jitter::None;
        }
        self
    }

    /// The jitter applied to the backoff.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.settings.jitter = jitter;
        self.settings.jitter_chosen = true;
        self
    }

    /// Also retry local rejections ([`CircuitOpen`](crate::circuit_breaker::CircuitOpen), a shed
    /// load) once their retry-after hint has passed, if that fits before the request's deadline
    /// (without a deadline, a rejection is still returned at once). Off by default: every caller
    /// of an open breaker would otherwise wait out the open period to be rejected, and the point
    /// of an open breaker is to fail fast.
    pub fn retry_rejections(mut self, retry: bool) -> Self {
        self.settings.retry_rejections = retry;
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
        self.shared_mut().hook = Some(Arc::new(hook));
        self
    }

    /// Calls `hook` when retry gives up on a result it would have retried: attempts exhausted,
    /// budget refused, deadline reached, hint too long (in addition to the `tracing` event).
    pub fn on_give_up(mut self, hook: impl Fn(&GiveUp<'_>) + Send + Sync + 'static) -> Self {
        self.shared_mut().give_up = Some(Arc::new(hook));
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

    /// Also honour the deadline the request itself carries (requests must be
    /// [`HasDeadline`](crate::timeout::HasDeadline)), and when the next attempt cannot start
    /// before it, stop with [`Elapsed`] naming the last error.
    pub fn honor_deadline(self) -> RetryPolicy<P, RequestDeadline> {
        self.deadline_source(RequestDeadline)
    }

    /// Ignore deadlines altogether.
    pub fn ignore_deadline(self) -> RetryPolicy<P, NoDeadline> {
        self.deadline_source(NoDeadline)
    }

    fn deadline_source<D2>(self, deadline: D2) -> RetryPolicy<P, D2> {
        RetryPolicy {
            settings: self.settings,
            predicate: self.predicate,
            deadline,
            shared: self.shared,
            attempts: 0,
            previous_delay_nanos: 0,
        }
    }

    /// The [`RetryLayer`](super::RetryLayer) applying this policy.
    pub fn layer(self) -> super::RetryLayer<Self> {
        super::RetryLayer::new(self)
    }

    /// At most this many attempts per request.
    pub fn max_attempts(&self) -> u32 {
        self.settings.max_attempts
    }

    fn next_delay(&mut self) -> Duration {
        let Settings {
            backoff, jitter, ..
        } = self.settings;
        let previous = if self.attempts <= 1 {
            backoff.initial()
        } else {
            Duration::from_nanos(self.previous_delay_nanos)
        };
        let random = match jitter {
            Jitter::None => 0,
            _ => self
                .shared()
                .and_then(|shared| shared.rng.as_ref())
                .unwrap_or_else(|| process_rng())
                .next_u64(),
        };
        jitter.delay(&backoff, self.attempts - 1, previous, random)
    }

    fn give_up(&self, reason: GiveUpReason, last_error: &str) {
        tracing::debug!(attempts = self.attempts, %reason, %last_error, "not retrying");
        if let Some(hook) = self.shared().and_then(|shared| shared.give_up.as_ref()) {
            hook(&GiveUp {
                attempts: self.attempts,
                reason,
                last_error,
            });
        }
    }
}

impl<P: Clone, D: Clone> Clone for RetryPolicy<P, D> {
    #[inline]
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
            .field("retry_rejections", &self.settings.retry_rejections)
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
    type Future = RetryDelay;

    #[inline(always)]
    fn retry(&mut self, request: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        // The common case — a success the predicate never retries — is one branch, inline.
        if result.is_ok() && !self.predicate.retries_responses() {
            return None;
        }
        self.check_and_plan(request, result)
    }

    #[inline]
    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        if self.attempts == 0
            && let Some(shared) = &self.shared
        {
            // A fresh request (retries run on the future's own copy of the policy, whose count is
            // above zero), so it pays into the budget exactly once.
            deposit(shared);
        }
        // Cloned for the last attempt too, so that retry sees its result and can report that it
        // gave up (`GiveUpReason::Exhausted`).
        Some(request.clone())
    }
}

impl<Res, E, P: Predicate<Res, E>, D> super::FinalResult<Res, E> for RetryPolicy<P, D> {
    const RETRY_INLINE: bool = false;

    /// A success is final unless the predicate may retry responses.
    #[inline(always)]
    fn is_final(&self, result: &Result<Res, E>) -> bool {
        result.is_ok() && !self.predicate.retries_responses()
    }
}

#[inline(never)]
fn deposit(shared: &Shared) {
    if let Some(budget) = &shared.budget {
        budget.deposit();
    }
}

impl<P, D> RetryPolicy<P, D> {
    /// Asks the predicate, and plans the retry if it says so. Out of line: most results are not
    /// retried, and tower's response future stays small enough to inline.
    #[inline(never)]
    fn check_and_plan<Req, Res, E>(
        &mut self,
        request: &Req,
        result: &mut Result<Res, E>,
    ) -> Option<RetryDelay>
    where
        P: Predicate<Res, E>,
        D: DeadlineSource<Req> + DeadlineStop<E>,
    {
        match self.predicate.check(result) {
            Verdict::Stop => None,
            verdict => self.plan_retry(request, result, verdict),
        }
    }

    /// Decides whether and when a retryable result is retried.
    fn plan_retry<Req, E>(
        &mut self,
        request: &Req,
        result: &mut Result<impl Sized, E>,
        verdict: Verdict,
    ) -> Option<RetryDelay>
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
        if rejection && !self.settings.retry_rejections {
            tracing::debug!(%reason, "not retrying a local rejection");
            return None;
        }
        self.attempts += 1;
        if self.attempts >= self.settings.max_attempts {
            self.give_up(GiveUpReason::Exhausted, &reason);
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
                self.give_up(GiveUpReason::HintTooLong, &reason);
                return None;
            }
            Some(after) => after,
            None => self.next_delay(),
        };
        if let Some(deadline) = deadline {
            // No `Instant + Duration` that could overflow: a delay past the end of time is past
            // any deadline.
            let fits = Instant::now()
                .checked_add(delay)
                .is_some_and(|start| start < deadline.instant());
            if !fits {
                self.give_up(GiveUpReason::DeadlineReached, &reason);
                if !rejection && let Some(error) = self.deadline.stop_error(self.attempts, &reason)
                {
                    *result = Err(error);
                }
                return None;
            }
        }
        if let Some(budget) = self.budget_ref()
            && !budget.withdraw()
        {
            tracing::warn!(attempts = self.attempts, last_error = %reason, "retry budget exhausted; not retrying");
            self.give_up(GiveUpReason::BudgetExhausted, &reason);
            return None;
        }
        self.previous_delay_nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        tracing::info!(attempt = self.attempts, ?delay, %reason, "retrying");
        if let Some(hook) = self.shared().and_then(|shared| shared.hook.as_ref()) {
            hook(&RetryEvent {
                attempt: self.attempts,
                delay,
                reason: &reason,
            });
        }
        Some(RetryDelay(Box::pin(tokio::time::sleep(delay))))
    }
}

/// The wait before a retry ([`tower::retry::Policy::Future`] of [`RetryPolicy`]).
///
/// Boxed: tower embeds the policy's future in every response future, and an inline `Sleep` would
/// make every call's future several times larger; only an actual retry allocates. Polled out of
/// line, so that the response future of a call that is not retried stays small enough to inline.
#[derive(Debug)]
pub struct RetryDelay(Pin<Box<Sleep>>);

impl std::future::Future for RetryDelay {
    type Output = ();

    #[inline(never)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.0.as_mut().poll(cx)
    }
}
