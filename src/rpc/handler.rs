//! Handlers: plain async functions with typed extractors, as in axum.

use super::{Headers, Pattern, RawJson, RpcError, RpcRequest};
use crate::timeout::{Deadline, HasDeadline};
use futures_core::Stream;
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{BoxError, ServiceExt};
use tower_layer::Layer;
use tower_service::Service;

/// What a handler answers: one value, nothing, or a stream of values.
pub enum Reply {
    /// One value (NestJS sends it with `isDisposed: true`).
    Value(RawJson),
    /// No value: the reply stream completes empty (a handler returning `()`).
    Empty,
    /// Several values, sent one packet each as they come; an `Err` ends the stream with an error.
    Stream(BoxStream<'static, Result<RawJson, RpcError>>),
}

impl Reply {
    /// The reply with `map` applied to each of its values (the one value, or every value of a
    /// stream) — what an [interceptor](super::InterceptorLayer) uses to reshape replies. An
    /// `Err` from `map` replaces the value (and ends a stream), and so does an `Internal` error
    /// for a value a [`serde_json::Value`] cannot hold (nested more than 128 deep, or holding a
    /// number beyond a double's range, such as `1e400`), which `map` never sees.
    pub fn map_values<F>(self, mut map: F) -> Reply
    where
        F: FnMut(serde_json::Value) -> Result<serde_json::Value, RpcError> + Send + 'static,
    {
        let mut apply = move |value: RawJson| {
            let value = value.try_to_value().map_err(|error| {
                RpcError::internal_with(format_args!("a reply value could not be mapped: {error}"))
            })?;
            map(value).and_then(|value| serialize(&value))
        };
        match self {
            Reply::Value(value) => match apply(value) {
                Ok(value) => Reply::Value(value),
                Err(error) => {
                    Reply::Stream(futures_util::stream::once(async { Err(error) }).boxed())
                }
            },
            Reply::Empty => Reply::Empty,
            Reply::Stream(values) => {
                Reply::Stream(values.map(move |value| value.and_then(&mut apply)).boxed())
            }
        }
    }
}

impl Reply {
    /// Runs the reply to its end, its values going nowhere: what an event's reply is for. A
    /// stream's work happens as it is polled (NestJS subscribes to an Observable an event
    /// handler returns), and its first error, or a panic in it, is the handler's failure.
    pub(crate) async fn run_to_end(self) -> Result<(), RpcError> {
        let Reply::Stream(values) = self else {
            return Ok(());
        };
        let mut values = std::panic::AssertUnwindSafe(values).catch_unwind();
        while let Some(item) = values.next().await {
            match item {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(error),
                Err(panic) => return Err(handler_panicked(&*panic)),
            }
        }
        Ok(())
    }
}

/// The text of a panic's payload, for logs.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned())
}

/// Logs a handler's panic; the error its caller gets.
pub(crate) fn handler_panicked(panic: &(dyn std::any::Any + Send)) -> RpcError {
    tracing::error!(panic = %panic_message(panic), "handler panicked; replying \"Internal server error\"");
    RpcError::internal()
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Value(value) => f.debug_tuple("Value").field(value).finish(),
            Reply::Empty => f.write_str("Empty"),
            Reply::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}

/// Turns what a handler returns into a [`Reply`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler's reply: it does not implement `IntoReply`",
    label = "not a reply",
    note = "a handler returns a value (String, numbers, bool, Vec<T>, Option<T>, serde_json::Value, `()`), `Json<T>` for any `T: Serialize`, `Result<T, E>` (T: Serialize, E: Into<BoxError>), or `Streaming<S>`",
    note = "a struct of your own goes in `Json(..)` or a `Result`: `Ok::<_, RpcError>(user)`"
)]
///
/// Implemented for `Result<T, E>` (`T: Serialize`; any error `E` — an [`RpcError`] goes to the
/// caller as is, anything else is logged in full on the server and reaches the caller as NestJS's
/// "Internal server error", never leaking internals), for [`Streaming`], [`Json`], `()`, and plain
/// values of common types.
pub trait IntoReply {
    /// The reply, or the error to send instead.
    fn into_reply(self) -> Result<Reply, RpcError>;
}

