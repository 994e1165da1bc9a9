//! The transport-facing side of a server: what a transport runs each message through.

use super::{Routes, Server, Target};
use crate::counter::StripedCounter;
use crate::rpc::error::NO_HANDLER_MESSAGE;
use crate::rpc::handler::{Reply, handler_panicked, panic_message};
use crate::rpc::request::TRACEPARENT_HEADER;
use crate::rpc::transport::{ReplyPacket, error_json};
use crate::rpc::{Code, Kind, RpcError, RpcRequest, TransportErrorKind};
use crate::timeout::HasDeadline;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
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
use tracing::Instrument;

/// Why a reply packet did not go out; see [`ReplySink::send`].
#[derive(Debug)]
#[non_exhaustive]
pub enum SendError {
    /// The caller is gone (its connection closed, or it stopped listening): nothing more is worth
    /// producing for it.
    CallerGone,
    /// The packet is larger than the transport can carry. The dispatcher answers the caller with
    /// a small `InvalidArgument` error instead, so the caller learns why rather than waiting for
    /// its timeout.
    TooLarge {
        /// The packet's size, in the transport's unit (bytes, or UTF-16 units on TCP).
        size: usize,
        /// The transport's limit, in the same unit.
        limit: usize,
    },
    /// The transport failed to send it.
    Failed(RpcError),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::CallerGone => f.write_str("the caller is gone"),
            SendError::TooLarge { size, limit } => write!(
                f,
                "the reply ({size}) is larger than the transport's limit ({limit})"
            ),
            SendError::Failed(error) => write!(f, "sending the reply failed: {error}"),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Failed(error) => Some(error),
            _ => None,
        }
    }
}

/// Where a transport sends one request's reply packets: back over the connection it came on, to
/// its reply subject, its reply topic...
///
/// A request's packets are sent in order, one at a time; the last one (see
/// [`ReplyPacket::is_last`]) ends the request.
pub trait ReplySink: Send + 'static {
    /// Sends a packet, or says why it could not.
    fn send(&mut self, packet: ReplyPacket) -> impl Future<Output = Result<(), SendError>> + Send;

    /// Whether a stream that has already ended when its latest value is sent should end on that
    /// value (`last: true`) instead of with a [`ReplyPacket::Complete`] of its own.
    ///
    /// `false` by default: NestJS's TCP and NATS servers send a separate completion packet after
    /// a stream's last value, and their clients make nothing of it. A NestJS Kafka client turns a
    /// separate completion record into one more `null` value, so the Kafka transport says `true`
    /// (as a NestJS Kafka server's reply usually looks).
    fn ends_streams_on_their_last_value(&self) -> bool {
        false
    }

    /// Resolves once the caller can take no more replies (it dropped its stream, its connection
    /// closed), for a handler that waits for its next value: the dispatcher stops a streamed
    /// reply there, rather than learn it at the stream's next value, which may never come. A
    /// transport that cannot tell keeps the default, which never resolves.
    fn caller_gone(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// Runs messages through a server's service on behalf of a transport: the transport-facing half of
/// a [`Server`], made by [`Server::into_dispatcher`]. Clones share it.
///
/// A transport reads messages, turns each into an [`RpcRequest`] and hands it over with
/// [`dispatch`](Self::dispatch), together with a [`ReplySink`] for a request's replies; everything
/// else — capacity ([`Server::max_in_flight`]), deadlines, panics, tracing, graceful shutdown — is
/// done here. Its own tasks (accept loops, subscriptions) it starts with [`spawn`](Self::spawn),
/// and it stops taking messages when [`draining`](Self::draining) resolves.
///
/// See [`ServerTransport`](crate::rpc::transport::ServerTransport) for a whole transport.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    service: Target,
    routes: Option<Routes>,
    tracker: TaskTracker,
    /// Requests waiting for a [`Server::max_in_flight`](super::Server::max_in_flight) slot (no
    /// tasks, only tokens): draining waits for them, the end of shutdown does not.
    waiting: TaskTracker,
    /// Cancelled when shutdown starts: no new messages are taken.
    draining: CancellationToken,
    /// The same, as a flag read per message (a token's `is_cancelled` takes a lock).
    draining_flag: AtomicBool,
    /// Cancelled when the grace period is over: running handlers are cancelled.
    abort: CancellationToken,
    permits: Option<Arc<Semaphore>>,
    in_flight: InFlightCount,
    grace_period: Duration,
    spawn_handlers: bool,
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

impl Target {
    fn call(&self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
        match self {
            Target::Router(router) => router.dispatch(request),
            Target::Service(service) => Box::pin(service.clone().oneshot(request)),
        }
    }
}

/// Whether a message's handler may take its first step in the dispatching task.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FirstPoll {
    Inline,
    Spawned,
}

