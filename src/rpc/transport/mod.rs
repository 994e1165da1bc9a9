//! Transports: how messages travel between clients and servers.
//!
//! - [`memory`]: client and server in one process — the embedded default, with the same
//!   semantics as the wire transports (payloads are serialised, patterns normalised, deadlines
//!   carried, unknown patterns answered the NestJS way).
//! - `tcp` (feature `tcp`): NestJS's `Transport.TCP`.
//! - `nats` (feature `nats`): NestJS's `Transport.NATS`, with optional durable (JetStream) events.
//! - `kafka` (feature `kafka`): NestJS's `Transport.KAFKA`, with consumer groups and at-least-once
//!   events.
//! - `rabbitmq` (feature `rabbitmq`): NestJS's `Transport.RMQ`, with acknowledgements, retries
//!   and dead letters for events, and publisher confirms.
//! - `redis` (feature `redis`): NestJS's `Transport.REDIS`, with fast failure for patterns nobody
//!   serves, an opt-in single responder per service, and optional durable events (Redis Streams).
//! - `mqtt` (feature `mqtt`): NestJS's `Transport.MQTT`, with one long-lived subscription per reply
//!   topic, opt-in shared subscriptions, and optional durable events (persistent sessions, QoS 1).
//!
//! # Writing a transport
//!
//! A transport has two halves, each one trait:
//!
//! - the client half implements [`ClientTransport`]: `request` hands a request over and returns a
//!   [`ReplyReceiver`] of its reply packets, `emit` publishes an event. A transport that needs
//!   connecting first implements [`Connect`] on its configuration, yielding the connected
//!   `ClientTransport`;
//! - the server half implements [`ServerTransport`]: `serve` turns the [`Server`] into a
//!   [`Dispatcher`](crate::rpc::Dispatcher) with [`Server::into_dispatcher`], reads messages and
//!   hands each to [`Dispatcher::dispatch`](crate::rpc::Dispatcher::dispatch) with a
//!   [`ReplySink`](crate::rpc::ReplySink) for its replies, and returns a
//!   [`ServerHandle`].
//!
//! The wire pieces NestJS's transports share — the JSON envelope, packet ids, the correlation map
//! of pending requests — are in [`wire`](crate::rpc::wire). The conformance suite
//! (`palisade::conformance`, feature `conformance`) checks a transport against the behaviour every
//! built-in transport has; `tests/custom_transport.rs` in the repository is a whole transport
//! written outside the crate that passes it.

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "tcp")]
pub mod tcp;

use super::wire::PendingRequests;
use super::{RawJson, RpcError, RpcRequest, Server, ServerHandle};
use futures_util::future::BoxFuture;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use tokio::sync::{mpsc, oneshot};

/// Header naming an operation's idempotency key: a caller that may send the same event or request
/// twice (a retry after a lost acknowledgement, a failover) gives both the same key.
///
/// Durable NATS events store an event once per key within the stream's duplicate window (the
/// key becomes JetStream's `Nats-Msg-Id`). A handler that must not run twice for one request
/// reads it with the [`Headers`](crate::rpc::Headers) extractor and remembers the keys it
/// handled.
pub const IDEMPOTENCY_KEY: &str = "palisade-idempotency-key";

/// Header of a dead letter (an event that failed for good, published aside by a transport with
/// acknowledged events): why its last delivery failed.
pub const DEAD_LETTER_REASON: &str = "palisade-dead-letter-reason";
/// Header of a dead letter: how many times the event was delivered.
pub const DEAD_LETTER_DELIVERIES: &str = "palisade-deliveries";
/// Header of a dead letter: the subject, channel or topic the event was published on.
pub const DEAD_LETTER_SUBJECT: &str = "palisade-original-subject";

