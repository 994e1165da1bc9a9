//! Message services: the Rust answer to NestJS microservices.
//!
//! A [`Client`] sends requests (`send`, `send_stream`) and events (`emit`) to patterns; a
//! [`Router`] maps patterns to handlers — plain async functions with typed extractors, as in
//! axum — and a [`Server`] runs it on a [transport]. Transports speak NestJS's wire
//! protocol, so palisade services and NestJS services can call each other.
//!
//! ```
//! use palisade::rpc::transport::memory::MemoryTransport;
//! use palisade::rpc::{Client, Payload, Router, RpcError, Server};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct GetUser { id: u64 }
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct User { id: u64, username: String }
//!
//! async fn get_user(Payload(req): Payload<GetUser>) -> Result<User, RpcError> {
//!     if req.id == 0 {
//!         return Err(RpcError::not_found("user 0 does not exist"));
//!     }
//!     Ok(User { id: req.id, username: format!("user{}", req.id) })
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), RpcError> {
//! let transport = MemoryTransport::new();
//! let server = Server::new(Router::new().message("get-user", get_user)).serve(&transport).await?;
//!
//! let users = Client::builder().timeout(Duration::from_secs(1)).connect(transport).await?;
//! let user: User = users.send("get-user", &GetUser { id: 42 }).await?;
//! assert_eq!(user, User { id: 42, username: "user42".into() });
//!
//! let missing = users.send::<User>("get-user", &GetUser { id: 0 }).await.unwrap_err();
//! assert_eq!(missing.code(), palisade::rpc::Code::NotFound);
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Coming from NestJS
//!
//! Guards, interceptors, pipes and exception filters are tower layers here ([`GuardLayer`],
//! [`InterceptorLayer`], [`Valid`], [`ExceptionFilterLayer`]); providers are the router's
//! [`State`]; `@CircuitBreaker` is [`Handler::layer`] with a `CircuitBreakerLayer`. The README's
//! "Coming from NestJS" table maps each decorator; this is its example:
//!
//! ```
//! use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
//! use palisade::rpc::transport::memory::MemoryTransport;
//! use palisade::rpc::{
//!     Client, Code, ExceptionFilterLayer, Extension, GuardLayer, Handler, Headers, InterceptorLayer,
//!     MessagePattern, Next, Payload, Reply, Router, RpcError, RpcRequest, Server, State, Valid,
//!     Validate, ValidationErrors,
//! };
//! use serde::{Deserialize, Serialize};
//! use serde_json::json;
//!
//! #[derive(Deserialize)]
//! struct CreateOrder { item: String, quantity: u32 }
//!
//! // Pipe: class-validator's decorators become a `Validate` impl, `ValidationPipe` the `Valid` extractor.
//! impl Validate for CreateOrder {
//!     fn validate(&self) -> Result<(), ValidationErrors> {
//!         let mut errors = ValidationErrors::new();
//!         errors.check(!self.item.is_empty(), "item", "should not be empty");
//!         errors.check(self.quantity > 0, "quantity", "must be a positive number");
//!         errors.into_result()
//!     }
//! }
//!
//! #[derive(Serialize, Deserialize, Debug)]
//! struct Order { id: u64, item: String }
//!
//! #[derive(Clone)]
//! struct Principal(String);
//!
//! #[derive(Clone)]
//! struct Orders { next_id: std::sync::Arc<std::sync::atomic::AtomicU64> }
//!
//! // @MessagePattern('create-order') with @Payload() (validated), a provider (State) and the guard's user (Extension).
//! async fn create_order(
//!     State(orders): State<Orders>,
//!     Extension(Principal(user)): Extension<Principal>,
//!     Valid(Payload(order)): Valid<Payload<CreateOrder>>,
//! ) -> Result<Order, RpcError> {
//!     let id = orders.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
//!     Ok(Order { id, item: format!("{} x{} for {user}", order.item, order.quantity) })
//! }
//!
//! // @MessagePattern('get-order'): a handler error of any type, mapped by the exception filter below.
//! #[derive(Debug)]
//! struct NoSuchOrder(u64);
//! impl std::fmt::Display for NoSuchOrder {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { write!(f, "no order {}", self.0) }
//! }
//! impl std::error::Error for NoSuchOrder {}
//!
//! async fn get_order(Payload(id): Payload<u64>) -> Result<Order, NoSuchOrder> {
//!     Err(NoSuchOrder(id))
//! }
//!
//! // @EventPattern('order-shipped') with @Ctx(): the pattern and headers are extractors too.
//! async fn order_shipped(Payload(id): Payload<u64>, MessagePattern(pattern): MessagePattern, headers: Headers) {
//!     let _ = (id, pattern, headers.get("traceparent"));
//! }
//!
//! // Guard (@UseGuards): runs before the handler, sees headers, hands the principal on.
//! fn authenticated(request: &mut RpcRequest) -> Result<(), RpcError> {
//!     let user = request.headers().get("user").ok_or_else(|| RpcError::unauthenticated("who are you?"))?;
//!     let user = Principal(user.to_owned());
//!     request.extensions_mut().insert(user);
//!     Ok(())
//! }
//!
//! // Interceptor (@UseInterceptors): around the handler, sees and maps the request and the reply.
//! async fn envelope(request: RpcRequest, next: Next) -> Result<Reply, RpcError> {
//!     let reply = next.run(request).await?;
//!     Ok(reply.map_values(|value| Ok(json!({ "data": value }))))
//! }
//!
//! // Exception filter (@UseFilters / @Catch): map handler errors once per router.
//! fn not_found(error: RpcError) -> RpcError {
//!     match error.handler_error::<NoSuchOrder>() {
//!         Some(missing) => RpcError::not_found(missing.to_string()),
//!         None => error,
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), RpcError> {
//! let router = Router::stateful()
//!     // @CircuitBreaker on one pattern: one line, palisade's own layer.
//!     .message("create-order", create_order.layer(CircuitBreakerLayer::new(CircuitBreakerConfig::new("orders"))))
//!     .message("get-order", get_order)
//!     .event("order-shipped", order_shipped)
//!     .route_layer(ExceptionFilterLayer::new(not_found))
//!     .route_layer(InterceptorLayer::new(envelope))
//!     .layer(GuardLayer::new(authenticated))
//!     .with_state(Orders { next_id: Default::default() });
//!
//! let transport = MemoryTransport::new();
//! let server = Server::new(router).serve(&transport).await?;
//! // ClientProxy: send / emit.
//! let client = Client::builder().header("user", "ann").connect(transport.clone()).await?;
//! let created: serde_json::Value = client.send("create-order", &json!({"item": "tea", "quantity": 2})).await?;
//! assert_eq!(created, json!({"data": {"id": 0, "item": "tea x2 for ann"}}));
//! client.emit("order-shipped", &0).await?;
//!
//! // Pipes answer NestJS's BadRequest body; filters map errors; guards turn strangers away.
//! let invalid = client.send::<Order>("create-order", &json!({"item": "", "quantity": 0})).await.unwrap_err();
//! assert_eq!(invalid.code(), Code::InvalidArgument);
//! assert_eq!(invalid.err()["message"], json!(["item should not be empty", "quantity must be a positive number"]));
//! assert_eq!(invalid.err()["error"], "Bad Request");
//! let missing = client.send::<Order>("get-order", &7).await.unwrap_err();
//! assert_eq!((missing.code(), missing.message()), (Code::NotFound, "no order 7"));
//! let stranger = Client::builder().connect(transport).await?;
//! assert_eq!(stranger.send::<Order>("get-order", &7).await.unwrap_err().code(), Code::Unauthenticated);
//!
//! // RpcException: RpcError::exception(..) / exception_object(..), NestJS's shapes on the wire.
//! assert_eq!(RpcError::exception("boom").err(), json!({"status": "error", "message": "boom"}));
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Wire shapes
//!
//! Requests are `{"pattern":P,"data":D,"id":ID}`, events `{"pattern":P,"data":D}`; replies are
//! NestJS's `{"response":R,"isDisposed":true,"id":ID}` and friends. palisade adds an optional
//! `"headers"` object (the deadline as `palisade-timeout-ms`, a W3C `traceparent`, your own), which
//! NestJS ignores. Errors cross as NestJS's `err` shapes; see [`RpcError`].

mod client;
mod contract;
mod error;
mod handler;
mod json;
mod key_hash;
#[cfg(feature = "metrics")]
mod observe;
#[cfg(feature = "opentelemetry")]
mod otel;
mod pattern;
mod pipeline;
mod request;
mod router;
mod server;
pub mod transport;
pub mod wire;

pub use self::client::{Client, ClientBuilder, DEFAULT_TIMEOUT, RpcResponse, RpcStream};
pub use self::contract::{Contract, ContractHandler};
pub use self::error::{
    Code, INTERNAL_SERVER_ERROR, NO_HANDLER_MESSAGE, RpcError, TransportErrorKind,
};
#[doc(hidden)]
pub use self::handler::IsService;
pub use self::handler::{
    Extension, FromRef, FromRequest, Handler, HandlerService, IntoReply, Json, Layered,
    MessagePattern, Payload, Reply, Route, State, Streaming, handler_service,
};
pub use self::json::{DecodeError, RawJson};
pub use self::pattern::Pattern;
#[cfg(feature = "validator")]
pub use self::pipeline::Validated;
pub use self::pipeline::{
    ExceptionFilter, ExceptionFilterLayer, FieldError, Guard, GuardFuture, GuardLayer, Interceptor,
    InterceptorLayer, Next, Valid, Validate, ValidationErrors,
};
pub use self::request::{
    Extensions, Headers, Kind, RpcRequest, TIMEOUT_HEADER, TRACEPARENT_HEADER,
};
pub use self::router::Router;
pub use self::server::{
    Dispatcher, ReplySink, Routes, SendError, Server, ServerHandle, ShutdownReport, StartGuard,
};

/// Whether a span made now could be seen: a `tracing` dispatcher was ever set, or a `log` logger
/// takes INFO records (`tracing` forwards spans to `log` while no dispatcher is set, when its
/// `log` feature is on). When neither holds, the client and server make no span at all: making
/// one only to find it disabled costs that forwarding a check of each of its fields, about 90
/// instructions per span.
pub(crate) fn spans_observed() -> bool {
    // `has_been_set` is what `tracing`'s own macros ask, from the caller's crate.
    tracing::dispatcher::has_been_set() || log::max_level() >= log::LevelFilter::Info
}
