use super::error::NO_HANDLER_MESSAGE;
use super::handler::Reply;
use super::request::TRACEPARENT_HEADER;
use super::transport::{ReplyPacket, error_json};
use super::{Code, Kind, RawJson, Router, RpcError, RpcRequest};
use crate::counter::StripedCounter;
use crate::timeout::HasDeadline;
use futures_util::future::{BoxFuture, Either};
use futures_util::{FutureExt, StreamExt};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_service::Service;
use tracing::Instrument;

/// A message server: a router (or any service) plus how to run it. Hand it to a transport to
/// serve, e.g. [`MemoryTransport::serve`](super::transport::memory::MemoryTransport::serve).
///
/// ```
/// use palisade::rpc::{Router, Server};
/// use std::time::Duration;
///
/// let server = Server::new(Router::new().message("ping", || async { "pong" }))
///     .grace_period(Duration::from_secs(5)) // drain in-flight requests for up to 5 s on shutdown
///     .max_in_flight(256);                    // stop reading new requests beyond 256 at once
/// # let _ = server;
/// ```
pub struct Server {
    service: Target,
    grace_period: Duration,
    max_in_flight: Option<usize>,
}

impl Server {
    /// A server for `service` — usually a [`Router`](super::Router), possibly wrapped in layers.
    pub fn new<S>(service: S) -> Self
    where
        S: Service<RpcRequest, Response = Reply, Error = RpcError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        // A bare router is called directly; any other service through `ready` + `call`.
        let mut slot = Some(service);
        let service = match (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Router>>() {
            Some(router) => Target::Router(router.take().expect("the slot holds the service")),
            None => Target::Service(BoxCloneSyncService::new(
                slot.take().expect("the slot holds the service"),
            )),
        };
        Server {
            service,
            grace_period: Duration::from_secs(10),
            max_in_flight: None,
        }
    }

    /// How long shutdown waits for in-flight requests (default 10 s, as NestJS's `gracePeriod`).
    /// Handlers still running after that are cancelled and their callers get `Unavailable`.
    pub fn grace_period(mut self, grace_period: Duration) -> Self {
        self.grace_period = grace_period;
        self
    }

    /// At most this many messages are handled at once; transports stop reading new ones until a
    /// slot frees (backpressure on the connection, not an error).
    pub fn max_in_flight(mut self, limit: usize) -> Self {
        self.max_in_flight = Some(limit.max(1));
        self
    }

    /// The routes of the message and event handlers, when the server runs a [`Router`] directly
    /// (a broker transport subscribes to them).
    #[cfg_attr(not(feature = "nats"), allow(dead_code))] // used by the NATS transport
    pub(crate) fn routes(&self) -> Option<(Vec<String>, Vec<String>)> {
        match &self.service {
            Target::Router(router) => Some(router.routes()),
            Target::Service(_) => None,
        }
    }

    pub(crate) fn into_dispatcher(self, transport: &'static str) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            service: self.service,
            tracker: TaskTracker::new(),
            draining: CancellationToken::new(),
            draining_flag: AtomicBool::new(false),
            abort: CancellationToken::new(),
            permits: self.max_in_flight.map(|n| Arc::new(Semaphore::new(n))),
            in_flight: InFlightCount::new(),
            grace_period: self.grace_period,
            transport,
        })
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("grace_period", &self.grace_period)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

/// What a server runs messages through.
enum Target {
    Router(Router),
    Service(BoxCloneSyncService<RpcRequest, Reply, RpcError>),
}

impl Target {
    fn call(&self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
        match self {
            Target::Router(router) => router.dispatch(request),
            Target::Service(service) => Box::pin(service.clone().oneshot(request)),
        }
    }
}

/// Where a transport sends one request's reply packets.
pub(crate) trait ReplySink: Send + 'static {
    /// Sends a packet; `false` if the caller is gone (the rest is not worth producing).
    fn send(&mut self, packet: ReplyPacket) -> impl Future<Output = bool> + Send;
}