/// Converts a handler's error: an [`RpcError`] (even boxed) passes through; anything else is logged
/// here, with its whole source chain, and replaced by the generic internal error.
pub(crate) fn handler_error(error: impl Into<BoxError>) -> RpcError {
    match error.into().downcast::<RpcError>() {
        Ok(rpc) => *rpc,
        Err(other) => {
            let mut chain = other.to_string();
            let mut source = other.source();
            while let Some(cause) = source {
                chain.push_str(": ");
                chain.push_str(&cause.to_string());
                source = cause.source();
            }
            tracing::error!(
                error = %chain,
                "handler failed with an error that is not an RpcError; the caller gets \"Internal server error\" unless an exception filter maps it"
            );
            RpcError::internal().with_handler_error(Arc::from(other))
        }
    }
}

fn serialize<T: Serialize + ?Sized>(value: &T) -> Result<RawJson, RpcError> {
    RawJson::to_json(value).map_err(|error| {
        tracing::error!(%error, "handler reply does not serialise to JSON");
        RpcError::internal()
    })
}

impl<T: Serialize, E: Into<BoxError>> IntoReply for Result<T, E> {
    fn into_reply(self) -> Result<Reply, RpcError> {
        match self {
            Ok(value) => Ok(Reply::Value(serialize(&value)?)),
            Err(error) => Err(handler_error(error)),
        }
    }
}

impl IntoReply for Reply {
    fn into_reply(self) -> Result<Reply, RpcError> {
        Ok(self)
    }
}

impl IntoReply for () {
    fn into_reply(self) -> Result<Reply, RpcError> {
        Ok(Reply::Empty)
    }
}

/// A reply of any serialisable type (for values without their own [`IntoReply`]).
#[derive(Clone, Copy, Debug)]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoReply for Json<T> {
    fn into_reply(self) -> Result<Reply, RpcError> {
        Ok(Reply::Value(serialize(&self.0)?))
    }
}

macro_rules! plain_replies {
    ($($t:ty),*) => {$(
        impl IntoReply for $t {
            fn into_reply(self) -> Result<Reply, RpcError> {
                Ok(Reply::Value(serialize(&self)?))
            }
        }
    )*};
}
plain_replies!(
    String,
    &'static str,
    bool,
    i8,
    i16,
    i32,
    i64,
    u8,
    u16,
    u32,
    u64,
    usize,
    isize,
    f32,
    f64,
    serde_json::Value
);

impl<T: Serialize> IntoReply for Vec<T> {
    fn into_reply(self) -> Result<Reply, RpcError> {
        Ok(Reply::Value(serialize(&self)?))
    }
}

impl<T: Serialize> IntoReply for Option<T> {
    fn into_reply(self) -> Result<Reply, RpcError> {
        Ok(Reply::Value(serialize(&self)?))
    }
}

/// A handler reply of several values, like a NestJS handler returning an `Observable`.
///
/// Build one from values ([`iter`](Streaming::iter)), from results that may fail part-way
/// ([`try_iter`](Streaming::try_iter)), from any stream of values
/// ([`from_stream`](Streaming::from_stream)), or wrap a stream of `Result`s directly:
/// `Streaming(stream)`. Each value goes out as one packet; an error ends the stream with that
/// error.
///
/// ```
/// use futures_core::Stream;
/// use palisade::rpc::{Payload, RpcError, Streaming};
///
/// async fn count(Payload(n): Payload<u32>) -> Streaming<impl Stream<Item = Result<u32, RpcError>>> {
///     Streaming::iter(1..=n)
/// }
/// ```
pub struct Streaming<S>(pub S);

impl Streaming<()> {
    /// A stream of these values.
    ///
    /// ```
    /// # use futures_core::Stream;
    /// # use palisade::rpc::{RpcError, Streaming};
    /// async fn colours() -> Streaming<impl Stream<Item = Result<&'static str, RpcError>>> {
    ///     Streaming::iter(["red", "green", "blue"])
    /// }
    /// ```
    pub fn iter<I>(values: I) -> Streaming<impl Stream<Item = Result<I::Item, RpcError>>>
    where
        I: IntoIterator,
    {
        Streaming(futures_util::stream::iter(values.into_iter().map(Ok)))
    }

