//! NestJS's `Transport.RMQ` over RabbitMQ with the `lapin` client (feature `rabbitmq`).
//!
//! # NestJS-compatible
//!
//! On the wire this is exactly NestJS 11's RabbitMQ transport, so palisade services and NestJS
//! services on the same broker call each other in both directions:
//!
//! - **one named queue carries every pattern** ([`RmqOptions::queue`]); the server routes on the
//!   body's `pattern`, normalised as NestJS does (object patterns in any key order);
//! - a request is `{"pattern","data","id"}` published to that queue with the AMQP properties
//!   `reply_to` (RabbitMQ's direct reply-to pseudo-queue `amq.rabbitmq.reply-to` by default) and
//!   `correlation_id` (the packet id); replies are NestJS's reply packets **without `id`**,
//!   published to the request's `reply_to` with its `correlation_id`, one message per value of a
//!   stream and a last `{"isDisposed":true}`;
//! - a request for a pattern no handler takes gets NestJS's no-handler reply (as on TCP), and an
//!   event is `{"pattern","data"}` without `reply_to`;
//! - NestJS's options keep their names and meaning: `queue`, `queueOptions`
//!   ([`QueueOptions`]), `prefetchCount`, `isGlobalPrefetchCount`, `noAck`, `persistent`,
//!   `headers`, `replyQueue`, `consumerTag`, `noAssert`, and the exchange modes (`exchange`,
//!   `exchangeType`, `exchangeArguments`, `routingKey`, `wildcards`; see [`RmqOptions::exchange`]).
//!
//! Several servers on one queue are competing consumers: each message is handled by one of them.
//!
//! ```no_run
//! use palisade::rpc::transport::rabbitmq::{EventRetries, RmqOptions, RmqServer};
//! use palisade::rpc::{Client, Router, Server};
//!
//! # #[tokio::main] async fn main() -> Result<(), palisade::rpc::RpcError> {
//! let options = RmqOptions::new(["amqp://guest:guest@127.0.0.1:5672/%2f"])
//!     .queue("orders")
//!     .prefetch_count(16);
//! let router = Router::new()
//!     .message("ping", || async { "pong" })
//!     .event("order-created", || async {});
//! let server = Server::new(router)
//!     .serve(RmqServer::new(options.clone()).event_retries(EventRetries::new().max_deliveries(5)))
//!     .await?;
//!
//! let client = Client::builder().connect(options).await?;
//! let pong: String = client.send("ping", &()).await?;
//! assert_eq!(pong, "pong");
//! client.emit("order-created", &serde_json::json!({"id": 7})).await?; // RabbitMQ has it
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Beyond NestJS
//!
//! The defaults are chosen for work queues that must not lose a message; where they differ from
//! NestJS's, the NestJS value is one option away (the table is on [`RmqOptions`]):
//!
//! - **Acknowledgements after the work is done** (`no_ack(false)`, NestJS's default is
//!   `noAck: true`). A message is acknowledged only once its handler finished: a request once
//!   its caller has its last reply, an event once every handler succeeded. The prefetch count
//!   (32 by default) bounds the messages in flight per server. At shutdown the server stops
//!   consuming, hands the messages it had not started back to the queue, and lets the running ones
//!   finish within the grace period; nothing is acknowledged that was not done (an event whose
//!   handler was cancelled goes back to the queue). A request whose handler the grace period
//!   cancelled is acknowledged all the same: its caller was answered `Unavailable` and decides
//!   whether to retry — handing it back too would run it a second time behind the caller's back.
//! - **Failing events are retried with backoff, then dead-lettered** ([`EventRetries`]): the event
//!   waits in a delay queue per backoff step (`<queue>.retry.<ms>`, a TTL queue that dead-letters
//!   back into the service's queue), and after the last delivery it is published to a dead-letter
//!   exchange with why in its headers ([`DEAD_LETTER_REASON`], ...) — the same headers as the NATS
//!   transport's durable events. An event no handler takes, or whose body is not JSON, is
//!   dead-lettered at once.
//! - **Publisher confirms and `mandatory` publishing**: `emit` resolves only once the broker has
//!   the event (and `Client::send` only sends once the broker routed the request); a message no
//!   queue receives is an error (`Unavailable`, [`NoResponders`]), not a silent drop.
//! - **Durability**: the queue is durable (NestJS's default too) and events are published
//!   persistent ([`RmqOptions::persistent_events`]); requests are transient unless
//!   [`persistent`](RmqOptions::persistent), as in NestJS.
//! - **Reconnection**: client and server reconnect with backoff and restore their channels,
//!   topology and consumers. When the connection (or the channel replies come through) is lost,
//!   every request in flight fails at once with `Unavailable` ([`ConnectionLost`]); while
//!   reconnecting, new requests fail fast ([`NotConnected`]).
//! - The deadline travels as the `palisade-timeout-ms` header and as the message's AMQP
//!   `expiration`, so a request whose caller gave up expires in the queue instead of being
//!   handled; other headers (and a W3C `traceparent`) travel as AMQP headers. The header is the
//!   time left when the request was published: the server counts it from delivery, so a request
//!   that waited in the queue for part of its budget is handled with the whole budget again
//!   (hosts' clocks need not agree).
//! - A message over [`max_message_size`](RmqOptions::max_message_size) is refused before it is
//!   sent (`InvalidArgument`); a reply over it becomes an error reply saying so. A message the
//!   broker refuses for its size (its own limit is lower) is the only one told it is too large:
//!   the refusal closes the channel, and requests in flight on it fail as `Unavailable` (worth
//!   retrying, though one published just before the refused message may have been delivered)
//!   while replies are sent again on a fresh channel. Each side then holds messages to
//!   the broker's limit, named in its refusal.
//!
//! TLS (`amqps://`) needs one of `lapin`'s TLS features: add `lapin` with, say, `features =
//! ["rustls"]` to your own dependencies and Cargo turns it on for palisade's connection too.
//!
//! [`NoResponders`]: crate::rpc::TransportErrorKind::NoResponders
//! [`ConnectionLost`]: crate::rpc::TransportErrorKind::ConnectionLost
//! [`NotConnected`]: crate::rpc::TransportErrorKind::NotConnected

mod client;
mod retry;
mod server;

pub use self::client::{RmqConnection, RmqTransport};
pub use self::retry::{
    DEAD_LETTER_DELIVERIES, DEAD_LETTER_QUEUE, DEAD_LETTER_REASON, DEAD_LETTER_SUBJECT,
    EventRetries,
};
pub use self::server::RmqServer;
/// The `lapin` client this transport is built on, for what goes beyond it (inspecting queues,
/// publishing with properties of your own) with the same version.
pub use lapin;

