use super::request::TRACEPARENT_HEADER;
use super::transport::{
    ClientTransport, Connect, ExplainSilence, ReplyPacket, ReplyReceiver, SILENCE_MARGIN,
};
use super::{Code, Headers, Kind, Pattern, RawJson, RpcError, RpcRequest};
use crate::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerHandle, CircuitBreakerLayer};
use crate::classify::FaultsOnly;
use crate::retry::{Predicate, RetryPolicy, TransientErrors};
use crate::rng::{SharedRng, mix};
use crate::timeout::{
    Deadline, DeadlineLayer, Elapsed, HasDeadline, RequestDeadline, TimeoutLayer, Until,
};
use futures_core::Stream;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use pin_project_lite::pin_project;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_service::Service;
use tracing::Instrument;

/// What the transport stack answers to one request: its first value (or nothing, for a stream
/// that completed empty and for events) and, when more may follow, the rest of the reply stream.
pub struct RpcResponse {
    first: Option<RawJson>,
    rest: Option<ReplyReceiver>,
}

impl RpcResponse {
    /// The first value, if any.
    pub fn first(&self) -> Option<&RawJson> {
        self.first.as_ref()
    }

    /// Whether more values may follow.
    pub fn has_more(&self) -> bool {
        self.rest.is_some()
    }

    fn empty() -> Self {
        RpcResponse {
            first: None,
            rest: None,
        }
    }
}

impl fmt::Debug for RpcResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcResponse")
            .field("first", &self.first)
            .field("has_more", &self.has_more())
            .finish()
    }
}

fn connection_lost() -> RpcError {
    RpcError::unavailable("connection closed before the reply was complete")
}

/// Reads a packet into a value, an end marker, or an error.
fn read_packet(packet: ReplyPacket) -> Result<(Option<RawJson>, bool), RpcError> {
    match packet {
        ReplyPacket::Value { response, last } => Ok((Some(response), last)),
        ReplyPacket::Complete => Ok((None, true)),
        ReplyPacket::Error(err) => Err(RpcError::from_wire_json(&err)),
        ReplyPacket::Failed(error) => Err(error),
        ReplyPacket::NoHandler => Err(RpcError::no_handler()),
    }
}

/// The bottom of the client stack: hands requests to the transport and resolves on the first
/// reply packet, so timeouts, retry and the breaker judge the handler's answer, not just the send.
#[derive(Clone)]
struct TransportService {
    transport: Arc<dyn ClientTransport>,
    /// Whether this bounds each request by its deadline. Needed when no attempt timeout does:
    /// a deadline enforced only above the breaker and retry cancels them when it passes, and a
    /// cancelled call counts for nothing, so a breaker in front of a service that hangs would
    /// never open.
    enforce_deadline: bool,
}

impl Service<RpcRequest> for TransportService {
    type Response = RpcResponse;
    type Error = RpcError;
    type Future = TransportFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RpcRequest) -> Self::Future {
        // A transport that explains silence does so just before the deadline.
        TransportFuture::new(&*self.transport, request, self.enforce_deadline)
    }
}

/// Awaits a future inside the request's span when someone collects the span (`traced`), and as it
/// is otherwise: a disabled span has nothing to enter, and entering it anyway costs `tracing`'s
/// `log` fallback a check at every poll. A macro, not an `async fn`: an `async fn` would take the
/// future by value, one more copy of it per request.
macro_rules! in_span {
    ($traced:expr, $span:expr, $future:expr) => {
        if $traced {
            $future.instrument($span.clone()).await
        } else {
            $future.await
        }
    };
}

/// Hands one request to the transport and resolves on its first reply packet (an event: once the
/// transport took it).
///
/// Written out rather than an `async fn`: it sits inside every call's future, and each of its
/// states is a boxed future or the reply receiver, where an `async fn` kept the request and each
/// awaited future side by side (416 bytes, copied with the futures around it at every move).
struct Exchange {
    state: ExchangeState,
    /// The transport took the request: an answer may come.
    sent: bool,
}