    /// A stream of these results: values until the first error, which ends the stream (an
    /// [`RpcError`] reaches the caller as it is; any other error as "Internal server error",
    /// logged here).
    ///
    /// ```
    /// # use futures_core::Stream;
    /// # use palisade::rpc::{RpcError, Streaming};
    /// async fn pages() -> Streaming<impl Stream<Item = Result<u32, RpcError>>> {
    ///     Streaming::try_iter([Ok(1), Ok(2), Err(RpcError::not_found("page 3 is gone"))])
    /// }
    /// ```
    pub fn try_iter<I, T, E>(results: I) -> Streaming<impl Stream<Item = Result<T, E>>>
    where
        I: IntoIterator<Item = Result<T, E>>,
    {
        Streaming(futures_util::stream::iter(results))
    }

    /// A stream of the values `stream` yields (a stream that cannot fail; one of `Result`s goes
    /// in [`Streaming`] directly).
    ///
    /// ```
    /// # use futures_core::Stream;
    /// # use palisade::rpc::{RpcError, Streaming};
    /// use tokio::sync::mpsc;
    ///
    /// async fn ticks() -> Streaming<impl Stream<Item = Result<u64, RpcError>>> {
    ///     let (tx, mut rx) = mpsc::channel(4);
    ///     tokio::spawn(async move { for tick in 0..3 { let _ = tx.send(tick).await; } });
    ///     Streaming::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    /// }
    /// ```
    pub fn from_stream<S>(stream: S) -> Streaming<impl Stream<Item = Result<S::Item, RpcError>>>
    where
        S: Stream,
    {
        Streaming(stream.map(Ok))
    }
}

impl<S> fmt::Debug for Streaming<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Streaming(..)")
    }
}

impl<S, T, E> IntoReply for Streaming<S>
where
    S: Stream<Item = Result<T, E>> + Send + 'static,
    T: Serialize,
    E: Into<BoxError>,
{
    fn into_reply(self) -> Result<Reply, RpcError> {
        Ok(Reply::Stream(
            self.0
                .map(|item| match item {
                    Ok(value) => serialize(&value),
                    Err(error) => Err(handler_error(error)),
                })
                .boxed(),
        ))
    }
}

/// Extracts a handler argument from the request and the router's state `S` (see
/// [`Router::with_state`](super::Router::with_state)).
///
/// Your own extractor implements it for every state (`impl<S> FromRequest<S> for ..`) unless it
/// needs a particular one:
///
/// ```
/// use palisade::rpc::{FromRequest, Router, RpcError, RpcRequest};
///
/// /// The caller's tenant, from a header.
/// struct Tenant(String);
///
/// impl<S> FromRequest<S> for Tenant {
///     fn from_request(request: &RpcRequest, _state: &S) -> Result<Self, RpcError> {
///         match request.headers().get("x-tenant") {
///             Some(tenant) => Ok(Tenant(tenant.to_owned())),
///             None => Err(RpcError::invalid_argument("the x-tenant header is missing")),
///         }
///     }
/// }
///
/// let router = Router::new().message("whoami", |Tenant(tenant): Tenant| async move { tenant });
/// # let _ = router;
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler argument: it does not implement `FromRequest<{S}>`",
    label = "not an extractor",
    note = "handler arguments are extractors: `Payload<T>` (T: Deserialize), `Valid<Payload<T>>` (or `Validated<Payload<T>>` with the `validator` feature), `State<T>` (T: FromRef of the router's state), `Extension<T>`, `Headers`, `MessagePattern`, `Option<Deadline>`, `RpcRequest`",
    note = "a payload type goes inside `Payload<..>`: write `Payload(user): Payload<User>`, not `user: User`"
)]
pub trait FromRequest<S = ()>: Sized {
    /// The argument, or the error to reply with instead of calling the handler.
    fn from_request(request: &RpcRequest, state: &S) -> Result<Self, RpcError>;
}

/// The payload, decoded. A payload that does not decode is answered with `InvalidArgument` naming
/// the pattern and the offending field, and the handler is not called.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Payload<T>(pub T);