/// One reply packet for a request, as a client transport delivers it.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplyPacket {
    /// A value; `last` when no packet follows (NestJS's `isDisposed` on the value).
    Value {
        /// The value.
        response: RawJson,
        /// Whether this is the final packet.
        last: bool,
    },
    /// The reply stream ended (NestJS's standalone `{"isDisposed":true}`).
    Complete,
    /// The handler failed; the raw `err` value.
    Error(RawJson),
    /// No handler for the pattern (NestJS's no-handler reply).
    NoHandler,
    /// The transport failed the request on this side — the connection was lost, a reply could not
    /// be read — with the error as it is (its [transport kind](RpcError::transport_kind) kept).
    /// Never sent over a wire: a server's sink sends it as an [`Error`](Self::Error).
    Failed(RpcError),
}

impl ReplyPacket {
    /// Whether no packet follows this one.
    pub fn is_last(&self) -> bool {
        !matches!(self, ReplyPacket::Value { last: false, .. })
    }
}

enum RestReceiver {
    Bounded(mpsc::Receiver<ReplyPacket>),
    Unbounded(mpsc::UnboundedReceiver<ReplyPacket>),
}

enum RestSender {
    Bounded(mpsc::Sender<ReplyPacket>),
    Unbounded(mpsc::UnboundedSender<ReplyPacket>),
}

type First = (ReplyPacket, Option<RestReceiver>);

/// A channel for one request's reply packets: [`ReplySender`] for the transport,
/// [`ReplyReceiver`] for the caller.
///
/// Most replies are a single packet, so the first packet travels through a oneshot; a channel for
/// the rest is opened only when the first packet is not the last. `stream_buffer` bounds how far a
/// streamed reply may run ahead of its reader (`None`: unbounded, for transports that cannot push
/// back, like a connection's reader serving many requests).
pub fn reply_channel(stream_buffer: Option<usize>) -> (ReplySender, ReplyReceiver) {
    let (first, receiver) = oneshot::channel();
    (
        ReplySender {
            first: Some(first),
            rest: None,
            stream_buffer,
        },
        ReplyReceiver {
            state: ReceiverState::First(receiver),
            _registration: Registration::None,
        },
    )
}

/// The transport's end of a [`reply_channel`].
pub struct ReplySender {
    first: Option<oneshot::Sender<First>>,
    rest: Option<RestSender>,
    stream_buffer: Option<usize>,
}

impl ReplySender {
    /// Sends a packet, waiting for room if a bounded stream is full; `false` if the caller is gone.
    pub async fn send(&mut self, packet: ReplyPacket) -> bool {
        match &self.rest {
            Some(RestSender::Bounded(rest)) => match rest.try_send(packet) {
                Ok(()) => true,
                // Waiting for room is rare; boxing it keeps every sender's future small.
                Err(mpsc::error::TrySendError::Full(packet)) => {
                    Box::pin(rest.send(packet)).await.is_ok()
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
            _ => self.try_send(packet),
        }
    }

    /// Resolves once the caller dropped its [`ReplyReceiver`] (or, for a stream, the rest of
    /// it): what a [`ReplySink::caller_gone`](crate::rpc::ReplySink::caller_gone) of a transport
    /// that hands replies over in memory waits for.
    pub async fn closed(&mut self) {
        match (&mut self.first, &self.rest) {
            (Some(first), _) => first.closed().await,
            (None, Some(RestSender::Bounded(rest))) => rest.closed().await,
            (None, Some(RestSender::Unbounded(rest))) => rest.closed().await,
            (None, None) => std::future::pending().await,
        }
    }

    /// Sends a packet without waiting; `false` if the caller is gone, or a bounded stream is full.
    pub fn try_send(&mut self, packet: ReplyPacket) -> bool {
        if let Some(first) = self.first.take() {
            let rest = if packet.is_last() {
                None
            } else {
                let (sender, receiver) = match self.stream_buffer {
                    Some(buffer) => {
                        let (tx, rx) = mpsc::channel(buffer.max(1));
                        (RestSender::Bounded(tx), RestReceiver::Bounded(rx))
                    }
                    None => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        (RestSender::Unbounded(tx), RestReceiver::Unbounded(rx))
                    }
                };
                self.rest = Some(sender);
                Some(receiver)
            };
            return first.send((packet, rest)).is_ok();
        }
        match &self.rest {
            Some(RestSender::Bounded(rest)) => rest.try_send(packet).is_ok(),
            Some(RestSender::Unbounded(rest)) => rest.send(packet).is_ok(),
            None => false,
        }
    }
}

impl fmt::Debug for ReplySender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplySender").finish_non_exhaustive()
    }
}

