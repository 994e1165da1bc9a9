//! NestJS's `Transport.REDIS` over the `redis` crate (feature `redis`).
//!
//! Plain Redis pub/sub, as NestJS uses it (nestjs-wire-brokers.md §2): a request or event is
//! published on the channel named after the pattern's NestJS route string (`get-user`,
//! `{"cmd":"sum"}`), with NestJS's JSON envelope as the message; replies are published on
//! `<route>.reply` and matched to their request by the body's `id`. Each side holds two
//! connections: one in subscriber mode, one that publishes. NestJS services on the same Redis can
//! call palisade services and be called by them.
//!
//! ```no_run
//! use palisade::rpc::transport::redis::{RedisOptions, RedisServer};
//! use palisade::rpc::{Client, Router, Server};
//!
//! # #[tokio::main] async fn main() -> Result<(), palisade::rpc::RpcError> {
//! let options = RedisOptions::new("redis://127.0.0.1:6379");
//! let server = Server::new(Router::new().message("ping", || async { "pong" }))
//!     .serve(RedisServer::new(options.clone()))
//!     .await?;
//!
//! let client = Client::builder().connect(options).await?;
//! let pong: String = client.send("ping", &()).await?;
//! server.shutdown().await;
//! # let _ = pong; Ok(()) }
//! ```
//!
//! # Several instances of a service
//!
//! Redis pub/sub has no load balancing: **by default every server subscribed to a pattern
//! handles every request and every event, and every one of them replies** (a streamed reply then
//! reaches the caller doubled, as with NestJS). Run one instance per Redis, or opt in to
//! [`RedisServer::single_responder`]: the instances then elect one responder through a lease key
//! in Redis; only it subscribes, and another takes over when it goes away (at once when it shuts
//! down, once its lease expired when it crashes). For events that must reach exactly one
//! instance, use [durable events](DurableEvents) (Redis Streams with a consumer group).
//!
//! The same holds for callers: replies to every caller of a pattern go to the one channel
//! `<route>.reply`, so **every client connection that has called a pattern receives every reply
//! to it** and drops those it is not waiting for. N client connections calling a pattern make N
//! times its reply traffic, in Redis and in each client. Share one [`Client`](crate::rpc::Client)
//! per process (its clones share the connection).
//!
//! # Beyond NestJS
//!
//! - **Unknown patterns fail fast.** NestJS's client waits for its timeout when nobody
//!   subscribed to a pattern; `PUBLISH` tells how many subscribers received the request, and
//!   none fails the request at once with `Unavailable` ("There are no subscribers listening to
//!   that message"). (An event nobody receives is dropped, as NestJS does.)
//! - **One long-lived subscription per reply channel**, made before the first request on a
//!   pattern is published and kept, instead of NestJS's subscribe/unsubscribe around every
//!   request.
//! - **Broker loss** fails every request in flight at once with `Unavailable` (a Redis gone silent
//!   without closing the connection: at the next [health check](RedisOptions::health_check));
//!   clients and servers reconnect with backoff and restore their subscriptions.
//! - The deadline (`palisade-timeout-ms`) and your headers travel in the envelope's `"headers"`
//!   field, which NestJS ignores.
//! - [Durable events](DurableEvents) (opt-in): Redis Streams with a consumer group — at-least-once
//!   delivery, retries with backoff, claiming the entries of dead consumers, a dead-letter stream.

mod client;
mod durable;
mod lease;
mod publisher;
mod server;

pub use self::client::{RedisConnection, RedisTransport};
pub use self::durable::{BODY_FIELD, DurableEvents};
pub use self::server::RedisServer;

use crate::rpc::wire::{Codec, SharedCodec};
use crate::rpc::{Code, RpcError, TransportErrorKind};
use std::fmt;
use std::time::Duration;

/// How to reach Redis: a `redis://` URL (with credentials and database, if any), timeouts and the
/// reconnection backoff. Shared by [`RedisServer`] and [`RedisTransport`]; a client can connect
/// with the options alone:
///
/// ```no_run
/// use palisade::rpc::Client;
/// use palisade::rpc::transport::redis::RedisOptions;
/// use std::time::Duration;
///
/// # #[tokio::main] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let client = Client::builder()
///     .connect(
///         RedisOptions::new("redis://:s3cret@redis-1:6379")
///             .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(5)),
///     )
///     .await?;
/// # let _ = client; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisOptions {
    url: String,
    connection_timeout: Duration,
    pub(crate) response_timeout: Duration,
    health_check: Duration,
    reconnect: (Duration, Duration),
    reply_idle: Duration,
    codec: SharedCodec,
}