impl<T: DeserializeOwned, S> FromRequest<S> for Payload<T> {
    fn from_request(request: &RpcRequest, _: &S) -> Result<Self, RpcError> {
        request.payload().decode().map(Payload).map_err(|error| {
            RpcError::invalid_argument(format!(
                "payload for '{}' does not decode: {error}",
                request.pattern()
            ))
        })
    }
}

/// The pattern the message arrived with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessagePattern(pub Pattern);

impl<S> FromRequest<S> for MessagePattern {
    fn from_request(request: &RpcRequest, _: &S) -> Result<Self, RpcError> {
        Ok(MessagePattern(request.pattern().clone()))
    }
}

impl<S> FromRequest<S> for Headers {
    fn from_request(request: &RpcRequest, _: &S) -> Result<Self, RpcError> {
        Ok(request.headers().clone())
    }
}

/// The request's deadline, if the caller sent one.
impl<S> FromRequest<S> for Option<Deadline> {
    fn from_request(request: &RpcRequest, _: &S) -> Result<Self, RpcError> {
        Ok(request.deadline())
    }
}

impl<S> FromRequest<S> for RpcRequest {
    fn from_request(request: &RpcRequest, _: &S) -> Result<Self, RpcError> {
        Ok(request.clone())
    }
}

/// Makes a value from a reference to a larger one: how [`State<T>`] takes a part of the router's
/// state (a *substate*), as axum's `FromRef`.
///
/// Every `Clone` type is a substate of itself; implement it for the parts handlers ask for.
///
/// ```
/// use palisade::rpc::{FromRef, Router, State};
/// use std::sync::Arc;
///
/// #[derive(Clone)]
/// struct AppState { users: Arc<Vec<String>>, greeting: &'static str }
///
/// #[derive(Clone)]
/// struct Users(Arc<Vec<String>>);
/// impl FromRef<AppState> for Users {
///     fn from_ref(state: &AppState) -> Self { Users(state.users.clone()) }
/// }
///
/// async fn count(State(Users(users)): State<Users>) -> usize { users.len() }
/// async fn greet(State(state): State<AppState>) -> &'static str { state.greeting }
///
/// let router = Router::stateful()
///     .message("count", count)
///     .message("greet", greet)
///     .with_state(AppState { users: Arc::new(vec!["ann".into()]), greeting: "hello" });
/// # let _ = router;
/// ```
pub trait FromRef<T> {
    /// The part of `input` this type stands for.
    fn from_ref(input: &T) -> Self;
}

impl<T: Clone> FromRef<T> for T {
    fn from_ref(input: &T) -> Self {
        input.clone()
    }
}

/// The router's state, or a part of it ([`FromRef`]): what handlers share (a database pool, a
/// client, configuration) without capturing clones in closures. Given to the router with
/// [`Router::with_state`](super::Router::with_state); a handler that asks for a state the router
/// does not have does not compile.
///
/// ```
/// use palisade::rpc::{Payload, Router, State};
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// #[derive(Clone, Default)]
/// struct Counter(Arc<AtomicU64>);
///
/// async fn add(State(counter): State<Counter>, Payload(n): Payload<u64>) -> u64 {
///     counter.0.fetch_add(n, Ordering::Relaxed) + n
/// }
///
/// let router = Router::stateful().message("add", add).with_state(Counter::default());
/// # let _ = router;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State<T>(pub T);

impl<S, T: FromRef<S>> FromRequest<S> for State<T> {
    fn from_request(_: &RpcRequest, state: &S) -> Result<Self, RpcError> {
        Ok(State(T::from_ref(state)))
    }
}

/// A value a layer stored in the request's [`Extensions`](super::Extensions) — the principal a
/// guard authenticated, a tenant, a transaction. A request without one is a server bug (a
/// handler served without the layer that provides it): it is logged and answered with
/// "Internal server error". Ask for `Option<Extension<T>>` when the value is optional.
///
/// ```
/// use palisade::rpc::{Extension, GuardLayer, Handler, Router, RpcError, RpcRequest};
///
/// #[derive(Clone)]
/// struct Principal { name: String }
///
/// /// Authenticates the caller from its token header and hands the principal to the handler.
/// fn authenticate(request: &mut RpcRequest) -> Result<(), RpcError> {
///     let name = match request.headers().get("authorization") {
///         Some(token) => token.trim_start_matches("Bearer ").to_owned(),
///         None => return Err(RpcError::unauthenticated("no token")),
///     };
///     request.extensions_mut().insert(Principal { name });
///     Ok(())
/// }
///
/// async fn whoami(Extension(principal): Extension<Principal>) -> String {
///     principal.name
/// }
///
/// let router = Router::new().message("whoami", whoami.layer(GuardLayer::new(authenticate)));
/// # let _ = router;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extension<T>(pub T);

