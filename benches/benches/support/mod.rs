//! What the benches share.

use std::future::Future;
use std::time::{Duration, Instant};

/// Runs exactly `iters` calls of `call`, `in_flight` at a time, in runtime tasks (a caller parked
/// on the bench's main thread would add a thread wake-up to every call), and returns the wall time.
pub async fn in_tasks<F, Fut>(iters: u64, in_flight: u64, call: F) -> Duration
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight.min(iters))
        .map(|task| {
            let call = call.clone();
            let share = iters / in_flight + u64::from(task < iters % in_flight);
            tokio::spawn(async move {
                for i in 0..share {
                    call(task + i * in_flight).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed()
}
