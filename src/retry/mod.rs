//! Retry with backoff, jitter, a retry budget and deadlines, for any [`tower::Service`] whose
//! request can be cloned.
//!
//! [`RetryPolicy`] is a [`tower::retry::Policy`], so tower's own `.retry(policy)` works; palisade's
//! [`Retry`] service (what [`RetryPolicy::layer`] and the preset use) has the same contract and a
//! response future that costs a branch when the call is not retried. The policy brings —
//!
//! - at most `max_attempts` attempts; [`Backoff`] constant, linear or exponential, capped; [`Jitter`]
//!   none, full, equal or decorrelated (AWS's formulas), never above the cap;
//! - a [`Predicate`] over the whole `Result`: errors *and* responses. The default,
//!   [`TransientErrors`], retries only what is safe: transient errors, never a response, never a
//!   [`CircuitOpen`](crate::circuit_breaker::CircuitOpen) (an open breaker exists to fail fast; opt in
//!   with [`RetryPolicy::retry_rejections`]);
//! - an error's [retry-after hint](crate::classify::FailureKind::retry_after) replaces the computed delay;
//! - a [`RetryBudget`] so that retries cannot multiply an outage;
//! - by default it never sleeps past the deadline of an enclosing
//!   [`DeadlineLayer`](crate::timeout::DeadlineLayer), for any request type; with
//!   [`honor_deadline`](RetryPolicy::honor_deadline), nor past the
//!   [`Deadline`](crate::timeout::Deadline) a request carries, and it stops with a clear error when
//!   the next attempt cannot fit;
//! - a `tracing` event per retry (attempt, delay, reason) and optional hooks for each retry and for
//!   giving up (attempts exhausted, budget refused, deadline reached).
//!
//! # `BoxError` and `tokio::spawn`
//!
//! With `tower::BoxError` as the error type, awaiting a retry future inside a task passed to
//! `tokio::spawn` can fail to compile with "implementation of `FailureKind` is not general enough".
//! That is a rustc limitation: while proving the task `Send`, the compiler forgets that the boxed
//! error is `'static`, and an error classifier that looks inside a box (downcasting) can only exist
//! for `'static`. Box the stack's future at the point where it crosses into other tasks — e.g.
//! `.layer(tower::util::BoxService::layer())` just below a `Buffer`, or `.boxed_clone()` — and it
//! compiles. Typed error enums and [`RpcError`](crate::rpc::RpcError) are not affected.
//!
//! Retry adds no error type of its own: the caller gets the last attempt's result (or, when the
//! deadline leaves no room, [`Elapsed`](crate::timeout::Elapsed) through `From`). Dropping the
//! response future stops retrying at once, backoff sleep included.
//!
//! ```
//! use palisade::retry::{Backoff, Jitter, RetryPolicy};
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let calls = Arc::new(AtomicU32::new(0));
//! let counter = Arc::clone(&calls);
//! let mut flaky = ServiceBuilder::new()
//!     .retry(RetryPolicy::new(3).backoff(Backoff::constant(Duration::from_millis(10))).jitter(Jitter::None))
//!     .service_fn(move |_: ()| {
//!         let n = counter.fetch_add(1, Ordering::SeqCst);
//!         async move {
//!             if n < 2 {
//!                 Err::<&str, BoxError>(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)))
//!             } else {
//!                 Ok("third time lucky")
//!             }
//!         }
//!     });
//! assert_eq!(flaky.ready().await.unwrap().call(()).await.unwrap(), "third time lucky");
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # }
//! ```

mod backoff;
mod budget;
mod policy;
mod service;

pub use self::backoff::{Backoff, Jitter};
pub use self::budget::RetryBudget;
pub use self::policy::{
    DeadlineStop, GiveUp, GiveUpReason, Predicate, RetryDelay, RetryEvent, RetryPolicy,
    TransientErrors, Verdict,
};
pub use self::service::{AnyPolicy, FinalResult, ResponseFuture, Retry, RetryLayer};