use crate::rpc::wire::{Codec, SharedCodec};
use crate::rpc::{Code, Headers, Pattern, RpcError, TransportErrorKind};
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// The longest time to live palisade gives RabbitMQ, for a message's `expiration` as for a
/// queue's `x-message-ttl`: 2³² − 1 ms (about 49.7 days), the most every RabbitMQ version takes
/// (older ones stop there, newer ones at 3650 days). A longer one is refused
/// (`PRECONDITION_FAILED`, a channel error).
pub(crate) const MAX_TTL: Duration = Duration::from_millis(4_294_967_295);

/// RabbitMQ's direct reply-to pseudo-queue: replies come straight to the requesting channel.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The kind of exchange of the exchange modes ([`RmqOptions::exchange`]); NestJS's
/// `exchangeType`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExchangeType {
    /// Routing key equals the binding key.
    Direct,
    /// Every bound queue gets every message.
    Fanout,
    /// Binding keys with `*` (one word) and `#` (any words) wildcards, `.`-separated; NestJS's
    /// default.
    #[default]
    Topic,
    /// Routing on message headers.
    Headers,
}

impl ExchangeType {
    fn kind(self) -> lapin::ExchangeKind {
        match self {
            ExchangeType::Direct => lapin::ExchangeKind::Direct,
            ExchangeType::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeType::Topic => lapin::ExchangeKind::Topic,
            ExchangeType::Headers => lapin::ExchangeKind::Headers,
        }
    }
}

/// How the queue is declared: NestJS's `queueOptions` (amqplib's `assertQueue` options).
///
/// The defaults are amqplib's: a durable queue, neither exclusive nor auto-deleted, no arguments.
/// Every client and server declaring a queue must declare it the same way, or RabbitMQ refuses
/// with `PRECONDITION_FAILED` (inequivalent arguments); [`no_assert`](Self::no_assert) skips
/// declaring it at all.
///
/// ```
/// use palisade::rpc::transport::rabbitmq::QueueOptions;
/// use serde_json::json;
///
/// let options = QueueOptions::default()
///     .arguments(json!({"x-queue-type": "quorum", "x-max-length": 100_000}));
/// # let _ = options;
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct QueueOptions {
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
    arguments: serde_json::Map<String, Value>,
    no_assert: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: serde_json::Map::new(),
            no_assert: false,
        }
    }
}

impl QueueOptions {
    /// Whether the queue survives a broker restart (default `true`).
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Whether the queue belongs to the declaring connection alone (default `false`).
    pub fn exclusive(mut self, exclusive: bool) -> Self {
        self.exclusive = exclusive;
        self
    }

    /// Whether the queue is deleted when its last consumer goes (default `false`).
    pub fn auto_delete(mut self, auto_delete: bool) -> Self {
        self.auto_delete = auto_delete;
        self
    }

    /// Queue arguments (`x-message-ttl`, `x-queue-type`, `x-dead-letter-exchange`, ...), a JSON
    /// object: strings, integers, floats, booleans, arrays and objects become their AMQP types.
    ///
    /// # Panics
    /// If `arguments` is not a JSON object.
    pub fn arguments(mut self, arguments: Value) -> Self {
        match arguments {
            Value::Object(map) => self.arguments = map,
            other => panic!("queue arguments must be a JSON object, got {other}"),
        }
        self
    }

    /// Does not declare the queue; it must exist (NestJS's `noAssert`).
    pub fn no_assert(mut self, no_assert: bool) -> Self {
        self.no_assert = no_assert;
        self
    }

    fn declare_options(&self) -> lapin::options::QueueDeclareOptions {
        lapin::options::QueueDeclareOptions {
            durable: self.durable,
            exclusive: self.exclusive,
            auto_delete: self.auto_delete,
            ..Default::default()
        }
    }

    /// Whether the queue is durable.
    pub(crate) fn is_durable(&self) -> bool {
        self.durable
    }
}

/// How to reach RabbitMQ and which queue and exchange to use: NestJS's `RmqOptions`, shared by
/// [`RmqServer`] and [`RmqTransport`] (a client can connect with the options alone).
///
/// | option | NestJS | NestJS default | palisade default |
/// | --- | --- | --- | --- |
/// | [`new`](Self::new) | `urls` | `amqp://localhost` | (required) |
/// | [`queue`](Self::queue) | `queue` | `''` (a server-named queue no client can address) | `''`: name it |
/// | [`queue_options`](Self::queue_options) | `queueOptions` | durable | durable |
/// | [`prefetch_count`](Self::prefetch_count) | `prefetchCount`, `isGlobalPrefetchCount` | 0 (unbounded), per consumer | **32**, per consumer |
/// | [`no_ack`](Self::no_ack) | `noAck` | `true` (acknowledged on delivery) | **`false`** (acknowledged when done) |
/// | [`persistent`](Self::persistent) | `persistent` | `false` | `false` |
/// | [`persistent_events`](Self::persistent_events) | — | (as `persistent`) | **`true`** |
/// | [`headers`](Self::headers) | `headers` | none | none |
/// | [`reply_queue`](Self::reply_queue) | `replyQueue` | `amq.rabbitmq.reply-to` | `amq.rabbitmq.reply-to` |
/// | [`consumer_tag`](Self::consumer_tag) | `consumerTag` | broker-made | broker-made |
/// | [`exchange`](Self::exchange) and friends | `exchange`, `exchangeType`, `exchangeArguments`, `routingKey`, `wildcards` | none (default exchange), `topic` | the same |
/// | [`heartbeat`](Self::heartbeat) | `socketOptions.heartbeatIntervalInSeconds` | 5 s | 5 s |
/// | [`reconnect_backoff`](Self::reconnect_backoff) | `socketOptions.reconnectTimeInSeconds` | 5 s | 100 ms doubling to 5 s |
/// | [`connection_timeout`](Self::connection_timeout) | — | — | 5 s |
/// | [`max_message_size`](Self::max_message_size) | — | — | 16 MiB |
///
/// ```no_run
/// use palisade::rpc::transport::rabbitmq::{QueueOptions, RmqOptions};
/// use std::time::Duration;
///
/// let options = RmqOptions::new(["amqp://app:s3cret@rabbit-1:5672/orders", "amqp://app:s3cret@rabbit-2:5672/orders"])
///     .queue("orders")
///     .queue_options(QueueOptions::default().durable(true))
///     .prefetch_count(16)
///     .connection_name("billing")
///     .heartbeat(Duration::from_secs(10));
/// # let _ = options;
/// ```
#[derive(Clone)]
pub struct RmqOptions {
    urls: Vec<String>,
    queue: String,
    queue_options: QueueOptions,
    prefetch_count: u16,
    global_prefetch: bool,
    no_ack: bool,
    persistent: bool,
    persistent_events: bool,
    headers: Headers,
    reply_queue: String,
    consumer_tag: Option<String>,
    exchange: Option<String>,
    exchange_type: ExchangeType,
    exchange_type_set: bool,
    exchange_arguments: serde_json::Map<String, Value>,
    routing_key: Option<String>,
    wildcards: bool,
    connection_name: Option<String>,
    heartbeat: Duration,
    connection_timeout: Duration,
    reconnect: (Duration, Duration),
    max_message_size: usize,
    codec: SharedCodec,
}