enum ReceiverState {
    First(oneshot::Receiver<First>),
    Rest(RestReceiver),
    Done,
}

/// The reply packets of one request, in order. Dropping it tells the transport the caller is no
/// longer interested (later packets for the request are discarded).
pub struct ReplyReceiver {
    state: ReceiverState,
    // Held for its `Drop` (the transport forgets the request there).
    _registration: Registration,
}

/// What forgets a request when its caller stops listening.
// The fields are held for their `Drop`.
#[allow(dead_code)]
enum Registration {
    None,
    Pending(Forget),
    Custom(Box<dyn Send + Sync>),
}

/// Forgets request `n` in its correlation map on drop.
struct Forget {
    pending: Arc<PendingRequests>,
    n: u64,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.pending.forget(self.n);
    }
}

impl ReplyReceiver {
    /// With `registration`, dropped together with the receiver: a transport with correlation
    /// bookkeeping of its own forgets the request there. (Transports using
    /// [`PendingRequests`] get this done for them.)
    pub fn with_registration(mut self, registration: Box<dyn Send + Sync>) -> Self {
        self._registration = Registration::Custom(registration);
        self
    }

    /// Forgets request `n` in `pending` when dropped.
    pub(crate) fn forgetting(mut self, pending: Arc<PendingRequests>, n: u64) -> Self {
        self._registration = Registration::Pending(Forget { pending, n });
        self
    }

    /// The next packet; `None` if the transport lost the request (it reports why by sending an
    /// `Unavailable` error packet first when it can).
    pub async fn recv(&mut self) -> Option<ReplyPacket> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`recv`](Self::recv) as a poll: the next packet once it is there, the task of `cx` woken
    /// when it comes.
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<ReplyPacket>> {
        match &mut self.state {
            ReceiverState::First(first) => match std::pin::Pin::new(first).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok((packet, rest))) => {
                    self.state = rest.map_or(ReceiverState::Done, ReceiverState::Rest);
                    Poll::Ready(Some(packet))
                }
                Poll::Ready(Err(_)) => {
                    self.state = ReceiverState::Done;
                    Poll::Ready(None)
                }
            },
            ReceiverState::Rest(RestReceiver::Bounded(rest)) => rest.poll_recv(cx),
            ReceiverState::Rest(RestReceiver::Unbounded(rest)) => rest.poll_recv(cx),
            ReceiverState::Done => Poll::Ready(None),
        }
    }
}

impl fmt::Debug for ReplyReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyReceiver").finish_non_exhaustive()
    }
}