/// Runs messages through the server's service on behalf of a transport.
pub(crate) struct Dispatcher {
    service: Target,
    tracker: TaskTracker,
    /// Cancelled when shutdown starts: no new messages are taken.
    draining: CancellationToken,
    /// The same, as a flag read per message (a token's `is_cancelled` takes a lock).
    draining_flag: AtomicBool,
    /// Cancelled when the grace period is over: running handlers are cancelled.
    abort: CancellationToken,
    permits: Option<Arc<Semaphore>>,
    in_flight: InFlightCount,
    grace_period: Duration,
    transport: &'static str,
}

/// Requests being handled, as requests started minus requests finished. Both are striped
/// per-thread counters: one shared counter, bumped twice per request by every thread, bounced its
/// cache line between cores and cost more than the rest of an in-process round trip.
#[derive(Debug)]
struct InFlightCount {
    started: StripedCounter,
    finished: StripedCounter,
}

impl InFlightCount {
    fn new() -> Self {
        InFlightCount {
            started: StripedCounter::new(),
            finished: StripedCounter::new(),
        }
    }

    /// Counts a request as started; it counts as finished when the guard drops, however the
    /// handling ends.
    fn enter(&self) -> InFlight<'_> {
        self.started.increment();
        InFlight(self)
    }

    fn get(&self) -> usize {
        // Finished first: both only grow, so the difference read this way is never negative.
        let finished = self.finished.sum();
        usize::try_from(self.started.sum().saturating_sub(finished)).unwrap_or(usize::MAX)
    }
}

/// Counts its request as finished however the handling ends.
struct InFlight<'a>(&'a InFlightCount);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.finished.increment();
    }
}