impl RmqOptions {
    /// Options for these broker URLs (`amqp://user:password@host:port/vhost`, the virtual host
    /// percent-encoded: `%2f` is `/`), tried in order at each connection attempt.
    pub fn new<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        RmqOptions {
            urls: urls.into_iter().map(Into::into).collect(),
            queue: String::new(),
            queue_options: QueueOptions::default(),
            prefetch_count: 32,
            global_prefetch: false,
            no_ack: false,
            persistent: false,
            persistent_events: true,
            headers: Headers::new(),
            reply_queue: DIRECT_REPLY_TO.to_owned(),
            consumer_tag: None,
            exchange: None,
            exchange_type: ExchangeType::Topic,
            exchange_type_set: false,
            exchange_arguments: serde_json::Map::new(),
            routing_key: None,
            wildcards: false,
            connection_name: None,
            heartbeat: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(5),
            reconnect: (Duration::from_millis(100), Duration::from_secs(5)),
            max_message_size: 16 * 1024 * 1024,
            codec: SharedCodec::default(),
        }
    }

    /// How message bodies are written and read: NestJS's JSON packets
    /// ([`JsonCodec`](crate::rpc::wire::JsonCodec), the default), or another [`Codec`] such as
    /// [`MessagePackCodec`](crate::rpc::wire::MessagePackCodec) (feature `msgpack`) where every
    /// client and server of the queue is palisade with the same codec.
    pub fn codec(mut self, codec: impl Codec) -> Self {
        self.codec = SharedCodec::new(codec);
        self
    }

    /// The queue every pattern goes through: servers consume it, clients publish to it.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// How the queue is declared (NestJS's `queueOptions`).
    pub fn queue_options(mut self, options: QueueOptions) -> Self {
        self.queue_options = options;
        self
    }

    /// How many unacknowledged messages a server takes at once (default 32; 0 is unbounded, as
    /// NestJS's default). With acknowledgements on, this bounds the handlers running per server.
    pub fn prefetch_count(mut self, count: u16) -> Self {
        self.prefetch_count = count;
        self
    }

    /// Applies the prefetch count to the whole channel instead of the consumer (NestJS's
    /// `isGlobalPrefetchCount`; default `false`).
    pub fn global_prefetch(mut self, global: bool) -> Self {
        self.global_prefetch = global;
        self
    }

    /// Lets the broker consider a message acknowledged as soon as it is delivered (NestJS's
    /// default, `noAck: true`): faster, but a message whose handler fails, or that a crashing
    /// server was handling, is lost, and events are not retried. palisade's default is `false`:
    /// acknowledged after the handler finished.
    pub fn no_ack(mut self, no_ack: bool) -> Self {
        self.no_ack = no_ack;
        self
    }

    /// Publishes every message persistent (delivery mode 2, stored on disk by a durable queue):
    /// NestJS's `persistent`, default `false`.
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// Publishes events persistent even when [`persistent`](Self::persistent) is off (default
    /// `true`): a durable queue keeps them across a broker restart.
    pub fn persistent_events(mut self, persistent: bool) -> Self {
        self.persistent_events = persistent;
        self
    }

    /// AMQP headers added to every message a client sends (NestJS's `headers`).
    pub fn headers<K: Into<String>, V: Into<String>>(
        mut self,
        headers: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (key, value) in headers {
            self.headers.insert(key.into(), value);
        }
        self
    }

    /// Where replies come to (NestJS's `replyQueue`): RabbitMQ's direct reply-to by default. A
    /// named queue must exist, and must not be shared by clients that are not meant to see each
    /// other's replies (they are dropped as late by the client they do not belong to).
    pub fn reply_queue(mut self, queue: impl Into<String>) -> Self {
        self.reply_queue = queue.into();
        self
    }

    /// The server's consumer tag (NestJS's `consumerTag`; default: made by the broker).
    pub fn consumer_tag(mut self, tag: impl Into<String>) -> Self {
        self.consumer_tag = Some(tag.into());
        self
    }

    /// Exchange mode: the server declares this exchange (durable, of
    /// [`exchange_type`](Self::exchange_type)) and binds its queue to it with the
    /// [`routing_key`](Self::routing_key) (or `''` for a fanout exchange). Clients keep sending to
    /// the queue, except with [`wildcards`](Self::wildcards) or a fanout exchange: then they
    /// publish to the exchange with the pattern as routing key (a string as it is, an object as
    /// its JSON). NestJS's `exchange`; §4.3 of the NestJS wire notes.
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = Some(exchange.into());
        self
    }

    /// The exchange's type (NestJS's `exchangeType`, default topic).
    pub fn exchange_type(mut self, kind: ExchangeType) -> Self {
        self.exchange_type = kind;
        self.exchange_type_set = true;
        self
    }

    /// Arguments of the exchange's declaration (NestJS's `exchangeArguments`), a JSON object.
    ///
    /// # Panics
    /// If `arguments` is not a JSON object.
    pub fn exchange_arguments(mut self, arguments: Value) -> Self {
        match arguments {
            Value::Object(map) => self.exchange_arguments = map,
            other => panic!("exchange arguments must be a JSON object, got {other}"),
        }
        self
    }

    /// The binding key of the queue to the exchange (NestJS's `routingKey`).
    pub fn routing_key(mut self, key: impl Into<String>) -> Self {
        self.routing_key = Some(key.into());
        self
    }

    /// Wildcard mode (NestJS's `wildcards`): the exchange (by default named after the queue) is a
    /// topic exchange, the server binds its queue with every handler's pattern as binding key,
    /// and a handler whose pattern has RabbitMQ wildcards (`*` one word, `#` any words, `.`
    /// between words) takes the messages no exact pattern takes; clients publish to the exchange
    /// with the pattern as routing key.
    pub fn wildcards(mut self, wildcards: bool) -> Self {
        self.wildcards = wildcards;
        self
    }

    /// The connection name the broker shows (management UI, `rabbitmqctl list_connections`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// The heartbeat interval asked of the broker (default 5 s, as NestJS): a silent peer is
    /// declared dead after two missed beats. Whole seconds from 1 s to 65 535 s: zero (which
    /// AMQP reads as "no heartbeats") is taken as 1 s, since a connection without heartbeats
    /// would never notice a broker that went silent. A `heartbeat` in the URL's query wins.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// How long connecting may take before the attempt fails (default 5 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Delays between reconnection attempts: `initial`, doubling (with ±20% jitter) up to `max`
    /// (default 100 ms up to 5 s). A delay under 1 ms is taken as 1 ms, so that a broker
    /// refusing at once is not retried in a busy loop.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.reconnect = (initial, max.max(initial));
        self
    }

    /// The largest message body sent, in bytes (default 16 MiB, RabbitMQ 4's default
    /// `max_message_size`; RabbitMQ 3 allows 128 MiB). Set it to the broker's limit: a larger
    /// message is refused here (`InvalidArgument`, never retried) instead of by the broker, which
    /// closes the channel — and with it every request waiting for replies on it. After such a
    /// refusal the client and server hold messages to the limit the broker named.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    fn exchange_mode(&self) -> bool {
        self.exchange.is_some() || self.wildcards
    }

    /// The exchange of the exchange modes: the option, or the queue's name.
    fn exchange_name(&self) -> &str {
        self.exchange.as_deref().unwrap_or(&self.queue)
    }

    /// Whether clients publish to the exchange (wildcards or fanout) instead of the queue.
    fn publishes_to_exchange(&self) -> bool {
        self.wildcards || (self.exchange_type_set && self.exchange_type == ExchangeType::Fanout)
    }

    fn backoff(&self, attempt: u32) -> Duration {
        super::reconnect_delay(self.reconnect, attempt)
    }

    fn urls_text(&self) -> String {
        self.urls
            .iter()
            .map(|url| redact(url))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Connects to the first URL that answers.
    pub(crate) async fn open_connection(&self, role: &str) -> Result<lapin::Connection, RpcError> {
        if self.urls.is_empty() {
            return Err(RpcError::invalid_argument("no RabbitMQ URL given"));
        }
        let mut last = None;
        for url in &self.urls {
            let mut uri: lapin::uri::AMQPUri = url.parse().map_err(|error| {
                RpcError::invalid_argument(format!(
                    "invalid RabbitMQ URL {:?}: {error}",
                    redact(url)
                ))
            })?;
            if uri.query.heartbeat.is_none() {
                uri.query.heartbeat = Some(self.heartbeat.as_secs().clamp(1, 65_535) as u16);
            }
            if uri.query.connection_timeout.is_none() {
                uri.query.connection_timeout =
                    Some(u64::try_from(self.connection_timeout.as_millis()).unwrap_or(u64::MAX));
            }
            // lapin 4.12 leaves two tasks behind for every attempt whose TCP connection is
            // refused (its internal RPC task keeps itself alive): reconnecting to a broker that is
            // down would pile them up. A plain TCP connection first tells whether anything
            // listens.
            let host = uri
                .authority
                .host
                .trim_start_matches('[')
                .trim_end_matches(']');
            let reachable = tokio::time::timeout(
                self.connection_timeout,
                tokio::net::TcpStream::connect((host, uri.authority.port)),
            )
            .await;
            match reachable {
                Ok(Ok(probe)) => drop(probe),
                Ok(Err(error)) => {
                    last = Some(RpcError::transport(
                        TransportErrorKind::Connect,
                        format!("cannot connect to RabbitMQ at {}: {error}", redact(url)),
                    ));
                    continue;
                }
                Err(_) => {
                    last = Some(RpcError::transport(
                        TransportErrorKind::Connect,
                        format!(
                            "cannot connect to RabbitMQ at {}: no answer within {:?}",
                            redact(url),
                            self.connection_timeout
                        ),
                    ));
                    continue;
                }
            }
            let name = self
                .connection_name
                .clone()
                .unwrap_or_else(|| format!("palisade {role}"));
            let properties =
                lapin::ConnectionProperties::default().with_connection_name(name.into());
            let connecting = lapin::Connection::connect_uri(uri, properties);
            match tokio::time::timeout(self.connection_timeout, connecting).await {
                Ok(Ok(connection)) => return Ok(connection),
                Ok(Err(error)) => last = Some(connect_error(&redact(url), &error)),
                Err(_) => {
                    last = Some(RpcError::transport(
                        TransportErrorKind::Connect,
                        format!(
                            "cannot connect to RabbitMQ at {}: no answer within {:?}",
                            redact(url),
                            self.connection_timeout
                        ),
                    ))
                }
            }
        }
        Err(last.expect("at least one URL was tried"))
    }

    /// Checks what can be checked before connecting.
    fn validate(&self) -> Result<(), RpcError> {
        for (what, name) in [("queue", &self.queue), ("reply queue", &self.reply_queue)] {
            short_string(name, what)?;
        }
        if let Some(exchange) = &self.exchange {
            short_string(exchange, "exchange")?;
        }
        if let Some(key) = &self.routing_key {
            short_string(key, "routing key")?;
        }
        Ok(())
    }

    /// Declares the queue (unless `no_assert`); returns its name (the broker's for `''`).
    async fn declare_queue(&self, channel: &lapin::Channel) -> Result<String, RpcError> {
        if self.queue_options.no_assert && !self.queue.is_empty() {
            return Ok(self.queue.clone());
        }
        let queue = channel
            .queue_declare(
                self.queue.as_str().into(),
                self.queue_options.declare_options(),
                field_table(&self.queue_options.arguments),
            )
            .await
            .map_err(|error| {
                declare_error(
                    &format!("cannot declare the queue {:?}", self.queue),
                    &error,
                )
            })?;
        Ok(queue.name().as_str().to_owned())
    }

    /// Declares the exchange of the exchange modes.
    async fn declare_exchange(&self, channel: &lapin::Channel) -> Result<(), RpcError> {
        let name = self.exchange_name();
        channel
            .exchange_declare(
                name.into(),
                self.exchange_type.kind(),
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                field_table(&self.exchange_arguments),
            )
            .await
            .map_err(|error| {
                declare_error(&format!("cannot declare the exchange {name:?}"), &error)
            })
    }
}