/// The client side of a transport.
///
/// Every request must resolve: with its replies, or with an error packet when the transport loses
/// what the replies would come through (a connection, a subscription) — [`PendingRequests`]
/// does this bookkeeping. Errors carry a [`TransportErrorKind`](crate::rpc::TransportErrorKind)
/// ([`RpcError::transport`]) so that retry and circuit breakers treat them right.
pub trait ClientTransport: Send + Sync + 'static {
    /// Sends a request (`Kind::Request`); the receiver yields its reply packets.
    fn request(&self, request: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>>;

    /// Publishes an event (`Kind::Event`); resolves once it is handed to the transport (or, for
    /// transports that confirm, once the broker stored it).
    fn emit(&self, event: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>>;

    /// For a broker that cannot tell whether anyone listens (MQTT): what a request that was sent
    /// but never answered probably met, as an error made from its route. The client then stops
    /// waiting [`SILENCE_MARGIN`] before the deadline and fails the request with it, rather than
    /// with the bare `DeadlineExceeded` of its timer. Default: `None` (the transport answers an
    /// unknown pattern, or reports that nobody listens, itself).
    fn explain_silence(&self) -> Option<ExplainSilence> {
        None
    }
}

/// Makes the error of a request that was sent but met silence until its deadline, from its route:
/// see [`ClientTransport::explain_silence`]. It should say what probably happened, with code
/// `DeadlineExceeded`.
pub type ExplainSilence = fn(&str) -> RpcError;

/// How long before the deadline a client gives up on a transport that
/// [explains silence](ClientTransport::explain_silence): early enough that the explanation, not
/// the bare deadline of the caller's timer, is what the caller sees.
pub const SILENCE_MARGIN: std::time::Duration = std::time::Duration::from_millis(10);

/// The server side of a transport, the counterpart of [`ClientTransport`]: serves a [`Server`].
///
/// `serve` starts serving and resolves once the server takes messages (listening, subscribed),
/// or fails with a clear error (the broker cannot be reached, a pattern is not a valid subject).
/// Every transport is served the same way:
///
/// ```
/// use palisade::rpc::transport::memory::MemoryTransport;
/// use palisade::rpc::transport::ServerTransport;
/// use palisade::rpc::{Router, Server};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let server = Server::new(Router::new().message("ping", || async { "pong" }));
/// let handle = MemoryTransport::new().serve(server).await?; // or `server.serve(transport)`
/// handle.shutdown().await;
/// # Ok(()) }
/// ```
///
/// An implementation makes a [`Dispatcher`](crate::rpc::Dispatcher) with
/// [`Server::into_dispatcher`], starts its reading tasks with
/// [`Dispatcher::spawn`](crate::rpc::Dispatcher::spawn) (shutdown waits for them), stops taking
/// messages once [`Dispatcher::draining`](crate::rpc::Dispatcher::draining) resolves, and returns
/// [`ServerHandle::new`] (with [`on_shutdown`](ServerHandle::on_shutdown) for what must happen
/// after the last reply, such as flushing a broker connection). A start that still awaits
/// something after its first `spawn` (a subscription's confirmation, a consumer group) takes a
/// [`Dispatcher::start_guard`](crate::rpc::Dispatcher::start_guard) first and returns
/// [`StartGuard::serving`](crate::rpc::StartGuard::serving): then a start whose future is
/// dropped half way stops what it started, and a failed start that calls
/// [`StartGuard::abandon`](crate::rpc::StartGuard::abandon) before it returns its error has
/// stopped it by then.
pub trait ServerTransport: Send {
    /// Starts serving `server`.
    fn serve(self, server: Server) -> impl Future<Output = Result<ServerHandle, RpcError>> + Send;
}

/// Something a [`Client`](crate::rpc::Client) can connect through: a transport, or the
/// configuration of one that needs connecting first.
pub trait Connect {
    /// The connected transport.
    type Transport: ClientTransport;

    /// Connects.
    fn connect(self) -> impl Future<Output = Result<Self::Transport, RpcError>> + Send;
}

impl<T: ClientTransport> Connect for T {
    type Transport = T;

    fn connect(self) -> impl Future<Output = Result<T, RpcError>> + Send {
        std::future::ready(Ok(self))
    }
}

/// The `err` JSON for `error`: what a reply packet carries when a request fails.
pub fn error_json(error: &RpcError) -> RawJson {
    error.err_json()
}

/// `reason`, halved (at a character boundary) until `fits` says the dead letter carrying it
/// fits; `None` if not even an empty one does. A dead letter over a broker's limit is refused
/// every time, and its event would come back for good.
#[cfg_attr(not(any(feature = "mqtt", feature = "nats")), allow(dead_code))]
pub(crate) fn shortened(mut reason: String, fits: impl Fn(&str) -> bool) -> Option<String> {
    loop {
        if fits(&reason) {
            return Some(reason);
        }
        if reason.is_empty() {
            return None;
        }
        let mut keep = reason.len() / 2;
        while !reason.is_char_boundary(keep) {
            keep -= 1;
        }
        reason.truncate(keep);
    }
}

/// The shortest delay between reconnection attempts, whatever is configured.
const MIN_RECONNECT_DELAY: std::time::Duration = std::time::Duration::from_millis(1);

/// A reconnection delay: `initial` doubling per attempt up to `max`, with ±20% jitter (so that
/// clients cut off together do not come back together), and never under 1 ms. Saturates:
/// `Duration::MAX` is "as long as can be", not an overflow.
#[cfg_attr(
    not(any(feature = "mqtt", feature = "rabbitmq", feature = "redis")),
    allow(dead_code)
)]
pub(crate) fn reconnect_delay(
    (initial, max): (std::time::Duration, std::time::Duration),
    attempt: u32,
) -> std::time::Duration {
    // A broker that refuses at once must not be retried in a busy loop.
    let (initial, max) = (
        initial.max(MIN_RECONNECT_DELAY),
        max.max(MIN_RECONNECT_DELAY),
    );
    let base = initial.saturating_mul(1 << attempt.min(20)).min(max);
    let random =
        crate::rng::mix(crate::rng::SharedRng::entropy() ^ u64::from(attempt).rotate_left(17));
    let factor = 0.8 + 0.4 * crate::rng::unit_interval(random);
    std::time::Duration::try_from_secs_f64(base.as_secs_f64() * factor)
        .unwrap_or(max)
        .min(max)
}