enum ExchangeState {
    Emitting(BoxFuture<'static, Result<(), RpcError>>),
    Sending(BoxFuture<'static, Result<ReplyReceiver, RpcError>>),
    Receiving(ReplyReceiver),
    Done,
}

impl Exchange {
    fn new(transport: &dyn ClientTransport, request: RpcRequest) -> Self {
        let state = if request.kind() == Kind::Event {
            // The deadline bounds the emit here and is not sent: no caller waits for an event's
            // handlers, and a durable event handled (or redelivered) later must not be judged
            // expired by the server.
            ExchangeState::Emitting(transport.emit(request.without_deadline()))
        } else {
            ExchangeState::Sending(transport.request(request))
        };
        Exchange { state, sent: false }
    }
}

impl Future for Exchange {
    type Output = Result<RpcResponse, RpcError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                ExchangeState::Emitting(emitting) => {
                    let emitted = std::task::ready!(emitting.as_mut().poll(cx));
                    this.state = ExchangeState::Done;
                    return Poll::Ready(emitted.map(|()| RpcResponse::empty()));
                }
                ExchangeState::Sending(sending) => {
                    match std::task::ready!(sending.as_mut().poll(cx)) {
                        Ok(replies) => {
                            this.sent = true;
                            this.state = ExchangeState::Receiving(replies);
                        }
                        Err(error) => {
                            this.state = ExchangeState::Done;
                            return Poll::Ready(Err(error));
                        }
                    }
                }
                ExchangeState::Receiving(replies) => {
                    let packet = std::task::ready!(replies.poll_recv(cx));
                    let ExchangeState::Receiving(replies) =
                        std::mem::replace(&mut this.state, ExchangeState::Done)
                    else {
                        unreachable!("matched above")
                    };
                    return Poll::Ready(first_of(packet, replies));
                }
                ExchangeState::Done => panic!("a client's exchange polled after it resolved"),
            }
        }
    }
}

/// The response a request's first reply packet makes, with `replies` for the rest if more follow.
fn first_of(packet: Option<ReplyPacket>, replies: ReplyReceiver) -> Result<RpcResponse, RpcError> {
    let (first, last) = read_packet(packet.ok_or_else(connection_lost)?)?;
    Ok(RpcResponse {
        first,
        rest: (!last).then_some(replies),
    })
}

pin_project! {
    /// A request handed to the transport, resolved on its first reply packet: within the request's
    /// deadline (when the client enforces it there), and [`SILENCE_MARGIN`] early over a
    /// transport that [explains silence](ClientTransport::explain_silence), with the transport's
    /// explanation if the request went out and a bare `DeadlineExceeded` if it did not.
    #[project = TransportFutureProjection]
    enum TransportFuture {
        Unbounded {
            #[pin]
            exchange: Exchange,
        },
        Bounded {
            #[pin]
            exchange: Until<Exchange>,
        },
        Explained {
            #[pin]
            exchange: Until<Exchange>,
            route: Arc<str>,
            explain: ExplainSilence,
        },
    }
}

impl TransportFuture {
    /// `request` through `transport`; `enforce_deadline` bounds it by the request's deadline here
    /// (no layer above does).
    fn new(transport: &dyn ClientTransport, request: RpcRequest, enforce_deadline: bool) -> Self {
        let deadline = request.deadline();
        match (deadline, transport.explain_silence()) {
            (Some(deadline), Some(explain)) if request.kind() == Kind::Request => {
                let route = Arc::clone(request.pattern().route_arc());
                let end = deadline.instant();
                let give_up = end.checked_sub(SILENCE_MARGIN).unwrap_or(end);
                TransportFuture::Explained {
                    exchange: crate::timeout::until(give_up, Exchange::new(transport, request)),
                    route,
                    explain,
                }
            }
            (Some(deadline), _) if enforce_deadline => TransportFuture::Bounded {
                exchange: crate::timeout::until(
                    deadline.instant(),
                    Exchange::new(transport, request),
                ),
            },
            _ => TransportFuture::Unbounded {
                exchange: Exchange::new(transport, request),
            },
        }
    }
}

impl Future for TransportFuture {
    type Output = Result<RpcResponse, RpcError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            TransportFutureProjection::Unbounded { exchange } => exchange.poll(cx),
            TransportFutureProjection::Bounded { exchange } => exchange
                .poll(cx)
                .map(|outcome| outcome.unwrap_or_else(|| Err(RpcError::from(Elapsed::deadline())))),
            TransportFutureProjection::Explained {
                mut exchange,
                route,
                explain,
            } => match std::task::ready!(exchange.as_mut().poll(cx)) {
                Some(result) => Poll::Ready(result),
                None if exchange.get_ref().sent => Poll::Ready(Err(explain(route))),
                None => Poll::Ready(Err(RpcError::from(Elapsed::deadline()))),
            },
        }
    }
}

/// The service a client sends through.
#[derive(Clone)]
enum Stack {
    /// No layers: straight to the transport, without cloning and boxing a service per request.
    Direct(Arc<dyn ClientTransport>),
    Layered(BoxCloneSyncService<RpcRequest, RpcResponse, RpcError>),
}

