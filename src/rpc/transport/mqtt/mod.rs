//! NestJS's `Transport.MQTT` over `rumqttc` (feature `mqtt`).
//!
//! As NestJS does it (nestjs-wire-brokers.md §3): a request or event is published (QoS 0) on the
//! topic named after the pattern's NestJS route string (`get-user`, `{"cmd":"sum"}`) with NestJS's
//! JSON envelope as the payload; replies are published on `<topic>/reply` (a slash) and matched to
//! their request by the body's `id`. Each side holds one MQTT connection, speaking MQTT 3.1.1
//! (NestJS's default, which every broker accepts) or [MQTT 5](MqttOptions::version). NestJS
//! services on the same broker can call palisade services and be called by them.
//!
//! ```no_run
//! use palisade::rpc::transport::mqtt::{MqttOptions, MqttServer};
//! use palisade::rpc::{Client, Router, Server};
//!
//! # #[tokio::main] async fn main() -> Result<(), palisade::rpc::RpcError> {
//! let options = MqttOptions::new("mqtt://127.0.0.1:1883");
//! let server = Server::new(Router::new().message("ping", || async { "pong" }))
//!     .serve(MqttServer::new(options.clone()))
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
//! **By default every server subscribed to a pattern handles every request and every event, and
//! every one of them replies** (a streamed reply then reaches the caller doubled, as with NestJS).
//! Opt in to [`MqttServer::shared_group`]: the servers then subscribe through shared
//! subscriptions (`$share/<group>/<topic>`: MQTT 5's, which Mosquitto, EMQX, HiveMQ and others
//! also offer to 3.1.1 clients; use [`MqttVersion::V5`] with brokers that do not), and the broker
//! delivers each message to one member of the group.
//!
//! The same holds for callers: replies to every caller of a pattern go to the one topic
//! `<topic>/reply`, so **every client connection that has called a pattern receives every reply
//! to it** and drops those it is not waiting for. N client connections calling a pattern make N
//! times its reply traffic, in the broker and in each client (with Mosquitto, a second client
//! calling the same pattern put a quarter on each request's time). Share one
//! [`Client`](crate::rpc::Client) per process (its clones share the connection).
//!
//! # Beyond NestJS
//!
//! - **One long-lived subscription per reply topic**, made (and acknowledged by the broker) before
//!   the first request on a pattern is published and then kept. NestJS's client subscribes and
//!   unsubscribes around requests with a reference count that loses replies in bursts
//!   (nestjs-wire-brokers.md §3.5).
//! - **Unknown patterns**: MQTT cannot tell whether anyone subscribed, so a request nobody serves
//!   ends with the caller's deadline, as in NestJS — always give MQTT clients a
//!   [timeout](crate::rpc::ClientBuilder::timeout). Just before the deadline the client fails
//!   it with `DeadlineExceeded` and a message that says what probably happened (no server
//!   subscribed to the pattern, or a wrong pattern) rather than only that time ran out
//!   ([`ClientTransport::explain_silence`](crate::rpc::transport::ClientTransport::explain_silence));
//!   nothing of a request is kept once it is answered.
//! - **Broker loss** fails every request in flight at once with `Unavailable`; clients and servers
//!   reconnect with backoff and restore their subscriptions. (A request published after a client
//!   is back but before a server resubscribed meets silence: MQTT cannot tell.)
//! - **Size limits** are checked before publishing: a message over
//!   [`max_packet_size`](MqttOptions::max_packet_size), or over the maximum packet size an MQTT 5
//!   broker announced, fails at once with `PayloadTooLarge` instead of breaking the connection.
//!   MQTT 3.1.1 brokers do not say their limit and close the connection on a larger packet: set
//!   `max_packet_size` to the broker's.
//! - The deadline (`palisade-timeout-ms`) and your headers travel in the envelope's `"headers"`
//!   field, which NestJS ignores.
//! - [Durable events](DurableEvents) (opt-in): a persistent session with QoS 1, acknowledged after
//!   the handlers succeeded, retries with backoff, a dead-letter topic.
//!
//! # Latency
//!
//! palisade's connections turn Nagle's algorithm off. Mosquitto leaves it on unless configured
//! with `set_tcp_nodelay true`; without it a small message that follows one needing no reply (an
//! event, then a request) can wait up to 40 ms in the broker for a delayed acknowledgement.

mod client;
mod durable;
mod link;
mod server;

pub use self::client::{MqttConnection, MqttTransport};
pub use self::durable::DurableEvents;
pub use self::link::MqttVersion;
pub use self::server::MqttServer;