/// The README's examples, compiled and run as doctests. They use every transport, so they live
/// here, where transport features are named (the core names none).
#[cfg(all(
    doctest,
    feature = "tcp",
    feature = "nats",
    feature = "rabbitmq",
    feature = "kafka"
))]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::reconnect_delay;
    use std::time::Duration;

    #[test]
    fn reconnect_delays_double_with_jitter_up_to_the_cap() {
        let limits = (Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..4 {
            let delay = reconnect_delay(limits, attempt).as_secs_f64() * 1000.0;
            let base = 100.0 * f64::from(1u32 << attempt);
            assert!(
                delay >= base * 0.8 - 1e-6 && delay <= base * 1.2 + 1e-6,
                "{delay}"
            );
        }
        assert!(reconnect_delay(limits, u32::MAX) <= Duration::from_secs(2));
    }

    /// A zero backoff would retry a broker that refuses at once in a busy loop: the delay is
    /// 1 ms at least, and still doubles from there.
    #[test]
    fn a_zero_backoff_still_waits_and_doubles() {
        let zero = (Duration::ZERO, Duration::ZERO);
        for attempt in [0, 1, 5, u32::MAX] {
            assert!(reconnect_delay(zero, attempt) >= Duration::from_micros(800));
        }
        let from_zero = (Duration::ZERO, Duration::from_secs(1));
        assert!(reconnect_delay(from_zero, 3) >= Duration::from_micros(6400));
    }

    /// `Duration::MAX` is "as long as can be": jitter above it saturates instead of panicking.
    #[test]
    fn a_delay_of_duration_max_saturates() {
        for attempt in [0, 1, 25, u32::MAX] {
            assert!(
                reconnect_delay((Duration::MAX, Duration::MAX), attempt)
                    > Duration::from_secs(1 << 40)
            );
            let capped = reconnect_delay((Duration::from_secs(1), Duration::MAX), attempt);
            assert!(capped <= Duration::from_secs(1 << 21), "{capped:?}");
        }
    }
}