impl<S, T: Clone + Send + Sync + 'static> FromRequest<S> for Extension<T> {
    fn from_request(request: &RpcRequest, _: &S) -> Result<Self, RpcError> {
        match request.extensions().get::<T>() {
            Some(value) => Ok(Extension(value.clone())),
            None => Err(RpcError::internal_with(format_args!(
                "the request to '{}' has no extension of type {}: is the layer that inserts it \
                 on this route?",
                request.pattern(),
                std::any::type_name::<T>()
            ))),
        }
    }
}

impl<S, T: Clone + Send + Sync + 'static> FromRequest<S> for Option<Extension<T>> {
    fn from_request(request: &RpcRequest, _: &S) -> Result<Self, RpcError> {
        Ok(request.extensions().get::<T>().cloned().map(Extension))
    }
}

/// Something that can handle messages: an async function whose arguments are extractors
/// ([`Payload`], [`State`], [`Extension`], [`MessagePattern`], [`Headers`], `Option<Deadline>`,
/// [`RpcRequest`]) and whose return type is [`IntoReply`] — or any `tower::Service<RpcRequest,
/// Response = Reply, Error = RpcError>`. `S` is the router's state
/// ([`Router::with_state`](super::Router::with_state)); `()` without one.
///
/// A handler wears layers of its own with [`layer`](Handler::layer) — a circuit breaker on one
/// pattern, as NestJS's `@CircuitBreaker` on one `@MessagePattern`:
///
/// ```
/// use palisade::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
/// use palisade::rpc::{Handler, Payload, Router, RpcError};
///
/// async fn pay(Payload(cents): Payload<u64>) -> Result<u64, RpcError> {
///     Ok(cents)
/// }
///
/// let router = Router::new()
///     .message("pay", pay.layer(CircuitBreakerLayer::new(CircuitBreakerConfig::new("payments"))));
/// # let _ = router;
/// ```
///
/// When a function is not a handler, the usual causes are: an argument that is not an extractor
/// (a payload type must be wrapped, `Payload<T>`), a return type that is not [`IntoReply`] (a
/// struct needs `Result<T, E>` or [`Json`]), a future that is not `Send` (an `Rc` or a
/// `std::sync::MutexGuard` held across an `.await`), a [`State<T>`] the router's state cannot
/// give ([`FromRef`]), a function that is not `async`, or more than five arguments.
///
/// ```compile_fail
/// use palisade::rpc::Router;
///
/// struct User { id: u64 } // not Deserialize, and not wrapped in Payload<..>
/// async fn get_user(user: User) -> u64 { user.id }
///
/// let router = Router::new().message("get-user", get_user); // error: not a message handler
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a message handler (for a router with state `{S}`)",
    label = "not a handler",
    note = "a handler is an `async fn` (or closure returning a future) whose arguments are extractors (`Payload<T>`, `State<T>`, `Extension<T>`, `Headers`, `MessagePattern`, ...; at most 5) and whose output is `IntoReply`, or a tower `Service<RpcRequest, Response = Reply, Error = RpcError>`",
    note = "check that every argument implements `FromRequest`, that the output implements `IntoReply` (a struct of your own: return `Result<T, RpcError>` or `Json<T>`), and that the future is `Send` (no `Rc` or `std::sync::MutexGuard` held across `.await`)"
)]
pub trait Handler<Args, S = ()>: Clone + Send + Sync + Sized + 'static {
    /// Handles one message with the router's state.
    fn call(self, request: RpcRequest, state: S) -> BoxFuture<'static, Result<Reply, RpcError>>;

    /// The handler with its state, as a tower service: what the router calls, and what layers
    /// wrap. Built once per route, when the state is known.
    fn with_state(self, state: S) -> Route
    where
        S: Clone + Send + Sync + 'static,
        Args: 'static,
    {
        Route::from_erased(Arc::new(HandlerRoute {
            handler: self,
            state,
            _args: PhantomData,
        }))
    }

    /// This handler inside `layer` (any tower layer over a [`Route`]: palisade's
    /// `CircuitBreakerLayer`, `TimeoutLayer`, `RetryLayer`, [`GuardLayer`](super::GuardLayer),
    /// tower's own). The layer wraps the handler once per route, so its state (a breaker's, a
    /// concurrency limit's) is shared by every message of the pattern. Layers added later wrap
    /// the earlier ones: `h.layer(a).layer(b)` runs `b`, then `a`, then `h`.
    fn layer<L>(self, layer: L) -> Layered<L, Self, Args, S> {
        Layered {
            layer,
            handler: self,
            _args: PhantomData,
        }
    }
}