impl RedisOptions {
    /// Options for the Redis at `url` (`redis://[:password@]host[:port][/db]`,
    /// `redis://user:password@host`, ...). TLS (`rediss://`) is not built in: connecting fails
    /// with a clear error.
    pub fn new(url: impl Into<String>) -> Self {
        RedisOptions {
            url: url.into(),
            connection_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            health_check: Duration::from_secs(5),
            reconnect: (Duration::from_millis(100), Duration::from_secs(5)),
            reply_idle: Duration::from_secs(300),
            codec: SharedCodec::default(),
        }
    }

    /// Client: how long the reply channel of a route (`<route>.reply`) stays subscribed after
    /// its last request ended (default 5 minutes). A client subscribes a route's reply channel
    /// at its first request and keeps it while the route is in use, which saves a `SUBSCRIBE`
    /// round trip per request; one left idle this long is unsubscribed (never while a request
    /// on it waits), so that a process calling ever new routes (patterns carrying ids) does not
    /// gather subscriptions, memory and other clients' replies without end. The next request to
    /// the route subscribes again.
    pub fn reply_idle(mut self, idle: Duration) -> Self {
        self.reply_idle = idle.clamp(Duration::from_millis(10), crate::timeout::FAR_FUTURE);
        self
    }

    /// How often idle reply channels are looked for: a tenth of [`reply_idle`](Self::reply_idle),
    /// between 10 ms and a minute.
    pub(crate) fn reply_sweep(&self) -> Duration {
        (self.reply_idle / 10).clamp(Duration::from_millis(10), Duration::from_secs(60))
    }

    /// How message bodies are written and read: NestJS's JSON packets
    /// ([`JsonCodec`](crate::rpc::wire::JsonCodec), the default), or another [`Codec`] such as
    /// [`MessagePackCodec`](crate::rpc::wire::MessagePackCodec) (feature `msgpack`) where every
    /// client and server of these patterns is palisade with the same codec. Redis replies travel
    /// by id on a shared channel, so a server cannot answer a message it cannot read: a client
    /// with the wrong codec waits for its timeout (its `debug` log names the unreadable replies).
    pub fn codec(mut self, codec: impl Codec) -> Self {
        self.codec = SharedCodec::new(codec);
        self
    }

    pub(crate) fn shared_codec(&self) -> &SharedCodec {
        &self.codec
    }

    /// How long connecting may take before it fails (default 5 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long Redis may take to answer a command (a `PUBLISH`, a `SUBSCRIBE`) before the
    /// command fails (default 5 s). A durable events reader's blocking read may take its block
    /// (at most a second) and this long; after that its connection counts as lost.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How often a subscriber connection is checked with a `PING` (default 5 s): one Redis does
    /// not answer within the [response timeout](Self::response_timeout) counts as lost — requests
    /// in flight fail and the connection is replaced — so that a Redis or network gone silent
    /// without closing the connection is noticed.
    pub fn health_check(mut self, interval: Duration) -> Self {
        // `Duration::MAX` is never: a tokio interval would overflow the clock adding it.
        self.health_check = interval.clamp(Duration::from_millis(10), crate::timeout::FAR_FUTURE);
        self
    }

    /// A timer for [`health_check`](Self::health_check); its first tick is one interval away.
    pub(crate) fn health_timer(&self) -> tokio::time::Interval {
        let mut timer = tokio::time::interval_at(
            tokio::time::Instant::now() + self.health_check,
            self.health_check,
        );
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    }

    /// `PING`s a subscriber connection; `false` when Redis did not answer in time.
    pub(crate) async fn healthy(&self, sink: &mut redis::aio::PubSubSink) -> bool {
        matches!(
            tokio::time::timeout(self.response_timeout, sink.ping::<redis::Value>()).await,
            Ok(Ok(_))
        )
    }

