//! Retry: backoff, jitter, budget, predicates, hints, deadlines and cancellation, on the paused
//! clock, with a user's own error enum running through the whole stack.

use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen};
use palisade::classify::FailureKind;
use palisade::retry::{Backoff, Jitter, RetryBudget, RetryPolicy};
use palisade::timeout::{Deadline, DeadlineLayer, Deadlined, Elapsed, TimeoutLayer};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{Instant, advance};
use tower::{Layer, Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

/// One error type for the whole stack, as a user would write it.
#[derive(Clone, Debug, PartialEq)]
enum AppError {
    /// Transient; the attempt number is kept so the test can see which error surfaced.
    Reset(u32),
    /// Transient with a server's retry-after hint.
    Busy(Duration),
    /// Not worth retrying.
    Invalid,
    Open(CircuitOpen),
    Timeout(Elapsed),
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Reset(n) => write!(f, "connection reset on attempt {n}"),
            AppError::Busy(d) => write!(f, "busy, retry after {d:?}"),
            AppError::Invalid => f.write_str("invalid request"),
            AppError::Open(open) => open.fmt(f),
            AppError::Timeout(elapsed) => elapsed.fmt(f),
        }
    }
}

impl From<CircuitOpen> for AppError {
    fn from(open: CircuitOpen) -> Self {
        AppError::Open(open)
    }
}

impl From<Elapsed> for AppError {
    fn from(elapsed: Elapsed) -> Self {
        AppError::Timeout(elapsed)
    }
}

impl FailureKind for AppError {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            AppError::Busy(after) => Some(*after),
            AppError::Open(open) => open.retry_after(),
            _ => None,
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            AppError::Reset(_) | AppError::Busy(_) => true,
            AppError::Invalid => false,
            AppError::Open(open) => open.is_transient(),
            AppError::Timeout(elapsed) => elapsed.is_transient(),
        }
    }

    fn is_rejection(&self) -> bool {
        matches!(self, AppError::Open(_))
    }
}

/// A service answering attempt `n` (1-based) with `script(n)`; records when each attempt came.
#[allow(clippy::type_complexity)]
fn scripted<R, F, Fut>(
    script: F,
) -> (
    impl Service<
        R,
        Response = &'static str,
        Error = AppError,
        Future = impl Future<Output = Result<&'static str, AppError>> + Send,
    > + Clone,
    Arc<Mutex<Vec<Instant>>>,
)
where
    F: Fn(u32) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<&'static str, AppError>> + Send + 'static,
    R: Send + 'static,
{
    let calls = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&calls);
    let counter = Arc::new(AtomicU32::new(0));
    let service = tower::service_fn(move |_: R| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        log.lock().unwrap().push(Instant::now());
        script(n)
    });
    (service, calls)
}

fn no_jitter(attempts: u32, delay: Duration) -> RetryPolicy {
    RetryPolicy::new(attempts)
        .backoff(Backoff::constant(delay))
        .jitter(Jitter::None)
}

