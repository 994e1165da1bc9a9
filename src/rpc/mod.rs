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
//! # Wire shapes
//!
//! Requests are `{"pattern":P,"data":D,"id":ID}`, events `{"pattern":P,"data":D}`; replies are
//! NestJS's `{"response":R,"isDisposed":true,"id":ID}` and friends. palisade adds an optional
//! `"headers"` object (the deadline as `palisade-timeout-ms`, a W3C `traceparent`, your own), which
//! NestJS ignores. Errors cross as NestJS's `err` shapes; see [`RpcError`].

mod client;
mod error;
mod handler;
mod json;
mod pattern;
mod pipeline;
mod request;
mod router;
mod server;
pub mod transport;
pub mod wire;

pub use self::client::{Client, ClientBuilder, DEFAULT_TIMEOUT, RpcResponse, RpcStream};
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
pub use self::pipeline::{
    ExceptionFilter, ExceptionFilterLayer, FieldError, Guard, GuardFuture, GuardLayer, Interceptor,
    InterceptorLayer, Next, Valid, Validate, ValidationErrors,
};
pub use self::request::{
    Extensions, Headers, Kind, RpcRequest, TIMEOUT_HEADER, TRACEPARENT_HEADER,
};
pub use self::router::Router;
pub use self::server::{
    Dispatcher, ReplySink, Routes, SendError, Server, ServerHandle, ShutdownReport,
};