/// A handler and its state as a tower service (see [`Handler::with_state`]): cheap to clone (one
/// shared pointer), always ready. The service every layer on a route wraps.
#[derive(Clone)]
pub struct Route(Arc<dyn ErasedRoute>);

/// Calling a route needs only `&self`, so dispatch clones nothing but the handler itself.
trait ErasedRoute: Send + Sync {
    fn call(&self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>>;
}

struct HandlerRoute<H, Args, S> {
    handler: H,
    state: S,
    _args: PhantomData<fn() -> Args>,
}

impl<H, Args, S> ErasedRoute for HandlerRoute<H, Args, S>
where
    H: Handler<Args, S>,
    S: Clone + Send + Sync + 'static,
{
    fn call(&self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
        self.handler.clone().call(request, self.state.clone())
    }
}

struct ServiceRoute<Svc>(Svc);

impl<Svc> ErasedRoute for ServiceRoute<Svc>
where
    Svc: Service<RpcRequest, Response = Reply, Error = RpcError> + Clone + Send + Sync + 'static,
    Svc::Future: Send + 'static,
{
    fn call(&self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
        Box::pin(self.0.clone().oneshot(request))
    }
}

impl Route {
    /// A route that calls `service` (cloned per message, as tower services are).
    pub fn new<Svc>(service: Svc) -> Self
    where
        Svc:
            Service<RpcRequest, Response = Reply, Error = RpcError> + Clone + Send + Sync + 'static,
        Svc::Future: Send + 'static,
    {
        Route(Arc::new(ServiceRoute(service)))
    }

    fn from_erased(route: Arc<dyn ErasedRoute>) -> Self {
        Route(route)
    }

    /// Handles one message.
    pub fn handle(&self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
        self.0.call(request)
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route").finish_non_exhaustive()
    }
}

impl Service<RpcRequest> for Route {
    type Response = Reply;
    type Error = RpcError;
    type Future = BoxFuture<'static, Result<Reply, RpcError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RpcRequest) -> Self::Future {
        self.0.call(request)
    }
}

/// A handler inside a layer; see [`Handler::layer`]. `Args` and `S` are the handler's: they
/// tie the layered handler to the same router state as the handler.
pub struct Layered<L, H, Args, S> {
    layer: L,
    handler: H,
    _args: PhantomData<fn() -> (Args, S)>,
}

impl<L: Clone, H: Clone, Args, S> Clone for Layered<L, H, Args, S> {
    fn clone(&self) -> Self {
        Layered {
            layer: self.layer.clone(),
            handler: self.handler.clone(),
            _args: PhantomData,
        }
    }
}

impl<L, H, Args, S> fmt::Debug for Layered<L, H, Args, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layered").finish_non_exhaustive()
    }
}

impl<L, H, Args, S> Handler<Args, S> for Layered<L, H, Args, S>
where
    L: Layer<Route> + Clone + Send + Sync + 'static,
    L::Service:
        Service<RpcRequest, Response = Reply, Error = RpcError> + Clone + Send + Sync + 'static,
    <L::Service as Service<RpcRequest>>::Future: Send + 'static,
    H: Handler<Args, S>,
    S: Clone + Send + Sync + 'static,
    Args: 'static,
{
    /// Wraps the handler for this one call. Routers never take this path (they build the
    /// layered service once, in [`with_state`](Handler::with_state)); it exists for callers that
    /// invoke a handler directly, and for them a stateful layer starts afresh each call.
    fn call(self, request: RpcRequest, state: S) -> BoxFuture<'static, Result<Reply, RpcError>> {
        let service = self.layer.layer(self.handler.with_state(state));
        Box::pin(service.oneshot(request))
    }

    fn with_state(self, state: S) -> Route {
        Route::new(self.layer.layer(self.handler.with_state(state)))
    }
}