#[test]
fn backoff_sequences() {
    let constant = Backoff::constant(100 * MS);
    assert_eq!(
        (0..3).map(|r| constant.delay(r)).collect::<Vec<_>>(),
        [100 * MS; 3]
    );

    let linear = Backoff::linear(100 * MS, 50 * MS).max_delay(220 * MS);
    let delays: Vec<_> = (0..5).map(|r| linear.delay(r).as_millis()).collect();
    assert_eq!(delays, [100, 150, 200, 220, 220]);

    let exponential = Backoff::exponential(10 * MS, 3.0).max_delay(SEC);
    let delays: Vec<_> = (0..6).map(|r| exponential.delay(r).as_millis()).collect();
    assert_eq!(delays, [10, 30, 90, 270, 810, 1000]);

    let zero = Backoff::exponential(Duration::ZERO, 2.0);
    assert_eq!(zero.delay(10_000), Duration::ZERO);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn backoffs() -> impl Strategy<Value = Backoff> {
        let duration = || (0u64..=u64::MAX / 2).prop_map(Duration::from_nanos);
        let small = || (0u64..=10_000_000_000).prop_map(Duration::from_nanos);
        prop_oneof![
            small().prop_map(Backoff::constant),
            (duration(), duration(), duration())
                .prop_map(|(i, s, cap)| Backoff::linear(i, s).max_delay(cap)),
            (duration(), 1.0f64..1000.0, duration())
                .prop_map(|(b, f, cap)| Backoff::exponential(b, f).max_delay(cap)),
            (small(), 1.0f64..4.0, small())
                .prop_map(|(b, f, cap)| Backoff::exponential(b, f).max_delay(cap)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// No delay, jittered or not, exceeds the cap, and nothing overflows or panics at any attempt.
        #[test]
        fn jittered_delays_stay_within_bounds(
            backoff in backoffs(),
            retry in any::<u32>(),
            previous in (0u64..=u64::MAX).prop_map(Duration::from_nanos),
            random in any::<u64>(),
        ) {
            let cap = backoff.max();
            let plain = backoff.delay(retry);
            prop_assert!(plain <= cap);
            prop_assert_eq!(Jitter::None.delay(&backoff, retry, previous, random), plain);

            let full = Jitter::Full.delay(&backoff, retry, previous, random);
            prop_assert!(full <= plain);

            let equal = Jitter::Equal.delay(&backoff, retry, previous, random);
            prop_assert!(equal <= plain);
            prop_assert!(equal.as_nanos() >= plain.as_nanos() / 2);

            let decorrelated = Jitter::Decorrelated.delay(&backoff, retry, previous, random);
            prop_assert!(decorrelated <= cap);
            prop_assert!(decorrelated >= backoff.initial().min(cap));
            let upper = previous.as_nanos().saturating_mul(3).max(backoff.initial().as_nanos());
            prop_assert!(decorrelated.as_nanos() <= upper);
        }

        /// Exact budget: with no reserve, `n` requests at ratio `k/1000` allow exactly
        /// `floor(n * k / 1000)` retries.
        #[test]
        fn budget_allows_exactly_its_share(permille in 0u32..=1000, requests in 0u32..200) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            let _context = runtime.enter();
            let budget = RetryBudget::new(10 * SEC, 0, f64::from(permille) / 1000.0);
            for _ in 0..requests {
                budget.deposit();
            }
            let allowed = (0..requests + 10).filter(|_| budget.withdraw()).count() as u64;
            prop_assert_eq!(allowed, u64::from(requests) * u64::from(permille) / 1000);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn budget_at_a_fractional_ratio_is_exact() {
    // tower-rs/tower#857: TpsBudget allows 10 retries here.
    let budget = RetryBudget::new(SEC, 0, 0.6);
    for _ in 0..10 {
        budget.deposit();
    }
    assert_eq!((0..10).filter(|_| budget.withdraw()).count(), 6);
}

#[tokio::test(start_paused = true)]
async fn budget_reserve_and_expiry() {
    let budget = RetryBudget::new(10 * SEC, 2, 0.5);
    // The floor: 2 per second over 10 s.
    assert_eq!(budget.remaining(), 20);
    for _ in 0..10 {
        budget.deposit();
    }
    assert_eq!(budget.remaining(), 25);
    advance(11 * SEC).await;
    assert_eq!(
        budget.remaining(),
        20,
        "deposits older than the ttl still count"
    );
    for _ in 0..20 {
        assert!(budget.withdraw());
    }
    assert!(!budget.withdraw());
    advance(11 * SEC).await;
    assert!(
        budget.withdraw(),
        "withdrawals older than the ttl still count"
    );
}

#[tokio::test(start_paused = true)]
async fn retries_up_to_max_attempts_and_surfaces_the_last_error() {
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let mut service = no_jitter(4, 10 * MS).layer().layer(service);
    let error = service.ready().await.unwrap().call(()).await.unwrap_err();
    assert_eq!(error, AppError::Reset(4));
    assert_eq!(calls.lock().unwrap().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn non_transient_errors_are_not_retried() {
    let (service, calls) = scripted(|_| async { Err::<&str, _>(AppError::Invalid) });
    let mut service = no_jitter(4, 10 * MS).layer().layer(service);
    assert_eq!(
        service.ready().await.unwrap().call(()).await,
        Err(AppError::Invalid)
    );
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn delays_between_attempts_follow_the_backoff() {
    let (service, calls) = scripted(|n| async move {
        if n < 4 {
            Err(AppError::Reset(n))
        } else {
            Ok("ok")
        }
    });
    let policy = RetryPolicy::new(5)
        .backoff(Backoff::exponential(100 * MS, 2.0))
        .jitter(Jitter::None);
    let mut service = policy.layer().layer(service);
    assert_eq!(service.ready().await.unwrap().call(()).await.unwrap(), "ok");
    let times = calls.lock().unwrap().clone();
    let gaps: Vec<_> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    assert_eq!(gaps, [100, 200, 400]);
}

#[tokio::test(start_paused = true)]
async fn retries_on_a_response() {
    let (service, calls) = scripted(|n| async move { Ok(if n < 3 { "503" } else { "200" }) });
    let policy = no_jitter(5, 10 * MS)
        .retry_if(|result: &Result<&'static str, AppError>| matches!(result, Ok("503")));
    let mut service = policy.layer().layer(service);
    assert_eq!(
        service.ready().await.unwrap().call(()).await.unwrap(),
        "200"
    );
    assert_eq!(calls.lock().unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_hint_replaces_the_backoff_delay() {
    let (service, calls) = scripted(|n| async move {
        if n == 1 {
            Err(AppError::Busy(3 * SEC))
        } else {
            Ok("ok")
        }
    });
    let policy = RetryPolicy::new(3)
        .backoff(Backoff::constant(10 * MS).max_delay(10 * SEC))
        .jitter(Jitter::None);
    let mut service = policy.layer().layer(service);
    service.ready().await.unwrap().call(()).await.unwrap();
    let times = calls.lock().unwrap().clone();
    assert_eq!(times[1] - times[0], 3 * SEC);
}

#[tokio::test(start_paused = true)]
async fn a_hint_beyond_the_maximum_delay_is_not_waited_for_without_a_deadline() {
    let (service, calls) = scripted(|_| async { Err::<&str, _>(AppError::Busy(60 * SEC)) });
    let policy = RetryPolicy::new(3)
        .backoff(Backoff::constant(10 * MS).max_delay(10 * SEC))
        .jitter(Jitter::None);
    let mut service = policy.layer().layer(service);
    let start = Instant::now();
    let error = service.ready().await.unwrap().call(()).await.unwrap_err();
    assert_eq!(error, AppError::Busy(60 * SEC));
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn cancelling_during_the_backoff_sleep_stops_retrying() {
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let mut service = no_jitter(5, SEC).layer().layer(service);
    let mut call = Box::pin(service.ready().await.unwrap().call(()));
    // First attempt fails; the retry is now asleep for a second.
    assert!(futures_util::poll!(call.as_mut()).is_pending());
    assert_eq!(calls.lock().unwrap().len(), 1);
    drop(call);
    advance(10 * SEC).await;
    assert_eq!(
        calls.lock().unwrap().len(),
        1,
        "a cancelled request kept retrying"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_outside_a_breaker_stops_at_circuit_open() {
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new("retry-vs-breaker")
            .max_failures(3)
            .reset_timeout(30 * SEC),
    );
    let mut service = no_jitter(7, 10 * MS).layer().layer(breaker.layer(service));
    let error = service.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(matches!(error, AppError::Open(_)), "got {error}");
    assert_eq!(
        calls.lock().unwrap().len(),
        3,
        "only 3 calls may reach the service"
    );
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_is_retried_when_asked_and_its_wait_fits_the_deadline() {
    let (service, calls) = scripted(|n| async move {
        if n <= 2 {
            Err(AppError::Reset(n))
        } else {
            Ok("recovered")
        }
    });
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new("fits")
            .max_failures(2)
            .reset_timeout(500 * MS),
    );
    let stack = DeadlineLayer::new(5 * SEC).layer(
        no_jitter(5, 10 * MS)
            .retry_rejections(true)
            .honor_deadline()
            .layer()
            .layer(breaker.layer(service)),
    );
    let mut service = stack;
    let reply = service
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(()))
        .await;
    assert_eq!(reply.unwrap(), "recovered");
    let times = calls.lock().unwrap().clone();
    assert_eq!(times.len(), 3);
    // The third call waited out the open circuit: 10 ms after the second failure it was
    // rejected with 490 ms to go, and retried exactly then.
    assert_eq!(times[2] - times[1], 500 * MS);
}

#[tokio::test(start_paused = true)]
async fn two_hung_attempts_time_out_and_the_third_succeeds() {
    let (service, calls) = scripted(|n| async move {
        if n <= 2 {
            std::future::pending::<()>().await;
        }
        Ok("third")
    });
    let timed = TimeoutLayer::new(SEC).layer(service);
    let mut service = no_jitter(3, 100 * MS).layer().layer(timed);
    let start = Instant::now();
    assert_eq!(
        service.ready().await.unwrap().call(()).await.unwrap(),
        "third"
    );
    assert_eq!(calls.lock().unwrap().len(), 3);
    assert_eq!(start.elapsed(), 2 * SEC + 200 * MS);
}

#[tokio::test(start_paused = true)]
async fn an_outer_deadline_cancels_the_retry_loop_in_its_sleep() {
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    // This policy does not look at deadlines: it would sleep 5 s; the deadline layer stops it.
    let mut service = DeadlineLayer::new(SEC).layer(
        no_jitter(5, 5 * SEC)
            .ignore_deadline()
            .layer()
            .layer(service),
    );
    let start = Instant::now();
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(()))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, AppError::Timeout(e) if e.is_deadline()),
        "got {error}"
    );
    assert_eq!(start.elapsed(), SEC);
    advance(60 * SEC).await;
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_stops_with_a_clear_error_when_the_next_attempt_cannot_fit() {
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let mut service = no_jitter(10, 600 * MS)
        .honor_deadline()
        .layer()
        .layer(service);
    let request = Deadlined::new(()).with_deadline(Deadline::after(SEC));
    let start = Instant::now();
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request)
        .await
        .unwrap_err();
    assert_eq!(calls.lock().unwrap().len(), 2);
    assert_eq!(
        start.elapsed(),
        600 * MS,
        "retry slept past the point it knew it would stop"
    );
    assert_eq!(
        error.to_string(),
        "deadline exceeded (no time left for another attempt after 2; last error: connection reset on attempt 2)"
    );
}

#[tokio::test(start_paused = true)]
async fn the_budget_refuses_retries_beyond_its_share_under_total_failure() {
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let budget = Arc::new(RetryBudget::new(10 * SEC, 0, 0.2));
    let mut service = no_jitter(5, 10 * MS)
        .budget(Arc::clone(&budget))
        .layer()
        .layer(service);
    for _ in 0..100 {
        assert!(service.ready().await.unwrap().call(()).await.is_err());
    }
    // Without a budget: 100 × 5 = 500 calls. With 20%: the 100 requests plus exactly 20 retries.
    assert_eq!(calls.lock().unwrap().len(), 120);
    assert_eq!(budget.remaining(), 0);
}

#[tokio::test(start_paused = true)]
async fn seeded_jitter_is_reproducible_and_hooks_see_every_retry() {
    async fn delays(seed: u64) -> Vec<(u32, Duration)> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let (service, _) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
        let policy = RetryPolicy::new(6)
            .backoff(Backoff::exponential(100 * MS, 2.0))
            .jitter(Jitter::Decorrelated)
            .seed(seed)
            .on_retry(move |event| log.lock().unwrap().push((event.attempt, event.delay)));
        let mut service = policy.layer().layer(service);
        let _ = service.ready().await.unwrap().call(()).await;
        seen.lock().unwrap().clone()
    }
    let first = delays(1234).await;
    assert_eq!(
        first.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(first, delays(1234).await);
    assert_ne!(first, delays(4321).await);
}

// ---- issue 13 items 6, 7, 9, 18, 19, 24 ----

#[tokio::test(start_paused = true)]
async fn a_closure_predicate_keeps_retry_after_hints() {
    let (service, calls) = scripted(|n| async move {
        if n == 1 {
            Err(AppError::Busy(70 * MS))
        } else {
            Ok("ok")
        }
    });
    let policy = RetryPolicy::new(3)
        .backoff(Backoff::constant(10 * MS).max_delay(SEC))
        .retry_if(|result: &Result<&'static str, AppError>| {
            matches!(result, Err(AppError::Busy(_)))
        });
    let mut service = policy.layer().layer(service);
    service.ready().await.unwrap().call(()).await.unwrap();
    let times = calls.lock().unwrap().clone();
    assert_eq!(times[1] - times[0], 70 * MS, "the hint was ignored");
}

#[tokio::test(start_paused = true)]
async fn a_closure_predicate_does_not_retry_an_open_circuit() {
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new("closure")
            .max_failures(1)
            .reset_timeout(100 * MS),
    );
    let policy = no_jitter(5, 10 * MS)
        .retry_if(|result: &Result<&'static str, AppError>| result.is_err())
        .honor_deadline();
    let mut service =
        DeadlineLayer::new(10 * SEC).layer(policy.layer().layer(breaker.layer(service)));
    let start = Instant::now();
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(()))
        .await
        .unwrap_err();
    assert!(matches!(error, AppError::Open(_)), "got {error}");
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert_eq!(
        start.elapsed(),
        10 * MS,
        "only the one backoff sleep before the rejection"
    );
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_fails_fast_by_default_even_with_time_to_wait() {
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new("fast")
            .max_failures(1)
            .reset_timeout(400 * MS),
    );
    let handle = breaker.handle();
    let mut service = DeadlineLayer::new(10 * SEC).layer(
        no_jitter(5, 10 * MS)
            .honor_deadline()
            .layer()
            .layer(breaker.layer(service)),
    );
    let _ = service
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(()))
        .await;
    assert_eq!(
        handle.state(),
        palisade::circuit_breaker::CircuitState::Open
    );
    let start = Instant::now();
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(()))
        .await
        .unwrap_err();
    assert!(matches!(error, AppError::Open(_)), "got {error}");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "a caller waited out the open breaker"
    );
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_hint_of_duration_max_neither_panics_nor_waits() {
    let (service, calls) = scripted(|_| async { Err::<&str, _>(AppError::Busy(Duration::MAX)) });
    let mut service =
        DeadlineLayer::new(SEC).layer(no_jitter(3, MS).honor_deadline().layer().layer(service));
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(()))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, AppError::Timeout(e) if e.is_deadline()),
        "got {error}"
    );
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_of_duration_max_works() {
    let (service, _) = scripted(|_| async { Ok("ok") });
    let mut service = DeadlineLayer::new(Duration::MAX).layer(service);
    assert_eq!(
        service
            .ready()
            .await
            .unwrap()
            .call(Deadlined::new(()))
            .await
            .unwrap(),
        "ok"
    );
    let deadline = Deadline::after(Duration::MAX);
    assert!(deadline.remaining() > 365 * 24 * 3600 * SEC);
}

#[tokio::test(start_paused = true)]
async fn configuring_a_clone_leaves_the_original_alone() {
    let seen = Arc::new(AtomicU32::new(0));
    let log = Arc::clone(&seen);
    let original = no_jitter(3, MS)
        .seed(7)
        .budget(Arc::new(RetryBudget::new(10 * SEC, 10, 0.5)));
    let configured = original
        .clone()
        .on_retry(move |_| {
            log.fetch_add(1, Ordering::SeqCst);
        })
        .seed(8);
    for policy in [original, configured] {
        let (service, _) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
        let _ = policy
            .layer()
            .layer(service)
            .ready()
            .await
            .unwrap()
            .call(())
            .await;
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "only the configured clone has the hook"
    );
}

#[tokio::test(start_paused = true)]
async fn an_enclosing_deadline_is_honoured_by_default_for_any_request() {
    // A plain `u32` request: no `HasDeadline`, no `.honor_deadline()`.
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let mut service = tower::ServiceBuilder::new()
        .map_request(|n: u32| Deadlined::new(n))
        .layer(DeadlineLayer::new(SEC))
        .map_request(|request: Deadlined<u32>| request.request)
        .layer(no_jitter(10, 300 * MS).layer())
        .layer(TimeoutLayer::new(10 * SEC))
        .service(service);
    let start = Instant::now();
    let error = service.ready().await.unwrap().call(7).await.unwrap_err();
    // Attempts at 0, 300, 600, 900 ms; the next would start at 1.2 s, past the deadline.
    assert_eq!(calls.lock().unwrap().len(), 4);
    assert_eq!(
        start.elapsed(),
        900 * MS,
        "retry slept toward a deadline it could not meet"
    );
    assert_eq!(error, AppError::Reset(4));
}

#[tokio::test(start_paused = true)]
async fn an_attempt_timeout_stops_at_an_enclosing_deadline_for_any_request() {
    let (service, _) = scripted(|_| async {
        tokio::time::sleep(10 * SEC).await;
        Ok("late")
    });
    let mut service = tower::ServiceBuilder::new()
        .layer(DeadlineLayer::new(SEC))
        .map_request(|request: Deadlined<u32>| request.request)
        .layer(TimeoutLayer::new(5 * SEC))
        .service(service);
    let start = Instant::now();
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, AppError::Timeout(e) if e.is_deadline()),
        "got {error}"
    );
    assert_eq!(start.elapsed(), SEC);
}