/// A message client: NestJS's `ClientProxy`. Cheap to clone; clones share the connection and the
/// resilience layers (one circuit breaker for all of them).
///
/// ```
/// use palisade::rpc::transport::memory::MemoryTransport;
/// use palisade::rpc::{Client, Payload, Router, Server};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let transport = MemoryTransport::new();
/// let server = Server::new(
///     Router::new().message("double", |Payload(n): Payload<i64>| async move { n * 2 }),
/// )
/// .serve(&transport)
/// .await?;
/// let client = Client::builder().connect(transport).await?;
/// let answer: i64 = client.send("double", &21).await?;
/// assert_eq!(answer, 42);
/// server.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    stack: Stack,
    timeout: Option<Duration>,
    headers: Headers,
    breaker: Option<CircuitBreakerHandle>,
}

impl Client {
    /// Configures a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The total timeout of each request (`None`: none); see [`ClientBuilder`]'s defaults.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// A handle to the client's circuit breaker, if it has one.
    pub fn circuit_breaker(&self) -> Option<&CircuitBreakerHandle> {
        self.breaker.as_ref()
    }

    /// The request for `payload` on `pattern`, and its deadline.
    ///
    /// Returned by value, never borrowed by the caller: an `async fn` keeps room for a local that
    /// was borrowed until the end of its scope, after it was moved away, and a request is 144
    /// bytes in every call's future.
    fn prepare(
        &self,
        kind: Kind,
        pattern: &Pattern,
        payload: &(impl Serialize + ?Sized),
    ) -> Result<(RpcRequest, Option<Deadline>), RpcError> {
        let payload = encode_payload(pattern, payload)?;
        let mut request = match kind {
            Kind::Request => RpcRequest::new(pattern.clone(), payload),
            Kind::Event => RpcRequest::event(pattern.clone(), payload),
        }
        .with_headers(self.headers.clone());
        let deadline = self.timeout.map(Deadline::after);
        if let Some(deadline) = deadline {
            request.set_deadline(deadline);
        }
        Ok((request, deadline))
    }