impl Dispatcher {
    /// Whether shutdown has started.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining_flag.load(Ordering::Acquire)
    }

    /// Resolves when shutdown starts.
    #[cfg_attr(not(any(feature = "tcp", feature = "nats")), allow(dead_code))] // wire transports
    pub(crate) async fn draining(&self) {
        self.draining.cancelled().await
    }

    /// Spawns a transport task (accept loop, connection) that shutdown waits for.
    #[cfg_attr(not(any(feature = "tcp", feature = "nats")), allow(dead_code))] // wire transports
    pub(crate) fn spawn_tracked<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Waits for capacity, then handles `request`, sending replies to `sink` (`None` for events):
    /// at once if the handler answers on its first poll, else in a task of its own. `id` is the
    /// wire id, for logs.
    pub(crate) async fn dispatch<K: ReplySink>(
        self: &Arc<Self>,
        request: RpcRequest,
        id: Option<&RawJson>,
        sink: Option<K>,
    ) {
        if self.is_draining() {
            match sink {
                Some(mut sink) => {
                    let error = RpcError::unavailable("the server is shutting down");
                    sink.send(ReplyPacket::Error(error_json(&error))).await;
                }
                None => {
                    tracing::warn!(pattern = %request.pattern(), "event dropped: the server is shutting down")
                }
            }
            return;
        }
        let permit = match &self.permits {
            Some(permits) => Arc::clone(permits).acquire_owned().await.ok(),
            None => None,
        };
        let span = tracing::info_span!(
            "rpc.server",
            transport = self.transport,
            pattern = %request.pattern(),
            kind = ?request.kind(),
            id = id.map(|id| tracing::field::display(id.as_str())),
            trace = request.headers().get(TRACEPARENT_HEADER).map(tracing::field::display),
            outcome = tracing::field::Empty,
            latency_us = tracing::field::Empty,
        );
        let mut handling = Box::pin(
            Arc::clone(self)
                .handle(request, sink, permit)
                .instrument(span),
        );
        // Most handlers answer on their first poll: poll once here and spawn a task only for
        // those that have to wait. Nothing changes for the caller — the first poll happens inside
        // this call, which the caller cannot cancel halfway — and a waiting handler still runs in
        // a task of its own, to completion, whatever the caller does next.
        let finished =
            std::future::poll_fn(|cx| Poll::Ready(handling.as_mut().poll(cx).is_ready())).await;
        if !finished {
            self.tracker.spawn(handling);
        }
    }

    /// Runs the handler and sends its reply.
    async fn respond<K: ReplySink>(
        &self,
        request: RpcRequest,
        sink: Option<&mut Tracked<K>>,
    ) -> Result<(), RpcError> {
        // A panicking handler must not leave its caller waiting: it becomes NestJS's
        // "Internal server error", and the panic is logged.
        let reply = AssertUnwindSafe(self.service.call(request))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic payload".to_owned());
                tracing::error!(panic = %message, "handler panicked; replying \"Internal server error\"");
                Err(RpcError::internal())
            });
        match (reply, sink) {
            (Ok(_), None) => Ok(()),
            (Err(error), None) => Err(error),
            (reply, Some(sink)) => send_replies(reply, sink).await,
        }
    }

    /// Handles one message: runs the handler within the deadline and sends every reply.
    async fn handle<K: ReplySink>(
        self: Arc<Self>,
        request: RpcRequest,
        sink: Option<K>,
        _permit: Option<OwnedSemaphorePermit>,
    ) {
        let _in_flight = self.in_flight.enter();
        let span = tracing::Span::current();
        // Clock reads only for a span someone listens to.
        let started = (!span.is_disabled()).then(Instant::now);
        let deadline = request.deadline();
        let kind = request.kind();
        let mut sink = sink.map(|inner| Tracked {
            inner,
            answered: false,
        });
        let outcome = {
            let work = self.respond(request, sink.as_mut());
            // One future either way, not an async block holding `work` twice; boxed when bounded,
            // because the timer is large and a request without a deadline should not carry room
            // for it.
            let bounded = match deadline {
                Some(deadline) => Either::Left(
                    Box::pin(tokio::time::timeout_at(deadline.instant(), work)).map(|timed| {
                        timed.unwrap_or_else(|_| {
                            Err(RpcError::deadline_exceeded(
                                "the caller's deadline passed; the handler was stopped",
                            ))
                        })
                    }),
                ),
                None => Either::Right(work),
            };
            // Created on its first poll: a handler that answers at once never touches the token.
            let aborted = async {
                self.abort.cancelled().await;
                Err(RpcError::unavailable(
                    "the server shut down before the handler finished",
                ))
            };
            tokio::select! {
                biased;
                outcome = bounded => outcome,
                aborted = aborted => aborted,
            }
        };
        // Stopped by the deadline or by shutdown before answering: every request gets an answer.
        if let (Err(error), Some(sink)) = (&outcome, sink.as_mut())
            && !sink.answered
        {
            sink.send(ReplyPacket::Error(error_json(error))).await;
        }
        if let Some(started) = started {
            span.record("latency_us", started.elapsed().as_micros() as u64);
            match &outcome {
                Ok(()) => span.record("outcome", tracing::field::display("ok")),
                Err(error) => span.record("outcome", tracing::field::display(error.code())),
            };
        }
        match &outcome {
            Ok(()) => tracing::debug!("handled"),
            Err(error) => {
                if kind == Kind::Event || error.code() == Code::Internal {
                    tracing::warn!(%error, "handler failed");
                } else {
                    tracing::debug!(%error, "replied with an error");
                }
            }
        }
    }

    /// Handles an event to completion in the caller's task and reports the outcome (durable events
    /// are acknowledged only when every handler succeeded). Counts as in flight for shutdown.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))] // used by the NATS transport
    pub(crate) async fn handle_now(&self, request: RpcRequest) -> Result<(), RpcError> {
        if self.is_draining() {
            return Err(RpcError::unavailable("the server is shutting down"));
        }
        let _token = self.tracker.token();
        let _in_flight = self.in_flight.enter();
        let handling =
            AssertUnwindSafe(self.service.call(request.reporting_failures())).catch_unwind();
        tokio::select! {
            biased;
            _ = self.abort.cancelled() => Err(RpcError::unavailable("the server shut down before the handler finished")),
            outcome = handling => match outcome {
                Ok(result) => result.map(drop),
                Err(_) => {
                    tracing::error!("event handler panicked");
                    Err(RpcError::internal())
                }
            },
        }
    }

    /// Starts shutdown: stop taking messages, drain for the grace period, then cancel.
    pub(crate) async fn shutdown(&self, transport_tasks: Vec<JoinHandle<()>>) -> ShutdownReport {
        self.draining_flag.store(true, Ordering::Release);
        self.draining.cancel();
        self.tracker.close();
        let started = Instant::now();
        let drained = tokio::time::timeout(self.grace_period, self.tracker.wait())
            .await
            .is_ok();
        let mut cancelled = 0;
        if !drained {
            cancelled = self.in_flight.get();
            tracing::warn!(cancelled, grace_period = ?self.grace_period, "grace period over; cancelling handlers still running");
            self.abort.cancel();
            self.tracker.wait().await;
        }
        for task in transport_tasks {
            let _ = task.await;
        }
        ShutdownReport {
            drained,
            cancelled,
            took: started.elapsed(),
        }
    }
}