use self::link::{Event, Events, Link, LinkError};
use crate::rpc::wire::{Codec, SharedCodec};
use crate::rpc::{RpcError, TransportErrorKind};
use std::fmt;
use std::time::Duration;

/// How to reach the MQTT broker: a `mqtt://` URL (with credentials, if any), the client id, keep
/// alive, the packet size limit and the reconnection backoff. Shared by [`MqttServer`] and
/// [`MqttTransport`]; a client can connect with the options alone:
///
/// ```no_run
/// use palisade::rpc::Client;
/// use palisade::rpc::transport::mqtt::MqttOptions;
///
/// # #[tokio::main] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let client = Client::builder()
///     .connect(MqttOptions::new("mqtt://billing:s3cret@broker:1883").client_id("billing-1"))
///     .await?;
/// # let _ = client; Ok(()) }
/// ```
#[derive(Clone)]
pub struct MqttOptions {
    url: String,
    client_id: Option<String>,
    version: MqttVersion,
    session_expiry: Duration,
    keep_alive: Duration,
    max_packet_size: usize,
    connection_timeout: Duration,
    response_timeout: Duration,
    reconnect: (Duration, Duration),
    codec: SharedCodec,
}

impl MqttOptions {
    /// Options for the broker at `url` (`mqtt://[user:password@]host[:port]`, port 1883 by
    /// default; `tcp://` is accepted too). TLS (`mqtts://`) and WebSockets are not built in: such
    /// a URL is refused with `InvalidArgument`.
    pub fn new(url: impl Into<String>) -> Self {
        MqttOptions {
            url: url.into(),
            client_id: None,
            version: MqttVersion::V311,
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            keep_alive: Duration::from_secs(30),
            max_packet_size: 16 * 1024 * 1024,
            connection_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            reconnect: (Duration::from_millis(100), Duration::from_secs(5)),
            codec: SharedCodec::default(),
        }
    }

    /// How message bodies are written and read: NestJS's JSON packets
    /// ([`JsonCodec`](crate::rpc::wire::JsonCodec), the default), or another [`Codec`] such as
    /// [`MessagePackCodec`](crate::rpc::wire::MessagePackCodec) (feature `msgpack`) where every
    /// client and server of these patterns is palisade with the same codec. MQTT replies travel
    /// by id on a shared topic, so a server cannot answer a message it cannot read: a client with
    /// the wrong codec waits for its timeout (its `debug` log names the unreadable replies).
    pub fn codec(mut self, codec: impl Codec) -> Self {
        self.codec = SharedCodec::new(codec);
        self
    }

    pub(crate) fn shared_codec(&self) -> &SharedCodec {
        &self.codec
    }

    /// The MQTT client id (default: `palisade-<random>`, a new one per connection). Two
    /// connections with one id push each other off the broker: give each instance its own.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// The protocol version (default MQTT 3.1.1, as NestJS). With either, NestJS peers on the
    /// same broker interoperate: the broker translates.
    pub fn version(mut self, version: MqttVersion) -> Self {
        self.version = version;
        self
    }

    /// MQTT 5: how long the broker keeps a persistent session (the
    /// [durable events](DurableEvents)') while its server is away (default 7 days). MQTT 3.1.1
    /// has no expiry: the broker's configuration decides.
    pub fn session_expiry(mut self, expiry: Duration) -> Self {
        self.session_expiry = expiry;
        self
    }

    /// The keep-alive interval (default 30 s): how soon a silent broker counts as lost. At least
    /// 1 s, and 5 s over MQTT 5 (rumqttc's floor there).
    pub fn keep_alive(mut self, interval: Duration) -> Self {
        self.keep_alive = interval.max(Duration::from_secs(1));
        self
    }

    /// The largest MQTT packet sent or accepted, in bytes (default 16 MiB). A message that would
    /// not fit fails at once with `InvalidArgument` (`PayloadTooLarge`).
    ///
    /// The broker may have a lower limit of its own. An MQTT 5 broker announces it when the
    /// client connects, and palisade checks it too. An MQTT 3.1.1 broker does not, and it closes
    /// the connection of a client that sends a larger packet (with everything in flight on it):
    /// over MQTT 3.1.1, set this to the broker's limit.
    pub fn max_packet_size(mut self, bytes: usize) -> Self {
        self.max_packet_size = bytes;
        self
    }

    /// How long connecting may take before it fails (default 5 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// How long the broker may take to acknowledge a subscription (default 5 s).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
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

