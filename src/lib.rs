//! # palisade
//!
//! Resilience middleware for [`tower`], and message services that speak NestJS's wire protocol.
//!
//! **Resilience** — layers for *any* `tower::Service`:
//!
//! - [`circuit_breaker`]: a circuit breaker configured the NestJS way (`ttl`, `max_failures`,
//!   `reset_timeout`), with consecutive-failure and failure-rate rules, a handle to observe and
//!   control it, and a hot path that takes no lock and makes no allocation. Open, it fails fast even
//!   when the service below is not ready.
//! - [`retry`]: a [`tower::retry::Policy`] (and a `Retry` service) with backoff, jitter, an exact
//!   retry budget, retry-after hints, deadlines honoured by default, and give-up events.
//! - [`timeout`]: timeouts that keep your error type, and deadlines that travel with requests.
//! - [`fault`]: seeded fault injection (errors, latency, hangs) for tests, chaos drills and demos.
//! - [`fallback`]: answer a failed call from a function, as Polly's and Resilience4j's fallbacks do.
//! - [`builder`]: all of it as `ServiceBuilder` methods, and a preset that stacks deadline → retry →
//!   circuit breaker → attempt timeout in the right order.
//! - [`classify`]: how results are judged (success, failure, ignored; transient or not).
//! - [`health`]: health checks from breakers and checks of your own, NestJS terminus style.
//!
//! **Messaging** — [`rpc`]: the Rust answer to NestJS microservices. A [`Client`](rpc::Client)
//! with `send`, `send_stream` and `emit`; a [`Router`](rpc::Router) of async handlers with typed
//! extractors; an [`RpcError`](rpc::RpcError) in NestJS's shapes; and transports — in-memory, TCP,
//! NATS, RabbitMQ, Kafka, Redis and MQTT — wire-compatible with NestJS, so palisade services and NestJS services
//! call each other.
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `tcp` | yes | [`rpc::transport::tcp`]: NestJS `Transport.TCP` (`socket2`) |
//! | `nats` | | [`rpc::transport::nats`]: NestJS `Transport.NATS`, durable events on JetStream (`async-nats`) |
//! | `rabbitmq` | | [`rpc::transport::rabbitmq`]: NestJS `Transport.RMQ` (`lapin`) |
//! | `redis` | | [`rpc::transport::redis`]: NestJS `Transport.REDIS`, durable events on Redis Streams (`redis`) |
//! | `mqtt` | | [`rpc::transport::mqtt`]: NestJS `Transport.MQTT`, MQTT 3.1.1 and 5, shared subscriptions and durable events (`rumqttc`) |
//! | `kafka` | | [`rpc::transport::kafka`]: NestJS `Transport.KAFKA` (`rdkafka`; builds librdkafka, which needs a C/C++ compiler) |
//! | `metrics` | | client and server metrics through the `metrics` facade: `rpc.{client,server}.call.duration` and `rpc.{client,server}.requests` per pattern, status code and (server) transport (OpenTelemetry's RPC names) |
//! | `opentelemetry` | | a request's `traceparent`/`tracestate` continue the caller's OpenTelemetry trace (through `tracing-opentelemetry`), and the server's span becomes the caller's child |
//! | `msgpack` | | [`rpc::wire::MessagePackCodec`]: MessagePack message bodies for palisade-to-palisade traffic (`rmp-serde`) |
//! | `macros` | | [`debug_handler`]: one clear error per cause when a function is not a message handler |
//! | `validator` | | [`rpc::Validated`]: payloads checked by the `validator` crate's `#[derive(Validate)]`, answered in NestJS's `BadRequest` shape |
//! | `conformance` | | [`conformance`]: the transport conformance suite, for transports written outside the crate |
//!
//! Beside palisade an application needs `tokio` (a runtime: `rt-multi-thread` and `macros` for
//! `#[tokio::main]`), `serde` with `derive` for its payload types, and `tower` only to stack layers
//! of its own or other crates' (`ServiceBuilder`).
//!
//! ```
//! use palisade::rpc::transport::memory::MemoryTransport;
//! use palisade::rpc::{Client, Payload, Router, Server};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), palisade::rpc::RpcError> {
//! let transport = MemoryTransport::new();
//! let server = Server::new(
//!     Router::new().message("sum", |Payload(xs): Payload<Vec<i64>>| async move {
//!         xs.iter().sum::<i64>()
//!     }),
//! )
//! .serve(&transport)
//! .await?;
//! let client = Client::builder().connect(transport).await?;
//! assert_eq!(client.send::<i64>("sum", &[1, 2, 3]).await?, 6);
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Every layer wraps *any* `tower::Service` and keeps your error type: instead of wrapping errors in
//! an enum of its own, a layer requires `S::Error: From<ItsError>`, so one error type runs through
//! a whole stack (`tower::BoxError` works out of the box).
//!
//! # Your error type, in one step
//!
//! Retry (which errors are worth another attempt, and when) and the [`FaultsOnly`] classifier (which
//! errors a breaker counts) ask an error what kind of failure it is: [`FailureKind`]. palisade's
//! errors, tower's (`Elapsed`, `Overloaded`, `Closed`), `std::io::Error` and `tower::BoxError`
//! (looked into, down its `source()` chain) already answer. For your own type, one method:
//!
//! ```
//! use palisade::circuit_breaker::CircuitOpen;
//! use palisade::classify::FailureKind;
//! use palisade::timeout::Elapsed;
//!
//! #[derive(Debug)]
//! enum StoreError {
//!     Conflict,
//!     Unreachable(std::io::Error),
//!     Open(CircuitOpen),
//!     TimedOut(Elapsed),
//! }
//!
//! impl FailureKind for StoreError {
//!     fn is_transient(&self) -> bool {
//!         match self {
//!             StoreError::Conflict => false,
//!             StoreError::Unreachable(io) => io.is_transient(),
//!             StoreError::Open(open) => open.is_transient(),
//!             StoreError::TimedOut(elapsed) => elapsed.is_transient(),
//!         }
//!     }
//!     // Optional, with defaults: is_fault (true), is_rejection (false), retry_after (None).
//!     fn is_rejection(&self) -> bool {
//!         matches!(self, StoreError::Open(_))
//!     }
//!     fn retry_after(&self) -> Option<std::time::Duration> {
//!         match self {
//!             StoreError::Open(open) => open.retry_after(),
//!             _ => None,
//!         }
//!     }
//! }
//! # impl From<CircuitOpen> for StoreError { fn from(e: CircuitOpen) -> Self { StoreError::Open(e) } }
//! # assert!(!StoreError::Conflict.is_transient());
//! ```
//!
//! Forgetting it is a compile error that names the trait (`on_unimplemented`), not a silent
//! "never retried".
//!
//! [`FaultsOnly`]: classify::FaultsOnly
//! [`FailureKind`]: classify::FailureKind
//!
//! ```
//! use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitState};
//! use std::time::Duration;
//! use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let breaker = CircuitBreakerLayer::new(
//!     CircuitBreakerConfig::new("user-service")
//!         .ttl(Duration::from_secs(5))
//!         .max_failures(3)
//!         .reset_timeout(Duration::from_secs(10)),
//! );
//! let handle = breaker.handle();
//! let mut users = ServiceBuilder::new()
//!     .layer(breaker)
//!     .service_fn(|id: u32| async move {
//!         if id == 0 { Err::<String, BoxError>("database unreachable".into()) }
//!         else { Ok(format!("user {id}")) }
//!     });
//!
//! assert_eq!(users.ready().await?.call(7).await?, "user 7");
//! for _ in 0..3 {
//!     let _ = users.ready().await?.call(0).await;
//! }
//! assert_eq!(handle.state(), CircuitState::Open);
//! let rejected = users.ready().await?.call(7).await.unwrap_err();
//! assert_eq!(rejected.to_string(), "circuit 'user-service' is open; retry after 10.0s");
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]
// docs.rs (nightly) labels each item with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod builder;
pub mod circuit_breaker;
pub mod classify;
#[cfg(feature = "conformance")]
pub mod conformance;
mod counter;
mod errors;
pub mod fallback;
pub mod fault;
pub mod health;
pub mod retry;
mod rng;
pub mod rpc;
pub mod timeout;

