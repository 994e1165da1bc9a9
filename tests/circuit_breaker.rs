//! Behaviour of the circuit breaker layer, rule by rule, on tokio's paused clock.

mod support;

use palisade::circuit_breaker::{
    CircuitBreaker, CircuitBreakerConfig, CircuitBreakerLayer, CircuitBreakerRegistry, CircuitOpen,
    CircuitState, TransitionReason,
};
use palisade::classify::Outcome;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::{Call, IGNORED, gate, scripted};
use tokio::time::{Instant, advance};
use tower::util::BoxCloneService;
use tower::{BoxError, Layer, Service, ServiceExt};

type Inner = BoxCloneService<Call, &'static str, BoxError>;
type Breaker<C = palisade::classify::ErrorsAreFailures> = CircuitBreaker<Inner, C>;

const SEC: Duration = Duration::from_secs(1);
const NS: Duration = Duration::from_nanos(1);

fn breaker(
    config: CircuitBreakerConfig,
) -> (Breaker, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (inner, reached) = scripted();
    (CircuitBreakerLayer::new(config).layer(inner), reached)
}

async fn call<C>(service: &mut Breaker<C>, request: Call) -> Result<&'static str, BoxError>
where
    C: palisade::classify::Classify<&'static str, BoxError> + Clone,
{
    service.ready().await?.call(request).await
}

fn open_error(error: BoxError) -> CircuitOpen {
    match error.downcast::<CircuitOpen>() {
        Ok(open) => *open,
        Err(other) => panic!("expected CircuitOpen, got {other}"),
    }
}

fn nest_config() -> CircuitBreakerConfig {
    CircuitBreakerConfig::new("users")
        .ttl(5 * SEC)
        .max_failures(3)
        .reset_timeout(10 * SEC)
}