    /// `host:port`, for messages.
    pub(crate) fn address_text(&self) -> String {
        match self.parse() {
            Ok(parsed) => format!("{}:{}", parsed.host, parsed.port),
            Err(_) => "(invalid URL)".to_owned(),
        }
    }

    fn parse(&self) -> Result<Parsed, RpcError> {
        let invalid = |why: &str| {
            RpcError::invalid_argument(format!("invalid MQTT URL {:?}: {why}", redact(&self.url)))
        };
        let rest = self
            .url
            .strip_prefix("mqtt://")
            .or_else(|| self.url.strip_prefix("tcp://"))
            .ok_or_else(|| invalid("expected mqtt://host[:port]"))?;
        let rest = rest.trim_end_matches('/');
        let (credentials, address) = match rest.rsplit_once('@') {
            Some((credentials, address)) => (Some(credentials), address),
            None => (None, rest),
        };
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().map_err(|_| invalid("bad port"))?),
            None => (address, 1883),
        };
        if host.is_empty() || host.contains('/') {
            return Err(invalid("no host"));
        }
        let credentials = credentials.map(|c| match c.split_once(':') {
            Some((user, password)) => (user.to_owned(), password.to_owned()),
            None => (c.to_owned(), String::new()),
        });
        Ok(Parsed {
            host: host.to_owned(),
            port,
            credentials,
        })
    }

    /// A connection's two halves for these options (not connected yet).
    pub(crate) fn session(
        &self,
        clean_session: bool,
        manual_acks: bool,
    ) -> Result<(Link, Events), RpcError> {
        let parsed = self.parse()?;
        let id = self.client_id.clone().unwrap_or_else(|| {
            format!(
                "palisade-{:016x}",
                crate::rng::mix(crate::rng::SharedRng::entropy())
            )
        });
        let mut network = rumqttc::NetworkOptions::new();
        network.set_connection_timeout(self.connection_timeout.as_secs().max(1));
        // Small request and reply packets must not wait for Nagle's algorithm (with delayed
        // acknowledgements that adds up to 40 ms per round trip).
        network.set_tcp_nodelay(true);
        // Room for the fixed header and topic next to the largest payload.
        let packet_limit = self.max_packet_size.saturating_add(64 * 1024);
        match self.version {
            MqttVersion::V311 => {
                let mut options = rumqttc::MqttOptions::new(id, parsed.host, parsed.port);
                options
                    .set_keep_alive(self.keep_alive)
                    .set_clean_session(clean_session)
                    .set_manual_acks(manual_acks)
                    .set_max_packet_size(packet_limit, packet_limit);
                if let Some((user, password)) = parsed.credentials {
                    options.set_credentials(user, password);
                }
                let (client, mut events) = rumqttc::AsyncClient::new(options, 1024);
                events.set_network_options(network);
                Ok((Link::V4(client), Events::v4(events)))
            }
            MqttVersion::V5 => {
                let mut options = rumqttc::v5::MqttOptions::new(id, parsed.host, parsed.port);
                options
                    // rumqttc panics below 5 s over MQTT 5.
                    .set_keep_alive(self.keep_alive.max(MQTT5_MIN_KEEP_ALIVE))
                    .set_clean_start(clean_session)
                    .set_manual_acks(manual_acks)
                    .set_connection_timeout(self.connection_timeout.as_secs().max(1))
                    .set_max_packet_size(Some(u32::try_from(packet_limit).unwrap_or(u32::MAX)));
                if !clean_session {
                    // MQTT 5 ends a session with its connection unless told to keep it.
                    options.set_session_expiry_interval(Some(
                        u32::try_from(self.session_expiry.as_secs()).unwrap_or(u32::MAX),
                    ));
                }
                if let Some((user, password)) = parsed.credentials {
                    options.set_credentials(user, password);
                }
                options.set_network_options(network);
                let (client, events) = rumqttc::v5::AsyncClient::new(options, 1024);
                let limit = link::BrokerLimit::default();
                Ok((Link::V5(client, limit.clone()), Events::v5(events, limit)))
            }
        }
    }

    /// Polls `events` until the broker accepted the connection; fails with a clear error.
    pub(crate) async fn connected(&self, events: &mut Events) -> Result<(), RpcError> {
        let waiting = async {
            loop {
                match events.poll().await {
                    Ok(Event::ConnAck { .. }) => return Ok(()),
                    Ok(_) => {}
                    Err(error) => return Err(self.connect_error(&error)),
                }
            }
        };
        match tokio::time::timeout(
            self.connection_timeout
                .saturating_add(Duration::from_secs(1)),
            waiting,
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(RpcError::transport(
                TransportErrorKind::Connect,
                format!(
                    "cannot connect to MQTT at {}: timed out after {:?}",
                    self.address_text(),
                    self.connection_timeout
                ),
            )),
        }
    }

    pub(crate) fn connect_error(&self, error: &LinkError) -> RpcError {
        let kind = if error.authentication {
            TransportErrorKind::Authentication
        } else {
            TransportErrorKind::Connect
        };
        RpcError::transport(
            kind,
            format!("cannot connect to MQTT at {}: {error}", self.address_text()),
        )
    }

    /// Refuses a message that would not fit: measured as rumqttc writes it, over
    /// [`max_packet_size`](Self::max_packet_size), or over the maximum packet size the broker
    /// announced (MQTT 5), which rumqttc would only find out by failing the connection with
    /// everything in flight on it.
    pub(crate) fn check_size(
        &self,
        link: &Link,
        topic: &str,
        qos: link::Qos,
        payload: usize,
    ) -> Result<(), RpcError> {
        link.check_size(self.max_packet_size, topic, qos, payload)
            .map_err(|oversize| {
                let whose = if oversize.broker {
                    format!(
                        "the maximum packet size of the MQTT broker at {}",
                        self.address_text()
                    )
                } else {
                    "the MQTT packet limit".to_owned()
                };
                RpcError::transport(
                    TransportErrorKind::PayloadTooLarge,
                    format!(
                        "the message to {topic:?} ({} bytes as a packet) is larger than {whose} \
                         ({} bytes)",
                        oversize.size, oversize.limit
                    ),
                )
            })
    }
}