impl Dispatcher {
    pub(super) fn new(mut server: Server, transport: &'static str) -> Self {
        Dispatcher {
            inner: Arc::new(Inner {
                routes: server.take_routes(),
                service: server.service,
                tracker: TaskTracker::new(),
                waiting: TaskTracker::new(),
                draining: CancellationToken::new(),
                draining_flag: AtomicBool::new(false),
                abort: CancellationToken::new(),
                permits: server.max_in_flight.map(|n| Arc::new(Semaphore::new(n))),
                in_flight: InFlightCount::new(),
                grace_period: server.grace_period,
                spawn_handlers: server.spawn_handlers,
                transport,
            }),
        }
    }

    /// The transport's name, as given to [`Server::into_dispatcher`].
    pub fn transport(&self) -> &'static str {
        self.inner.transport
    }

    /// The patterns the server answers, when known: what a transport that subscribes per pattern
    /// subscribes to. `None` for a service that is not a router and declared none (see
    /// [`Server::with_routes`]); such a transport should refuse to serve it with a clear error.
    pub fn routes(&self) -> Option<&Routes> {
        self.inner.routes.as_ref()
    }

    /// Whether shutdown has started (a plain load: cheap enough to check per message).
    pub fn is_draining(&self) -> bool {
        self.inner.draining_flag.load(Ordering::Acquire)
    }

    /// Resolves when shutdown starts: stop taking messages (stop accepting, unsubscribe).
    ///
    /// Polling it takes a lock, so a loop that takes messages should poll it only when no message
    /// is waiting, and check [`is_draining`](Self::is_draining) per message.
    pub fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        let token = self.inner.draining.clone();
        async move { token.cancelled().await }
    }

    /// Spawns a transport task (an accept loop, a connection, a subscription) that shutdown waits
    /// for: the task must end once [`draining`](Self::draining) resolved and its messages were
    /// answered.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.tracker.spawn(task)
    }

    /// Messages being handled right now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.get()
    }

    /// Handles a message: a request with the `sink` its replies go to, or an event (`sink` is
    /// `None`; an event's handlers run and nothing is sent back).
    ///
    /// Waits for capacity ([`Server::max_in_flight`]). The handler takes its first step — up to
    /// its first `.await` — here, in the calling task, and continues in a task of its own if it has
    /// to wait: most handlers answer in that first step, and a task per message is saved. Events
    /// read by one loop therefore start in the order they arrived, as NestJS invokes them. A
    /// handler that computes before its first `.await` holds up the calling loop meanwhile; with
    /// [`Server::spawn_handlers`], a request's handler runs in a task of its own from the start
    /// instead (events keep their order: a transport that must never wait on one reads them into
    /// a lane of their own, as the TCP server does).
    /// During shutdown a request is answered with `Unavailable` and an event is dropped (logged).
    ///
    /// Every request gets an answer: the handler's replies; an error reply when it fails, panics,
    /// or outlives the caller's deadline or the grace period of a shutdown; and, when a reply is
    /// too large for the transport, an error saying so.
    ///
    /// Not an `async fn`, here and in [`dispatch_inline`](Self::dispatch_inline): one would keep
    /// the request and the sink a second time, beside the future that does the work.
    pub fn dispatch<K: ReplySink>(
        &self,
        request: RpcRequest,
        sink: Option<K>,
    ) -> impl Future<Output = ()> + Send + '_ {
        let first_poll = if sink.is_some() && self.inner.spawn_handlers {
            FirstPoll::Spawned
        } else {
            FirstPoll::Inline
        };
        self.dispatch_with(request, sink, first_poll)
    }

    /// [`dispatch`](Self::dispatch), with the handler's first step always taken in the calling
    /// task, whatever [`Server::spawn_handlers`] says: for a transport whose calling task exists
    /// for this one message (the in-memory transport calls it from the client's task).
    pub fn dispatch_inline<K: ReplySink>(
        &self,
        request: RpcRequest,
        sink: Option<K>,
    ) -> impl Future<Output = ()> + Send + '_ {
        self.dispatch_with(request, sink, FirstPoll::Inline)
    }

    async fn dispatch_with<K: ReplySink>(
        &self,
        request: RpcRequest,
        sink: Option<K>,
        first_poll: FirstPoll,
    ) {
        if self.is_draining() {
            // Boxed: rare, and this future is held for every message.
            Box::pin(refuse_at_shutdown(request, sink)).await;
            return;
        }
        // A request waiting for a slot counts for draining (which otherwise could report
        // everything drained and then see it run), until it is tracked itself. Like a request
        // already running, it is handled within the grace period: a transport that took it from
        // a broker (RabbitMQ's prefetch) has handed it to this server alone. Past the grace
        // period it is refused, and shutdown no longer waits for it: it has not started, and a
        // caller may hold it without ever polling it again.
        let mut _waiting = None;
        let permit = match &self.inner.permits {
            None => None,
            Some(permits) => match Arc::clone(permits).try_acquire_owned() {
                Ok(permit) => Some(permit),
                // Only a request that has to wait takes a token: the tracker's count is shared
                // by every message.
                Err(_) => {
                    _waiting = Some(self.inner.waiting.token());
                    // Boxed: only a request that has to wait gets here, and this future is held
                    // for every message.
                    let slot = Box::pin(async {
                        tokio::select! {
                            biased;
                            () = self.inner.abort.cancelled() => None,
                            permit = self.slot() => Some(permit),
                        }
                    })
                    .await;
                    match slot {
                        Some(permit) => permit,
                        None => {
                            Box::pin(refuse_at_shutdown(request, sink)).await;
                            return;
                        }
                    }
                }
            },
        };
        // The target stays `palisade::rpc::server` whatever file this lives in: log filters name it.
        let span = if crate::rpc::spans_observed() {
            tracing::info_span!(
                target: "palisade::rpc::server",
                "rpc.server",
                transport = self.inner.transport,
                pattern = %request.pattern(),
                kind = ?request.kind(),
                trace = request.headers().get(TRACEPARENT_HEADER).map(tracing::field::display),
                outcome = tracing::field::Empty,
                latency_us = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        #[cfg(feature = "opentelemetry")]
        if !span.is_disabled() {
            crate::rpc::otel::continue_trace(&span, request.headers());
        }
        // Boxed where it is made: the handler's future is large (it holds the sink's send), and
        // each move of it is a copy. Entered at each poll only when someone collects the span: a
        // disabled span has nothing to enter, and entering it anyway costs `tracing`'s `log`
        // fallback a check at every poll.
        let inner = Arc::clone(&self.inner);
        // Each kind boxed on its own (not one `Either` box): the future goes into its box in one
        // copy rather than being moved into the `Either` first.
        let mut handling: Pin<Box<dyn Future<Output = ()> + Send>> = if span.is_disabled() {
            Box::pin(inner.handle(request, sink, permit, span, first_poll))
        } else {
            Box::pin(
                inner
                    .handle(request, sink, permit, span.clone(), first_poll)
                    .instrument(span),
            )
        };
        match first_poll {
            FirstPoll::Spawned => {
                self.inner.tracker.spawn(handling);
            }
            FirstPoll::Inline => {
                // Most handlers answer on their first poll: poll once here and spawn a task only
                // for those that have to wait. The first poll happens inside this call, which the
                // caller cannot cancel halfway, and a waiting handler still runs to completion in
                // a task of its own, whatever the caller does next.
                let finished =
                    std::future::poll_fn(|cx| Poll::Ready(handling.as_mut().poll(cx).is_ready()))
                        .await;
                if !finished {
                    self.inner.tracker.spawn(handling);
                }
            }
        }
    }

    /// A slot of [`Server::max_in_flight`](super::Server::max_in_flight), once one is free
    /// (`None` without a limit).
    async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        match &self.inner.permits {
            Some(permits) => Arc::clone(permits).acquire_owned().await.ok(),
            None => None,
        }
    }

    /// Handles an event to completion in the calling task and reports whether every handler
    /// succeeded — for transports that acknowledge events (durable streams, queues with manual
    /// acks): acknowledge on `Ok`, redeliver or dead-letter on `Err`. Counts as in flight for
    /// shutdown and for [`Server::max_in_flight`](super::Server::max_in_flight) (it waits for a
    /// slot); fails with `Unavailable` once shutdown started or when the grace period ends before
    /// the handlers do.
    pub async fn handle_event(&self, event: RpcRequest) -> Result<(), RpcError> {
        if self.is_draining() {
            return Err(RpcError::unavailable("the server is shutting down"));
        }
        let inner = &*self.inner;
        let _token = inner.tracker.token();
        // `max_in_flight` counts events that are acknowledged after handling as it counts the
        // rest: the caller waits here for a slot, and a shutdown meanwhile fails the event (to
        // be delivered again) rather than run it in the grace period.
        let _permit = tokio::select! {
            biased;
            permit = self.slot() => permit,
            _ = self.draining() => {
                return Err(RpcError::unavailable("the server is shutting down"));
            }
        };
        let _in_flight = inner.in_flight.enter();
        // A panic while the handler's future is made (an extractor, a validator, a layer's
        // `call`) is caught as well as one while it runs: it must not unwind into the
        // transport's consumer task, which reads every event of its route.
        let handling =
            AssertUnwindSafe(inner.call_service(event.reporting_failures())).catch_unwind();
        let handling = async move {
            match handling.await {
                // A stream's work happens as it is polled; its first error is the event's.
                Ok(result) => result?.run_to_end().await,
                Err(panic) => {
                    tracing::error!(panic = %panic_message(&*panic), "event handler panicked");
                    Err(RpcError::internal())
                }
            }
        };
        tokio::select! {
            biased;
            _ = inner.abort.cancelled() => Err(RpcError::unavailable("the server shut down before the handler finished")),
            outcome = handling => outcome,
        }
    }

    /// Guards a transport's start. Until [`StartGuard::serving`] hands out the server's
    /// [`ServerHandle`](super::ServerHandle), nobody can stop what the transport started: if the
    /// start fails or its future is dropped half way (a caller's timeout), the guard stops it.
    /// Take one before the first [`spawn`](Self::spawn) of a start that awaits anything
    /// afterwards, and keep it in a named binding: `let _ = dispatcher.start_guard();` drops it,
    /// and so stops the server, at once. Only the start holds one: dropping a guard stops the
    /// server even when a [`ServerHandle`](super::ServerHandle) was made some other way.
    ///
    /// ```
    /// use palisade::rpc::{Dispatcher, RpcError, ServerHandle};
    ///
    /// async fn start(dispatcher: Dispatcher) -> Result<ServerHandle, RpcError> {
    ///     let starting = dispatcher.start_guard();
    ///     dispatcher.spawn(dispatcher.draining()); // a reading task, ended by shutdown
    ///     // Dropped here (an error returned with `?`, or the future dropped while it waits),
    ///     // `starting` stops the reading task.
    ///     confirm_subscriptions().await?;
    ///     Ok(starting.serving())
    /// }
    /// # async fn confirm_subscriptions() -> Result<(), RpcError> { Ok(()) }
    /// ```
    pub fn start_guard(&self) -> StartGuard {
        StartGuard {
            dispatcher: Some(self.clone()),
        }
    }

    /// Stops taking messages and cancels running handlers at once (their callers get
    /// `Unavailable`); the transport's tasks end on their own.
    fn stop_now(&self) {
        self.begin_draining();
        self.inner.abort.cancel();
    }

    fn begin_draining(&self) {
        let inner = &*self.inner;
        inner.draining_flag.store(true, Ordering::Release);
        inner.draining.cancel();
        inner.tracker.close();
        inner.waiting.close();
    }

    /// Starts shutdown: stop taking messages, drain for the grace period, then cancel.
    pub(super) async fn shutdown(&self) -> super::ShutdownReport {
        let inner = &*self.inner;
        self.begin_draining();
        let started = Instant::now();
        // Waiters first: one that gets its slot is tracked before it stops waiting. And again
        // while a waiter came late (past the draining check just before it began, its token
        // taken once the waiters looked done).
        let drained = tokio::time::timeout(inner.grace_period, async {
            loop {
                inner.waiting.wait().await;
                inner.tracker.wait().await;
                if inner.waiting.is_empty() {
                    break;
                }
            }
        })
        .await
        .is_ok();
        let mut cancelled = 0;
        if !drained {
            cancelled = inner.in_flight.get();
            tracing::warn!(cancelled, grace_period = ?inner.grace_period, "grace period over; cancelling handlers still running");
            inner.abort.cancel();
            inner.tracker.wait().await;
        }
        super::ShutdownReport {
            drained,
            cancelled,
            took: started.elapsed(),
        }
    }
}