#[tokio::test(start_paused = true)]
async fn a_chosen_backoff_is_used_as_written() {
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let policy = RetryPolicy::new(4).backoff(Backoff::constant(10 * MS));
    let _ = policy
        .layer()
        .layer(service)
        .ready()
        .await
        .unwrap()
        .call(())
        .await;
    let times = calls.lock().unwrap().clone();
    let gaps: Vec<_> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps, [10 * MS; 3]);
}

#[tokio::test(start_paused = true)]
async fn give_up_events_name_the_attempts_the_reason_and_the_last_error() {
    use palisade::retry::GiveUpReason;
    let events = Arc::new(Mutex::new(Vec::new()));
    type Log = Arc<Mutex<Vec<(u32, GiveUpReason, String)>>>;
    let record = |events: &Log| {
        let events = Arc::clone(events);
        move |stop: &palisade::retry::GiveUp<'_>| {
            events
                .lock()
                .unwrap()
                .push((stop.attempts, stop.reason, stop.last_error.to_owned()))
        }
    };

    // Attempts exhausted.
    let (service, _) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let policy = no_jitter(3, MS).on_give_up(record(&events));
    let _ = policy
        .layer()
        .layer(service)
        .ready()
        .await
        .unwrap()
        .call(())
        .await;
    // Budget refused.
    let (service, _) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let policy = no_jitter(3, MS)
        .budget(Arc::new(RetryBudget::new(10 * SEC, 0, 0.0)))
        .on_give_up(record(&events));
    let _ = policy
        .layer()
        .layer(service)
        .ready()
        .await
        .unwrap()
        .call(())
        .await;
    // Deadline reached.
    let (service, _) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let policy = no_jitter(3, 2 * SEC).on_give_up(record(&events));
    let _ = DeadlineLayer::new(SEC)
        .layer(policy.layer().layer(service))
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(()))
        .await;
    // Hint too long.
    let (service, _) = scripted(|_| async { Err::<&str, _>(AppError::Busy(60 * SEC)) });
    let policy = no_jitter(3, MS).on_give_up(record(&events));
    let _ = policy
        .layer()
        .layer(service)
        .ready()
        .await
        .unwrap()
        .call(())
        .await;

    assert_eq!(
        *events.lock().unwrap(),
        [
            (
                3,
                GiveUpReason::Exhausted,
                "connection reset on attempt 3".to_owned()
            ),
            (
                1,
                GiveUpReason::BudgetExhausted,
                "connection reset on attempt 1".to_owned()
            ),
            (
                1,
                GiveUpReason::DeadlineReached,
                "connection reset on attempt 1".to_owned()
            ),
            (
                1,
                GiveUpReason::HintTooLong,
                "busy, retry after 60s".to_owned()
            ),
        ]
    );
    assert_eq!(GiveUpReason::Exhausted.to_string(), "retries exhausted");
}

