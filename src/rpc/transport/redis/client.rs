use super::publisher::Publisher;
use super::{RedisOptions, reply_channel};
use crate::rpc::transport::{ClientTransport, Connect, ReplyReceiver};
use crate::rpc::wire::{PendingRequests, SharedCodec};
use crate::rpc::{RpcError, RpcRequest, TransportErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use redis::aio::{PubSubSink, PubSubStream};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The client side of the Redis transport, before it is connected.
/// [`Client::builder().connect(..)`](crate::rpc::ClientBuilder::connect) connects it (a bad URL,
/// an unreachable Redis or refused credentials fail there with a clear error); [`RedisOptions`]
/// alone connects the same way.
///
/// ```no_run
/// use palisade::rpc::Client;
/// use palisade::rpc::transport::redis::{RedisOptions, RedisTransport};
///
/// # #[tokio::main] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let orders = Client::builder()
///     .connect(RedisTransport::new(RedisOptions::new("redis://127.0.0.1")).durable_events())
///     .await?;
/// orders.emit("order-created", &serde_json::json!({"id": 7})).await?; // XADD to a stream
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RedisTransport {
    options: RedisOptions,
    durable_events: bool,
}

impl RedisTransport {
    /// A transport connecting with `options`.
    pub fn new(options: RedisOptions) -> Self {
        RedisTransport {
            options,
            durable_events: false,
        }
    }

    /// Publishes events to Redis Streams (`XADD` to the stream named after the event's route)
    /// instead of pub/sub, for servers with [durable events](super::DurableEvents): each `emit`
    /// resolves once Redis stored the event, whether or not a server is running.
    pub fn durable_events(mut self) -> Self {
        self.durable_events = true;
        self
    }

    /// Connects.
    pub async fn connect(self) -> Result<RedisConnection, RpcError> {
        RedisConnection::connect(self.options, self.durable_events).await
    }
}

impl Connect for RedisTransport {
    type Transport = RedisConnection;

    async fn connect(self) -> Result<RedisConnection, RpcError> {
        RedisTransport::connect(self).await
    }
}

impl Connect for RedisOptions {
    type Transport = RedisConnection;

    async fn connect(self) -> Result<RedisConnection, RpcError> {
        RedisTransport::new(self).connect().await
    }
}

struct Shared {
    options: RedisOptions,
    pending: Arc<PendingRequests>,
    /// Cleared before the pending requests are failed on a connection loss, set once the
    /// subscriptions are restored: a request registered while it is set is either answered or
    /// failed by the loss.
    connected: AtomicBool,
    /// The routes whose reply channels are subscribed to, and when each was last asked for:
    /// restored on reconnection, unsubscribed once idle for `reply_idle` with no request waiting
    /// on them. Keyed by route, so that a request finds its reply channel subscribed without
    /// naming it.
    routes: Mutex<HashMap<Arc<str>, Instant>>,
    /// The command half of the current subscriber connection; `None` while reconnecting.
    /// Subscribing a new reply channel holds this lock, and so does restoring the subscriptions
    /// on a new connection, so that none is missed.
    link: tokio::sync::Mutex<Option<PubSubSink>>,
    /// The publishing connection of the current link.
    publisher: Arc<Publisher>,
    durable_events: bool,
}

/// Stops the supervisor when the last clone of the connection is dropped.
struct Owner {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A connected Redis client transport: requests published on their route's channel, replies read
/// from `<route>.reply` (one subscription per route, kept) and matched by id; events published on
/// their route's channel (or added to a stream, with [`RedisTransport::durable_events`]). Clones
/// share the connections.
#[derive(Clone)]
pub struct RedisConnection {
    owner: Arc<Owner>,
}

impl RedisConnection {
    async fn connect(options: RedisOptions, durable_events: bool) -> Result<Self, RpcError> {
        let shared = Arc::new(Shared {
            options: options.clone(),
            pending: PendingRequests::new(),
            connected: AtomicBool::new(false),
            routes: Mutex::new(HashMap::new()),
            link: tokio::sync::Mutex::new(None),
            publisher: Publisher::new(options.clone()),
            durable_events,
        });
        let replies = shared.establish().await?;
        let stop = CancellationToken::new();
        tokio::spawn(supervise(Arc::clone(&shared), replies, stop.clone()));
        Ok(RedisConnection {
            owner: Arc::new(Owner { shared, stop }),
        })
    }

    /// Replies dropped because their request was no longer waiting (it timed out, or its caller
    /// went away).
    pub fn late_replies(&self) -> u64 {
        self.owner.shared.pending.late_replies()
    }

    /// Whether the connection to Redis is up (`false` while reconnecting).
    pub fn is_connected(&self) -> bool {
        self.owner.shared.connected.load(Ordering::SeqCst)
    }
}

impl Shared {
    /// Opens both connections, subscribes every known reply channel and makes them the current
    /// link; returns the subscriber's message stream.
    async fn establish(&self) -> Result<PubSubStream, RpcError> {
        let (mut subscriber, stream) = self.options.subscriber().await?.split();
        let publisher = self.options.commands().await?;
        let mut link = self.link.lock().await;
        let channels: Vec<String> = self
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .map(|route| reply_channel(route))
            .collect();
        let names: Vec<&str> = channels.iter().map(String::as_str).collect();
        self.options.subscribe(&mut subscriber, &names).await?;
        self.publisher.set(Some(publisher));
        *link = Some(subscriber);
        self.connected.store(true, Ordering::SeqCst);
        Ok(stream)
    }

    /// Forgets the lost link and fails every request in flight.
    async fn lose(&self, why: &str) {
        self.connected.store(false, Ordering::SeqCst);
        self.publisher.set(None);
        *self.link.lock().await = None;
        self.pending.fail_all(&RpcError::transport(
            TransportErrorKind::ConnectionLost,
            format!("{why} (Redis at {})", self.options.url_text()),
        ));
    }

    fn check_connected(&self) -> Result<(), RpcError> {
        if self.connected.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(RpcError::transport(
                TransportErrorKind::NotConnected,
                format!(
                    "not connected to Redis at {} (reconnecting)",
                    self.options.url_text()
                ),
            ))
        }
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Instant>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes the reply channel of `route` once; later requests find it subscribed. Marks
    /// the route in use (before the request is registered: a route used this recently is not
    /// unsubscribed).
    async fn ensure_subscribed(&self, route: &Arc<str>) -> Result<(), RpcError> {
        let subscribed = || match self.routes().get_mut(route) {
            Some(used) => {
                *used = Instant::now();
                true
            }
            None => false,
        };
        if subscribed() {
            return Ok(());
        }
        let mut link = self.link.lock().await;
        if subscribed() {
            return Ok(());
        }
        let Some(subscriber) = link.as_mut() else {
            return Err(RpcError::transport(
                TransportErrorKind::NotConnected,
                format!(
                    "not connected to Redis at {} (reconnecting)",
                    self.options.url_text()
                ),
            ));
        };
        self.options
            .subscribe(subscriber, &[reply_channel(route).as_str()])
            .await?;
        self.routes().insert(Arc::clone(route), Instant::now());
        Ok(())
    }

    /// Unsubscribes the reply channels of the routes idle for `reply_idle`, but not of those a
    /// request waits on. Under the link's lock, as subscribing is: a request that finds its
    /// route gone subscribes it again after this.
    async fn drop_idle_routes(&self) {
        let mut link = self.link.lock().await;
        let Some(subscriber) = link.as_mut() else {
            return;
        };
        let waited_on = self.pending.waiting_routes();
        let idle: Vec<Arc<str>> = {
            let mut routes = self.routes();
            let now = Instant::now();
            let idle: Vec<Arc<str>> = routes
                .iter()
                .filter(|(route, used)| {
                    now.saturating_duration_since(**used) >= self.options.reply_idle
                        && !waited_on.contains(*route)
                })
                .map(|(route, _)| Arc::clone(route))
                .collect();
            for route in &idle {
                routes.remove(route);
            }
            idle
        };
        if idle.is_empty() {
            return;
        }
        let channels: Vec<String> = idle.iter().map(|route| reply_channel(route)).collect();
        let names: Vec<&str> = channels.iter().map(String::as_str).collect();
        let unsubscribed = tokio::time::timeout(
            self.options.response_timeout,
            subscriber.unsubscribe(&names),
        )
        .await;
        if !matches!(unsubscribed, Ok(Ok(()))) {
            // The connection is in trouble: the next one subscribes only the routes kept.
            tracing::debug!(
                routes = idle.len(),
                "could not unsubscribe idle reply channels"
            );
        }
    }
}

/// Reads replies; on a lost connection fails what is pending and reconnects with backoff.
async fn supervise(shared: Arc<Shared>, mut replies: PubSubStream, stop: CancellationToken) {
    let sweep = shared.options.reply_sweep();
    let mut sweeps = tokio::time::interval_at(tokio::time::Instant::now() + sweep, sweep);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut health = shared.options.health_timer();
        loop {
            tokio::select! {
                biased;
                message = replies.next() => match message {
                    Some(message) => deliver(&shared.pending, shared.options.shared_codec(), &message),
                    None => break,
                },
                _ = sweeps.tick() => shared.drop_idle_routes().await,
                _ = health.tick() => {
                    shared.publisher.keep_alive();
                    let sink = shared.link.lock().await.clone();
                    if let Some(mut sink) = sink
                        && !shared.options.healthy(&mut sink).await
                    {
                        tracing::warn!("Redis did not answer a PING in time");
                        break;
                    }
                }
                _ = stop.cancelled() => {
                    shared.pending.close(&RpcError::transport(
                        TransportErrorKind::ConnectionLost,
                        "the Redis client was dropped",
                    ));
                    return;
                }
            }
        }
        tracing::warn!(url = %shared.options.url_text(), "lost the connection to Redis; reconnecting");
        shared.lose("the connection to Redis was lost").await;
        let mut attempt = 0;
        replies = loop {
            tokio::select! {
                _ = tokio::time::sleep(shared.options.backoff(attempt)) => {}
                _ = stop.cancelled() => {
                    shared.pending.close(&RpcError::transport(
                        TransportErrorKind::ConnectionLost,
                        "the Redis client was dropped",
                    ));
                    return;
                }
            }
            match shared.establish().await {
                Ok(replies) => {
                    tracing::info!(url = %shared.options.url_text(), "reconnected to Redis");
                    break replies;
                }
                Err(error) => {
                    tracing::debug!(%error, attempt, "reconnecting to Redis failed");
                    *shared.link.lock().await = None;
                    attempt = attempt.saturating_add(1);
                }
            }
        };
    }
}

/// Routes one reply to the request waiting for it. Every client calling a pattern receives every
/// reply on its reply channel: ids this client did not make are someone else's and ignored.
fn deliver(pending: &PendingRequests, codec: &SharedCodec, message: &redis::Msg) {
    let payload = Bytes::copy_from_slice(message.get_payload_bytes());
    match codec.decode_reply(&payload) {
        Ok((Some(id), packet)) => {
            if let Some(n) = pending.ids().parse_json(id.as_bytes()) {
                pending.deliver(n, packet);
            }
        }
        Ok((None, _)) => tracing::debug!(
            channel = message.get_channel_name(),
            "a reply without id ignored"
        ),
        // Not attributable to a request: NestJS ignores these too.
        Err(error) => tracing::debug!(
            channel = message.get_channel_name(),
            %error,
            "an unreadable reply ignored (is its server using another codec?)"
        ),
    }
}

pub(super) fn body(
    codec: &SharedCodec,
    request: &RpcRequest,
    id: Option<&str>,
) -> Result<Bytes, RpcError> {
    codec
        .request_body_within(
            request.pattern().raw(),
            request.payload(),
            id,
            request.headers(),
            request.wire_timeout_millis(),
        )
        .map_err(|error| {
            RpcError::invalid_argument(format!(
                "cannot encode the message for '{}': {error}",
                request.pattern()
            ))
        })
}

impl ClientTransport for RedisConnection {
    fn request(&self, request: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>> {
        let shared = Arc::clone(&self.owner.shared);
        Box::pin(async move {
            shared.check_connected()?;
            let route = request.pattern().route();
            // Subscribed before publishing, or a quick reply would be published to nobody.
            shared
                .ensure_subscribed(request.pattern().route_arc())
                .await?;
            let registered = shared.pending.register(request.pattern())?;
            // Checked after registering: a loss from now on fails this request (see `connected`).
            shared.check_connected()?;
            let payload = body(
                shared.options.shared_codec(),
                &request,
                Some(registered.id().as_str()),
            )?;
            let receivers = shared.publisher.publish(route, &payload).await?;
            if receivers == 0 {
                // NestJS's caller would wait for its timeout; Redis already told us.
                return Err(RpcError::transport(
                    TransportErrorKind::NoResponders,
                    format!(
                        "There are no subscribers listening to that message (\"{route}\"): \
                         no server subscribed to this pattern on Redis (not running, or a wrong pattern)"
                    ),
                ));
            }
            Ok(registered.into_replies())
        })
    }

    fn emit(&self, event: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>> {
        let shared = Arc::clone(&self.owner.shared);
        Box::pin(async move {
            shared.check_connected()?;
            let route = event.pattern().route();
            let payload = body(shared.options.shared_codec(), &event, None)?;
            if shared.durable_events {
                return shared
                    .publisher
                    .add(route, super::BODY_FIELD, &payload)
                    .await;
            }
            let receivers = shared.publisher.publish(route, &payload).await?;
            if receivers == 0 {
                // As NestJS: an event nobody listens to is dropped.
                tracing::debug!(%route, "event published to no subscriber");
            }
            Ok(())
        })
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.owner.shared;
        f.debug_struct("RedisConnection")
            .field("options", &shared.options)
            .field("connected", &shared.connected.load(Ordering::Relaxed))
            .field("pending", &shared.pending.len())
            .finish_non_exhaustive()
    }
}