/// Stops what a transport started for a server that never got its
/// [`ServerHandle`](super::ServerHandle); see [`Dispatcher::start_guard`].
///
/// Dropped while armed, it stops taking messages and cancels running handlers at once: their
/// callers get `Unavailable`, and the transport's tasks end on their own. A failed start that can
/// wait calls [`abandon`](Self::abandon), which also waits for those tasks, so that nothing it
/// started outlives the error it returns.
#[must_use = "dropping the guard stops the server it guards"]
pub struct StartGuard {
    /// `None` once disarmed.
    dispatcher: Option<Dispatcher>,
}

impl StartGuard {
    /// The server is serving: disarms the guard and returns the server's handle.
    pub fn serving(mut self) -> super::ServerHandle {
        let dispatcher = self
            .dispatcher
            .take()
            .expect("a guard is armed until it is consumed");
        super::ServerHandle::new(dispatcher)
    }

    /// The start failed: stops what it started at once, and waits until the transport's tasks
    /// ended — so a task that does not end once [`Dispatcher::draining`] resolves keeps this
    /// waiting.
    pub async fn abandon(mut self) {
        if let Some(dispatcher) = self.dispatcher.take() {
            dispatcher.stop_now();
            dispatcher.inner.tracker.wait().await;
        }
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(dispatcher) = self.dispatcher.take() {
            tracing::debug!(
                transport = dispatcher.transport(),
                "the server's start ended without a handle; stopping what it started"
            );
            dispatcher.stop_now();
        }
    }
}