    /// Sends a prepared request through the stack (the lower-level form of [`send`](Self::send)).
    ///
    /// When the request's tracing span is enabled (a subscriber collects it), a W3C `traceparent`
    /// header is added — a new trace unless the request already carries one — so the server's span
    /// can be correlated with this one. Without tracing there is no trace context to carry, and
    /// nothing extra goes on the wire.
    ///
    /// The future is lazy, like an `async fn`'s: nothing happens until it is polled.
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` keeps the request twice in its future"
    )]
    pub fn call(
        &self,
        mut request: RpcRequest,
    ) -> impl Future<Output = Result<RpcResponse, RpcError>> + '_ {
        // An `async` block rather than an `async fn`: an `async fn` moves its argument into a
        // local of its own, and the future kept both copies of the request (144 bytes each) for
        // as long as it lived. Every call's future is inside the caller's, often in a task.
        async move {
            let span = if super::spans_observed() {
                tracing::info_span!(
                    "rpc.client",
                    pattern = %request.pattern(),
                    kind = ?request.kind(),
                    trace = tracing::field::Empty,
                    outcome = tracing::field::Empty,
                    latency_us = tracing::field::Empty,
                )
            } else {
                tracing::Span::none()
            };
            let traced = !span.is_disabled();
            if traced {
                let headers = request.headers_mut();
                // With OpenTelemetry the request continues the caller's trace, through this span.
                #[cfg(feature = "opentelemetry")]
                let continued = headers.get(TRACEPARENT_HEADER).is_none()
                    && super::otel::inject(&span, headers);
                #[cfg(not(feature = "opentelemetry"))]
                let continued = false;
                if !continued && headers.get(TRACEPARENT_HEADER).is_none() {
                    headers.insert(TRACEPARENT_HEADER, traceparent());
                }
                span.record("trace", headers.get(TRACEPARENT_HEADER));
            }
            // Clock reads only for a span someone listens to (or for metrics).
            let started = (cfg!(feature = "metrics") || traced).then(Instant::now);
            #[cfg(feature = "metrics")]
            let metered = (Arc::clone(request.pattern().route_arc()), request.kind());
            let result = match &self.stack {
                // Without other layers the deadline is enforced here rather than by a boxed
                // `DeadlineLayer` stack, so the default timeout costs a timer, not a service.
                Stack::Direct(transport) => {
                    // The transport is asked at once (its `request` or `emit` makes the future):
                    // inside the span, as on the layered path, where the bottom service is called
                    // while the span is entered.
                    let exchange = if traced {
                        span.in_scope(|| TransportFuture::new(&**transport, request, true))
                    } else {
                        TransportFuture::new(&**transport, request, true)
                    };
                    in_span!(traced, span, exchange)
                }
                Stack::Layered(stack) => in_span!(traced, span, stack.clone().oneshot(request)),
            };
            #[cfg(feature = "metrics")]
            if let Some(started) = started {
                let (route, kind) = &metered;
                let outcome = result.as_ref().map(drop);
                super::observe::record_client(route, *kind, outcome, started.elapsed());
            }
            if let Some(started) = started
                && traced
            {
                span.record("latency_us", started.elapsed().as_micros() as u64);
                match &result {
                    Ok(_) => span.record("outcome", tracing::field::display("ok")),
                    Err(error) => span.record("outcome", tracing::field::display(error.code())),
                };
            }
            result
        }
    }

    /// Sends a request and waits for its reply: the handler's value (the last one, if it answers
    /// with a stream), decoded as `R`. A handler that answers nothing decodes as JSON `null` (so
    /// `R = ()` or `Option<_>` fits).
    pub async fn send<R: DeserializeOwned>(
        &self,
        pattern: impl Into<Pattern>,
        payload: &(impl Serialize + ?Sized),
    ) -> Result<R, RpcError> {
        let pattern = pattern.into();
        let (request, deadline) = self.prepare(Kind::Request, &pattern, payload)?;
        let response = self.call(request).await?;
        let mut last = response.first;
        if let Some(mut rest) = response.rest {
            let drain = async {
                loop {
                    let packet = rest.recv().await.ok_or_else(connection_lost)?;
                    let (value, done) = read_packet(packet)?;
                    if value.is_some() {
                        last = value;
                    }
                    if done {
                        return Ok::<(), RpcError>(());
                    }
                }
            };
            match deadline {
                Some(deadline) => crate::timeout::until(deadline.instant(), drain)
                    .await
                    .ok_or_else(|| {
                        RpcError::deadline_exceeded(
                            "deadline exceeded while the reply was streaming",
                        )
                    })??,
                None => drain.await?,
            }
        }
        decode_reply(&pattern, last.as_ref())
    }

    /// Sends a request whose handler answers with a stream of values.
    ///
    /// ```
    /// use futures_util::{stream, StreamExt};
    /// use palisade::rpc::transport::memory::MemoryTransport;
    /// use palisade::rpc::{Client, Payload, Router, RpcError, Server, Streaming};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), RpcError> {
    /// let transport = MemoryTransport::new();
    /// let _server = Server::new(Router::new().message(
    ///     "count",
    ///     |Payload(n): Payload<u32>| async move { Streaming(stream::iter((1..=n).map(Ok::<_, RpcError>))) },
    /// ))
    /// .serve(&transport)
    /// .await?;
    /// let client = Client::builder().connect(transport).await?;
    /// let counts: Vec<u32> = client.send_stream::<u32>("count", &3).await?.map(Result::unwrap).collect().await;
    /// assert_eq!(counts, [1, 2, 3]);
    /// # Ok(()) }
    /// ```
    pub async fn send_stream<R: DeserializeOwned + Send + 'static>(
        &self,
        pattern: impl Into<Pattern>,
        payload: &(impl Serialize + ?Sized),
    ) -> Result<RpcStream<R>, RpcError> {
        let pattern = pattern.into();
        let (request, deadline) = self.prepare(Kind::Request, &pattern, payload)?;
        let response = self.call(request).await?;
        Ok(RpcStream::new(pattern, response, deadline))
    }

    /// Publishes an event; resolves once the transport took it (events are not acknowledged).
    pub async fn emit(
        &self,
        pattern: impl Into<Pattern>,
        payload: &(impl Serialize + ?Sized),
    ) -> Result<(), RpcError> {
        let (request, _) = self.prepare(Kind::Event, &pattern.into(), payload)?;
        self.call(request).await.map(drop)
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("timeout", &self.timeout)
            .field("circuit_breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

fn encode_payload(
    pattern: &Pattern,
    payload: &(impl Serialize + ?Sized),
) -> Result<RawJson, RpcError> {
    RawJson::to_json(payload).map_err(|error| {
        RpcError::invalid_argument(format!(
            "payload for '{pattern}' does not serialise: {error}"
        ))
    })
}

fn decode_reply<R: DeserializeOwned>(
    pattern: &Pattern,
    value: Option<&RawJson>,
) -> Result<R, RpcError> {
    let null = RawJson::null();
    value.unwrap_or(&null).decode().map_err(|error| {
        let what = if value.is_none() {
            "the handler answered with no value".to_owned()
        } else {
            format!(
                "the reply does not decode as {}: {error}",
                std::any::type_name::<R>()
            )
        };
        RpcError::new(Code::Internal, format!("reply to '{pattern}': {what}"))
    })
}

/// A W3C `traceparent` for a new trace.
fn traceparent() -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(SharedRng::entropy);
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let mut text = String::with_capacity(55);
    text.push_str("00-");
    for word in [mix(seed ^ n), mix(seed.rotate_left(17) ^ n)] {
        push_hex(&mut text, word);
    }
    text.push('-');
    push_hex(&mut text, mix(seed.rotate_left(41) ^ n) | 1);
    text.push_str("-01");
    text
}

fn push_hex(text: &mut String, word: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        text.push(DIGITS[(word >> (shift * 4) & 0xF) as usize] as char);
    }
}