#[tokio::test(start_paused = true)]
async fn stays_closed_below_max_failures_and_opens_at_it() {
    let (mut service, _) = breaker(nest_config());
    for _ in 0..2 {
        assert!(call(&mut service, Call::Fail).await.is_err());
    }
    assert_eq!(service.handle().state(), CircuitState::Closed);
    assert!(call(&mut service, Call::Fail).await.is_err());
    assert_eq!(service.handle().state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn successes_do_not_erase_failures() {
    let (mut service, _) = breaker(nest_config());
    for request in [
        Call::Fail,
        Call::Ok,
        Call::Ok,
        Call::Fail,
        Call::Ok,
        Call::Fail,
    ] {
        let _ = call(&mut service, request).await;
    }
    assert_eq!(service.handle().state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_failure_exactly_ttl_old_no_longer_counts() {
    let (mut service, _) = breaker(nest_config());
    let _ = call(&mut service, Call::Fail).await;
    advance(5 * SEC).await;
    let _ = call(&mut service, Call::Fail).await;
    let _ = call(&mut service, Call::Fail).await;
    assert_eq!(service.handle().state(), CircuitState::Closed);

    let (mut service, _) = breaker(nest_config());
    let _ = call(&mut service, Call::Fail).await;
    advance(5 * SEC - NS).await;
    let _ = call(&mut service, Call::Fail).await;
    let _ = call(&mut service, Call::Fail).await;
    assert_eq!(service.handle().state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn open_rejects_without_calling_the_inner_service() {
    let (mut service, reached) = breaker(nest_config());
    for _ in 0..3 {
        let _ = call(&mut service, Call::Fail).await;
    }
    assert_eq!(reached.load(Ordering::SeqCst), 3);
    advance(4 * SEC).await;
    let open = open_error(call(&mut service, Call::Ok).await.unwrap_err());
    assert_eq!(
        reached.load(Ordering::SeqCst),
        3,
        "a rejected call reached the service"
    );
    assert_eq!(open.name(), "users");
    assert_eq!(open.state(), CircuitState::Open);
    assert_eq!(open.retry_after(), Some(6 * SEC));
    assert_eq!(
        open.to_string(),
        "circuit 'users' is open; retry after 6.0s"
    );
}

#[tokio::test(start_paused = true)]
async fn rejection_happens_in_call_not_poll_ready() {
    let (mut service, _) = breaker(nest_config());
    service.handle().force_open();
    // poll_ready reports ready even though the circuit is open...
    let ready = futures_util::FutureExt::now_or_never(service.ready());
    assert!(matches!(ready, Some(Ok(_))));
    // ...and the rejection comes from the call.
    assert!(call(&mut service, Call::Ok).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn waiting_exactly_retry_after_is_admitted() {
    let (mut service, reached) = breaker(nest_config());
    for _ in 0..3 {
        let _ = call(&mut service, Call::Fail).await;
    }
    let open = open_error(call(&mut service, Call::Ok).await.unwrap_err());
    let wait = open.retry_after().unwrap();
    advance(wait - NS).await;
    assert!(
        call(&mut service, Call::Ok).await.is_err(),
        "admitted 1 ns early"
    );
    advance(NS).await;
    assert_eq!(call(&mut service, Call::Ok).await.unwrap(), "ok");
    assert_eq!(reached.load(Ordering::SeqCst), 4);
    assert_eq!(service.handle().state(), CircuitState::Closed);
}

async fn open_then_half_open(service: &mut Breaker) {
    for _ in 0..3 {
        let _ = call(service, Call::Fail).await;
    }
    assert_eq!(service.handle().state(), CircuitState::Open);
    advance(10 * SEC).await;
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_one_trial_by_default() {
    let (mut service, _) = breaker(nest_config());
    open_then_half_open(&mut service).await;
    let (release, request) = gate();
    let trial = service.ready().await.unwrap().call(request);
    assert_eq!(service.handle().state(), CircuitState::HalfOpen);
    let rejected = open_error(call(&mut service, Call::Ok).await.unwrap_err());
    assert_eq!(rejected.state(), CircuitState::HalfOpen);
    // The trial may run for the trial timeout (30 s by default) before another is admitted.
    assert_eq!(rejected.retry_after(), Some(30 * SEC));
    release.send(Ok(())).unwrap();
    assert_eq!(trial.await.unwrap(), "waited");
    assert_eq!(service.handle().state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_admission_limit_is_configurable() {
    let (mut service, _) = breaker(nest_config().half_open_max_calls(3).success_threshold(3));
    open_then_half_open(&mut service).await;
    let mut trials = Vec::new();
    for _ in 0..3 {
        let (release, request) = gate();
        trials.push((release, service.ready().await.unwrap().call(request)));
    }
    assert!(
        call(&mut service, Call::Ok).await.is_err(),
        "a fourth trial was admitted"
    );
    for (release, trial) in trials {
        release.send(Ok(())).unwrap();
        trial.await.unwrap();
    }
    assert_eq!(service.handle().state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn success_threshold_needs_that_many_successful_trials() {
    let (mut service, _) = breaker(nest_config().success_threshold(2));
    open_then_half_open(&mut service).await;
    call(&mut service, Call::Ok).await.unwrap();
    assert_eq!(service.handle().state(), CircuitState::HalfOpen);
    call(&mut service, Call::Ok).await.unwrap();
    assert_eq!(service.handle().state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_failed_trial_reopens_for_the_reset_timeout() {
    let (mut service, _) = breaker(nest_config());
    open_then_half_open(&mut service).await;
    assert!(call(&mut service, Call::Fail).await.is_err());
    assert_eq!(service.handle().state(), CircuitState::Open);
    let open = open_error(call(&mut service, Call::Ok).await.unwrap_err());
    assert_eq!(open.retry_after(), Some(10 * SEC));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_trial_frees_its_slot_without_a_verdict() {
    let (mut service, reached) = breaker(nest_config());
    open_then_half_open(&mut service).await;
    let trial = service.ready().await.unwrap().call(Call::Hang);
    assert!(call(&mut service, Call::Ok).await.is_err());
    drop(trial);
    assert_eq!(service.handle().state(), CircuitState::HalfOpen);
    assert_eq!(call(&mut service, Call::Ok).await.unwrap(), "ok");
    assert_eq!(service.handle().state(), CircuitState::Closed);
    assert_eq!(reached.load(Ordering::SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn an_ignored_trial_frees_its_slot_without_a_verdict() {
    let (inner, _) = scripted();
    let mut service = CircuitBreakerLayer::new(nest_config())
        .with_classifier(|result: &Result<&'static str, BoxError>| match result {
            Ok(_) => Outcome::Success,
            Err(e) if e.to_string() == IGNORED => Outcome::Ignored,
            Err(_) => Outcome::Failure,
        })
        .layer(inner);
    for _ in 0..3 {
        let _ = call(&mut service, Call::Fail).await;
    }
    advance(10 * SEC).await;
    assert!(call(&mut service, Call::Ignore).await.is_err());
    assert_eq!(service.handle().state(), CircuitState::HalfOpen);
    call(&mut service, Call::Ok).await.unwrap();
    assert_eq!(service.handle().state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_hung_trial_does_not_wedge_the_breaker() {
    let (mut service, _) = breaker(nest_config().trial_timeout(2 * SEC));
    open_then_half_open(&mut service).await;
    let (release, request) = gate();
    let hung = service.ready().await.unwrap().call(request);
    advance(2 * SEC - NS).await;
    assert!(
        call(&mut service, Call::Ok).await.is_err(),
        "slot reclaimed too early"
    );
    advance(NS).await;
    let (release_new, request) = gate();
    let fresh = service.ready().await.unwrap().call(request);
    // The hung trial finally fails: its verdict is disregarded.
    release.send(Err(())).unwrap();
    assert!(hung.await.is_err());
    assert_eq!(service.handle().state(), CircuitState::HalfOpen);
    release_new.send(Ok(())).unwrap();
    fresh.await.unwrap();
    assert_eq!(service.handle().state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn trial_timeout_defaults_to_thirty_seconds() {
    let (mut service, _) = breaker(nest_config());
    open_then_half_open(&mut service).await;
    let _hung = service.ready().await.unwrap().call(Call::Hang);
    advance(30 * SEC - NS).await;
    let rejected = open_error(call(&mut service, Call::Ok).await.unwrap_err());
    assert_eq!(rejected.retry_after(), Some(NS));
    advance(NS).await;
    assert_eq!(call(&mut service, Call::Ok).await.unwrap(), "ok");
    assert_eq!(service.handle().state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn results_from_before_a_transition_do_not_move_the_new_state() {
    let (mut service, _) = breaker(nest_config());
    let (release, request) = gate();
    let stale = service.ready().await.unwrap().call(request);
    for _ in 0..3 {
        let _ = call(&mut service, Call::Fail).await;
    }
    service.handle().reset();
    // Two fresh failures plus the stale one would make three.
    for _ in 0..2 {
        let _ = call(&mut service, Call::Fail).await;
    }
    release.send(Err(())).unwrap();
    assert!(stale.await.is_err());
    assert_eq!(service.handle().state(), CircuitState::Closed);

    // Likewise a stale success does not close a half-open circuit.
    let (mut service, _) = breaker(nest_config());
    let (release, request) = gate();
    let stale = service.ready().await.unwrap().call(request);
    open_then_half_open(&mut service).await;
    let trial = service.ready().await.unwrap().call(Call::Hang);
    release.send(Ok(())).unwrap();
    stale.await.unwrap();
    assert_eq!(service.handle().state(), CircuitState::HalfOpen);
    drop(trial);
}

#[tokio::test(start_paused = true)]
async fn open_time_grows_on_reopen_and_resets_once_closed() {
    let (mut service, _) = breaker(nest_config().open_backoff(2.0, 25 * SEC));
    for _ in 0..3 {
        let _ = call(&mut service, Call::Fail).await;
    }
    let mut waits = Vec::new();
    for _ in 0..3 {
        let open = open_error(call(&mut service, Call::Ok).await.unwrap_err());
        waits.push(open.retry_after().unwrap().as_secs());
        advance(open.retry_after().unwrap()).await;
        assert!(call(&mut service, Call::Fail).await.is_err()); // failed trial
    }
    assert_eq!(waits, [10, 20, 25]);
    let open = open_error(call(&mut service, Call::Ok).await.unwrap_err());
    advance(open.retry_after().unwrap()).await;
    call(&mut service, Call::Ok).await.unwrap();
    assert_eq!(service.handle().state(), CircuitState::Closed);
    for _ in 0..3 {
        let _ = call(&mut service, Call::Fail).await;
    }
    let open = open_error(call(&mut service, Call::Ok).await.unwrap_err());
    assert_eq!(open.retry_after(), Some(10 * SEC));
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_rule() {
    let (mut service, _) = breaker(CircuitBreakerConfig::new("c").consecutive_failures(3));
    for request in [Call::Fail, Call::Fail, Call::Ok, Call::Fail, Call::Fail] {
        let _ = call(&mut service, request).await;
    }
    assert_eq!(service.handle().state(), CircuitState::Closed);
    let _ = call(&mut service, Call::Fail).await;
    assert_eq!(service.handle().state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_rule_needs_min_calls_and_the_threshold() {
    let config = CircuitBreakerConfig::new("r").failure_rate(0.5, 10 * SEC, 4);
    let (mut service, _) = breaker(config.clone());
    for request in [Call::Fail, Call::Fail, Call::Fail] {
        let _ = call(&mut service, request).await;
    }
    assert_eq!(
        service.handle().state(),
        CircuitState::Closed,
        "tripped below min_calls"
    );
    let _ = call(&mut service, Call::Fail).await;
    assert_eq!(service.handle().state(), CircuitState::Open);

    // 1 failure in 4 calls is 25%: stays closed; a second failure makes 2 in 5 = 40%; a third,
    // 3 in 6 = 50%: opens.
    let (mut service, _) = breaker(config.clone());
    for request in [Call::Ok, Call::Ok, Call::Ok, Call::Fail, Call::Fail] {
        let _ = call(&mut service, request).await;
    }
    assert_eq!(service.handle().state(), CircuitState::Closed);
    let _ = call(&mut service, Call::Fail).await;
    assert_eq!(service.handle().state(), CircuitState::Open);

    // Calls leave the window.
    let (mut service, _) = breaker(config);
    for _ in 0..3 {
        let _ = call(&mut service, Call::Fail).await;
    }
    advance(10 * SEC).await;
    let _ = call(&mut service, Call::Fail).await;
    assert_eq!(
        service.handle().state(),
        CircuitState::Closed,
        "old calls still counted"
    );
}

#[tokio::test(start_paused = true)]
async fn slow_calls_open_the_circuit() {
    let config = CircuitBreakerConfig::new("s")
        .failure_rate(1.0, 60 * SEC, 2)
        .slow_calls(SEC, 0.5);
    let (mut service, _) = breaker(config);
    call(&mut service, Call::Sleep(SEC / 2)).await.unwrap();
    call(&mut service, Call::Sleep(SEC / 2)).await.unwrap();
    assert_eq!(service.handle().state(), CircuitState::Closed);
    call(&mut service, Call::Sleep(SEC)).await.unwrap();
    call(&mut service, Call::Sleep(2 * SEC)).await.unwrap();
    assert_eq!(service.handle().state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn force_open_force_closed_and_reset() {
    let (mut service, reached) = breaker(nest_config());
    let handle = service.handle();
    let mut changes = handle.subscribe();

    handle.force_open();
    let open = open_error(call(&mut service, Call::Ok).await.unwrap_err());
    assert_eq!(open.retry_after(), None);
    assert_eq!(open.state(), CircuitState::ForcedOpen);
    advance(3600 * SEC).await;
    assert!(
        call(&mut service, Call::Ok).await.is_err(),
        "forced open let a call through"
    );

    handle.force_closed();
    for _ in 0..10 {
        let _ = call(&mut service, Call::Fail).await;
    }
    assert_eq!(handle.state(), CircuitState::ForcedClosed);

    handle.reset();
    assert_eq!(handle.state(), CircuitState::Closed);
    assert_eq!(reached.load(Ordering::SeqCst), 10);

    let seen: Vec<_> = std::iter::from_fn(|| changes.try_recv())
        .map(|c| (c.from, c.to, c.reason))
        .collect();
    assert_eq!(
        seen,
        [
            (
                CircuitState::Closed,
                CircuitState::ForcedOpen,
                TransitionReason::ForcedOpen
            ),
            (
                CircuitState::ForcedOpen,
                CircuitState::ForcedClosed,
                TransitionReason::ForcedClosed
            ),
            (
                CircuitState::ForcedClosed,
                CircuitState::Closed,
                TransitionReason::Reset
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn subscription_sees_the_whole_cycle_with_timestamps() {
    let (mut service, _) = breaker(nest_config());
    let mut changes = service.handle().subscribe();
    let start = Instant::now();
    open_then_half_open(&mut service).await;
    call(&mut service, Call::Ok).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let change = changes.recv().await.unwrap();
        seen.push((change.to, change.reason, change.at - start));
    }
    assert_eq!(
        seen,
        [
            (
                CircuitState::Open,
                TransitionReason::Tripped,
                Duration::ZERO
            ),
            (
                CircuitState::HalfOpen,
                TransitionReason::ResetTimeoutElapsed,
                10 * SEC
            ),
            (
                CircuitState::Closed,
                TransitionReason::TrialsSucceeded,
                10 * SEC
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn metrics_count_calls_failures_rejections_and_transitions() {
    let (mut service, _) = breaker(nest_config());
    call(&mut service, Call::Ok).await.unwrap();
    for _ in 0..3 {
        let _ = call(&mut service, Call::Fail).await;
    }
    for _ in 0..4 {
        let _ = call(&mut service, Call::Ok).await;
    }
    let metrics = service.handle().metrics();
    assert_eq!(
        (
            metrics.calls,
            metrics.failures,
            metrics.rejections,
            metrics.transitions
        ),
        (4, 3, 4, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_breaker() {
    let (mut first, _) = breaker(nest_config());
    let mut second = first.clone();
    let _ = call(&mut first, Call::Fail).await;
    let _ = call(&mut second, Call::Fail).await;
    let _ = call(&mut first, Call::Fail).await;
    assert!(call(&mut second, Call::Ok).await.is_err());
    assert_eq!(second.handle().state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn registry_hands_out_one_breaker_per_name() {
    let registry = CircuitBreakerRegistry::new(nest_config());
    let (inner, _) = scripted();
    let mut users_a = registry.layer("get-user").layer(inner.clone());
    let mut users_b = registry.layer("get-user").layer(inner.clone());
    let mut orders = registry.layer("create-order").layer(inner);
    for _ in 0..3 {
        let _ = call(&mut users_a, Call::Fail).await;
    }
    assert!(call(&mut users_b, Call::Ok).await.is_err());
    assert_eq!(call(&mut orders, Call::Ok).await.unwrap(), "ok");
    assert_eq!(
        registry.handle("get-user").unwrap().state(),
        CircuitState::Open
    );
    let names: Vec<_> = registry
        .handles()
        .iter()
        .map(|h| h.name().to_owned())
        .collect();
    assert_eq!(names, ["create-order", "get-user"]);
}

/// A user's own error enum only needs `From<CircuitOpen>`.
#[derive(Debug)]
enum StoreError {
    Database,
    Unavailable(CircuitOpen),
}

impl From<CircuitOpen> for StoreError {
    fn from(open: CircuitOpen) -> Self {
        StoreError::Unavailable(open)
    }
}

#[tokio::test(start_paused = true)]
async fn works_with_a_users_own_error_enum() {
    let mut service = CircuitBreakerLayer::new(CircuitBreakerConfig::new("store").max_failures(1))
        .layer(tower::service_fn(|fail: bool| async move {
            if fail {
                Err(StoreError::Database)
            } else {
                Ok(())
            }
        }));
    let first = service.ready().await.unwrap().call(true).await;
    assert!(matches!(first, Err(StoreError::Database)));
    let second = service.ready().await.unwrap().call(false).await;
    match second {
        Err(StoreError::Unavailable(open)) => assert_eq!(open.name(), "store"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_breaker_gives_its_slot_back_and_stale_futures_do_nothing() {
    let (mut service, _) = breaker(nest_config().max_failures(1));
    let (release, request) = gate();
    let stale = service.ready().await.unwrap().call(request);
    drop(service);
    // A new breaker may now reuse the slot; the old future must not trip it.
    let (mut fresh, _) = breaker(nest_config().max_failures(1));
    release.send(Err(())).unwrap();
    assert!(stale.await.is_err());
    assert_eq!(fresh.handle().state(), CircuitState::Closed);
    assert_eq!(fresh.handle().metrics().failures, 0);
    let _ = call(&mut fresh, Call::Fail).await;
    assert_eq!(fresh.handle().state(), CircuitState::Open);
}

/// A rejected call's future polled again after it answered gives the rejection again rather than
/// panicking (the breaker's futures never unwind on their own).
#[tokio::test(start_paused = true)]
async fn a_rejected_future_polled_again_answers_again() {
    let (mut service, reached) = breaker(nest_config());
    service.handle().force_open();
    let mut future = std::pin::pin!(service.ready().await.unwrap().call(Call::Ok));
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    for _ in 0..2 {
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(Err(error)) => {
                let open = open_error(error);
                assert_eq!(open.state(), CircuitState::ForcedOpen);
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
    assert_eq!(reached.load(Ordering::SeqCst), 0);
}
