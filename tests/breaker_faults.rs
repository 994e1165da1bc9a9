//! The breaker faults of issue 13 (items 1–5) and the behaviours of issue 18 that no test pinned
//! down (the rate window over time, stale results after a reset, huge open times, subscriptions
//! of a dropped breaker), on tokio's paused clock.

use palisade::circuit_breaker::{
    CircuitBreaker, CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, CircuitState,
};
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::{advance, timeout};
use tower::{BoxError, Layer, Service, ServiceExt};

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Readiness {
    Ready,
    Pending,
    Fail,
}

/// A service whose readiness the test controls; counts `poll_ready`s and calls.
#[derive(Clone)]
struct Gated {
    readiness: Arc<Mutex<Readiness>>,
    polls: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Gated {
    fn new() -> Self {
        Gated {
            readiness: Arc::new(Mutex::new(Readiness::Ready)),
            polls: Arc::default(),
            calls: Arc::default(),
        }
    }

    fn set(&self, readiness: Readiness) {
        *self.readiness.lock().unwrap() = readiness;
    }
}

impl Service<bool> for Gated {
    type Response = &'static str;
    type Error = BoxError;
    type Future = Ready<Result<&'static str, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        match *self.readiness.lock().unwrap() {
            Readiness::Ready => Poll::Ready(Ok(())),
            Readiness::Pending => Poll::Pending,
            Readiness::Fail => Poll::Ready(Err(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )))),
        }
    }

    fn call(&mut self, fail: bool) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        ready(if fail { Err("boom".into()) } else { Ok("ok") })
    }
}

fn guarded(config: CircuitBreakerConfig) -> (CircuitBreaker<Gated>, Gated) {
    let inner = Gated::new();
    (CircuitBreakerLayer::new(config).layer(inner.clone()), inner)
}

async fn call(service: &mut CircuitBreaker<Gated>, fail: bool) -> Result<&'static str, BoxError> {
    service.ready().await?.call(fail).await
}

fn open_error(error: BoxError) -> CircuitOpen {
    *error.downcast::<CircuitOpen>().expect("a CircuitOpen")
}

// ---- item 1: an open breaker fails fast even when the inner service is not ready ----