/// The values of a streamed reply; see [`Client::send_stream`]. Ends after the last value, or
/// after the first error.
pub struct RpcStream<R> {
    inner: BoxStream<'static, Result<R, RpcError>>,
    _marker: PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned + Send + 'static> RpcStream<R> {
    fn new(pattern: Pattern, response: RpcResponse, deadline: Option<Deadline>) -> Self {
        struct State {
            pattern: Pattern,
            first: Option<RawJson>,
            rest: Option<ReplyReceiver>,
            deadline: Option<Deadline>,
        }
        let state = State {
            pattern,
            first: response.first,
            rest: response.rest,
            deadline,
        };
        fn decode<R: DeserializeOwned>(pattern: &Pattern, value: RawJson) -> Result<R, RpcError> {
            value.decode().map_err(|error| {
                RpcError::new(
                    Code::Internal,
                    format!("a value streamed by '{pattern}' does not decode: {error}"),
                )
            })
        }
        let inner = futures_util::stream::unfold(state, |mut state| async move {
            if let Some(value) = state.first.take() {
                let item = decode(&state.pattern, value);
                return Some((item, state));
            }
            let rest = state.rest.as_mut()?;
            let received = match state.deadline {
                Some(deadline) => crate::timeout::until(deadline.instant(), rest.recv())
                    .await
                    .ok_or_else(|| {
                        RpcError::deadline_exceeded(
                            "deadline exceeded while the reply was streaming",
                        )
                    }),
                None => Ok(rest.recv().await),
            };
            match received
                .and_then(|packet| packet.ok_or_else(connection_lost).and_then(read_packet))
            {
                Ok((value, last)) => {
                    if last {
                        state.rest = None;
                    }
                    let value = value?;
                    let item = decode(&state.pattern, value);
                    Some((item, state))
                }
                Err(error) => {
                    state.rest = None;
                    Some((Err(error), state))
                }
            }
        });
        RpcStream {
            inner: Box::pin(inner),
            _marker: PhantomData,
        }
    }
}

impl<R> Stream for RpcStream<R> {
    type Item = Result<R, RpcError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl<R> fmt::Debug for RpcStream<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcStream").finish_non_exhaustive()
    }
}

/// Configures a [`Client`]: the resilience layers between the API and the transport, in the
/// preset order — deadline (`timeout`) → retry → circuit breaker → attempt timeout → transport.
///
/// ```
/// use palisade::circuit_breaker::CircuitBreakerConfig;
/// use palisade::retry::RetryPolicy;
/// use palisade::rpc::Client;
/// use palisade::rpc::transport::memory::MemoryTransport;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let users = Client::builder()
///     .timeout(Duration::from_secs(2))             // the caller's total budget per request
///     .retry(RetryPolicy::new(3))                  // transient errors only; never past the deadline
///     .circuit_breaker(CircuitBreakerConfig::new("users").max_failures(5))
///     .attempt_timeout(Duration::from_millis(500)) // one attempt, bounded by the time left
///     .connect(MemoryTransport::new())
///     .await?;
/// # let _ = users; Ok(()) }
/// ```
///
/// The breaker counts only server-side and transport faults ([`FaultsOnly`]): a `NotFound` or
/// `InvalidArgument` answer means the service is up.
///
/// # Defaults
///
/// | setting | default | change with |
/// |---|---|---|
/// | total timeout per request (retries included) | [`DEFAULT_TIMEOUT`] (5 s, as NestJS's TCP client) | [`timeout`](Self::timeout), [`no_timeout`](Self::no_timeout) |
/// | attempt timeout | none (the total timeout bounds each attempt) | [`attempt_timeout`](Self::attempt_timeout) |
/// | retry | none | [`retry`](Self::retry) |
/// | circuit breaker | none | [`circuit_breaker`](Self::circuit_breaker), [`circuit_breaker_layer`](Self::circuit_breaker_layer) |
/// | headers sent with every message | none (the deadline travels as [`TIMEOUT_HEADER`](super::TIMEOUT_HEADER)) | [`header`](Self::header) |
///
/// A request nobody answers (a hung handler, a server that swallows packets) fails with
/// `DeadlineExceeded` after the timeout instead of waiting forever; a request that must wait
/// longer sets its own:
///
/// ```
/// use palisade::rpc::{Client, DEFAULT_TIMEOUT};
/// use palisade::rpc::transport::memory::MemoryTransport;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let default = Client::builder().connect(MemoryTransport::new()).await?;
/// assert_eq!(default.timeout(), Some(DEFAULT_TIMEOUT));
/// let patient = Client::builder().timeout(Duration::from_secs(60)).connect(MemoryTransport::new()).await?;
/// assert_eq!(patient.timeout(), Some(Duration::from_secs(60)));
/// let forever = Client::builder().no_timeout().connect(MemoryTransport::new()).await?;
/// assert_eq!(forever.timeout(), None);
/// # Ok(()) }
/// ```
pub struct ClientBuilder<P = TransientErrors> {
    timeout: Option<Duration>,
    attempt_timeout: Option<Duration>,
    retry: Option<RetryPolicy<P, RequestDeadline>>,
    breaker: Option<CircuitBreakerLayer<FaultsOnly>>,
    headers: Headers,
}