// ---- issue 18 items 3, 6, 7 ----

#[tokio::test(start_paused = true)]
async fn budget_deposits_add_up_last_the_whole_ttl_and_expire_at_it() {
    // ttl 10 s in ten slots of 1 s; ratio 1: one retry per request.
    let budget = RetryBudget::new(10 * SEC, 0, 1.0);
    budget.deposit(); // t = 0
    advance(3 * SEC).await;
    budget.deposit(); // t = 3 s
    advance(3 * SEC).await;
    budget.deposit(); // t = 6 s
    assert_eq!(budget.remaining(), 3, "deposits at different times add up");
    advance(4 * SEC - MS).await; // t = 9.999 s
    assert_eq!(budget.remaining(), 3, "a deposit lasts the whole ttl");
    advance(MS).await; // t = 10 s
    assert_eq!(
        budget.remaining(),
        2,
        "the first deposit expires exactly at the ttl"
    );
    advance(3 * SEC).await; // t = 13 s
    assert_eq!(budget.remaining(), 1);
    assert!(budget.withdraw());
    assert_eq!(budget.remaining(), 0);
    advance(3 * SEC).await; // t = 16 s: the t = 6 s deposit and the withdrawal both expire
    assert_eq!(budget.remaining(), 0);
    assert!(!budget.withdraw());

    // A withdrawal lasts as long: it stops counting exactly one ttl after it was made.
    let budget = RetryBudget::new(10 * SEC, 0, 1.0);
    budget.deposit();
    budget.deposit();
    assert!(budget.withdraw());
    advance(5 * SEC).await;
    budget.deposit();
    assert_eq!(budget.remaining(), 2);
    advance(5 * SEC).await; // t = 10 s: the first two deposits and the withdrawal expire
    assert_eq!(budget.remaining(), 1);
    assert_eq!(
        format!("{budget:?}"),
        "RetryBudget { ttl: 10s, min_per_sec: 0, ratio: 1.0, remaining: 1 }"
    );
}

