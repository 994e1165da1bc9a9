use super::publisher::Publisher;
use super::{DurableEvents, RedisOptions, reply_channel};
use crate::rpc::transport::{ReplyPacket, ServerTransport};
use crate::rpc::wire::{IncomingPacket, SharedCodec, decode_incoming};
use crate::rpc::{
    Dispatcher, Headers, RawJson, ReplySink, RpcError, SendError, Server, ServerHandle,
};
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A NestJS-compatible Redis server: one subscription per pattern, on its route string; replies
/// published on `<channel>.reply`.
///
/// The server subscribes to its [routes](crate::rpc::Routes): those of a
/// [`Router`](crate::rpc::Router), or those a layered service declares with
/// [`Server::with_routes`].
///
/// **Every server subscribed to a pattern handles every message on it** (Redis pub/sub has no
/// load balancing, NestJS neither): run one instance per Redis, or opt in to
/// [`single_responder`](Self::single_responder).
pub struct RedisServer {
    options: RedisOptions,
    single_responder: Option<SingleResponder>,
    durable: Option<DurableEvents>,
}

/// The lease of [`RedisServer::single_responder`].
#[derive(Clone, Debug)]
pub(super) struct SingleResponder {
    pub(super) key: String,
    pub(super) ttl: Duration,
}

impl RedisServer {
    /// A server connecting with `options`.
    pub fn new(options: RedisOptions) -> Self {
        RedisServer {
            options,
            single_responder: None,
            durable: None,
        }
    }

    /// Makes the instances of a service that share `name` answer each request once: they elect
    /// one responder through the lease key `palisade:responder:<name>` in Redis (`SET NX PX`,
    /// renewed every third of `ttl`); only the holder subscribes to the patterns, the others wait
    /// and try to take the lease every third of `ttl`. A responder that cannot renew the lease
    /// in time stops answering before the lease expires. When the responder shuts down it gives
    /// the lease up and another instance takes over within a third of `ttl`; when it crashes or
    /// loses Redis, once the lease expired (within `ttl` and a third). Requests meanwhile fail
    /// fast with `Unavailable` (no subscriber). This is failover, not load sharing: one instance
    /// does all the work. Without it, every instance answers every request.
    pub fn single_responder(mut self, name: impl AsRef<str>, ttl: Duration) -> Self {
        self.single_responder = Some(SingleResponder {
            key: format!("palisade:responder:{}", name.as_ref()),
            ttl: ttl.max(Duration::from_millis(30)),
        });
        self
    }

    /// Reads events from Redis Streams with a consumer group instead of pub/sub; see
    /// [`DurableEvents`].
    pub fn durable_events(mut self, durable: DurableEvents) -> Self {
        self.durable = Some(durable);
        self
    }

    async fn start(self, server: Server) -> Result<ServerHandle, RpcError> {
        let routes = server.routes().cloned().ok_or_else(|| {
            RpcError::invalid_argument(
                "a Redis server subscribes per pattern: serve a Router, or declare the patterns of \
                 another service with Server::with_routes",
            )
        })?;
        let events: Vec<Arc<str>> = routes.events().to_vec();
        let channels: BTreeSet<Arc<str>> = routes
            .messages()
            .iter()
            .cloned()
            .chain(events.iter().filter(|_| self.durable.is_none()).cloned())
            .collect();
        let channels: Vec<Arc<str>> = channels.into_iter().collect();
        let publisher = Publisher::new(self.options.clone());
        // Connect and subscribe once here, so that `serve` fails when Redis cannot be reached.
        let first = match &self.single_responder {
            None => Some(connect(&self.options, &channels, &publisher).await?),
            // A standby subscribes only once it holds the lease; checking Redis is reachable.
            Some(_) => {
                self.options.commands().await?;
                None
            }
        };
        let dispatcher = server.into_dispatcher("redis");
        if let Some(durable) = self.durable {
            super::durable::start(&self.options, &dispatcher, events, durable).await?;
        }
        let serving = Serving {
            options: self.options,
            channels,
            publisher,
            dispatcher: dispatcher.clone(),
        };
        match self.single_responder {
            None => {
                dispatcher.spawn(serving.run(first));
            }
            Some(lease) => {
                dispatcher.spawn(super::lease::run(serving, lease));
            }
        }
        Ok(ServerHandle::new(dispatcher))
    }
}

