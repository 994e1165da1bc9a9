//! Timeouts and deadlines, on the paused clock.

use palisade::timeout::{
    Deadline, DeadlineLayer, Deadlined, Elapsed, ElapsedKind, HasDeadline, TimeoutLayer,
};
use std::time::Duration;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

#[derive(Debug, PartialEq)]
enum AppError {
    Timeout(Elapsed),
}

impl From<Elapsed> for AppError {
    fn from(e: Elapsed) -> Self {
        AppError::Timeout(e)
    }
}

fn sleeper<R: HasDeadlineOrNot>() -> impl Service<R, Response = Duration, Error = AppError> + Clone
{
    tower::service_fn(|request: R| async move {
        let nap = request.nap();
        tokio::time::sleep(nap).await;
        Ok(nap)
    })
}

trait HasDeadlineOrNot: Send + 'static {
    fn nap(&self) -> Duration;
}
impl HasDeadlineOrNot for Duration {
    fn nap(&self) -> Duration {
        *self
    }
}
impl HasDeadlineOrNot for Deadlined<Duration> {
    fn nap(&self) -> Duration {
        self.request
    }
}

#[tokio::test(start_paused = true)]
async fn timeout_fails_through_the_users_error_type() {
    let mut service = TimeoutLayer::new(100 * MS).layer(sleeper::<Duration>());
    assert_eq!(
        service.ready().await.unwrap().call(50 * MS).await,
        Ok(50 * MS)
    );
    let start = Instant::now();
    let error = service.ready().await.unwrap().call(SEC).await.unwrap_err();
    assert_eq!(error, AppError::Timeout(Elapsed::attempt(100 * MS)));
    assert_eq!(start.elapsed(), 100 * MS);
}

#[tokio::test(start_paused = true)]
async fn timeout_works_with_box_error_too() {
    let mut service = TimeoutLayer::new(100 * MS).layer(tower::service_fn(|_: ()| async {
        tokio::time::sleep(SEC).await;
        Ok::<(), BoxError>(())
    }));
    let error = service.ready().await.unwrap().call(()).await.unwrap_err();
    assert_eq!(
        error.downcast_ref::<Elapsed>().unwrap().kind(),
        ElapsedKind::Attempt(100 * MS)
    );
}

#[tokio::test(start_paused = true)]
async fn an_attempt_gets_at_most_the_time_left() {
    let mut service = TimeoutLayer::new(SEC).honor_deadline().layer(sleeper());
    let request = Deadlined::new(5 * SEC).with_deadline(Deadline::after(300 * MS));
    let start = Instant::now();
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request)
        .await
        .unwrap_err();
    assert_eq!(error, AppError::Timeout(Elapsed::deadline()));
    assert_eq!(start.elapsed(), 300 * MS);

    // With plenty of time left, the attempt timeout is the limit.
    let request = Deadlined::new(5 * SEC).with_deadline(Deadline::after(60 * SEC));
    let error = service
        .ready()
        .await
        .unwrap()
        .call(request)
        .await
        .unwrap_err();
    assert_eq!(error, AppError::Timeout(Elapsed::attempt(SEC)));
}

#[tokio::test(start_paused = true)]
async fn the_deadline_layer_sets_and_enforces_a_deadline_but_never_extends_one() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let log = std::sync::Arc::clone(&seen);
    let mut service = DeadlineLayer::new(5 * SEC).layer(tower::service_fn(
        move |request: Deadlined<Duration>| {
            *log.lock().unwrap() = request.deadline();
            async move {
                tokio::time::sleep(request.request).await;
                Ok::<_, AppError>(())
            }
        },
    ));
    let start = Instant::now();
    service
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(SEC))
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap().unwrap().instant(), start + 5 * SEC);

    let own = Deadline::after(2 * SEC);
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Deadlined::new(10 * SEC).with_deadline(own))
        .await
        .unwrap_err();
    assert_eq!(error, AppError::Timeout(Elapsed::deadline()));
    assert_eq!(*seen.lock().unwrap(), Some(own));
    assert_eq!(start.elapsed(), SEC + 2 * SEC);
}