#[tokio::test(start_paused = true)]
async fn decorrelated_jitter_grows_from_the_previous_delay() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let (service, _) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let policy = RetryPolicy::new(12)
        .backoff(Backoff::exponential(10 * MS, 2.0).max_delay(3600 * SEC))
        .jitter(Jitter::Decorrelated)
        .seed(99)
        .on_retry(move |event| log.lock().unwrap().push(event.delay));
    let _ = policy
        .layer()
        .layer(service)
        .ready()
        .await
        .unwrap()
        .call(())
        .await;
    let delays = seen.lock().unwrap().clone();
    assert_eq!(delays.len(), 11);
    for pair in delays.windows(2) {
        assert!(pair[1] >= 10 * MS && pair[1] <= pair[0] * 3, "{pair:?}");
    }
    // Drawn from [base, 3 × previous], the delays climb well above the base over 11 retries.
    assert!(*delays.iter().max().unwrap() > 100 * MS, "{delays:?}");
}

#[test]
fn jitter_and_backoff_edges() {
    // Equal jitter below the cap spans [d/2, d].
    let backoff = Backoff::constant(100 * MS).max_delay(SEC);
    assert_eq!(Jitter::Equal.delay(&backoff, 0, MS, 0), 50 * MS);
    assert_eq!(Jitter::Equal.delay(&backoff, 0, MS, u64::MAX), 100 * MS);
    assert_eq!(Jitter::Full.delay(&backoff, 0, MS, 0), Duration::ZERO);
    assert_eq!(Jitter::Full.delay(&backoff, 0, MS, u64::MAX), 100 * MS);
    // Zero delays stay zero under every jitter.
    let zero = Backoff::constant(Duration::ZERO);
    for jitter in [
        Jitter::None,
        Jitter::Full,
        Jitter::Equal,
        Jitter::Decorrelated,
    ] {
        assert_eq!(
            jitter.delay(&zero, 3, Duration::ZERO, u64::MAX),
            Duration::ZERO
        );
    }
    // Finite but beyond `Duration`'s range: the cap, no panic.
    let huge =
        Backoff::exponential(Duration::from_secs(u64::MAX / 4), 1000.0).max_delay(Duration::MAX);
    assert_eq!(huge.delay(3), Duration::MAX);
    assert_eq!(huge.delay(0), Duration::from_secs(u64::MAX / 4));
    let capped = Backoff::exponential(SEC, 10.0).max_delay(Duration::from_secs(u64::MAX));
    assert_eq!(capped.delay(25), Duration::from_secs(u64::MAX));
    // Linear growth saturates.
    let linear = Backoff::linear(Duration::MAX, SEC).max_delay(Duration::MAX);
    assert_eq!(linear.delay(u32::MAX), Duration::MAX);
    // Decorrelated never goes below the base or above the cap.
    let decorrelated = Backoff::exponential(10 * MS, 2.0).max_delay(25 * MS);
    assert_eq!(
        Jitter::Decorrelated.delay(&decorrelated, 5, SEC, u64::MAX),
        25 * MS
    );
    assert_eq!(
        Jitter::Decorrelated.delay(&decorrelated, 5, SEC, 0),
        10 * MS
    );
    assert_eq!(
        Jitter::Decorrelated.delay(&decorrelated, 5, MS, u64::MAX),
        10 * MS
    );
}