impl fmt::Debug for StartGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StartGuard")
            .field("armed", &self.dispatcher.is_some())
            .finish()
    }
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("transport", &self.inner.transport)
            .field("routes", &self.inner.routes)
            .field("in_flight", &self.in_flight())
            .field("draining", &self.is_draining())
            .finish()
    }
}

/// Runs the handler's future and sends its reply. Sets `finished` once the handler has produced
/// everything it will (a stream has not), so that the deadline need not watch the reply's send.
async fn respond<K: ReplySink>(
    call: BoxFuture<'static, Result<Reply, RpcError>>,
    sink: Option<&mut Tracked<K>>,
    finished: &AtomicBool,
) -> Result<(), RpcError> {
    // A panicking handler must not leave its caller waiting: it becomes NestJS's
    // "Internal server error", and the panic is logged.
    let reply = AssertUnwindSafe(call)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(handler_panicked(&*panic)));
    if !matches!(reply, Ok(Reply::Stream(_))) {
        finished.store(true, Ordering::Relaxed);
    }
    match (reply, sink) {
        // An event: nobody to answer, but a stream's work happens as it is polled.
        (Ok(reply), None) => reply.run_to_end().await,
        (Err(error), None) => Err(error),
        (reply, Some(sink)) => send_replies(reply, sink).await,
    }
}