impl fmt::Debug for RmqOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Passwords in URLs stay out of logs.
        f.debug_struct("RmqOptions")
            .field("urls", &self.urls_text())
            .field("queue", &self.queue)
            .field("queue_options", &self.queue_options)
            .field("prefetch_count", &self.prefetch_count)
            .field("no_ack", &self.no_ack)
            .field("persistent", &self.persistent)
            .field("exchange", &self.exchange)
            .field("exchange_type", &self.exchange_type)
            .field("routing_key", &self.routing_key)
            .field("wildcards", &self.wildcards)
            .field("reply_queue", &self.reply_queue)
            .finish_non_exhaustive()
    }
}

/// `amqp://user:password@host` with the password replaced.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A name AMQP carries as a short string (at most 255 bytes).
fn short_string(text: &str, what: &str) -> Result<ShortString, RpcError> {
    ShortString::try_new(text).map_err(|_| {
        RpcError::transport(
            TransportErrorKind::InvalidRoute,
            format!(
                "the {what} {:?}… is {} bytes long; AMQP allows 255",
                text.chars().take(32).collect::<String>(),
                text.len()
            ),
        )
    })
}

/// The routing key NestJS's client publishes a pattern with in the exchange modes: a string
/// pattern as it is, any other as its JSON (`JSON.stringify` of the raw pattern).
fn routing_key_of(pattern: &Pattern) -> &str {
    if pattern.is_string() {
        pattern.route()
    } else {
        pattern.raw().as_str()
    }
}