/// A sink that remembers whether the final packet went out.
struct Tracked<K> {
    inner: K,
    answered: bool,
}

impl<K: ReplySink> ReplySink for Tracked<K> {
    async fn send(&mut self, packet: ReplyPacket) -> bool {
        self.answered |= packet.is_last();
        self.inner.send(packet).await
    }
}

/// Sends a handler's reply (or error) as NestJS packets.
async fn send_replies<K: ReplySink>(
    reply: Result<Reply, RpcError>,
    sink: &mut K,
) -> Result<(), RpcError> {
    match reply {
        Ok(Reply::Value(response)) => {
            sink.send(ReplyPacket::Value {
                response,
                last: true,
            })
            .await;
            Ok(())
        }
        Ok(Reply::Empty) => {
            sink.send(ReplyPacket::Complete).await;
            Ok(())
        }
        Ok(Reply::Stream(mut stream)) => {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(response) => {
                        if !sink
                            .send(ReplyPacket::Value {
                                response,
                                last: false,
                            })
                            .await
                        {
                            // The caller is gone; stop producing.
                            return Err(RpcError::new(
                                Code::Cancelled,
                                "the caller went away mid-stream",
                            ));
                        }
                    }
                    Err(error) => {
                        sink.send(ReplyPacket::Error(error_json(&error))).await;
                        return Err(error);
                    }
                }
            }
            sink.send(ReplyPacket::Complete).await;
            Ok(())
        }
        Err(error) => {
            let packet =
                if error.code() == Code::Unimplemented && error.message() == NO_HANDLER_MESSAGE {
                    ReplyPacket::NoHandler
                } else {
                    ReplyPacket::Error(error_json(&error))
                };
            sink.send(packet).await;
            Err(error)
        }
    }
}

/// What happened at shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether every in-flight message finished within the grace period.
    pub drained: bool,
    /// How many handlers were cancelled when the grace period ran out.
    pub cancelled: usize,
    /// How long shutdown took.
    pub took: Duration,
}

/// A running server. Dropping it leaves the server running; call [`shutdown`](Self::shutdown) to
/// stop it gracefully.
pub struct ServerHandle {
    dispatcher: Arc<Dispatcher>,
    tasks: Vec<JoinHandle<()>>,
    local_addr: Option<std::net::SocketAddr>,
    /// Runs after everything drained (a broker transport flushes the last replies).
    finish: Option<BoxFuture<'static, ()>>,
}

impl ServerHandle {
    pub(crate) fn new(
        dispatcher: Arc<Dispatcher>,
        tasks: Vec<JoinHandle<()>>,
        local_addr: Option<std::net::SocketAddr>,
    ) -> Self {
        ServerHandle {
            dispatcher,
            tasks,
            local_addr,
            finish: None,
        }
    }

    /// Runs `finish` at the end of shutdown, after the last handler is done.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))] // used by the NATS transport
    pub(crate) fn finishing_with(mut self, finish: BoxFuture<'static, ()>) -> Self {
        self.finish = Some(finish);
        self
    }

    /// The address the server listens on (network transports).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.local_addr
    }

    /// Messages being handled right now.
    pub fn in_flight(&self) -> usize {
        self.dispatcher.in_flight.get()
    }

    /// Stops taking new messages (new requests are answered with `Unavailable`), waits up to the
    /// grace period for in-flight ones, then cancels what is left — their callers get
    /// `Unavailable` — and closes the transport.
    pub async fn shutdown(self) -> ShutdownReport {
        let report = self.dispatcher.shutdown(self.tasks).await;
        if let Some(finish) = self.finish {
            finish.await;
        }
        report
    }
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}