    /// Delays between reconnection attempts: `initial`, doubling (with ±20% jitter) up to `max`
    /// (default 100 ms to 5 s). A delay under 1 ms is taken as 1 ms, so that a broker refusing
    /// at once is not retried in a busy loop.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.reconnect = (initial, max.max(initial));
        self
    }

    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        super::reconnect_delay(self.reconnect, attempt)
    }

    /// The URL without its password, for messages.
    pub(crate) fn url_text(&self) -> String {
        redact(&self.url)
    }

    fn client(&self) -> Result<redis::Client, RpcError> {
        redis::Client::open(self.url.as_str()).map_err(|error| {
            RpcError::invalid_argument(format!("invalid Redis URL {:?}: {error}", self.url_text()))
        })
    }

    fn config(&self, response_timeout: Option<Duration>) -> redis::AsyncConnectionConfig {
        redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(response_timeout)
    }

    /// A connection for commands (`PUBLISH`, stream commands).
    pub(crate) async fn commands(&self) -> Result<redis::aio::MultiplexedConnection, RpcError> {
        self.commands_with_timeout(Some(self.response_timeout))
            .await
    }

    /// A connection for commands, with its own response timeout (`None`: for blocking reads).
    pub(crate) async fn commands_with_timeout(
        &self,
        response_timeout: Option<Duration>,
    ) -> Result<redis::aio::MultiplexedConnection, RpcError> {
        self.client()?
            .get_multiplexed_async_connection_with_config(&self.config(response_timeout))
            .await
            .map_err(|error| self.connect_error(&error))
    }

    /// A connection in subscriber mode.
    pub(crate) async fn subscriber(&self) -> Result<redis::aio::PubSub, RpcError> {
        let client = self.client()?;
        match tokio::time::timeout(self.connection_timeout, client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(error)) => Err(self.connect_error(&error)),
            Err(_) => Err(RpcError::transport(
                TransportErrorKind::Connect,
                format!(
                    "cannot connect to Redis at {}: timed out after {:?}",
                    self.url_text(),
                    self.connection_timeout
                ),
            )),
        }
    }

    /// Subscribes `channels` on a subscriber connection, within the response timeout.
    pub(crate) async fn subscribe(
        &self,
        sink: &mut redis::aio::PubSubSink,
        channels: &[&str],
    ) -> Result<(), RpcError> {
        if channels.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(self.response_timeout, sink.subscribe(channels)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(command_error(&error, "cannot subscribe")),
            Err(_) => Err(RpcError::transport(
                TransportErrorKind::ConnectionLost,
                "cannot subscribe: Redis did not confirm in time",
            )),
        }
    }

    fn connect_error(&self, error: &redis::RedisError) -> RpcError {
        let (kind, code) = match error.kind() {
            redis::ErrorKind::AuthenticationFailed => {
                (TransportErrorKind::Authentication, Code::Unauthenticated)
            }
            redis::ErrorKind::InvalidClientConfig => {
                return RpcError::invalid_argument(format!(
                    "invalid Redis configuration for {}: {error}",
                    self.url_text()
                ));
            }
            _ => (TransportErrorKind::Connect, Code::Unavailable),
        };
        debug_assert_eq!(kind.code(), code);
        RpcError::transport(
            kind,
            format!("cannot connect to Redis at {}: {error}", self.url_text()),
        )
    }
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Credentials stay out of logs.
        f.debug_struct("RedisOptions")
            .field("url", &self.url_text())
            .field("connection_timeout", &self.connection_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("health_check", &self.health_check)
            .field("reconnect", &self.reconnect)
            .field("reply_idle", &self.reply_idle)
            .finish()
    }
}

/// `url` with the password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}

/// A failed Redis command as an [`RpcError`] that keeps what kind of failure it was.
pub(crate) fn command_error(error: &redis::RedisError, what: &str) -> RpcError {
    let kind = if error.is_io_error()
        || error.is_connection_dropped()
        || error.is_timeout()
        || error.is_unrecoverable_error()
    {
        TransportErrorKind::ConnectionLost
    } else {
        match error.kind() {
            redis::ErrorKind::AuthenticationFailed => TransportErrorKind::Authentication,
            redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType => {
                TransportErrorKind::Protocol
            }
            _ => TransportErrorKind::Io,
        }
    };
    RpcError::transport(kind, format!("{what} on Redis: {error}"))
}

/// The channel replies to requests on `route` are published on (NestJS: `<route>.reply`).
pub(crate) fn reply_channel(route: &str) -> String {
    format!("{route}.reply")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis://:pw@host:1/2"), "redis://:***@host:1/2");
        assert_eq!(redact("redis://user:pw@host"), "redis://user:***@host");
        assert_eq!(redact("redis://token@host"), "redis://***@host");
        let debug = format!("{:?}", RedisOptions::new("redis://u:secret@h"));
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn replies_go_to_the_route_dot_reply() {
        assert_eq!(reply_channel("sum"), "sum.reply");
        assert_eq!(reply_channel(r#"{"cmd":"sum"}"#), r#"{"cmd":"sum"}.reply"#);
    }
}