/// Explains why a function is not a message handler: put it on the handler while you write it.
///
/// Without it, a handler with one wrong argument, a reply type that is not a reply, or a future
/// that is not `Send` gets one error at the router — "`fn` is not a message handler" — that does
/// not say which. With it, each cause gets its own error, at the argument, the return type or
/// the function at fault. It changes nothing else, and costs nothing at run time; remove it when
/// the handler compiles, or keep it.
///
/// For a router with state, name the state: `#[debug_handler(state = AppState)]`. It checks free
/// `async fn`s with at most five extractors, as [`Router::message`](rpc::Router::message) takes.
///
/// ```
/// use palisade::debug_handler;
/// use palisade::rpc::{Payload, Router, RpcError, State};
///
/// #[derive(serde::Deserialize)]
/// struct NewUser { name: String }
///
/// #[debug_handler]
/// async fn create_user(Payload(user): Payload<NewUser>) -> Result<String, RpcError> {
///     Ok(user.name)
/// }
///
/// #[derive(Clone)]
/// struct AppState { greeting: &'static str }
///
/// #[debug_handler(state = AppState)]
/// async fn greet(State(state): State<AppState>, Payload(name): Payload<String>) -> String {
///     format!("{} {name}", state.greeting)
/// }
///
/// let users = Router::new().message("create-user", create_user);
/// let greeter = Router::stateful().message("greet", greet).with_state(AppState { greeting: "hello" });
/// # let _ = (users, greeter);
/// ```
///
/// An argument that is not an extractor is named where it stands: "`NewUser` cannot be a
/// handler argument: it does not implement `FromRequest<()>`", with the hint to wrap it in
/// `Payload<..>`.
///
/// ```compile_fail
/// # #[derive(serde::Deserialize)] struct NewUser { name: String }
/// #[palisade::debug_handler]
/// async fn create_user(user: NewUser) -> String { user.name }
/// ```
///
/// A future that holds something not `Send` across an `.await` is reported at the function, with
/// the value and the `.await` at fault:
///
/// ```compile_fail
/// #[palisade::debug_handler]
/// async fn count() -> u64 {
///     let local = std::rc::Rc::new(1);
///     tokio::task::yield_now().await;
///     *local
/// }
/// ```
#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
pub use palisade_macros::debug_handler;