#[tokio::test(start_paused = true)]
async fn a_hint_exactly_the_maximum_delay_is_waited_for() {
    let (service, calls) = scripted(|n| async move {
        if n == 1 {
            Err(AppError::Busy(SEC))
        } else {
            Ok("ok")
        }
    });
    let policy = RetryPolicy::new(3).backoff(Backoff::constant(10 * MS).max_delay(SEC));
    let mut service = policy.layer().layer(service);
    service.ready().await.unwrap().call(()).await.unwrap();
    let times = calls.lock().unwrap().clone();
    assert_eq!(times[1] - times[0], SEC);
}

#[test]
fn max_attempts_and_debug_output() {
    let policy = RetryPolicy::new(4).backoff(Backoff::constant(10 * MS));
    assert_eq!(policy.max_attempts(), 4);
    assert_eq!(
        format!("{policy:?}"),
        "RetryPolicy { max_attempts: 4, backoff: Backoff { kind: Constant(10ms), max_delay: 10ms }, jitter: None, retry_rejections: false, budget: None, .. }"
    );
}

#[tokio::test(start_paused = true)]
async fn a_response_future_names_itself_in_debug_output() {
    let (service, _) = scripted::<(), _, _>(|_| async { Ok("done") });
    let mut service = no_jitter(2, MS).layer().layer(service);
    let future = service.ready().await.unwrap().call(());
    // Its fields (the request, the policy, the inner future) are not the caller's business.
    assert_eq!(format!("{future:?}"), "ResponseFuture { .. }");
    assert_eq!(future.await, Ok("done"));
}