impl ServerTransport for RedisServer {
    /// Connects, subscribes and starts serving `server`. Fails with a clear error if Redis cannot
    /// be reached or refuses the credentials.
    fn serve(self, server: Server) -> impl Future<Output = Result<ServerHandle, RpcError>> + Send {
        self.start(server)
    }
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("options", &self.options)
            .field("single_responder", &self.single_responder)
            .field("durable", &self.durable)
            .finish()
    }
}

/// Opens a subscriber on `channels` and a publisher (stored in `publisher`).
async fn connect(
    options: &RedisOptions,
    channels: &[Arc<str>],
    publisher: &Publisher,
) -> Result<Subscribed, RpcError> {
    let (mut sink, stream) = options.subscriber().await?.split();
    let names: Vec<&str> = channels.iter().map(|c| &**c).collect();
    options.subscribe(&mut sink, &names).await?;
    let commands = options.commands().await?;
    publisher.set(Some(commands));
    tracing::debug!(channels = names.len(), "subscribed on Redis");
    Ok(Subscribed { sink, stream })
}

/// A subscriber connection: its command half (to unsubscribe) and its messages.
pub(super) struct Subscribed {
    sink: PubSubSink,
    stream: PubSubStream,
}

/// The channels served: each one's route, and the channel its replies go to.
type Routes<'a> = crate::rpc::key_hash::KeyMap<&'a str, (&'a Arc<str>, Arc<str>)>;

/// What a serving loop needs; the lease runs it while it holds the lease.
pub(super) struct Serving {
    pub(super) options: RedisOptions,
    channels: Vec<Arc<str>>,
    publisher: Arc<Publisher>,
    pub(super) dispatcher: Dispatcher,
}

/// Why a serving loop stopped.
pub(super) enum Stopped {
    Draining,
    /// Told to (the lease was lost).
    Told,
}

impl Serving {
    /// Serves until shutdown, reconnecting with backoff.
    async fn run(self, first: Option<Subscribed>) {
        self.serve_until(first, std::future::pending()).await;
    }

    /// Serves until shutdown or until `stop` resolves, reconnecting with backoff; unsubscribes
    /// (closes the subscriber) when it stops.
    pub(super) async fn serve_until(
        &self,
        mut stream: Option<Subscribed>,
        stop: impl Future<Output = ()>,
    ) -> Stopped {
        let routes: Routes<'_> = self
            .channels
            .iter()
            .map(|c| (&**c, (c, Arc::from(reply_channel(c)))))
            .collect();
        let mut draining = std::pin::pin!(self.dispatcher.draining());
        let mut stop = std::pin::pin!(stop);
        let mut attempt = 0u32;
        let mut health = self.options.health_timer();
        loop {
            let Some(messages) = stream.as_mut() else {
                // (Re)connect, with backoff after a failure.
                if attempt > 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(self.options.backoff(attempt - 1)) => {}
                        _ = &mut draining => return Stopped::Draining,
                        _ = &mut stop => return Stopped::Told,
                    }
                }
                tokio::select! {
                    connected = connect(&self.options, &self.channels, &self.publisher) => match connected {
                        Ok(connected) => {
                            if attempt > 0 {
                                tracing::info!("server reconnected to Redis");
                            }
                            attempt = 0;
                            stream = Some(connected);
                        }
                        Err(error) => {
                            tracing::debug!(%error, attempt, "server could not reconnect to Redis");
                            attempt = attempt.saturating_add(1);
                        }
                    },
                    _ = &mut draining => return Stopped::Draining,
                    _ = &mut stop => return Stopped::Told,
                }
                continue;
            };
            let message = if self.dispatcher.is_draining() {
                None
            } else {
                tokio::select! {
                    biased;
                    message = messages.stream.next() => Some(message),
                    _ = health.tick() => {
                        self.publisher.keep_alive();
                        // A Redis gone silent must not hold up shutdown for the PING's timeout.
                        tokio::select! {
                            healthy = self.options.healthy(&mut messages.sink) => {
                                if healthy {
                                    continue;
                                }
                                tracing::warn!("Redis did not answer the server's PING in time");
                                // As if the connection had closed: reconnect.
                                Some(None)
                            }
                            _ = &mut draining => None,
                        }
                    }
                    _ = &mut draining => None,
                    _ = &mut stop => {
                        self.step_down(stream.take(), &routes).await;
                        return Stopped::Told;
                    }
                }
            };
            let Some(message) = message else {
                self.step_down(stream.take(), &routes).await;
                return Stopped::Draining;
            };
            let Some(message) = message else {
                tracing::warn!(url = %self.options.url_text(), "server lost the connection to Redis; reconnecting");
                stream = None;
                self.publisher.set(None);
                attempt = 1;
                continue;
            };
            self.handle(&routes, &message).await;
        }
    }

    /// Stops taking messages without losing those already on their way: unsubscribes, then
    /// handles what arrived before Redis confirmed (during shutdown the dispatcher answers those
    /// requests `Unavailable`, rather than leaving their callers to time out).
    async fn step_down(&self, subscribed: Option<Subscribed>, routes: &Routes<'_>) {
        let Some(mut subscribed) = subscribed else {
            return;
        };
        let names: Vec<&str> = self.channels.iter().map(|c| &**c).collect();
        let unsubscribed =
            tokio::time::timeout(Duration::from_secs(2), subscribed.sink.unsubscribe(&names)).await;
        if !matches!(unsubscribed, Ok(Ok(()))) {
            tracing::debug!("could not unsubscribe cleanly; closing the subscriber connection");
            return;
        }
        // Everything published before the unsubscription is ahead of its confirmation.
        while let Some(Some(message)) = subscribed.stream.next().now_or_never() {
            self.handle(routes, &message).await;
        }
    }

    async fn handle(&self, routes: &Routes<'_>, message: &redis::Msg) {
        let channel = message.get_channel_name();
        let Some((route, reply_to)) = routes.get(channel) else {
            tracing::debug!(%channel, "message on a channel not subscribed to ignored");
            return;
        };
        let payload = Bytes::copy_from_slice(message.get_payload_bytes());
        let Some((payload, packet)) = incoming(self.options.shared_codec(), payload) else {
            tracing::warn!(%channel, codec = ?self.options.shared_codec(), "message dropped: unreadable with the server's codec");
            return;
        };
        let (request, id) = packet.into_request_on(route, &payload, Headers::new());
        let sink = id.map(|id| RedisSink {
            publisher: Arc::clone(&self.publisher),
            channel: Arc::clone(reply_to),
            id,
            done: false,
            codec: self.options.shared_codec().clone(),
        });
        self.dispatcher.dispatch(request, sink).await;
    }
}