/// A JSON value as an AMQP field value.
fn amqp_value(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            // A u64 beyond i64: AMQP has no wider signed type RabbitMQ reads.
            (None, None) => AMQPValue::LongString(n.to_string().into()),
        },
        Value::String(s) => AMQPValue::LongString(s.as_str().into()),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(amqp_value).collect::<Vec<_>>(),
        )),
        Value::Object(map) => AMQPValue::FieldTable(field_table(map)),
    }
}

/// A JSON object as an AMQP field table (keys longer than 255 bytes are left out).
fn field_table(map: &serde_json::Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in map {
        if let Ok(key) = ShortString::try_new(key.as_str()) {
            table.insert(key, amqp_value(value));
        }
    }
    table
}

/// palisade headers as AMQP headers (`None` when there are none).
fn to_amqp_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Option<FieldTable>, RpcError> {
    let mut table = FieldTable::default();
    for (key, value) in headers {
        // A header name is an AMQP short string; a longer one is refused rather than dropped.
        let key = ShortString::try_new(key).map_err(|_| {
            RpcError::invalid_argument(format!(
                "the header name {:?}… is {} bytes long; AMQP allows 255",
                key.chars().take(32).collect::<String>(),
                key.len()
            ))
        })?;
        table.insert(key, AMQPValue::LongString(value.into()));
    }
    Ok((!table.inner().is_empty()).then_some(table))
}

/// AMQP headers as palisade headers: strings as they are, numbers and booleans as text; other
/// values (tables, arrays, bytes) are left out.
fn from_amqp_headers(table: Option<&FieldTable>) -> Headers {
    let Some(table) = table else {
        return Headers::new();
    };
    let headers = table.inner().iter().filter_map(|(key, value)| {
        let text = match value {
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            AMQPValue::ShortString(s) => s.as_str().to_owned(),
            AMQPValue::Boolean(b) => b.to_string(),
            AMQPValue::ShortShortInt(n) => n.to_string(),
            AMQPValue::ShortShortUInt(n) => n.to_string(),
            AMQPValue::ShortInt(n) => n.to_string(),
            AMQPValue::ShortUInt(n) => n.to_string(),
            AMQPValue::LongInt(n) => n.to_string(),
            AMQPValue::LongUInt(n) => n.to_string(),
            AMQPValue::LongLongInt(n) => n.to_string(),
            AMQPValue::Timestamp(n) => n.to_string(),
            AMQPValue::Float(n) => n.to_string(),
            AMQPValue::Double(n) => n.to_string(),
            _ => return None,
        };
        Some((key.as_str().to_owned(), text))
    });
    headers.collect()
}

/// The text of an AMQP error, for messages.
fn describe(error: &lapin::Error) -> String {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().as_str().to_owned(),
        _ => error.to_string(),
    }
}

/// The soft (channel) error of `error`, if it is one.
fn soft_error(error: &lapin::Error) -> Option<lapin::protocol::AMQPSoftError> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            lapin::protocol::AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Publishes with `publish` (a `basic_publish` on a channel in confirm mode) so that the
/// delivery tag lapin numbers its confirm with is the one the broker gives the message. lapin
/// takes the tag and queues the message's frames in two steps, both in the first poll of
/// `basic_publish`: two tasks publishing on one channel at once could queue their frames in the
/// other order than their tags, and each would get the other's confirm — a message the broker
/// refused reported as confirmed (its caller waiting out its deadline), the refusal given to
/// its neighbour. That first poll is taken under `order`, one per channel.
pub(crate) async fn publish_in_order<F: std::future::Future>(
    order: &std::sync::Mutex<()>,
    publish: F,
) -> F::Output {
    let mut publish = std::pin::pin!(publish);
    let mut first = true;
    std::future::poll_fn(|cx| {
        if std::mem::take(&mut first) {
            let _order = order
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            return publish.as_mut().poll(cx);
        }
        publish.as_mut().poll(cx)
    })
    .await
}

/// The largest message body the broker takes, as far as this side knows: the configured
/// [`max_message_size`](RmqOptions::max_message_size), lowered to the broker's own limit once
/// the broker refused a message for its size. Such a refusal closes the channel, and with it
/// every other message in flight on it: a body over the learned limit is refused here instead.
#[derive(Debug)]
pub(crate) struct SizeLimit {
    configured: usize,
    /// The limit the broker named in a refusal (`usize::MAX` until one came).
    broker: std::sync::atomic::AtomicUsize,
}

impl SizeLimit {
    pub(crate) fn new(configured: usize) -> Self {
        SizeLimit {
            configured,
            broker: std::sync::atomic::AtomicUsize::new(usize::MAX),
        }
    }

    /// The largest body to send.
    pub(crate) fn get(&self) -> usize {
        self.configured
            .min(self.broker.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Whether `error` is the broker refusing this message, of `size` bytes, for its size —
    /// rather than another message's refusal, which closed the channel under this one (the
    /// broker names the size it refused: "message size N is larger than configured max size
    /// M"; a refusal that names none is taken as this message's). Learns the broker's limit
    /// from any refusal.
    pub(crate) fn refused(&self, error: &lapin::Error, size: usize) -> bool {
        if !is_too_large(error) {
            return false;
        }
        let text = describe(error);
        if let Some(limit) = number_after(&text, "max size ") {
            self.broker
                .fetch_min(limit, std::sync::atomic::Ordering::Relaxed);
        }
        number_after(&text, "message size ").is_none_or(|refused| refused == size)
    }
}

/// The number right after the first `prefix` in `text`.
fn number_after(text: &str, prefix: &str) -> Option<usize> {
    let (_, rest) = text.split_once(prefix)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|digits| digits.parse().ok())
}

/// Whether the broker refused a message for its size (RabbitMQ's `max_message_size`).
fn is_too_large(error: &lapin::Error) -> bool {
    use lapin::protocol::AMQPSoftError;
    matches!(
        soft_error(error),
        Some(AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::CONTENTTOOLARGE)
    ) && describe(error).contains("size")
}

/// A failed connection attempt.
fn connect_error(url: &str, error: &lapin::Error) -> RpcError {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let kind = match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => TransportErrorKind::Authentication,
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => TransportErrorKind::Authorization,
            _ => TransportErrorKind::Connect,
        },
        lapin::ErrorKind::AuthProviderError(_) => TransportErrorKind::Authentication,
        _ => TransportErrorKind::Connect,
    };
    RpcError::transport(
        kind,
        format!("cannot connect to RabbitMQ at {url}: {}", describe(error)),
    )
}