/// The total timeout of a client's requests unless [`ClientBuilder::timeout`] says otherwise: 5 s,
/// as NestJS's TCP client.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            timeout: Some(DEFAULT_TIMEOUT),
            attempt_timeout: None,
            retry: None,
            breaker: None,
            headers: Headers::new(),
        }
    }
}

impl<P> ClientBuilder<P> {
    /// Each request must be answered within `timeout`, retries included (default
    /// [`DEFAULT_TIMEOUT`], 5 s); the deadline travels to the server, which stops handlers nobody
    /// waits for any more. `None` waits forever, as [`no_timeout`](Self::no_timeout).
    ///
    /// A request that runs out of time fails with [`Code::DeadlineExceeded`]. For an event the
    /// timeout bounds [`emit`](Client::emit) (handing the event to the transport or broker) and
    /// is not sent: nobody waits for an event's handlers.
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.timeout = timeout.into();
        self
    }

    /// Requests wait for their reply as long as it takes: no deadline is set or sent. Only for
    /// callers that bound the wait some other way; a hung handler then blocks `send` forever.
    pub fn no_timeout(self) -> Self {
        self.timeout(None)
    }

    /// Each attempt may take at most `timeout` (and never more than the time left).
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Retries with `policy` (made to honour the deadline).
    pub fn retry<P2, D>(self, policy: RetryPolicy<P2, D>) -> ClientBuilder<P2> {
        ClientBuilder {
            timeout: self.timeout,
            attempt_timeout: self.attempt_timeout,
            retry: Some(policy.honor_deadline()),
            breaker: self.breaker,
            headers: self.headers,
        }
    }

    /// Guards the transport with a circuit breaker configured by `config`.
    pub fn circuit_breaker(mut self, config: CircuitBreakerConfig) -> Self {
        self.breaker = Some(CircuitBreakerLayer::new(config).with_classifier(FaultsOnly));
        self
    }

    /// Guards the transport with an existing breaker (to share one between clients).
    pub fn circuit_breaker_layer<C>(mut self, layer: CircuitBreakerLayer<C>) -> Self {
        self.breaker = Some(layer.with_classifier(FaultsOnly));
        self
    }

    /// Sends `key: value` with every message.
    pub fn header(
        mut self,
        key: impl Into<std::borrow::Cow<'static, str>>,
        value: impl Into<String>,
    ) -> Self {
        self.headers.insert(key, value);
        self
    }
}