/// Reads a message as NestJS does: a body that is not JSON is the data (as a string) of an
/// event on the channel (nestjs-wire-brokers.md §2.2).
pub(super) fn incoming(codec: &SharedCodec, payload: Bytes) -> Option<(Bytes, IncomingPacket)> {
    if !codec.is_json() {
        return codec
            .decode_incoming(&payload)
            .ok()
            .map(|packet| (payload, packet));
    }
    match decode_incoming(&payload) {
        Ok(packet) => Some((payload, packet)),
        Err(_) => {
            let text = std::str::from_utf8(&payload).ok()?;
            let quoted = Bytes::from(serde_json::to_vec(text).ok()?);
            let packet = decode_incoming(&quoted).ok()?;
            Some((quoted, packet))
        }
    }
}

struct RedisSink {
    publisher: Arc<Publisher>,
    channel: Arc<str>,
    id: RawJson,
    done: bool,
    codec: SharedCodec,
}

impl ReplySink for RedisSink {
    async fn send(&mut self, packet: ReplyPacket) -> Result<(), SendError> {
        if self.done {
            return Err(SendError::CallerGone);
        }
        self.done = packet.is_last();
        let body = self
            .codec
            .reply_body(&packet, Some(&self.id))
            .map_err(|error| {
                SendError::Failed(RpcError::internal_with(format!(
                    "cannot encode the reply: {error}"
                )))
            })?;
        match self.publisher.publish(&self.channel, &body).await {
            // Nobody listens on the reply channel any more: the caller is gone.
            Ok(0) => Err(SendError::CallerGone),
            Ok(_) => Ok(()),
            Err(error) => Err(SendError::Failed(error)),
        }
    }
}