/// A failed declaration (queue, exchange, binding).
fn declare_error(what: &str, error: &lapin::Error) -> RpcError {
    use lapin::protocol::AMQPSoftError;
    let message = format!("{what}: {}", describe(error));
    match soft_error(error) {
        // Declared elsewhere with other options: the caller's configuration to fix.
        Some(AMQPSoftError::PRECONDITIONFAILED) => RpcError::new(Code::FailedPrecondition, message),
        Some(AMQPSoftError::NOTFOUND) => {
            RpcError::transport(TransportErrorKind::UnknownDestination, message)
        }
        Some(AMQPSoftError::ACCESSREFUSED) => {
            RpcError::transport(TransportErrorKind::Authorization, message)
        }
        Some(AMQPSoftError::RESOURCELOCKED) => RpcError::new(Code::FailedPrecondition, message),
        _ => RpcError::transport(TransportErrorKind::ConnectionLost, message),
    }
}

/// A failed publish (or its confirmation).
fn publish_error(what: &str, error: &lapin::Error) -> RpcError {
    use lapin::protocol::AMQPSoftError;
    let message = format!("{what}: {}", describe(error));
    if is_too_large(error) {
        return RpcError::transport(TransportErrorKind::PayloadTooLarge, message);
    }
    match (error.kind(), soft_error(error)) {
        (_, Some(AMQPSoftError::NOTFOUND)) => {
            RpcError::transport(TransportErrorKind::UnknownDestination, message)
        }
        (_, Some(AMQPSoftError::ACCESSREFUSED)) => {
            RpcError::transport(TransportErrorKind::Authorization, message)
        }
        (
            lapin::ErrorKind::InvalidChannelState(..) | lapin::ErrorKind::InvalidConnectionState(_),
            _,
        ) => RpcError::transport(TransportErrorKind::NotConnected, message),
        _ => RpcError::transport(TransportErrorKind::ConnectionLost, message),
    }
}

/// Whether a routing key of the exchange modes matches a binding pattern with RabbitMQ
/// wildcards, as NestJS matches its wildcard handlers: `*` is one word, `#` any words (only as
/// the last word here, as in NestJS), words separated by `.`.
fn wildcard_matches(pattern: &str, key: &str) -> bool {
    if key.is_empty() {
        return pattern == "#";
    }
    let words: Vec<&str> = pattern.split('.').collect();
    let keys: Vec<&str> = key.split('.').collect();
    let last = words.len() - 1;
    for (i, word) in words.iter().enumerate() {
        let current = keys.get(i).copied();
        if current.is_none_or(str::is_empty) && word.is_empty() {
            continue;
        }
        if current.is_none_or(str::is_empty) && *word != "#" {
            return false;
        }
        if *word == "#" {
            return i == last;
        }
        if *word != "*" && Some(*word) != current {
            return false;
        }
    }
    words.len() == keys.len()
}