impl<P> ClientBuilder<P>
where
    P: Predicate<RpcResponse, RpcError> + Clone + Send + Sync + 'static,
{
    /// Connects through `transport` (for memory and TCP this opens nothing yet; NATS connects here
    /// and fails with a clear error if it cannot).
    pub async fn connect(self, transport: impl Connect) -> Result<Client, RpcError> {
        Ok(self.build(transport.connect().await?))
    }

    /// A client over an already connected transport.
    pub fn build(self, transport: impl ClientTransport) -> Client {
        let breaker = self.breaker.as_ref().map(CircuitBreakerLayer::handle);
        let transport: Arc<dyn ClientTransport> = Arc::new(transport);
        // The total timeout alone needs no layer: `Client::call` enforces a request's deadline on
        // the direct path.
        let layered =
            self.retry.is_some() || self.breaker.is_some() || self.attempt_timeout.is_some();
        if !layered {
            return Client {
                stack: Stack::Direct(transport),
                timeout: self.timeout,
                headers: self.headers,
                breaker,
            };
        }
        let stack = ServiceBuilder::new()
            .option_layer(self.timeout.map(DeadlineLayer::new))
            .option_layer(self.retry.map(RetryPolicy::layer))
            .option_layer(self.breaker)
            .option_layer(
                self.attempt_timeout
                    .map(|timeout| TimeoutLayer::new(timeout).honor_deadline()),
            )
            .service(TransportService {
                transport,
                enforce_deadline: self.attempt_timeout.is_none(),
            });
        Client {
            stack: Stack::Layered(BoxCloneSyncService::new(stack)),
            timeout: self.timeout,
            headers: self.headers,
            breaker,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::transport::{ReplySender, reply_channel};
    use std::sync::Mutex;

    /// A transport that answers nothing: it takes each request and keeps its sender (or, with
    /// `hang`, never takes it, nor an event), and may explain silence.
    struct Silent {
        hang: bool,
        explain: Option<ExplainSilence>,
        senders: Arc<Mutex<Vec<ReplySender>>>,
    }

    impl ClientTransport for Silent {
        fn request(&self, _: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>> {
            if self.hang {
                return Box::pin(std::future::pending());
            }
            let (sender, receiver) = reply_channel(None);
            self.senders.lock().unwrap().push(sender);
            Box::pin(async move { Ok(receiver) })
        }

        fn emit(&self, _: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>> {
            if self.hang {
                return Box::pin(std::future::pending());
            }
            Box::pin(async { Ok(()) })
        }

        fn explain_silence(&self) -> Option<ExplainSilence> {
            self.explain
        }
    }

    fn nobody_listens(route: &str) -> RpcError {
        RpcError::deadline_exceeded(format!("nobody listens to {route}"))
    }

    fn silent(hang: bool, explain: Option<ExplainSilence>) -> Silent {
        Silent {
            hang,
            explain,
            senders: Arc::default(),
        }
    }

    /// Sends to `route` through a direct client and a layered one; the error and when it came.
    async fn outcomes(transport: impl Fn() -> Silent) -> Vec<(String, Duration)> {
        let timeout = Duration::from_millis(500);
        let direct = Client::builder().timeout(timeout).build(transport());
        let layered = Client::builder()
            .timeout(timeout)
            .retry(RetryPolicy::new(2))
            .build(transport());
        let mut seen = Vec::new();
        for client in [direct, layered] {
            let started = Instant::now();
            let error = client.send::<()>("orders", &1).await.unwrap_err();
            assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
            seen.push((error.message().to_owned(), started.elapsed()));
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_sent_into_silence_is_explained_just_before_its_deadline() {
        let seen = outcomes(|| silent(false, Some(nobody_listens))).await;
        let (message, took) = &seen[0];
        assert_eq!(message, "nobody listens to orders");
        assert_eq!(*took, Duration::from_millis(500) - SILENCE_MARGIN);
        // Through retry, which may try once more in the time left (and meet silence again at
        // once), the explanation is inside its word that no time was left for another attempt.
        let (message, took) = &seen[1];
        assert!(message.contains("nobody listens to orders"), "{message}");
        assert!(
            *took >= Duration::from_millis(500) - SILENCE_MARGIN
                && *took <= Duration::from_millis(500),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_never_went_out_is_not_called_silence() {
        for (message, took) in outcomes(|| silent(true, Some(nobody_listens))).await {
            assert!(!message.contains("nobody listens"), "{message}");
            assert!(
                took <= Duration::from_millis(500) && took >= Duration::from_millis(490),
                "{took:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_keeps_the_whole_deadline_to_be_handed_over() {
        let timeout = Duration::from_millis(500);
        let transport = || silent(true, Some(nobody_listens));
        let direct = Client::builder().timeout(timeout).build(transport());
        let layered = Client::builder()
            .timeout(timeout)
            .retry(RetryPolicy::new(2))
            .build(transport());
        for client in [direct, layered] {
            let started = Instant::now();
            let hung = tokio::time::timeout(Duration::from_secs(1), client.emit("orders", &1));
            let error = hung.await.unwrap().unwrap_err();
            assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
            assert!(!error.message().contains("nobody listens"), "{error}");
            assert_eq!(started.elapsed(), timeout);
        }
    }

    /// A client without retry (whose layers would send again) through each stack: direct, and
    /// layered by an attempt timeout.
    fn direct_and_layered(transport: impl Fn() -> Silent) -> [Client; 2] {
        let timeout = Duration::from_millis(500);
        [
            Client::builder().timeout(timeout).build(transport()),
            Client::builder()
                .timeout(timeout)
                .attempt_timeout(timeout)
                .build(transport()),
        ]
    }

    /// Sends `1` to `orders` through `client` over `transport`'s `senders`, and once the transport
    /// took it, does `then` to its reply sender; the outcome and when it came.
    async fn with_the_sender(
        client: Client,
        senders: &Arc<Mutex<Vec<ReplySender>>>,
        then: impl FnOnce(ReplySender),
    ) -> (Result<u32, RpcError>, Duration) {
        let started = Instant::now();
        let call = tokio::spawn(async move { client.send::<u32>("orders", &1).await });
        let sender = loop {
            if let Some(sender) = senders.lock().unwrap().pop() {
                break sender;
            }
            tokio::task::yield_now().await;
        };
        then(sender);
        let outcome = call.await.unwrap();
        (outcome, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_over_a_transport_that_explains_silence_is_the_answer() {
        let senders = Arc::default();
        let transport = || Silent {
            hang: false,
            explain: Some(nobody_listens),
            senders: Arc::clone(&senders),
        };
        for client in direct_and_layered(transport) {
            let (outcome, took) = with_the_sender(client, &senders, |mut sender| {
                let response = RawJson::to_json(&7).unwrap();
                assert!(sender.try_send(ReplyPacket::Value {
                    response,
                    last: true
                }));
            })
            .await;
            assert_eq!(outcome.unwrap(), 7);
            assert_eq!(took, Duration::ZERO);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_channel_closed_without_a_packet_is_a_lost_connection() {
        let senders = Arc::default();
        let transport = || Silent {
            hang: false,
            explain: None,
            senders: Arc::clone(&senders),
        };
        for client in direct_and_layered(transport) {
            let (outcome, took) = with_the_sender(client, &senders, drop).await;
            let error = outcome.unwrap_err();
            assert_eq!(error.code(), Code::Unavailable, "{error}");
            assert_eq!(
                error.message(),
                "connection closed before the reply was complete"
            );
            assert_eq!(took, Duration::ZERO);
        }
    }

    /// Answers each request at once, noting the span current when it was asked.
    struct SpanNoting(Arc<Mutex<Vec<Option<&'static str>>>>);

    impl ClientTransport for SpanNoting {
        fn request(&self, _: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>> {
            let current = tracing::Span::current().metadata().map(|meta| meta.name());
            self.0.lock().unwrap().push(current);
            let (mut sender, receiver) = reply_channel(None);
            let response = RawJson::to_json(&7).unwrap();
            sender.try_send(ReplyPacket::Value {
                response,
                last: true,
            });
            Box::pin(async move { Ok(receiver) })
        }

        fn emit(&self, _: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn the_transport_is_asked_inside_the_clients_span_on_both_stacks() {
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
        let noted = Arc::new(Mutex::new(Vec::new()));
        let transport = || SpanNoting(Arc::clone(&noted));
        let direct = Client::builder().build(transport());
        let layered = Client::builder()
            .attempt_timeout(Duration::from_secs(1))
            .build(transport());
        // `tracing` caches whether anyone wants a span: a test on another thread may register
        // the client's span while no subscriber is set, just as this one is set, and cache a
        // "never". Registered here, the cache is computed again with this subscriber.
        for client in [&direct, &layered] {
            client.send::<u32>("orders", &1).await.unwrap();
        }
        tracing::callsite::rebuild_interest_cache();
        noted.lock().unwrap().clear();
        for client in [direct, layered] {
            assert_eq!(client.send::<u32>("orders", &1).await.unwrap(), 7);
        }
        assert_eq!(*noted.lock().unwrap(), [Some("rpc.client"); 2]);
    }

    /// Without an attempt timeout, the deadline is what ends a call to a service that hangs: the
    /// breaker must see it as a failure, not as a call cancelled from above.
    #[tokio::test(start_paused = true)]
    async fn a_breaker_without_an_attempt_timeout_opens_on_requests_that_meet_their_deadline() {
        use crate::circuit_breaker::{CircuitBreakerConfig, CircuitState};
        for hang in [false, true] {
            let client = Client::builder()
                .timeout(Duration::from_millis(100))
                .circuit_breaker(CircuitBreakerConfig::new("hung").max_failures(2))
                .build(silent(hang, None));
            for _ in 0..2 {
                let error = client.send::<u32>("orders", &1).await.unwrap_err();
                assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
            }
            let breaker = client.circuit_breaker().unwrap();
            assert_eq!(breaker.state(), CircuitState::Open, "hang: {hang}");
            let started = Instant::now();
            let error = client.send::<u32>("orders", &1).await.unwrap_err();
            assert_eq!(started.elapsed(), Duration::ZERO, "{error}");
            assert_eq!(error.code(), Code::Unavailable, "{error}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_explanation_the_deadline_is_the_callers_own() {
        for (message, took) in outcomes(|| silent(false, None)).await {
            assert!(!message.contains("nobody listens"), "{message}");
            assert_eq!(took, Duration::from_millis(500));
        }
    }
}