#[tokio::test(start_paused = true)]
async fn a_forced_open_breaker_is_ready_without_polling_a_stuck_inner_service() {
    let (mut service, inner) = guarded(CircuitBreakerConfig::new("stuck"));
    inner.set(Readiness::Pending);
    service.handle().force_open();
    let polls = inner.polls.load(Ordering::SeqCst);
    let ready = timeout(60 * SEC, service.ready()).await;
    assert!(ready.is_ok(), "ready() waited for the inner service");
    let rejected = open_error(service.call(false).await.unwrap_err());
    assert_eq!(rejected.state(), CircuitState::ForcedOpen);
    assert_eq!(inner.polls.load(Ordering::SeqCst), polls);
    assert_eq!(inner.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_tripped_breaker_is_ready_without_polling_a_stuck_inner_service() {
    let (mut service, inner) = guarded(
        CircuitBreakerConfig::new("stuck")
            .max_failures(1)
            .reset_timeout(10 * SEC),
    );
    assert!(call(&mut service, true).await.is_err());
    assert_eq!(service.handle().state(), CircuitState::Open);
    inner.set(Readiness::Pending);
    for _ in 0..3 {
        let ready = timeout(60 * SEC, service.ready()).await;
        assert!(ready.is_ok(), "ready() waited for the inner service");
        let rejected = open_error(service.call(false).await.unwrap_err());
        assert_eq!(rejected.state(), CircuitState::Open);
    }
    assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
    // Once a trial is due the inner service is polled again (and waited for).
    advance(60 * SEC).await;
    assert!(timeout(SEC, service.ready()).await.is_err());
    inner.set(Readiness::Ready);
    assert_eq!(call(&mut service, false).await.unwrap(), "ok");
    assert_eq!(service.handle().state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn an_open_period_ending_between_poll_ready_and_call_rejects_with_no_wait() {
    let (mut service, inner) = guarded(
        CircuitBreakerConfig::new("race")
            .max_failures(1)
            .reset_timeout(10 * SEC),
    );
    assert!(call(&mut service, true).await.is_err());
    service.ready().await.unwrap();
    let polls = inner.polls.load(Ordering::SeqCst);
    advance(10 * SEC).await;
    // The inner service was not made ready, so it must not be called: reject, come back at once.
    let rejected = open_error(service.call(false).await.unwrap_err());
    assert_eq!(rejected.retry_after(), Some(Duration::ZERO));
    assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
    assert_eq!(inner.polls.load(Ordering::SeqCst), polls);
    assert_eq!(service.handle().state(), CircuitState::Open);
    // The next call polls the inner service and is the trial.
    assert_eq!(call(&mut service, false).await.unwrap(), "ok");
    assert_eq!(service.handle().state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_call_without_poll_ready_is_rejected_not_forwarded() {
    let (mut service, inner) = guarded(CircuitBreakerConfig::new("eager"));
    let rejected = open_error(service.call(false).await.unwrap_err());
    assert_eq!(rejected.retry_after(), Some(Duration::ZERO));
    assert_eq!(inner.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn inner_poll_ready_errors_count_as_failures() {
    let (mut service, inner) = guarded(
        CircuitBreakerConfig::new("refused")
            .max_failures(3)
            .reset_timeout(10 * SEC),
    );
    inner.set(Readiness::Fail);
    for _ in 0..3 {
        let error = service.ready().await.err().expect("poll_ready fails");
        assert!(error.downcast_ref::<std::io::Error>().is_some());
    }
    assert_eq!(service.handle().state(), CircuitState::Open);
    assert_eq!(service.handle().metrics().failures, 3);
    // Open: callers fail fast without touching the dead transport.
    let polls = inner.polls.load(Ordering::SeqCst);
    assert!(open_error(call(&mut service, false).await.unwrap_err()).retry_after() > Some(MS));
    assert_eq!(inner.polls.load(Ordering::SeqCst), polls);
    // When a trial is due the inner service is polled again; its error reaches the caller, and
    // it is a failed trial: the circuit opens for another period, as a failed trial call would
    // open it. (It used to stay open with its period over, so every caller after it polled the
    // dead transport again and none was turned away.)
    let mut changes = service.handle().subscribe();
    advance(10 * SEC).await;
    let error = service.ready().await.err().expect("poll_ready fails");
    assert!(error.downcast_ref::<std::io::Error>().is_some());
    assert_eq!(service.handle().state(), CircuitState::Open);
    assert_eq!(service.handle().metrics().failures, 4);
    for (from, to) in [
        (CircuitState::Open, CircuitState::HalfOpen),
        (CircuitState::HalfOpen, CircuitState::Open),
    ] {
        let change = changes.try_recv().expect("a state change");
        assert_eq!((change.from, change.to), (from, to));
    }
    assert!(changes.try_recv().is_none());
    let polls = inner.polls.load(Ordering::SeqCst);
    for _ in 0..10 {
        let rejected = open_error(call(&mut service, false).await.unwrap_err());
        assert_eq!(rejected.retry_after(), Some(10 * SEC));
    }
    assert_eq!(inner.polls.load(Ordering::SeqCst), polls);
    inner.set(Readiness::Ready);
    advance(10 * SEC).await;
    assert_eq!(call(&mut service, false).await.unwrap(), "ok");
    assert_eq!(service.handle().state(), CircuitState::Closed);
}

/// Half-open with every trial slot taken, a caller is turned away at once, as in `Open`: it
/// used to queue behind the inner service (not ready while the trial holds it: a
/// `ConcurrencyLimit(1)`, a full `Buffer`) only to be rejected once it got ready.
#[tokio::test(start_paused = true)]
async fn half_open_with_every_trial_slot_taken_turns_callers_away_without_polling() {
    let (mut service, inner) = guarded(
        CircuitBreakerConfig::new("busy")
            .max_failures(1)
            .reset_timeout(10 * SEC)
            .trial_timeout(10 * SEC),
    );
    let handle = service.handle();
    assert!(call(&mut service, true).await.is_err());
    advance(10 * SEC).await;
    let mut other = service.clone();
    let trial = service.ready().await.unwrap().call(false);
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    inner.set(Readiness::Pending);
    advance(2 * SEC).await;
    let polls = inner.polls.load(Ordering::SeqCst);
    let ready = timeout(60 * SEC, other.ready()).await;
    assert!(ready.is_ok(), "ready() waited for the inner service");
    let rejected = open_error(other.call(false).await.unwrap_err());
    assert_eq!(rejected.state(), CircuitState::HalfOpen);
    // The trial's slot is taken back after the trial timeout.
    assert_eq!(rejected.retry_after(), Some(8 * SEC));
    assert_eq!(inner.polls.load(Ordering::SeqCst), polls);
    assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
    // Once the trial timeout has passed, a caller takes the hung trial's slot and polls the
    // inner service again; the hung trial's end, late, changes nothing.
    advance(8 * SEC).await;
    assert!(timeout(SEC, other.ready()).await.is_err());
    drop(trial);
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    inner.set(Readiness::Ready);
    assert_eq!(call(&mut other, false).await.unwrap(), "ok");
    assert_eq!(handle.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_classifier_that_ignores_poll_ready_errors_is_obeyed() {
    let inner = Gated::new();
    let mut service =
        CircuitBreakerLayer::new(CircuitBreakerConfig::new("lenient").max_failures(1))
            .with_classifier(|result: &Result<&'static str, BoxError>| match result {
                Ok(_) => palisade::classify::Outcome::Success,
                Err(_) => palisade::classify::Outcome::Ignored,
            })
            .layer(inner.clone());
    inner.set(Readiness::Fail);
    assert!(service.ready().await.is_err());
    assert_eq!(service.handle().state(), CircuitState::Closed);
}

// ---- item 2 and issue 18 item 1: the rate rules over time ----

#[tokio::test(start_paused = true)]
async fn a_rate_rule_trips_when_a_success_reaches_min_calls() {
    let (mut service, _) =
        guarded(CircuitBreakerConfig::new("rate").failure_rate(0.5, 10 * SEC, 4));
    for fail in [true, true, false] {
        let _ = call(&mut service, fail).await;
        assert_eq!(service.handle().state(), CircuitState::Closed);
    }
    let _ = call(&mut service, false).await;
    assert_eq!(
        service.handle().state(),
        CircuitState::Open,
        "F F S S is 50% of 4 calls"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_rule_trips_on_slow_successes_alone() {
    let inner = tower::service_fn(|nap: Duration| async move {
        tokio::time::sleep(nap).await;
        Ok::<_, BoxError>("ok")
    });
    let mut service = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new("slow")
            .failure_rate(1.0, 60 * SEC, 3)
            .slow_calls(SEC, 0.6),
    )
    .layer(inner);
    let handle = service.handle();
    for nap in [2 * SEC, 2 * SEC] {
        service.ready().await.unwrap().call(nap).await.unwrap();
        assert_eq!(handle.state(), CircuitState::Closed);
    }
    // The third call, fast, brings the window to min_calls with 2/3 slow.
    service.ready().await.unwrap().call(MS).await.unwrap();
    assert_eq!(handle.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn the_rate_window_spans_its_buckets_and_forgets_old_ones() {
    let config = || CircuitBreakerConfig::new("window").failure_rate(0.5, 10 * SEC, 4);
    // Spread over four different buckets: all count.
    let (mut service, _) = guarded(config());
    for (fail, wait) in [(true, 2 * SEC), (true, 2 * SEC), (false, 2 * SEC)] {
        let _ = call(&mut service, fail).await;
        advance(wait).await;
    }
    let _ = call(&mut service, false).await;
    assert_eq!(service.handle().state(), CircuitState::Open);

    // Calls a whole window old no longer count, even when the clock lands on the same bucket.
    for later in [10 * SEC, 10 * SEC + 500 * MS, 15 * SEC, 25 * SEC] {
        let (mut service, _) = guarded(config());
        for fail in [true, true, false] {
            let _ = call(&mut service, fail).await;
        }
        advance(later).await;
        let _ = call(&mut service, false).await;
        assert_eq!(service.handle().state(), CircuitState::Closed, "{later:?}");
        for _ in 0..2 {
            let _ = call(&mut service, true).await;
            assert_eq!(service.handle().state(), CircuitState::Closed, "{later:?}");
        }
        let _ = call(&mut service, true).await;
        assert_eq!(service.handle().state(), CircuitState::Open, "{later:?}");
    }

    // A bucket 9.5 s old still counts; the window keeps ten buckets of one second.
    let (mut service, _) = guarded(config());
    for fail in [true, true, false] {
        let _ = call(&mut service, fail).await;
    }
    advance(9 * SEC + 500 * MS).await;
    let _ = call(&mut service, false).await;
    assert_eq!(service.handle().state(), CircuitState::Open);
}

// ---- item 3: controls that change nothing emit nothing ----

#[tokio::test(start_paused = true)]
async fn controls_that_change_nothing_emit_nothing_and_keep_calls_in_flight() {
    let (mut service, _) = guarded(CircuitBreakerConfig::new("controls").max_failures(2));
    let handle = service.handle();
    let mut changes = handle.subscribe();
    // A call in flight across a reset of an untouched closed breaker still counts.
    let first = service.ready().await.unwrap().call(true);
    handle.reset();
    assert!(changes.try_recv().is_none());
    assert_eq!(handle.metrics().transitions, 0);
    assert!(first.await.is_err());
    let _ = call(&mut service, true).await;
    assert_eq!(
        handle.state(),
        CircuitState::Open,
        "the failure from before reset() counted"
    );

    handle.force_open();
    handle.force_open();
    handle.force_closed();
    handle.force_closed();
    handle.reset();
    handle.reset();
    let seen: Vec<_> = std::iter::from_fn(|| changes.try_recv())
        .map(|change| (change.from, change.to))
        .collect();
    assert_eq!(
        seen,
        [
            (CircuitState::Closed, CircuitState::Open),
            (CircuitState::Open, CircuitState::ForcedOpen),
            (CircuitState::ForcedOpen, CircuitState::ForcedClosed),
            (CircuitState::ForcedClosed, CircuitState::Closed),
        ]
    );
    assert_eq!(handle.metrics().transitions, 4);
}

#[tokio::test(start_paused = true)]
async fn reset_of_a_closed_breaker_forgets_its_failures() {
    let (mut service, _) = guarded(CircuitBreakerConfig::new("forget").max_failures(2));
    let handle = service.handle();
    let mut changes = handle.subscribe();
    let _ = call(&mut service, true).await;
    handle.reset();
    assert!(changes.try_recv().is_none());
    let _ = call(&mut service, true).await;
    assert_eq!(handle.state(), CircuitState::Closed);
    let _ = call(&mut service, true).await;
    assert_eq!(handle.state(), CircuitState::Open);
}

// ---- item 5: a zero reset timeout keeps the half-open limit ----

#[tokio::test(start_paused = true)]
async fn a_zero_reset_timeout_keeps_the_half_open_limit() {
    let mut service = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new("zero")
            .consecutive_failures(1)
            .reset_timeout(Duration::ZERO),
    )
    .layer(tower::util::BoxService::new(tower::service_fn(
        |rx: Option<oneshot::Receiver<()>>| async move {
            match rx {
                None => Err::<&str, BoxError>("boom".into()),
                Some(rx) => {
                    let _ = rx.await;
                    Ok("ok")
                }
            }
        },
    )));
    assert!(service.ready().await.unwrap().call(None).await.is_err());
    let mut admitted = Vec::new();
    let mut rejected = 0;
    let mut senders = Vec::new();
    for _ in 0..5 {
        let (tx, rx) = oneshot::channel();
        senders.push(tx);
        let mut future = Box::pin(service.ready().await.unwrap().call(Some(rx)));
        match futures::poll!(future.as_mut()) {
            Poll::Pending => admitted.push(future),
            Poll::Ready(Err(error)) => {
                assert_eq!(open_error(error).state(), CircuitState::HalfOpen);
                rejected += 1;
            }
            Poll::Ready(Ok(_)) => panic!("finished early"),
        }
    }
    assert_eq!((admitted.len(), rejected), (1, 4));
}

// ---- issue 18: stale results after a reset; huge open times; dropped breakers ----

#[tokio::test(start_paused = true)]
async fn a_success_admitted_before_a_reset_neither_ends_a_new_streak_nor_counts() {
    // Consecutive failures: the stale success must not end the new streak.
    let (mut service, _) = guarded(CircuitBreakerConfig::new("streak").consecutive_failures(3));
    let handle = service.handle();
    let stale = service.ready().await.unwrap().call(false);
    let _ = call(&mut service, true).await;
    handle.reset();
    for _ in 0..2 {
        let _ = call(&mut service, true).await;
    }
    assert!(stale.await.is_ok());
    let _ = call(&mut service, true).await;
    assert_eq!(
        handle.state(),
        CircuitState::Open,
        "the stale success ended the streak"
    );

    // Failure rate: the stale success must not count in the new window.
    let (mut service, _) =
        guarded(CircuitBreakerConfig::new("rate").failure_rate(0.5, 10 * SEC, 2));
    let handle = service.handle();
    let stale = service.ready().await.unwrap().call(false);
    handle.force_open();
    handle.reset();
    assert!(stale.await.is_ok());
    let _ = call(&mut service, true).await;
    assert_eq!(
        handle.state(),
        CircuitState::Closed,
        "one call is below min_calls"
    );
    let _ = call(&mut service, false).await;
    assert_eq!(
        handle.state(),
        CircuitState::Open,
        "1 failure in 2 fresh calls is 50%"
    );
}

#[tokio::test(start_paused = true)]
async fn a_huge_open_time_still_reports_a_retry_after() {
    let (mut service, _) = guarded(
        CircuitBreakerConfig::new("forever")
            .max_failures(1)
            .reset_timeout(Duration::MAX),
    );
    let _ = call(&mut service, true).await;
    let rejected = open_error(call(&mut service, false).await.unwrap_err());
    assert_eq!(rejected.state(), CircuitState::Open);
    assert!(
        rejected
            .retry_after()
            .is_some_and(|after| after > 100 * 365 * 24 * 3600 * SEC)
    );
    advance(1000 * 24 * 3600 * SEC).await;
    assert_eq!(
        open_error(call(&mut service, false).await.unwrap_err()).state(),
        CircuitState::Open
    );
}

#[tokio::test(start_paused = true)]
async fn huge_trial_timeouts_and_open_backoff_caps_do_not_panic() {
    let (mut service, _) = guarded(
        CircuitBreakerConfig::new("huge")
            .max_failures(1)
            .reset_timeout(SEC)
            .trial_timeout(Duration::MAX)
            .open_backoff(2.0, Duration::MAX),
    );
    let _ = call(&mut service, true).await;
    advance(SEC).await;
    let trial = service.ready().await.unwrap().call(false);
    let rejected = open_error(call(&mut service, false).await.unwrap_err());
    assert_eq!(rejected.state(), CircuitState::HalfOpen);
    assert!(rejected.retry_after().is_some());
    drop(trial);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_breaker_ends_its_subscriptions() {
    let (service, _) = guarded(CircuitBreakerConfig::new("dropped"));
    let mut changes = service.handle().subscribe();
    drop(service);
    assert!(timeout(SEC, changes.recv()).await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn poll_ready_turns_away_until_exactly_the_end_of_the_open_period() {
    let (mut service, inner) = guarded(
        CircuitBreakerConfig::new("edge")
            .max_failures(1)
            .reset_timeout(10 * SEC),
    );
    assert!(call(&mut service, true).await.is_err());
    inner.set(Readiness::Pending);
    advance(10 * SEC - MS).await;
    assert!(timeout(Duration::ZERO, service.ready()).await.is_ok());
    let rejected = open_error(service.call(false).await.unwrap_err());
    assert_eq!(rejected.retry_after(), Some(MS));
    advance(MS).await;
    // A trial is due: the inner service is polled (and is not ready).
    assert!(timeout(SEC, service.ready()).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_failed_poll_ready_in_half_open_is_a_failed_trial() {
    let (mut service, inner) = guarded(
        CircuitBreakerConfig::new("half")
            .max_failures(1)
            .reset_timeout(10 * SEC)
            .half_open_max_calls(2),
    );
    let handle = service.handle();
    assert!(call(&mut service, true).await.is_err());
    advance(10 * SEC).await;
    // A trial in flight on one clone puts the breaker in half-open, a second slot free...
    let mut other = service.clone();
    let (tx, _rx) = oneshot::channel::<()>();
    let trial = service.ready().await.unwrap().call(false);
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    // ...and another clone's failed poll_ready counts as a failed trial.
    inner.set(Readiness::Fail);
    assert!(other.ready().await.is_err());
    assert_eq!(handle.state(), CircuitState::Open);
    assert_eq!(handle.metrics().failures, 2);
    drop((trial, tx));
    // In the forced states a failed poll_ready records nothing.
    handle.force_closed();
    assert!(other.ready().await.is_err());
    assert_eq!(handle.metrics().failures, 2);
}

#[tokio::test(start_paused = true)]
async fn a_breaker_that_reopens_between_poll_ready_and_call_rejects_with_the_new_wait() {
    let (mut service, _) = guarded(
        CircuitBreakerConfig::new("reopen")
            .max_failures(1)
            .reset_timeout(10 * SEC)
            .trial_timeout(2 * SEC),
    );
    assert!(call(&mut service, true).await.is_err());
    advance(10 * SEC).await;
    // One clone finds a trial due, takes its slot and makes its inner service ready...
    let mut waiting = service.clone();
    waiting.ready().await.unwrap();
    // ...but does not call within the trial timeout: another clone takes the slot back, its
    // trial fails and the circuit opens again...
    advance(3 * SEC).await;
    assert!(call(&mut service, true).await.is_err());
    assert_eq!(service.handle().metrics().failures, 2);
    advance(2 * SEC).await;
    // ...so the first clone's call is rejected with the new open period's wait.
    let rejected = open_error(waiting.call(false).await.unwrap_err());
    assert_eq!(rejected.state(), CircuitState::Open);
    assert_eq!(rejected.retry_after(), Some(8 * SEC));
}

#[tokio::test(start_paused = true)]
async fn a_call_from_before_several_resets_never_counts() {
    let (mut service, _) = guarded(CircuitBreakerConfig::new("resets").max_failures(2));
    let handle = service.handle();
    let stale = service.ready().await.unwrap().call(true);
    let _ = call(&mut service, true).await;
    handle.reset();
    handle.force_open();
    handle.reset();
    let _ = call(&mut service, true).await;
    handle.reset();
    // Admitted before all of that: its failure belongs to a forgotten history.
    assert!(stale.await.is_err());
    let _ = call(&mut service, true).await;
    assert_eq!(
        handle.state(),
        CircuitState::Closed,
        "the stale failure counted"
    );
}

/// With a trial due while the inner service is not ready (a `ConcurrencyLimit` still held by
/// calls admitted before the breaker opened, a full `Buffer`), one caller waits for it to become
/// the trial; the others are turned away at once, as in half-open with every slot taken, instead
/// of queueing behind it only to be rejected once it is ready.
#[tokio::test(start_paused = true)]
async fn with_a_trial_due_one_caller_waits_for_the_inner_service_and_the_rest_are_turned_away() {
    let (mut first, inner) = guarded(
        CircuitBreakerConfig::new("due")
            .max_failures(1)
            .reset_timeout(10 * SEC)
            .trial_timeout(30 * SEC),
    );
    let handle = first.handle();
    let mut second = first.clone();
    assert!(call(&mut first, true).await.is_err());
    inner.set(Readiness::Pending);
    advance(10 * SEC).await;
    // The first caller holds the trial's slot while it waits for the inner service.
    assert!(timeout(SEC, first.ready()).await.is_err());
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    let polls = inner.polls.load(Ordering::SeqCst);
    assert!(timeout(Duration::ZERO, second.ready()).await.is_ok());
    let rejected = open_error(second.call(false).await.unwrap_err());
    assert_eq!(rejected.state(), CircuitState::HalfOpen);
    assert_eq!(rejected.retry_after(), Some(29 * SEC));
    assert_eq!(inner.polls.load(Ordering::SeqCst), polls);
    // Ready at last, the first caller's call is the trial.
    inner.set(Readiness::Ready);
    assert_eq!(call(&mut first, false).await.unwrap(), "ok");
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(handle.metrics().calls, 2);
}

/// A service that took the trial's slot and is dropped without calling gives the slot back at
/// once: the next caller is the trial, not turned away until the trial timeout.
#[tokio::test(start_paused = true)]
async fn a_trial_slot_taken_by_a_dropped_service_is_given_back() {
    let (mut service, inner) = guarded(
        CircuitBreakerConfig::new("dropped")
            .max_failures(1)
            .reset_timeout(10 * SEC)
            .trial_timeout(30 * SEC),
    );
    assert!(call(&mut service, true).await.is_err());
    inner.set(Readiness::Pending);
    advance(10 * SEC).await;
    let mut gone = service.clone();
    assert!(timeout(SEC, gone.ready()).await.is_err());
    // Held: another caller is turned away...
    let mut other = service.clone();
    other.ready().await.unwrap();
    assert!(open_error(other.call(false).await.unwrap_err()).state() == CircuitState::HalfOpen);
    // ...until the holder goes.
    drop(gone);
    inner.set(Readiness::Ready);
    assert_eq!(call(&mut service, false).await.unwrap(), "ok");
    assert_eq!(service.handle().state(), CircuitState::Closed);
}

/// The trial timeout bounds the trial call, not the wait for the inner service before it: a
/// caller that held the trial's slot for most of the timeout while the inner service got ready
/// keeps its slot for the whole timeout once it calls.
#[tokio::test(start_paused = true)]
async fn a_trial_timeout_counts_from_the_call_not_from_the_wait_before_it() {
    let (mut first, inner) = guarded(
        CircuitBreakerConfig::new("waited")
            .max_failures(1)
            .reset_timeout(10 * SEC)
            .trial_timeout(5 * SEC),
    );
    let mut other = first.clone();
    assert!(call(&mut first, true).await.is_err());
    inner.set(Readiness::Pending);
    advance(10 * SEC).await;
    assert!(timeout(4 * SEC, first.ready()).await.is_err());
    inner.set(Readiness::Ready);
    first.ready().await.unwrap();
    let trial = first.call(false);
    advance(2 * SEC).await;
    other.ready().await.unwrap();
    let rejected = open_error(other.call(false).await.unwrap_err());
    assert_eq!(rejected.state(), CircuitState::HalfOpen);
    assert_eq!(rejected.retry_after(), Some(3 * SEC));
    assert_eq!(trial.await.unwrap(), "ok");
    assert_eq!(first.handle().state(), CircuitState::Closed);
}

/// A caller turned away in half-open whose call comes after a trial slot freed is told to come
/// back at once (its inner service was never made ready, so it cannot be called now).
#[tokio::test(start_paused = true)]
async fn a_caller_turned_away_in_half_open_comes_back_at_once_when_a_slot_freed() {
    let (mut service, _) = guarded(
        CircuitBreakerConfig::new("freed")
            .max_failures(1)
            .reset_timeout(10 * SEC)
            .half_open_max_calls(2)
            .trial_timeout(30 * SEC),
    );
    let mut turned_away = service.clone();
    let mut second = service.clone();
    assert!(call(&mut service, true).await.is_err());
    advance(10 * SEC).await;
    let first_trial = service.ready().await.unwrap().call(false);
    advance(SEC).await;
    let second_trial = second.ready().await.unwrap().call(false);
    turned_away.ready().await.unwrap();
    drop(first_trial);
    let rejected = open_error(turned_away.call(false).await.unwrap_err());
    assert_eq!(rejected.state(), CircuitState::HalfOpen);
    assert_eq!(rejected.retry_after(), Some(Duration::ZERO));
    // Turned away with both slots taken, it is told when the oldest one can be taken back.
    let third_trial = service.ready().await.unwrap().call(false);
    turned_away.ready().await.unwrap();
    let rejected = open_error(turned_away.call(false).await.unwrap_err());
    assert_eq!(rejected.retry_after(), Some(30 * SEC));
    drop((second_trial, third_trial));
}

/// A trial slot taken in one half-open period is no use in a later one: the call it was taken
/// for is admitted only if a slot of the new period is free.
#[tokio::test(start_paused = true)]
async fn a_slot_taken_in_an_earlier_half_open_period_is_no_use_in_a_later_one() {
    let (mut service, _) = guarded(
        CircuitBreakerConfig::new("stale")
            .max_failures(1)
            .reset_timeout(10 * SEC)
            .trial_timeout(2 * SEC),
    );
    let handle = service.handle();
    let mut stale = service.clone();
    let mut holder = service.clone();
    assert!(call(&mut service, true).await.is_err());
    advance(10 * SEC).await;
    stale.ready().await.unwrap();
    // The stale caller's slot is taken back, the trial fails, the circuit opens again...
    advance(3 * SEC).await;
    assert!(call(&mut service, true).await.is_err());
    // ...and in the next half-open period another caller holds the only slot.
    advance(10 * SEC).await;
    let held = holder.ready().await.unwrap().call(false);
    assert_eq!(handle.state(), CircuitState::HalfOpen);
    let calls = handle.metrics().calls;
    let rejected = open_error(stale.call(false).await.unwrap_err());
    assert_eq!(rejected.state(), CircuitState::HalfOpen);
    assert_eq!(handle.metrics().calls, calls);
    assert_eq!(held.await.unwrap(), "ok");
    assert_eq!(handle.state(), CircuitState::Closed);
}
