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
use std::task::{Context, Poll};
use tower::{BoxError, ServiceExt};
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
            tracing::error!(error = %chain, "handler failed; replying \"Internal server error\"");
            RpcError::internal()
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

/// Extracts a handler argument from the request.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler argument: it does not implement `FromRequest`",
    label = "not an extractor",
    note = "handler arguments are extractors: `Payload<T>` (T: Deserialize), `Valid<Payload<T>>`, `State<T>`, `Extension<T>`, `Headers`, `MessagePattern`, `Option<Deadline>`, `RpcRequest`",
    note = "a payload type goes inside `Payload<..>`: write `Payload(user): Payload<User>`, not `user: User`"
)]
pub trait FromRequest: Sized {
    /// The argument, or the error to reply with instead of calling the handler.
    fn from_request(request: &RpcRequest) -> Result<Self, RpcError>;
}

/// The payload, decoded. A payload that does not decode is answered with `InvalidArgument` naming
/// the pattern and the offending field, and the handler is not called.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Payload<T>(pub T);

impl<T: DeserializeOwned> FromRequest for Payload<T> {
    fn from_request(request: &RpcRequest) -> Result<Self, RpcError> {
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

impl FromRequest for MessagePattern {
    fn from_request(request: &RpcRequest) -> Result<Self, RpcError> {
        Ok(MessagePattern(request.pattern().clone()))
    }
}

impl FromRequest for Headers {
    fn from_request(request: &RpcRequest) -> Result<Self, RpcError> {
        Ok(request.headers().clone())
    }
}

/// The request's deadline, if the caller sent one.
impl FromRequest for Option<Deadline> {
    fn from_request(request: &RpcRequest) -> Result<Self, RpcError> {
        Ok(request.deadline())
    }
}

impl FromRequest for RpcRequest {
    fn from_request(request: &RpcRequest) -> Result<Self, RpcError> {
        Ok(request.clone())
    }
}

/// Something that can handle messages: an async function whose arguments are extractors
/// ([`Payload`], [`MessagePattern`], [`Headers`], `Option<Deadline>`, [`RpcRequest`]) and whose
/// return type is [`IntoReply`] — or any `tower::Service<RpcRequest, Response = Reply, Error =
/// RpcError>` (so handlers can wear layers; see [`handler_service`]).
///
/// When a function is not a handler, the usual causes are: an argument that is not an extractor
/// (a payload type must be wrapped, `Payload<T>`), a return type that is not [`IntoReply`] (a
/// struct needs `Result<T, E>` or [`Json`]), a future that is not `Send` (an `Rc` or a
/// `std::sync::MutexGuard` held across an `.await`), a function that is not `async`, or more
/// than five arguments.
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
    message = "`{Self}` is not a message handler",
    label = "not a handler",
    note = "a handler is an `async fn` (or closure returning a future) whose arguments are extractors (`Payload<T>`, `State<T>`, `Extension<T>`, `Headers`, `MessagePattern`, ...; at most 5) and whose output is `IntoReply`, or a tower `Service<RpcRequest, Response = Reply, Error = RpcError>`",
    note = "check that every argument implements `FromRequest`, that the output implements `IntoReply` (a struct of your own: return `Result<T, RpcError>` or `Json<T>`), and that the future is `Send` (no `Rc` or `std::sync::MutexGuard` held across `.await`)"
)]
pub trait Handler<Args>: Clone + Send + Sync + Sized + 'static {
    /// Handles one message.
    fn call(self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>>;
}

/// Marks the [`Handler`] implementation for tower services: an implementation detail that
/// must be public because it appears in that implementation's type.
#[doc(hidden)]
#[derive(Debug)]
pub enum IsService {}

impl<S> Handler<IsService> for S
where
    S: Service<RpcRequest, Response = Reply, Error = RpcError> + Clone + Send + Sync + 'static,
    S::Future: Send,
{
    fn call(self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
        Box::pin(self.oneshot(request))
    }
}

macro_rules! handler_for_fn {
    ($($arg:ident),*) => {
        #[allow(non_snake_case)]
        impl<F, Fut, R, $($arg,)*> Handler<($($arg,)*)> for F
        where
            F: FnOnce($($arg),*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoReply,
            $($arg: FromRequest + Send + 'static,)*
        {
            #[allow(unused_variables)]
            fn call(self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
                $(
                    let $arg = match $arg::from_request(&request) {
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
        self.handler.clone().call(request)
    }
}