/// Answers a request the server will not run because it is shutting down (an event is dropped).
async fn refuse_at_shutdown<K: ReplySink>(request: RpcRequest, sink: Option<K>) {
    match sink {
        Some(mut sink) => {
            let error = RpcError::unavailable("the server is shutting down");
            let _ = sink.send(ReplyPacket::Error(error_json(&error))).await;
        }
        None => {
            tracing::warn!(pattern = %request.pattern(), "event dropped: the server is shutting down")
        }
    }
}

/// Sends `error` as the answer of a request stopped before it answered. Once the server shut
/// down, the send gets one more grace period: a transport's send may take a while (a publish
/// the broker confirms), but one that waits for a caller with no room for it (a stream held but
/// no longer read) would keep shutdown waiting for good.
async fn last_word<K: ReplySink>(
    sink: &mut Tracked<K>,
    error: &RpcError,
    abort: &CancellationToken,
    grace_period: Duration,
) {
    let given_up = async {
        abort.cancelled().await;
        tokio::time::sleep(grace_period).await;
    };
    tokio::select! {
        biased;
        _ = sink.send(ReplyPacket::Error(error_json(error))) => {}
        () = given_up => {
            tracing::debug!("the caller has no room for the handler's last error; given up at shutdown");
        }
    }
}