#[tokio::test(start_paused = true)]
async fn a_rejection_without_a_hint_is_never_retried() {
    // tower's LoadShed: transient, a local rejection, no retry-after.
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let service = tower::service_fn(move |_: Deadlined<()>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), tower::BoxError>(Box::new(tower::load_shed::error::Overloaded::new())) }
    });
    for policy in [no_jitter(3, MS), no_jitter(3, MS).retry_rejections(true)] {
        calls.store(0, Ordering::SeqCst);
        let mut retried = DeadlineLayer::new(10 * SEC).layer(policy.layer().layer(service.clone()));
        let _ = retried
            .ready()
            .await
            .unwrap()
            .call(Deadlined::new(()))
            .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_configured_clone_keeps_sharing_the_budget() {
    let budget = Arc::new(RetryBudget::new(10 * SEC, 0, 0.0));
    let original = no_jitter(3, MS).seed(1).budget(Arc::clone(&budget));
    let clone = original.clone().on_retry(|_| {}).seed(2);
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let _ = clone
        .layer()
        .layer(service)
        .ready()
        .await
        .unwrap()
        .call(())
        .await;
    assert_eq!(calls.lock().unwrap().len(), 1, "the clone lost the budget");
    drop(original);
}

#[tokio::test(start_paused = true)]
async fn retrying_rejections_still_needs_a_deadline_to_fit_the_wait_in() {
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new("no-deadline")
            .max_failures(1)
            .reset_timeout(100 * MS),
    );
    let mut service = no_jitter(5, 10 * MS)
        .retry_rejections(true)
        .layer()
        .layer(breaker.layer(service));
    let start = Instant::now();
    let error = service.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(matches!(error, AppError::Open(_)), "got {error}");
    assert_eq!(
        start.elapsed(),
        10 * MS,
        "the open circuit was waited out with no deadline"
    );
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_attempt_that_would_start_exactly_at_the_deadline_is_not_made() {
    let (service, calls) = scripted(|n| async move { Err::<&str, _>(AppError::Reset(n)) });
    let mut service = DeadlineLayer::new(SEC).layer(no_jitter(5, 500 * MS).layer().layer(service));
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(()))
        .await
        .unwrap_err();
    // Attempts at 0 and 500 ms; the third would start at exactly 1 s, the deadline.
    assert_eq!(calls.lock().unwrap().len(), 2);
    assert_eq!(error, AppError::Reset(2));
}

#[tokio::test(start_paused = true)]
async fn budgets_on_one_thread_keep_their_own_slots() {
    let long = RetryBudget::new(10 * SEC, 0, 1.0);
    advance(5 * SEC).await;
    long.deposit();
    // A budget with another epoch and slot length, used on the same thread right after.
    let short = RetryBudget::new(SEC, 0, 1.0);
    short.deposit();
    assert_eq!((long.remaining(), short.remaining()), (1, 1));
    advance(SEC).await;
    assert_eq!((long.remaining(), short.remaining()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_deposit_exactly_at_a_slot_boundary_lands_in_the_new_slot() {
    let budget = RetryBudget::new(10 * SEC, 0, 1.0);
    budget.deposit(); // slot [0, 1 s)
    advance(SEC).await;
    budget.deposit(); // exactly 1 s: slot [1 s, 2 s)
    advance(9 * SEC).await;
    assert_eq!(
        budget.remaining(),
        1,
        "the second deposit expired with the first"
    );
    advance(SEC).await;
    assert_eq!(budget.remaining(), 0);
}

/// A tower policy written without palisade in mind: retries up to `left` more times whenever
/// `wants` says so, and counts how often it was asked.
#[derive(Clone)]
struct Counting {
    left: u32,
    asked: Arc<AtomicU32>,
    wants: fn(&Result<&'static str, AppError>) -> bool,
}

impl<Req: Clone> tower::retry::Policy<Req, &'static str, AppError> for Counting {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Req,
        result: &mut Result<&'static str, AppError>,
    ) -> Option<Self::Future> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        if self.left == 0 || !(self.wants)(result) {
            return None;
        }
        self.left -= 1;
        Some(std::future::ready(()))
    }

    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        Some(request.clone())
    }
}

/// `Counting` as a policy of one's own: a success final or not (`SUCCESS_FINAL`), its retry
/// loop run inline or out of line (`INLINE`, `FinalResult::RETRY_INLINE`), so that both of
/// `Retry`'s loops are tried.
#[derive(Clone)]
struct Own<const SUCCESS_FINAL: bool, const INLINE: bool>(Counting);

impl<Req: Clone, const SUCCESS_FINAL: bool, const INLINE: bool>
    tower::retry::Policy<Req, &'static str, AppError> for Own<SUCCESS_FINAL, INLINE>
{
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        request: &mut Req,
        result: &mut Result<&'static str, AppError>,
    ) -> Option<Self::Future> {
        self.0.retry(request, result)
    }

    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        self.0.clone_request(request)
    }
}