/// Whether a route has RabbitMQ wildcards (a wildcard handler of the `wildcards` mode).
fn is_wildcard(route: &str) -> bool {
    route.contains('*') || route.contains('#')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::RawJson;
    use serde_json::json;

    #[test]
    fn wildcards_match_as_in_nestjs() {
        for (pattern, key, expected) in [
            ("users.*", "users.created", true),
            ("users.*", "users.created.eu", false),
            ("users.*", "users", false),
            ("users.#", "users.created.eu", true),
            ("users.#", "users.created", true),
            ("#", "anything.at.all", true),
            ("#", "", true),
            ("*", "", false),
            ("*.created", "users.created", true),
            ("*.created", "users.deleted", false),
            ("users.created", "users.created", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
            // `#` also matches no word at all; an empty word matches only an empty one.
            ("a.#", "a", true),
            ("a.", "a.b", false),
            ("a.", "a.", true),
        ] {
            assert_eq!(
                wildcard_matches(pattern, key),
                expected,
                "{pattern} vs {key}"
            );
        }
        assert!(is_wildcard("users.*") && is_wildcard("#") && !is_wildcard("users.created"));
    }

    #[test]
    fn urls_lose_their_passwords_in_messages() {
        assert_eq!(
            redact("amqp://app:s3cret@rabbit:5672/%2f"),
            "amqp://app:***@rabbit:5672/%2f"
        );
        assert_eq!(redact("amqp://rabbit:5672"), "amqp://rabbit:5672");
        assert_eq!(redact("amqp://app@rabbit"), "amqp://app@rabbit");
        // An `@` before the scheme is no credential (and no reason to panic).
        assert_eq!(redact("a:b@c://rabbit"), "a:b@c://rabbit");
    }

    #[test]
    fn json_arguments_become_amqp_values() {
        let table = field_table(
            json!({"x-message-ttl": 1000, "x-queue-type": "quorum", "flag": true, "ratio": 0.5, "list": [1, "a"], "nested": {"k": null}})
                .as_object()
                .unwrap(),
        );
        let inner = table.inner();
        assert_eq!(inner["x-message-ttl"], AMQPValue::LongLongInt(1000));
        assert_eq!(
            inner["x-queue-type"],
            AMQPValue::LongString("quorum".into())
        );
        assert_eq!(inner["flag"], AMQPValue::Boolean(true));
        assert_eq!(inner["ratio"], AMQPValue::Double(0.5));
        assert_eq!(
            inner["list"],
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongLongInt(1),
                AMQPValue::LongString("a".into())
            ]))
        );
        let mut nested = FieldTable::default();
        nested.insert("k".into(), AMQPValue::Void);
        assert_eq!(inner["nested"], AMQPValue::FieldTable(nested));
    }

    #[test]
    fn headers_round_trip_and_other_values_read_as_text() {
        let table = to_amqp_headers([("x-tenant", "acme"), ("traceparent", "00-1")])
            .unwrap()
            .unwrap();
        let mut extra = table.clone();
        extra.insert("n".into(), AMQPValue::LongInt(7));
        extra.insert("b".into(), AMQPValue::Boolean(false));
        extra.insert("t".into(), AMQPValue::FieldTable(FieldTable::default()));
        let headers = from_amqp_headers(Some(&extra));
        assert_eq!(headers.get("x-tenant"), Some("acme"));
        assert_eq!(headers.get("traceparent"), Some("00-1"));
        assert_eq!(headers.get("n"), Some("7"));
        assert_eq!(headers.get("b"), Some("false"));
        assert_eq!(headers.get("t"), None);
        // Every scalar AMQP type reads as text.
        let mut scalars = FieldTable::default();
        for (key, value) in [
            ("ss", AMQPValue::ShortString("short".into())),
            ("i8", AMQPValue::ShortShortInt(-8)),
            ("u8", AMQPValue::ShortShortUInt(8)),
            ("i16", AMQPValue::ShortInt(-16)),
            ("u16", AMQPValue::ShortUInt(16)),
            ("u32", AMQPValue::LongUInt(32)),
            ("i64", AMQPValue::LongLongInt(-64)),
            ("ts", AMQPValue::Timestamp(1_700_000_000)),
            ("f32", AMQPValue::Float(1.5)),
            ("f64", AMQPValue::Double(2.5)),
        ] {
            scalars.insert(key.into(), value);
        }
        let read = from_amqp_headers(Some(&scalars));
        for (key, text) in [
            ("ss", "short"),
            ("i8", "-8"),
            ("u8", "8"),
            ("i16", "-16"),
            ("u16", "16"),
            ("u32", "32"),
            ("i64", "-64"),
            ("ts", "1700000000"),
            ("f32", "1.5"),
            ("f64", "2.5"),
        ] {
            assert_eq!(read.get(key), Some(text), "{key}");
        }
        assert!(to_amqp_headers([]).unwrap().is_none());
        let long = "k".repeat(256);
        let error = to_amqp_headers([(long.as_str(), "v")]).unwrap_err();
        assert_eq!(error.code(), crate::rpc::Code::InvalidArgument);
        assert!(error.message().contains("256 bytes"), "{error}");
        assert!(to_amqp_headers([("k".repeat(255).as_str(), "v")]).is_ok());
        assert!(from_amqp_headers(None).is_empty());
    }

    #[test]
    fn routing_keys_are_the_raw_pattern() {
        assert_eq!(
            routing_key_of(&Pattern::from("users.created")),
            "users.created"
        );
        // A received pattern keeps its text, key order included, as NestJS's routing key does.
        let object =
            Pattern::received(RawJson::from_text(r#"{"role":"math","cmd":"sum"}"#).unwrap());
        assert_eq!(routing_key_of(&object), r#"{"role":"math","cmd":"sum"}"#);
        let built = Pattern::from(json!({"role": "math", "cmd": "sum"}));
        assert_eq!(routing_key_of(&built), built.raw().as_str());
    }

    #[test]
    fn names_longer_than_amqp_allows_are_refused() {
        assert!(short_string("orders", "queue").is_ok());
        let error = short_string(&"q".repeat(256), "queue").unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert!(error.message().contains("256 bytes"), "{error}");
        let options = RmqOptions::new(["amqp://localhost"]).queue("q".repeat(300));
        assert!(options.validate().is_err());
    }

    #[test]
    fn every_option_sets_what_it_says_and_the_defaults_are_the_documented_ones() {
        let defaults = RmqOptions::new(["amqp://a", "amqp://b"]);
        assert_eq!(defaults.urls, ["amqp://a", "amqp://b"]);
        assert_eq!(defaults.queue, "");
        assert_eq!(defaults.queue_options, QueueOptions::default());
        assert_eq!(defaults.prefetch_count, 32);
        assert!(!defaults.global_prefetch && !defaults.no_ack && !defaults.persistent);
        assert!(defaults.persistent_events);
        assert!(defaults.headers.is_empty());
        assert_eq!(defaults.reply_queue, DIRECT_REPLY_TO);
        assert_eq!(defaults.consumer_tag, None);
        assert_eq!(defaults.exchange, None);
        assert_eq!(defaults.exchange_type, ExchangeType::Topic);
        assert!(defaults.exchange_arguments.is_empty());
        assert_eq!(defaults.routing_key, None);
        assert!(!defaults.wildcards);
        assert_eq!(defaults.heartbeat, Duration::from_secs(5));
        assert_eq!(defaults.connection_timeout, Duration::from_secs(5));
        assert_eq!(
            defaults.reconnect,
            (Duration::from_millis(100), Duration::from_secs(5))
        );
        assert_eq!(defaults.max_message_size, 16 * 1024 * 1024);
        assert!(!defaults.exchange_mode() && !defaults.publishes_to_exchange());

        let options = RmqOptions::new(["amqp://a"])
            .queue("orders")
            .queue_options(QueueOptions::default().durable(false))
            .prefetch_count(7)
            .global_prefetch(true)
            .no_ack(true)
            .persistent(true)
            .persistent_events(false)
            .headers([("x-a", "1")])
            .reply_queue("replies")
            .consumer_tag("tag")
            .exchange("ex")
            .exchange_type(ExchangeType::Direct)
            .exchange_arguments(json!({"alternate-exchange": "other"}))
            .routing_key("key")
            .connection_name("svc")
            .heartbeat(Duration::from_secs(9))
            .connection_timeout(Duration::from_secs(3))
            .reconnect_backoff(Duration::from_secs(2), Duration::from_secs(1))
            .max_message_size(99);
        assert_eq!(options.queue, "orders");
        assert!(!options.queue_options.is_durable());
        assert_eq!(options.prefetch_count, 7);
        assert!(options.global_prefetch && options.no_ack && options.persistent);
        assert!(!options.persistent_events);
        assert_eq!(options.headers.get("x-a"), Some("1"));
        assert_eq!(options.reply_queue, "replies");
        assert_eq!(options.consumer_tag.as_deref(), Some("tag"));
        assert_eq!(options.exchange.as_deref(), Some("ex"));
        assert_eq!(options.exchange_type, ExchangeType::Direct);
        assert_eq!(options.exchange_arguments["alternate-exchange"], "other");
        assert_eq!(options.routing_key.as_deref(), Some("key"));
        assert_eq!(options.connection_name.as_deref(), Some("svc"));
        assert_eq!(options.heartbeat, Duration::from_secs(9));
        assert_eq!(options.connection_timeout, Duration::from_secs(3));
        // The cap is never below the first delay.
        assert_eq!(
            options.reconnect,
            (Duration::from_secs(2), Duration::from_secs(2))
        );
        assert_eq!(options.max_message_size, 99);
        assert!(options.exchange_mode());
        assert_eq!(options.exchange_name(), "ex");
        // An exchange alone: clients still send to the queue.
        assert!(!options.publishes_to_exchange());
        let wildcards = RmqOptions::new(["amqp://a"]).queue("q").wildcards(true);
        assert!(
            wildcards.wildcards && wildcards.exchange_mode() && wildcards.publishes_to_exchange()
        );
        assert_eq!(
            wildcards.exchange_name(),
            "q",
            "the exchange is named after the queue"
        );
        let fanout = RmqOptions::new(["amqp://a"])
            .exchange("f")
            .exchange_type(ExchangeType::Fanout);
        assert!(fanout.publishes_to_exchange());
        let topic = RmqOptions::new(["amqp://a"]).exchange_type(ExchangeType::Topic);
        assert!(!topic.publishes_to_exchange() && !topic.exchange_mode());
    }

    #[test]
    fn queue_options_map_to_the_declaration() {
        let options = QueueOptions::default()
            .durable(false)
            .exclusive(true)
            .auto_delete(true)
            .no_assert(true)
            .arguments(json!({"x-max-length": 10}));
        let declared = options.declare_options();
        assert!(!declared.durable && declared.exclusive && declared.auto_delete);
        assert!(options.no_assert);
        assert_eq!(options.arguments["x-max-length"], 10);
        let defaults = QueueOptions::default().declare_options();
        assert!(defaults.durable && !defaults.exclusive && !defaults.auto_delete);
        assert!(!QueueOptions::default().no_assert);
        for (kind, expected) in [
            (ExchangeType::Direct, lapin::ExchangeKind::Direct),
            (ExchangeType::Fanout, lapin::ExchangeKind::Fanout),
            (ExchangeType::Topic, lapin::ExchangeKind::Topic),
            (ExchangeType::Headers, lapin::ExchangeKind::Headers),
        ] {
            assert_eq!(kind.kind(), expected);
        }
    }

    #[test]
    fn options_show_no_password() {
        let options = RmqOptions::new(["amqp://app:s3cret@rabbit/%2f", "amqp://b"]).queue("q");
        let shown = format!("{options:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("app:***@rabbit"),
            "{shown}"
        );
        assert!(
            shown.contains("amqp://b") && shown.contains("\"q\""),
            "{shown}"
        );
        assert_eq!(options.urls_text(), "amqp://app:***@rabbit/%2f, amqp://b");
    }

    #[test]
    fn a_size_refusal_is_this_messages_only_when_it_names_this_size() {
        use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};
        let refusal = |text: &str| -> lapin::Error {
            lapin::ErrorKind::ProtocolError(AMQPError::new(
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                text.into(),
            ))
            .into()
        };
        let limit = SizeLimit::new(16 << 20);
        assert_eq!(limit.get(), 16 << 20);
        let named = refusal(
            "PRECONDITION_FAILED - message size 2097152 is larger than configured max size 1048576",
        );
        assert!(!limit.refused(&named, 15));
        assert_eq!(limit.get(), 1_048_576);
        assert!(limit.refused(&named, 2_097_152));
        // A lower limit is learned; a higher one never raises it.
        let lower =
            refusal("PRECONDITION_FAILED - message size 9 is larger than configured max size 8");
        assert!(limit.refused(&lower, 9));
        assert_eq!(limit.get(), 8);
        assert!(!limit.refused(&named, 15));
        assert_eq!(limit.get(), 8);
        // A refusal that names no size is taken as this message's.
        let unnamed = refusal("PRECONDITION_FAILED - message size too large");
        assert!(SizeLimit::new(100).refused(&unnamed, 1));
        // Anything else is no size refusal.
        let other = refusal("PRECONDITION_FAILED - inequivalent arg 'durable'");
        let untouched = SizeLimit::new(100);
        assert!(!untouched.refused(&other, 1));
        assert_eq!(untouched.get(), 100);
        assert_eq!(number_after("max size 12, more", "max size "), Some(12));
        assert_eq!(number_after("max size none", "max size "), None);
    }

    #[test]
    fn broker_errors_keep_their_kind() {
        use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
        let amqp = |kind: AMQPErrorKind, text: &str| -> lapin::Error {
            lapin::ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into()
        };
        let too_large = amqp(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - message size 2 is larger than configured max size 1",
        );
        assert!(is_too_large(&too_large));
        let published = publish_error("cannot publish", &too_large);
        assert_eq!(
            published.transport_kind(),
            Some(TransportErrorKind::PayloadTooLarge)
        );
        assert!(
            published
                .message()
                .starts_with("cannot publish: PRECONDITION_FAILED")
        );
        let inequivalent = amqp(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - inequivalent arg 'durable'",
        );
        assert!(!is_too_large(&inequivalent));
        assert_eq!(
            declare_error("x", &inequivalent).code(),
            Code::FailedPrecondition
        );
        let locked = amqp(
            AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED),
            "RESOURCE_LOCKED",
        );
        assert_eq!(declare_error("x", &locked).code(), Code::FailedPrecondition);
        let missing = amqp(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no exchange",
        );
        assert_eq!(
            declare_error("x", &missing).transport_kind(),
            Some(TransportErrorKind::UnknownDestination)
        );
        assert_eq!(
            publish_error("x", &missing).transport_kind(),
            Some(TransportErrorKind::UnknownDestination)
        );
        let refused = amqp(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED",
        );
        assert_eq!(
            declare_error("x", &refused).transport_kind(),
            Some(TransportErrorKind::Authorization)
        );
        assert_eq!(
            publish_error("x", &refused).transport_kind(),
            Some(TransportErrorKind::Authorization)
        );
        assert_eq!(
            connect_error("amqp://h", &refused).transport_kind(),
            Some(TransportErrorKind::Authentication)
        );
        let vhost = amqp(
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
            "NOT_ALLOWED - vhost",
        );
        assert_eq!(
            connect_error("amqp://h", &vhost).transport_kind(),
            Some(TransportErrorKind::Authorization)
        );
        assert!(!is_too_large(&vhost));
        let provider: lapin::Error = lapin::ErrorKind::AuthProviderError("expired".into()).into();
        assert_eq!(
            connect_error("amqp://h", &provider).transport_kind(),
            Some(TransportErrorKind::Authentication)
        );
        let io: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert_eq!(
            connect_error("amqp://h", &io).transport_kind(),
            Some(TransportErrorKind::Connect)
        );
        assert_eq!(
            declare_error("x", &io).transport_kind(),
            Some(TransportErrorKind::ConnectionLost)
        );
        assert_eq!(
            publish_error("x", &io).transport_kind(),
            Some(TransportErrorKind::ConnectionLost)
        );
        let closed: lapin::Error =
            lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "basic.publish")
                .into();
        assert_eq!(
            publish_error("x", &closed).transport_kind(),
            Some(TransportErrorKind::NotConnected)
        );
        let gone: lapin::Error =
            lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed).into();
        assert_eq!(
            publish_error("x", &gone).transport_kind(),
            Some(TransportErrorKind::NotConnected)
        );
        assert_eq!(soft_error(&io), None);
        assert_eq!(describe(&missing), "NOT_FOUND - no exchange");
    }

    #[test]
    fn reconnect_delays_double_with_jitter_up_to_the_cap() {
        let options = RmqOptions::new(["amqp://localhost"])
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..10 {
            let base = (100u64 << attempt).min(2000) as f64;
            let delay = options.backoff(attempt).as_secs_f64() * 1000.0;
            assert!(
                delay >= base * 0.8 - 1e-6 && delay <= (base * 1.2).min(2000.0) + 1e-6,
                "{attempt}: {delay}"
            );
        }
        assert!(options.backoff(u32::MAX) <= Duration::from_secs(2));
    }
}