struct Parsed {
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
}

impl fmt::Debug for MqttOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Credentials stay out of logs.
        f.debug_struct("MqttOptions")
            .field("url", &redact(&self.url))
            .field("client_id", &self.client_id)
            .field("version", &self.version)
            .field("keep_alive", &self.keep_alive)
            .field("max_packet_size", &self.max_packet_size)
            .field("reconnect", &self.reconnect)
            .finish_non_exhaustive()
    }
}

/// `url` with the password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://{credentials}@{host}"),
        },
        None => url.to_owned(),
    }
}

/// Whether `route` can be published to: a non-empty MQTT topic name without wildcards or NUL.
pub(crate) fn check_topic(route: &str) -> Result<(), RpcError> {
    if route.is_empty() || route.contains(['+', '#', '\0']) || route.len() > 65_535 {
        return Err(RpcError::transport(
            TransportErrorKind::InvalidRoute,
            format!(
                "the pattern route {route:?} is not a valid MQTT topic name (non-empty, no `+`, `#` or NUL)"
            ),
        ));
    }
    Ok(())
}

/// The topic replies to requests on `topic` are published on (NestJS: `<topic>/reply`).
pub(crate) fn reply_topic(topic: &str) -> String {
    format!("{topic}/reply")
}

/// The shortest keep-alive rumqttc accepts over MQTT 5.
const MQTT5_MIN_KEEP_ALIVE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_short_keep_alive_is_raised_to_what_each_version_allows() {
        for version in [MqttVersion::V311, MqttVersion::V5] {
            for interval in [
                Duration::ZERO,
                Duration::from_secs(1),
                Duration::from_secs(4),
            ] {
                let options = MqttOptions::new("mqtt://127.0.0.1:1")
                    .version(version)
                    .keep_alive(interval);
                assert!(
                    options.session(true, false).is_ok(),
                    "{version:?} {interval:?}"
                );
            }
        }
    }

    #[test]
    fn urls() {
        let parsed = MqttOptions::new("mqtt://u:p@h:1884").parse().unwrap();
        assert_eq!(
            (parsed.host.as_str(), parsed.port, parsed.credentials),
            ("h", 1884, Some(("u".into(), "p".into())))
        );
        let parsed = MqttOptions::new("tcp://broker").parse().unwrap();
        assert_eq!((parsed.host.as_str(), parsed.port), ("broker", 1883));
        assert!(MqttOptions::new("http://h").parse().is_err());
        assert!(MqttOptions::new("mqtt://h:x").parse().is_err());
        let debug = format!("{:?}", MqttOptions::new("mqtt://u:secret@h"));
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn topics() {
        for ok in ["get-user", r#"{"cmd":"sum"}"#, "a/b", "with space"] {
            assert!(check_topic(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/+", "a/#", "a\0"] {
            assert!(check_topic(bad).is_err(), "{bad:?}");
        }
        assert_eq!(reply_topic("sum"), "sum/reply");
    }
}