/// The error that stops a handler still running: its caller's deadline passed (unless the
/// handler had finished by the time this was first polled, its reply on its way), or the server
/// shut down past its grace period.
async fn stop_when(
    deadline: Option<crate::timeout::Deadline>,
    finished: &AtomicBool,
    abort: &CancellationToken,
) -> RpcError {
    let deadline_passed = async {
        match deadline {
            Some(deadline) if !finished.load(Ordering::Relaxed) => {
                crate::timeout::sleep_until_lazily(deadline.instant()).await
            }
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        _ = deadline_passed => {
            RpcError::deadline_exceeded("the caller's deadline passed; the handler was stopped")
        }
        _ = abort.cancelled() => {
            RpcError::unavailable("the server shut down before the handler finished")
        }
    }
}

impl Inner {
    /// The `rpc.method` a message is counted under: its route, or `None` (`_OTHER`) for a route
    /// no handler is registered for, so that callers naming ever new patterns do not add a
    /// metric series each. A server whose routes are not known counts every route.
    #[cfg(feature = "metrics")]
    fn metric_method(&self, route: &Arc<str>) -> Option<Arc<str>> {
        let known = self.routes.as_ref().is_none_or(|routes| {
            routes.messages().binary_search(route).is_ok()
                || routes.events().binary_search(route).is_ok()
        });
        known.then(|| Arc::clone(route))
    }

    /// The handler's future for `request`. A panic while it is made (in a layer's `call`, say)
    /// is a panic of the handler: the caller gets "Internal server error".
    fn call_service(&self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.service.call(request))) {
            Ok(call) => call,
            Err(panic) => {
                let error = handler_panicked(&*panic);
                Box::pin(std::future::ready(Err(error)))
            }
        }
    }

    /// Handles one message: runs the handler within the deadline and sends every reply.
    ///
    /// Not an `async fn`: the handler's future is made here, at once, and the request is not
    /// kept. An `async fn` keeps each argument twice in its future and the request until the
    /// end, and this future is boxed for every message and held while it is in flight: those
    /// copies were a quarter of its size, copied into each allocation and out of the cache.
    fn handle<K: ReplySink>(
        self: Arc<Self>,
        request: RpcRequest,
        sink: Option<K>,
        permit: Option<OwnedSemaphorePermit>,
        span: tracing::Span,
        first_poll: FirstPoll,
    ) -> impl Future<Output = ()> + Send + 'static {
        let deadline = request.deadline();
        let kind = request.kind();
        // A failed event is the dispatcher's to see, as a failed request is: counted in the
        // metrics and the span's outcome, and logged. Nothing is sent back either way.
        let request = if kind == Kind::Event {
            request.reporting_failures()
        } else {
            request
        };
        #[cfg(feature = "metrics")]
        let method = self.metric_method(request.pattern().route_arc());
        let call = if span.is_disabled() {
            self.call_service(request)
        } else {
            span.in_scope(|| self.call_service(request))
        };
        // Made out here, so that the future holds the sink once (an `async` block holds what it
        // captures as well as what it binds).
        let mut sink = sink.map(|inner| Tracked {
            inner,
            answered: false,
        });
        async move {
            let _in_flight = self.in_flight.enter();
            // Clock reads only for a span someone listens to (or for metrics).
            let started = (cfg!(feature = "metrics") || !span.is_disabled()).then(Instant::now);
            // Whether the handler is done and only its reply is on its way.
            let finished = AtomicBool::new(false);
            let outcome = {
                let mut work = std::pin::pin!(respond(call, sink.as_mut(), &finished));
                // The deadline's timer and the shutdown token are watched only once the handler
                // has to wait, from a box made then: a handler that answers at once never arms a
                // timer or touches the token, and this future, boxed for every message, has no
                // room for them. A first poll in the dispatching task is followed by one in the
                // handler's own task (spawned if the work waits): the watch starts there, once,
                // rather than first for the dispatching task and then again for the handler's.
                // A handler that is done by then, its reply waiting on the transport, gets no
                // timer at all: there is nothing left to stop, and the transport bounds its sends.
                let mut probing = first_poll == FirstPoll::Inline;
                let mut watch = None;
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(outcome) = work.as_mut().poll(cx) {
                        return Poll::Ready(outcome);
                    }
                    if std::mem::take(&mut probing) {
                        return Poll::Pending;
                    }
                    watch
                        .get_or_insert_with(|| {
                            Box::pin(stop_when(deadline, &finished, &self.abort))
                        })
                        .as_mut()
                        .poll(cx)
                        .map(Err)
                })
                .await
            };
            // Stopped by the deadline or by shutdown before answering: every request gets an answer.
            // One the caller has no room for (a stream it holds but stops reading) is given up
            // once the server shuts down, which would otherwise wait for it forever.
            if let (Err(error), Some(sink)) = (&outcome, sink.as_mut())
                && !sink.answered
            {
                // Boxed: rare, and this future is boxed for every message.
                Box::pin(last_word(sink, error, &self.abort, self.grace_period)).await;
            }
            #[cfg(feature = "metrics")]
            if let Some(started) = started {
                crate::rpc::observe::record(
                    method.as_ref(),
                    self.transport,
                    kind,
                    &outcome,
                    started.elapsed(),
                );
            }
            if let Some(started) = started
                && !span.is_disabled()
            {
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
            // Held to the end: it bounds the handlers running at once.
            drop(permit);
        }
    }
}