/// Marks the [`Handler`] implementation for tower services: an implementation detail that
/// must be public because it appears in that implementation's type.
#[doc(hidden)]
#[derive(Debug)]
pub enum IsService {}

impl<Svc, S> Handler<IsService, S> for Svc
where
    Svc: Service<RpcRequest, Response = Reply, Error = RpcError> + Clone + Send + Sync + 'static,
    Svc::Future: Send,
{
    fn call(self, request: RpcRequest, _: S) -> BoxFuture<'static, Result<Reply, RpcError>> {
        Box::pin(self.oneshot(request))
    }
}

macro_rules! handler_for_fn {
    ($($arg:ident),*) => {
        #[allow(non_snake_case)]
        impl<F, Fut, R, S, $($arg,)*> Handler<($($arg,)*), S> for F
        where
            F: FnOnce($($arg),*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoReply,
            $($arg: FromRequest<S> + Send + 'static,)*
        {
            #[allow(unused_variables)]
            fn call(self, request: RpcRequest, state: S) -> BoxFuture<'static, Result<Reply, RpcError>> {
                $(
                    let $arg = match $arg::from_request(&request, &state) {
                        Ok(value) => value,
                        Err(error) => return Box::pin(std::future::ready(Err(error))),
                    };
                )*
                Box::pin(async move { self($($arg),*).await.into_reply() })
            }
        }
    };
}

handler_for_fn!();
handler_for_fn!(A1);
handler_for_fn!(A1, A2);
handler_for_fn!(A1, A2, A3);
handler_for_fn!(A1, A2, A3, A4);
handler_for_fn!(A1, A2, A3, A4, A5);

/// A handler function as a `tower::Service`, so it can wear layers before going into a router —
/// like NestJS's `@CircuitBreaker` on one `@MessagePattern`.
///
/// ```
/// use palisade::builder::ServiceBuilderExt;
/// use palisade::circuit_breaker::CircuitBreakerConfig;
/// use palisade::rpc::{handler_service, Payload, Router, RpcError};
/// use std::time::Duration;
/// use tower::ServiceBuilder;
///
/// async fn create_user(Payload(name): Payload<String>) -> Result<u64, RpcError> {
///     Ok(name.len() as u64)
/// }
///
/// let router = Router::new().message(
///     "create-user",
///     ServiceBuilder::new()
///         .circuit_breaker(
///             CircuitBreakerConfig::new("user-service")
///                 .ttl(Duration::from_secs(5))
///                 .max_failures(3)
///                 .reset_timeout(Duration::from_secs(10)),
///         )
///         .service(handler_service(create_user)),
/// );
/// # let _ = router;
/// ```
pub fn handler_service<H, Args>(handler: H) -> HandlerService<H, Args>
where
    H: Handler<Args>,
{
    HandlerService {
        handler,
        _args: PhantomData,
    }
}

/// A [`Handler`] as a `tower::Service`; see [`handler_service`].
pub struct HandlerService<H, Args> {
    handler: H,
    _args: PhantomData<fn() -> Args>,
}

impl<H: Clone, Args> Clone for HandlerService<H, Args> {
    fn clone(&self) -> Self {
        HandlerService {
            handler: self.handler.clone(),
            _args: PhantomData,
        }
    }
}

impl<H, Args> fmt::Debug for HandlerService<H, Args> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerService").finish_non_exhaustive()
    }
}

impl<H: Handler<Args>, Args> Service<RpcRequest> for HandlerService<H, Args> {
    type Response = Reply;
    type Error = RpcError;
    type Future = BoxFuture<'static, Result<Reply, RpcError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RpcRequest) -> Self::Future {
        self.handler.clone().call(request, ())
    }
}