impl<const SUCCESS_FINAL: bool, const INLINE: bool>
    palisade::retry::FinalResult<&'static str, AppError> for Own<SUCCESS_FINAL, INLINE>
{
    const RETRY_INLINE: bool = INLINE;

    fn is_final(&self, result: &Result<&'static str, AppError>) -> bool {
        SUCCESS_FINAL && result.is_ok()
    }
}

/// A policy that retries a response, asked about every result.
async fn asked_about_every_result<P>(make: impl Fn(Counting) -> P)
where
    P: tower::retry::Policy<(), &'static str, AppError>
        + palisade::retry::FinalResult<&'static str, AppError>
        + Clone,
{
    use palisade::retry::RetryLayer;
    // A response that the policy retries: a palisade `Retry` must not skip it.
    let (service, calls) =
        scripted::<(), _, _>(|n| async move { Ok(if n < 3 { "not yet" } else { "done" }) });
    let asked = Arc::new(AtomicU32::new(0));
    let policy = make(Counting {
        left: 5,
        asked: Arc::clone(&asked),
        wants: |result| matches!(result, Ok("not yet")),
    });
    let mut retried = RetryLayer::new(policy).layer(service);
    let answer = retried.ready().await.unwrap().call(()).await;
    assert_eq!(answer, Ok("done"));
    assert_eq!(calls.lock().unwrap().len(), 3);
    assert_eq!(
        asked.load(Ordering::SeqCst),
        3,
        "every result, the final success included"
    );
}

#[tokio::test(start_paused = true)]
async fn any_tower_policy_retries_through_any_policy_and_is_asked_about_every_result() {
    asked_about_every_result(palisade::retry::AnyPolicy).await;
    asked_about_every_result(Own::<false, true>).await;
    asked_about_every_result(Own::<false, false>).await;
}

async fn final_results_skip_the_policy<const INLINE: bool>() {
    use palisade::retry::RetryLayer;
    let (service, calls) = scripted::<(), _, _>(|n| async move {
        if n < 3 {
            Err(AppError::Reset(n))
        } else {
            Ok("done")
        }
    });
    let asked = Arc::new(AtomicU32::new(0));
    let policy = Own::<true, INLINE>(Counting {
        left: 5,
        asked: Arc::clone(&asked),
        wants: |result| result.is_err(),
    });
    let mut retried = RetryLayer::new(policy).layer(service);
    assert_eq!(retried.ready().await.unwrap().call(()).await, Ok("done"));
    assert_eq!(calls.lock().unwrap().len(), 3);
    assert_eq!(
        asked.load(Ordering::SeqCst),
        2,
        "asked about the two failures, not the final success"
    );

    // A first attempt that succeeds never reaches the policy.
    asked.store(0, Ordering::SeqCst);
    let (service, _) = scripted::<(), _, _>(|_| async { Ok("at once") });
    let policy = Own::<true, INLINE>(Counting {
        left: 5,
        asked: Arc::clone(&asked),
        wants: |_| true,
    });
    let mut retried = RetryLayer::new(policy).layer(service);
    assert_eq!(retried.ready().await.unwrap().call(()).await, Ok("at once"));
    assert_eq!(asked.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_result_the_policy_calls_final_skips_the_policy_and_others_still_reach_it() {
    final_results_skip_the_policy::<true>().await;
    final_results_skip_the_policy::<false>().await;
}

#[tokio::test(start_paused = true)]
async fn an_inner_service_that_fails_its_readiness_check_before_a_retry_ends_the_call() {
    use palisade::retry::{AnyPolicy, RetryLayer};
    use std::task::{Context, Poll};

    /// Ready for the first call, then reports a lost connection from `poll_ready`.
    #[derive(Clone)]
    struct LosesItsConnection(Arc<AtomicU32>);

    impl Service<()> for LosesItsConnection {
        type Response = &'static str;
        type Error = AppError;
        type Future = std::future::Ready<Result<&'static str, AppError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AppError>> {
            Poll::Ready(if self.0.load(Ordering::SeqCst) == 0 {
                Ok(())
            } else {
                Err(AppError::Invalid)
            })
        }

        fn call(&mut self, (): ()) -> Self::Future {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            std::future::ready(Err(AppError::Reset(n)))
        }
    }

    let counting = || Counting {
        left: 5,
        asked: Arc::new(AtomicU32::new(0)),
        wants: |result| result.is_err(),
    };
    let calls = Arc::new(AtomicU32::new(0));
    let mut retried =
        RetryLayer::new(AnyPolicy(counting())).layer(LosesItsConnection(Arc::clone(&calls)));
    let answer = retried.ready().await.unwrap().call(()).await;
    assert_eq!(
        answer,
        Err(AppError::Invalid),
        "the readiness error, at once"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The same through the loop that runs out of line.
    let calls = Arc::new(AtomicU32::new(0));
    let mut retried = RetryLayer::new(Own::<false, false>(counting()))
        .layer(LosesItsConnection(Arc::clone(&calls)));
    let answer = retried.ready().await.unwrap().call(()).await;
    assert_eq!(answer, Err(AppError::Invalid));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