/// A sink that remembers whether the final packet went out, and answers a reply that is too large
/// for the transport with an error saying so.
struct Tracked<K> {
    inner: K,
    answered: bool,
}

impl<K: ReplySink> Tracked<K> {
    /// Sends `packet`; `Err` when nothing more should be sent for this request.
    async fn send(&mut self, mut packet: ReplyPacket) -> Result<(), RpcError> {
        let last = packet.is_last();
        // One send at a time, from one place: the transport's send is most of this future, and
        // a second call site could take room for a second one.
        let mut too_large: Option<RpcError> = None;
        loop {
            let sent = self.inner.send(packet).await;
            if let Some(error) = too_large {
                // `sent` is the error packet's: the reply that was too large is answered.
                self.answered = true;
                if let Err(failed) = sent {
                    tracing::warn!(error = %failed, "could not send the error for a reply that was too large");
                }
                return Err(error);
            }
            match sent {
                Ok(()) => {
                    self.answered |= last;
                    return Ok(());
                }
                Err(SendError::TooLarge { size, limit }) => {
                    let error = RpcError::transport(
                        TransportErrorKind::PayloadTooLarge,
                        format!(
                            "the handler's reply ({size}) is larger than the transport's limit ({limit}); it was not sent"
                        ),
                    );
                    tracing::warn!(%error, "reply too large");
                    packet = ReplyPacket::Error(error_json(&error));
                    too_large = Some(error);
                }
                Err(SendError::CallerGone) => {
                    self.answered = true;
                    return Err(RpcError::new(Code::Cancelled, "the caller went away"));
                }
                Err(SendError::Failed(error)) => {
                    tracing::warn!(%error, "a reply could not be sent");
                    self.answered = true;
                    return Err(error);
                }
            }
        }
    }
}

/// Sends a stream's items, and its end, as NestJS packets.
async fn send_stream<K: ReplySink>(
    stream: futures_util::stream::BoxStream<'static, Result<crate::rpc::RawJson, RpcError>>,
    sink: &mut Tracked<K>,
) -> Result<(), RpcError> {
    // The stream is the handler's code too: a panic in it ends the stream with "Internal server
    // error" rather than unwinding into the transport's task (which reads the messages of a whole
    // route or connection) or leaving the caller waiting.
    // Boxed again, as a stream of its own: a named type for `next_value`, whose future would not
    // be `Send` otherwise (the closure's type is not general over the panic's lifetime).
    let mut stream: futures_util::stream::BoxStream<
        'static,
        Result<crate::rpc::RawJson, RpcError>,
    > = Box::pin(
        AssertUnwindSafe(stream)
            .catch_unwind()
            .map(|item| item.unwrap_or_else(|panic| Err(handler_panicked(&*panic)))),
    );
    let mut next = next_value(&mut stream, sink).await?;
    while let Some(item) = next {
        match item {
            // A failed send (the caller is gone, ...) stops the stream.
            Ok(response) => {
                // Only looked at when the transport wants streams to end on their last
                // value (see `ReplySink::ends_streams_on_their_last_value`).
                let following = if sink.inner.ends_streams_on_their_last_value() {
                    stream.next().now_or_never()
                } else {
                    None
                };
                let last = matches!(following, Some(None));
                sink.send(ReplyPacket::Value { response, last }).await?;
                next = match following {
                    Some(None) => return Ok(()),
                    Some(item) => item,
                    None => next_value(&mut stream, sink).await?,
                };
            }
            Err(error) => {
                sink.send(ReplyPacket::Error(error_json(&error))).await?;
                return Err(error);
            }
        }
    }
    sink.send(ReplyPacket::Complete).await
}

/// The stream's next item, unless its caller goes away first (a stream may wait for its next
/// value for good; its caller's going is the only end it gets then).
async fn next_value<K: ReplySink>(
    stream: &mut futures_util::stream::BoxStream<'static, Result<crate::rpc::RawJson, RpcError>>,
    sink: &mut Tracked<K>,
) -> Result<Option<Result<crate::rpc::RawJson, RpcError>>, RpcError> {
    tokio::select! {
        biased;
        item = stream.next() => Ok(item),
        () = sink.inner.caller_gone() => {
            tracing::debug!("the caller of a streamed reply went away; the stream is stopped");
            // Not marked answered: the error goes out as the stream's end, which a caller that
            // only closed its side of a connection still reads (one that is gone does not).
            Err(RpcError::new(
                Code::Cancelled,
                "the caller closed its side; the streamed reply was stopped",
            ))
        }
    }
}

/// Sends a handler's reply (or error) as NestJS packets.
async fn send_replies<K: ReplySink>(
    reply: Result<Reply, RpcError>,
    sink: &mut Tracked<K>,
) -> Result<(), RpcError> {
    match reply {
        Ok(Reply::Value(response)) => {
            sink.send(ReplyPacket::Value {
                response,
                last: true,
            })
            .await
        }
        Ok(Reply::Empty) => sink.send(ReplyPacket::Complete).await,
        // Boxed: a stream's sending is a future several times larger than a single reply's,
        // and every handling future would otherwise have room for it.
        Ok(Reply::Stream(stream)) => Box::pin(send_stream(stream, sink)).await,
        Err(error) => {
            let packet =
                if error.code() == Code::Unimplemented && error.message() == NO_HANDLER_MESSAGE {
                    ReplyPacket::NoHandler
                } else {
                    ReplyPacket::Error(error_json(&error))
                };
            sink.send(packet).await?;
            Err(error)
        }
    }
}
