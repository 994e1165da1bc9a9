//! NestJS's `Transport.KAFKA` over librdkafka (the `rdkafka` crate; feature `kafka`).
//!
//! Wire-compatible with NestJS 11 in both directions (nestjs-wire-brokers.md §5): the topic is the
//! pattern's route; a record's value is the data alone, encoded as NestJS encodes it (objects and
//! arrays as JSON, strings and numbers as their text); requests carry `kafka_correlationId`,
//! `kafka_replyTopic` (`<route>.reply`) and `kafka_replyPartition`; replies carry
//! `kafka_nest-err` and `kafka_nest-is-disposed`; consumer groups are `<group>-server` and
//! `<group>-client`. A NestJS `ClientKafka` calls a [`KafkaServer`], and a palisade
//! [`Client`](crate::rpc::Client) over a [`KafkaTransport`] calls a NestJS Kafka microservice.
//!
//! ```no_run
//! use palisade::rpc::transport::kafka::{KafkaOptions, KafkaServer, KafkaTransport};
//! use palisade::rpc::{Client, Payload, Router, Server};
//!
//! # #[tokio::main] async fn main() -> Result<(), palisade::rpc::RpcError> {
//! let options = KafkaOptions::new(["127.0.0.1:9092"]).group_id("orders");
//! let server = Server::new(
//!     Router::new()
//!         .message("get-order", |Payload(id): Payload<u64>| async move { format!("order {id}") })
//!         .event("order-created", |Payload(order): Payload<serde_json::Value>| async move {
//!             let _ = order; // handled at least once; a failing event is retried, then dead-lettered
//!         }),
//! )
//! .serve(KafkaServer::new(options.clone()))
//! .await?;
//!
//! let client = Client::builder()
//!     .connect(KafkaTransport::new(options).reply_to(["get-order"]))
//!     .await?;
//! let order: String = client.send("get-order", &7).await?;
//! server.shutdown().await;
//! # let _ = order; Ok(()) }
//! ```
//!
//! # Beyond NestJS
//!
//! - **Scaling.** Servers share the partitions of their topics in the consumer group
//!   `<group>-server` (cooperative-sticky rebalancing). Partitions are handled concurrently —
//!   NestJS handles every record of every topic one at a time — and the records of one partition
//!   in order: events strictly one after another, requests started in order.
//! - **Delivery.** At least once: a record's offset is committed only after its handler finished
//!   (every earlier record of its partition too), every [`commit_interval`](KafkaOptions::commit_interval).
//!   A failing event is retried with backoff and then published to a dead-letter topic with the
//!   reason in its headers ([`KafkaEvents`]). A rebalance loses nothing: a partition's records
//!   not yet handled are handled by its next owner (some of them twice, as at-least-once allows).
//!   Neither does a shutdown: an event still failing then is not committed, and is delivered
//!   again after the restart. A dead letter the broker does not take holds up its partition and
//!   is tried again until it is published; one too large with its headers goes without the
//!   record's value and headers ([`DEAD_LETTER_VALUE_OMITTED`]), naming the record by
//!   [partition](DEAD_LETTER_PARTITION) and [offset](DEAD_LETTER_OFFSET).
//! - **Ordering of events.** [`KafkaRecord`] sets a record's key: events with one key go to one
//!   partition and are handled in order.
//! - **Producers** are idempotent with `acks=all` by default, and every `emit` resolves once the
//!   broker stored the event. One the broker does not acknowledge within the
//!   [delivery timeout](KafkaOptions::delivery_timeout) fails with `Unavailable`
//!   ([`NotAcknowledged`](crate::rpc::TransportErrorKind::NotAcknowledged)) and is not sent again:
//!   a broker that was only slow may still store it, so a retry of it may store it twice. A
//!   server's last reply to a request is the exception: it is sent once more on a fresh producer
//!   (the caller would otherwise wait out its deadline), and a copy reaches the caller as a late
//!   reply, which is dropped. A record a broken producer refused before queueing it went nowhere,
//!   and is sent once more on a fresh producer.
//! - **Request/reply.** The client reads its reply topics in the group `<group>-client`, so each
//!   client instance reads partitions no other one reads, and names the lowest of them in
//!   `kafka_replyPartition`. When a partition is assigned it starts reading at the partition's end
//!   offset as read *before* any request names it, so no reply is missed. An empty stream is
//!   answered with its completion record (a NestJS Kafka server hangs there). A reply topic needs
//!   at least as many partitions as there are client instances in the group.
//! - **Errors** keep their kind: a message over the size limit is `InvalidArgument`
//!   ([`TransportErrorKind::PayloadTooLarge`](crate::rpc::TransportErrorKind)), a pattern that is
//!   not a valid topic name too, an unknown topic with topic creation off is `NotFound`, an
//!   authorisation failure `PermissionDenied`, a broker that does not acknowledge `Unavailable`.
//!   Every request in flight resolves.
//! - **Closing** never waits on the broker where it could hold anything up. A dropped client or
//!   server closes its group consumer (the last offsets committed, the group left) on a thread of
//!   its own: librdkafka can wait forever there when the broker is gone, and neither a runtime
//!   thread nor the runtime's shutdown waits with it. [`KafkaServer`]'s shutdown flushes its last
//!   replies and then waits for its close, each up to the
//!   [delivery timeout](KafkaOptions::delivery_timeout); a process that exits without shutting
//!   its servers down may cut a close short ([`consumers_closing`] says more).
//!
//! # Values
//!
//! NestJS sends scalars as text (`3`, `abc`) and hands them to handlers as strings. palisade
//! decodes them usefully for Rust types: text that is a JSON number, `true`, `false` or `null` is
//! that value, other text is a string, `{…}`/`[…]` is JSON, and a value starting with a 0x00 byte
//! (schema-registry framing) is Node's JSON form of a `Buffer`. Between palisade peers a string
//! value is marked (header `palisade-type: string`), so strings that look like numbers stay
//! strings. Object patterns cannot be Kafka topics: only string patterns of `[A-Za-z0-9._-]`.

mod client;
mod closing;
mod server;
mod value;

pub use self::client::{KafkaConnection, KafkaTransport};
pub use self::server::{
    DEAD_LETTER_OFFSET, DEAD_LETTER_PARTITION, DEAD_LETTER_VALUE_OMITTED, KafkaEvents, KafkaServer,
};

/// Group consumers of dropped Kafka clients and servers whose close has not finished: each still
/// holds a thread, its sockets and librdkafka's threads, until its broker answers (then the close
/// completes and frees them). A number that only grows means the broker is gone for good.
///
/// A process that exits while a close is under way cuts it short: the offsets stored since the
/// last commit are not committed (those records are delivered again, as at-least-once allows)
/// and the group notices the member gone only at its session timeout. Shut servers down
/// ([`ServerHandle::shutdown`](crate::rpc::ServerHandle::shutdown)) before exiting: that waits for
/// the close, up to the delivery timeout.
pub fn consumers_closing() -> usize {
    closing::closing()
}

use crate::rpc::wire::{Codec, SharedCodec};
use crate::rpc::{RpcError, TransportErrorKind};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// How to reach Kafka and how to behave on it: shared by [`KafkaServer`] and [`KafkaTransport`].
///
/// | setting | default | |
/// |---|---|---|
/// | [`client_id`](Self::client_id) | `palisade` | `<id>-server` / `<id>-client`, as NestJS names them |
/// | [`group_id`](Self::group_id) | `palisade` | groups `<id>-server` and `<id>-client` |
/// | [`create_topics`](Self::create_topics) | on | the topics a server or client uses are created if missing |
/// | [`partitions`](Self::partitions) | the broker's default | for topics palisade creates |
/// | [`replication`](Self::replication) | the broker's default | for topics palisade creates |
/// | [`idempotent`](Self::idempotent) | on, with `acks=all` | producers |
/// | [`delivery_timeout`](Self::delivery_timeout) | 10 s | a record not acknowledged by then fails |
/// | [`fetch_wait`](Self::fetch_wait) | 100 ms | the longest a fetch waits for data (the latency floor on brokers that do not wake fetches) |
/// | [`session_timeout`](Self::session_timeout) | 10 s | a consumer silent this long leaves its group |
/// | [`commit_interval`](Self::commit_interval) | 1 s | handled records' offsets are committed this often |
/// | [`join_timeout`](Self::join_timeout) | 30 s | how long a client waits to be given reply partitions |
/// | [`max_message_bytes`](Self::max_message_bytes) | 1 000 000 | librdkafka's `message.max.bytes` |
/// | [`from_beginning`](Self::from_beginning) | off | where a new server group starts reading |
///
/// Any other librdkafka property — SASL, TLS (with the `rdkafka` crate's `ssl` feature), compression
/// — passes through [`set`](Self::set):
///
/// ```
/// use palisade::rpc::transport::kafka::KafkaOptions;
///
/// let options = KafkaOptions::new(["kafka-1:9093", "kafka-2:9093"])
///     .group_id("billing")
///     .set("security.protocol", "SASL_SSL")
///     .set("sasl.mechanisms", "PLAIN")
///     .set("sasl.username", "billing")
///     .set("sasl.password", "s3cret");
/// # let _ = options;
/// ```
#[derive(Clone)]
#[must_use]
pub struct KafkaOptions {
    bootstrap: Vec<String>,
    client_id: String,
    group_id: String,
    create_topics: bool,
    partitions: Option<i32>,
    replication: Option<i32>,
    idempotent: bool,
    delivery_timeout: Duration,
    fetch_wait: Duration,
    session_timeout: Duration,
    commit_interval: Duration,
    join_timeout: Duration,
    max_message_bytes: usize,
    from_beginning: bool,
    extra: BTreeMap<String, String>,
    codec: SharedCodec,
}

impl KafkaOptions {
    /// Options for these bootstrap servers (`host:port`).
    pub fn new<S: Into<String>>(bootstrap: impl IntoIterator<Item = S>) -> Self {
        KafkaOptions {
            bootstrap: bootstrap.into_iter().map(Into::into).collect(),
            client_id: "palisade".into(),
            group_id: "palisade".into(),
            create_topics: true,
            partitions: None,
            replication: None,
            idempotent: true,
            delivery_timeout: Duration::from_secs(10),
            fetch_wait: Duration::from_millis(100),
            session_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_secs(1),
            join_timeout: Duration::from_secs(30),
            max_message_bytes: 1_000_000,
            from_beginning: false,
            extra: BTreeMap::new(),
            codec: SharedCodec::default(),
        }
    }

    /// How record values are written and read: NestJS's way (the default: JSON, a string as its
    /// raw text), or another [`Codec`]'s [`encode_value`](Codec::encode_value), such as
    /// [`MessagePackCodec`](crate::rpc::wire::MessagePackCodec) (feature `msgpack`), where every
    /// client and server of these topics is palisade with the same codec. The envelope stays in
    /// record headers either way, and NestJS's `{key, value, headers}` message shape still picks a
    /// record's key and headers; only the value (and an error reply's `kafka_nest-err` header)
    /// changes. A server that cannot read a request answers it at once with an error naming its
    /// codec, and dead-letters an event it cannot read.
    pub fn codec(mut self, codec: impl Codec) -> Self {
        self.codec = SharedCodec::new(codec);
        self
    }

    pub(crate) fn shared_codec(&self) -> &SharedCodec {
        &self.codec
    }

    /// The client id (`<id>-server` for servers, `<id>-client` for clients).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// The consumer group id (`<id>-server` for servers, `<id>-client` for clients, as NestJS
    /// names them). Instances of one service share it.
    pub fn group_id(mut self, id: impl Into<String>) -> Self {
        self.group_id = id.into();
        self
    }

    /// Whether the topics a server or client uses are created when missing (on by default). Off,
    /// they must exist — create them explicitly — and a missing one is an `UnknownDestination`
    /// error.
    pub fn create_topics(mut self, create: bool) -> Self {
        self.create_topics = create;
        self
    }

    /// Partitions of the topics palisade creates (default: the broker's default).
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Replication factor of the topics palisade creates (default: the broker's default).
    pub fn replication(mut self, replicas: i32) -> Self {
        self.replication = Some(replicas);
        self
    }

    /// Idempotent producers with `acks=all` (on by default); off, `acks=all` without idempotence.
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }

    /// How long a produced record may wait for the broker's acknowledgement. At most
    /// `i32::MAX` milliseconds (about 24.8 days), librdkafka's limit: a longer one is that.
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout.min(MAX_LIBRDKAFKA_TIMEOUT);
        self
    }

    /// The longest a fetch waits for data. At most 5 minutes, librdkafka's limit: a longer one is
    /// that.
    pub fn fetch_wait(mut self, wait: Duration) -> Self {
        self.fetch_wait = wait.min(MAX_FETCH_WAIT);
        self
    }

    /// A consumer that sends no heartbeat for this long leaves its group (its partitions move).
    /// Real Kafka brokers accept 6 s to 30 minutes by default (`group.min.session.timeout.ms`,
    /// `group.max.session.timeout.ms`). At most an hour, librdkafka's limit: a longer one is
    /// that.
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout.min(MAX_SESSION_TIMEOUT);
        self
    }

    /// How often handled records' offsets are committed. At most a day, librdkafka's limit: a
    /// longer one is that.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval.min(MAX_COMMIT_INTERVAL);
        self
    }

    /// How long a client waits for its group to give it partitions of a reply topic.
    pub fn join_timeout(mut self, timeout: Duration) -> Self {
        self.join_timeout = timeout;
        self
    }

    /// The largest record palisade produces (librdkafka's `message.max.bytes`): a larger one fails
    /// at once with `InvalidArgument`.
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Where a server group starts reading a partition it never committed an offset for (a new
    /// service, or new partitions): at the end as it is when the partition is assigned (default,
    /// as NestJS's `fromBeginning: false`), or at the beginning (`true`: a new service handles
    /// the events already stored).
    pub fn from_beginning(mut self, from_beginning: bool) -> Self {
        self.from_beginning = from_beginning;
        self
    }

    /// Sets any librdkafka property (`security.protocol`, `sasl.*`, `ssl.*`,
    /// `compression.type`, ...); it overrides palisade's own settings.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    fn base(&self, role: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.bootstrap.join(","))
            .set("client.id", format!("{}-{role}", self.client_id))
            .set("reconnect.backoff.max.ms", "1000")
            .set("message.max.bytes", self.max_message_bytes.to_string())
            // librdkafka logs through the `log` crate only when told a level.
            .set_log_level(RDKafkaLogLevel::Warning);
        config
    }

    fn finish(&self, mut config: ClientConfig) -> ClientConfig {
        for (key, value) in &self.extra {
            config.set(key, value);
        }
        config
    }

    pub(crate) fn producer_config(&self, role: &str) -> ClientConfig {
        let mut config = self.base(role);
        config
            .set("acks", "all")
            .set("enable.idempotence", self.idempotent.to_string())
            .set("message.timeout.ms", millis(self.delivery_timeout))
            .set("linger.ms", "0")
            .set("allow.auto.create.topics", self.create_topics.to_string())
            .set("topic.metadata.propagation.max.ms", "1000");
        self.finish(config)
    }

    pub(crate) fn consumer_config(&self, role: &str) -> ClientConfig {
        let mut config = self.base(role);
        let session = self.session_timeout.max(Duration::from_millis(100));
        config
            .set("group.id", format!("{}-{role}", self.group_id))
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", millis(self.commit_interval))
            .set(
                "auto.offset.reset",
                if self.from_beginning {
                    "earliest"
                } else {
                    "latest"
                },
            )
            .set("session.timeout.ms", millis(session))
            .set(
                "heartbeat.interval.ms",
                millis((session / 3).max(Duration::from_millis(10))),
            )
            // librdkafka refuses a poll interval shorter than the session timeout; its default
            // is 5 minutes.
            .set(
                "max.poll.interval.ms",
                millis(session.max(Duration::from_secs(300))),
            )
            .set("fetch.wait.max.ms", millis(self.fetch_wait))
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("topic.metadata.refresh.interval.ms", "5000")
            .set("enable.partition.eof", "false");
        self.finish(config)
    }

    fn admin_config(&self) -> ClientConfig {
        self.finish(self.base("admin"))
    }

    /// The servers, for messages.
    fn servers(&self) -> String {
        self.bootstrap.join(",")
    }
}

impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Passed-through properties may hold credentials: only their keys are shown.
        f.debug_struct("KafkaOptions")
            .field("bootstrap", &self.bootstrap)
            .field("client_id", &self.client_id)
            .field("group_id", &self.group_id)
            .field("create_topics", &self.create_topics)
            .field("idempotent", &self.idempotent)
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The longest time librdkafka takes (milliseconds in an `i32`).
const MAX_LIBRDKAFKA_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);
/// librdkafka's ranges for `fetch.wait.max.ms`, `session.timeout.ms` and
/// `auto.commit.interval.ms`: a value outside them fails the client's creation.
const MAX_FETCH_WAIT: Duration = Duration::from_secs(300);
const MAX_SESSION_TIMEOUT: Duration = Duration::from_secs(3600);
const MAX_COMMIT_INTERVAL: Duration = Duration::from_secs(86_400);

fn millis(duration: Duration) -> String {
    duration.as_millis().clamp(1, i32::MAX as u128).to_string()
}

/// A record with a key (and headers, or a partition) for [`emit`](crate::rpc::Client::emit) or
/// [`send`](crate::rpc::Client::send): events with one key go to one partition, so events about
/// one entity are handled in order.
///
/// It is NestJS's own convention: a payload object with a `key` or `value` field is sent as the
/// Kafka message itself (so a payload that has such a field for other reasons must be wrapped
/// in a `KafkaRecord`).
///
/// ```
/// use palisade::rpc::transport::kafka::KafkaRecord;
/// use serde_json::json;
///
/// let record = KafkaRecord::new(json!({"order": 7, "status": "paid"})).key("order-7");
/// assert_eq!(
///     serde_json::to_value(&record).unwrap(),
///     json!({"key": "order-7", "value": {"order": 7, "status": "paid"}})
/// );
/// ```
#[derive(Clone, Debug, Serialize)]
#[must_use]
pub struct KafkaRecord<T> {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    value: T,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<i32>,
}

impl<T> KafkaRecord<T> {
    /// A record carrying `value`.
    pub fn new(value: T) -> Self {
        KafkaRecord {
            key: None,
            value,
            headers: BTreeMap::new(),
            partition: None,
        }
    }

    /// With this key (the partition follows from it).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// With this header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// To this partition (instead of the key's).
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
}

/// The route of a pattern as a topic, or why it cannot be one.
pub(crate) fn topic_of(route: &str) -> Result<&str, RpcError> {
    if value::valid_topic(route) {
        Ok(route)
    } else {
        Err(RpcError::transport(
            TransportErrorKind::InvalidRoute,
            format!(
                "the pattern route {route:?} is not a valid Kafka topic name (1 to 249 characters \
                 of [A-Za-z0-9._-]; object patterns cannot be Kafka topics)"
            ),
        ))
    }
}

/// A Kafka error as an `RpcError` of the right kind.
pub(crate) fn kafka_error(error: &KafkaError, what: &str) -> RpcError {
    use RDKafkaErrorCode as Code;
    // librdkafka refused its configuration (an `extra` setting it does not know, a value out of
    // its range): no retry changes that.
    if matches!(
        error,
        KafkaError::ClientCreation(_) | KafkaError::ClientConfig(..)
    ) {
        return RpcError::invalid_argument(format!("{what}: {error}"));
    }
    let code = match error {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    let kind = match code {
        Some(Code::MessageSizeTooLarge) | Some(Code::InvalidMessageSize) => {
            TransportErrorKind::PayloadTooLarge
        }
        Some(Code::InvalidTopic) => TransportErrorKind::InvalidRoute,
        Some(Code::UnknownTopicOrPartition)
        | Some(Code::UnknownTopic)
        | Some(Code::UnknownPartition) => TransportErrorKind::UnknownDestination,
        Some(Code::TopicAuthorizationFailed)
        | Some(Code::GroupAuthorizationFailed)
        | Some(Code::ClusterAuthorizationFailed)
        | Some(Code::TransactionalIdAuthorizationFailed) => TransportErrorKind::Authorization,
        Some(Code::SaslAuthenticationFailed) | Some(Code::Authentication) => {
            TransportErrorKind::Authentication
        }
        Some(Code::MessageTimedOut)
        | Some(Code::RequestTimedOut)
        | Some(Code::NotEnoughReplicas)
        | Some(Code::NotEnoughReplicasAfterAppend)
        | Some(Code::LeaderNotAvailable)
        | Some(Code::NotLeaderForPartition) => TransportErrorKind::NotAcknowledged,
        Some(Code::AllBrokersDown) | Some(Code::BrokerTransportFailure) => {
            TransportErrorKind::ConnectionLost
        }
        _ => TransportErrorKind::Io,
    };
    RpcError::transport(kind, format!("{what}: {error}"))
}

/// Creates the topics a server or client uses, when [topic creation](KafkaOptions::create_topics)
/// is on: one admin client for the server's or connection's life.
pub(crate) struct Topics {
    admin: Option<AdminClient<DefaultClientContext>>,
    options: KafkaOptions,
}

impl Topics {
    pub(crate) fn new(options: &KafkaOptions) -> Result<Self, RpcError> {
        let admin = if options.create_topics {
            Some(
                options
                    .admin_config()
                    .create()
                    .map_err(|error| kafka_error(&error, "cannot create the Kafka admin client"))?,
            )
        } else {
            None
        };
        Ok(Topics {
            admin,
            options: options.clone(),
        })
    }

    /// Whether topics are created (topic creation is on).
    pub(crate) fn creates(&self) -> bool {
        self.admin.is_some()
    }

    /// Creates those of `topics` that do not exist yet (those that do are left as they are). With
    /// topic creation off, fails with `NotFound` naming those that do not exist.
    pub(crate) async fn ensure(&self, topics: &[String]) -> Result<(), RpcError> {
        let Some(admin) = &self.admin else {
            return self.check_exist(topics).await;
        };
        if topics.is_empty() {
            return Ok(());
        }
        let options = &self.options;
        let partitions = options.partitions.unwrap_or(-1);
        let replication = options.replication.unwrap_or(-1);
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|topic| NewTopic::new(topic, partitions, TopicReplication::Fixed(replication)))
            .collect();
        let admin_options = AdminOptions::new().request_timeout(Some(options.delivery_timeout));
        let results = admin
            .create_topics(&new, &admin_options)
            .await
            .map_err(|error| {
                kafka_error(
                    &error,
                    &format!("cannot create topics on Kafka at {}", options.servers()),
                )
            })?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(kafka_error(
                        &KafkaError::AdminOp(code),
                        &format!("cannot create the topic {topic:?}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Topics {
    /// Fails with `NotFound` when one of `topics` does not exist (topic creation off: nothing
    /// would ever arrive on them, and a server that waited for them would wait silently).
    async fn check_exist(&self, topics: &[String]) -> Result<(), RpcError> {
        if topics.is_empty() {
            return Ok(());
        }
        let options = self.options.clone();
        let wanted = topics.to_vec();
        let missing = tokio::task::spawn_blocking(move || -> Result<Vec<String>, RpcError> {
            let client: AdminClient<DefaultClientContext> = options
                .admin_config()
                .create()
                .map_err(|error| kafka_error(&error, "cannot create the Kafka admin client"))?;
            let metadata = client
                .inner()
                .fetch_metadata(None, options.delivery_timeout)
                .map_err(|error| {
                    kafka_error(
                        &error,
                        &format!("cannot read the topics of Kafka at {}", options.servers()),
                    )
                })?;
            let existing: HashSet<&str> = metadata
                .topics()
                .iter()
                .filter(|topic| topic.error().is_none() && !topic.partitions().is_empty())
                .map(|topic| topic.name())
                .collect();
            Ok(wanted
                .into_iter()
                .filter(|topic| !existing.contains(topic.as_str()))
                .collect())
        })
        .await
        .map_err(|_| RpcError::internal())??;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(RpcError::transport(
                TransportErrorKind::UnknownDestination,
                format!(
                    "the Kafka topics {missing:?} do not exist and topic creation is off \
                     (KafkaOptions::create_topics): create them, or turn creation on"
                ),
            ))
        }
    }
}

/// Watches a delivery its caller stopped waiting for.
struct Watch<'a> {
    delivery: Option<rdkafka::producer::DeliveryFuture>,
    producer: &'a Producer,
    generation: u64,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let Some(delivery) = self.delivery.take() else {
            return;
        };
        // A future dropped outside a runtime (kept past it, or polled by another executor) has
        // nothing to watch with: the producer is judged by the next record that times out.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (current, generation) = (Arc::clone(&self.producer.current), self.generation);
        let (options, role) = (self.producer.options.clone(), self.producer.role);
        runtime.spawn(async move {
            if let Ok(Err((error, _))) = delivery.await {
                let _ = Producer::judge_in(&current, &options, role, &error, generation);
            }
        });
    }
}

/// Whether a failed send replaced the producer, and whether the record was queued first (and so
/// may have reached the broker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Replaced {
    No,
    /// Refused before it was queued: it went nowhere.
    BeforeQueueing,
    /// Given up on after it was queued: a broker that was only slow may store it yet.
    AfterQueueing,
}

impl Replaced {
    fn before_queueing(replaced: bool) -> Self {
        if replaced {
            Replaced::BeforeQueueing
        } else {
            Replaced::No
        }
    }

    fn after_queueing(replaced: bool) -> Self {
        if replaced {
            Replaced::AfterQueueing
        } else {
            Replaced::No
        }
    }
}

/// A producer, replaced when librdkafka gives up on it: after a broker lost the producer's state,
/// an idempotent producer can retry its epoch forever, and every later record times out.
pub(crate) struct Producer {
    options: KafkaOptions,
    role: &'static str,
    current: Arc<std::sync::Mutex<(u64, rdkafka::producer::FutureProducer)>>,
}

impl Producer {
    pub(crate) fn new(options: &KafkaOptions, role: &'static str) -> Result<Self, RpcError> {
        Ok(Producer {
            current: Arc::new(std::sync::Mutex::new((0, Self::create(options, role)?))),
            options: options.clone(),
            role,
        })
    }

    fn create(
        options: &KafkaOptions,
        role: &str,
    ) -> Result<rdkafka::producer::FutureProducer, RpcError> {
        options.producer_config(role).create().map_err(|error| {
            kafka_error(
                &error,
                &format!("cannot create a Kafka producer for {}", options.servers()),
            )
        })
    }

    fn current(&self) -> (u64, rdkafka::producer::FutureProducer) {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the producer of `generation` (unless someone replaced it already).
    fn judge_in(
        current: &std::sync::Mutex<(u64, rdkafka::producer::FutureProducer)>,
        options: &KafkaOptions,
        role: &str,
        error: &KafkaError,
        generation: u64,
    ) -> bool {
        use rdkafka::producer::Producer as _;
        // Timed out (the broker may have lost the producer's state), or fatal: an idempotent
        // producer whose sequence numbers the broker no longer accepts never recovers.
        let fatal = {
            let current = current
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            current.0 == generation && current.1.client().fatal_error().is_some()
        };
        let gave_up = fatal
            || matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::Fatal)
            );
        if gave_up {
            Self::replace_in(current, options, role, generation);
        }
        gave_up
    }

    fn replace_in(
        current: &std::sync::Mutex<(u64, rdkafka::producer::FutureProducer)>,
        options: &KafkaOptions,
        role: &str,
        generation: u64,
    ) {
        let mut current = current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.0 != generation {
            return;
        }
        match Self::create(options, role) {
            Ok(producer) => {
                tracing::warn!("replacing a Kafka producer whose records time out");
                *current = (generation + 1, producer);
            }
            Err(error) => tracing::warn!(%error, "cannot replace a Kafka producer"),
        }
    }

    /// Produces `record` to `topic` and waits for the broker's acknowledgement, up to the
    /// delivery timeout. A record the producer gave up on fails (the producer is replaced for
    /// the records after it): the broker may still have stored it, if it was only slow, so it is
    /// not sent again here, where a copy would be a second event or a second request. One a
    /// producer in a fatal state refused before queueing it went nowhere: it is sent once more,
    /// with a fresh producer.
    pub(crate) async fn send(
        &self,
        topic: &str,
        record: &value::Outgoing,
        headers: &[(&str, &[u8])],
    ) -> Result<(), RpcError> {
        self.send_resending(topic, record, headers, |replaced| {
            replaced == Replaced::BeforeQueueing
        })
        .await
    }

    /// [`send`](Self::send) for a request's last reply: one the producer gave up on (timed out:
    /// the broker may have lost the producer's state) is sent once more with a fresh producer,
    /// since its caller would otherwise wait out its deadline. A copy of it, should the first
    /// have been stored after all, reaches the caller as a late reply, which is dropped.
    pub(crate) async fn send_last_reply(
        &self,
        topic: &str,
        record: &value::Outgoing,
        headers: &[(&str, &[u8])],
    ) -> Result<(), RpcError> {
        self.send_resending(topic, record, headers, |replaced| replaced != Replaced::No)
            .await
    }

    /// Sends `record`, once more with the fresh producer when the first send replaced the
    /// producer in a way `resend` takes.
    async fn send_resending(
        &self,
        topic: &str,
        record: &value::Outgoing,
        headers: &[(&str, &[u8])],
        resend: impl Fn(Replaced) -> bool,
    ) -> Result<(), RpcError> {
        match self.send_once(topic, record, headers).await {
            Err((error, replaced)) if resend(replaced) => {
                tracing::debug!(%error, "sending once more with a new producer");
                self.send_once(topic, record, headers)
                    .await
                    .map_err(|(error, _)| error)
            }
            other => other.map_err(|(error, _)| error),
        }
    }

    /// Sends `record` once; on failure, whether the producer was replaced for it, and when.
    async fn send_once(
        &self,
        topic: &str,
        record: &value::Outgoing,
        headers: &[(&str, &[u8])],
    ) -> Result<(), (RpcError, Replaced)> {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::FutureRecord;
        let mut owned = OwnedHeaders::new_with_capacity(record.headers.len() + headers.len());
        for (key, value) in record
            .headers
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_slice()))
            .chain(headers.iter().copied())
        {
            owned = owned.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut future: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(owned);
        if let Some(key) = &record.key {
            future = future.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            future = future.payload(value.as_slice());
        }
        if let Some(partition) = record.partition {
            future = future.partition(partition);
        }
        let (generation, producer) = self.current();
        // Queue it (waiting while librdkafka's queue is full, up to the delivery timeout)...
        let queued_by = tokio::time::Instant::now() + self.options.delivery_timeout;
        let delivery = loop {
            match producer.send_result(future) {
                Ok(delivery) => break delivery,
                Err((error, record))
                    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull)
                        && tokio::time::Instant::now() < queued_by =>
                {
                    future = record;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => {
                    let replaced = Replaced::before_queueing(self.judge(&error, generation));
                    let error =
                        kafka_error(&error, &format!("cannot produce to the topic {topic:?}"));
                    return Err((error, replaced));
                }
            }
        };
        // ...and wait for the broker's acknowledgement. A caller that stops waiting (its deadline
        // passed) leaves the watching to a task, so that a producer whose records time out is
        // replaced whoever was waiting.
        let mut watch = Watch {
            delivery: Some(delivery),
            producer: self,
            generation,
        };
        let delivered = watch.delivery.as_mut().expect("set above").await;
        watch.delivery = None;
        match delivered {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((error, _))) => {
                let replaced = Replaced::after_queueing(self.judge(&error, generation));
                let error = kafka_error(&error, &format!("cannot produce to the topic {topic:?}"));
                Err((error, replaced))
            }
            Err(_) => Err((
                RpcError::transport(
                    TransportErrorKind::ConnectionLost,
                    format!(
                        "the Kafka producer was closed before {topic:?} acknowledged the record"
                    ),
                ),
                Replaced::No,
            )),
        }
    }

    /// Replaces the producer when `error` shows it gave up; whether it did.
    fn judge(&self, error: &KafkaError, generation: u64) -> bool {
        Self::judge_in(&self.current, &self.options, self.role, error, generation)
    }

    /// Waits (up to `timeout`) for records still queued to be delivered.
    pub(crate) async fn flush(&self, timeout: Duration) {
        let (_, producer) = self.current();
        let flushed = tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer as _;
            producer.flush(timeout)
        })
        .await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "records still queued for Kafka were not delivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_timeout_beyond_librdkafkas_limit_is_its_limit() {
        let options = KafkaOptions::new(["127.0.0.1:9092"]);
        let huge = options.clone().delivery_timeout(Duration::MAX);
        assert_eq!(huge.delivery_timeout, MAX_LIBRDKAFKA_TIMEOUT);
        // Deadlines are computed from it: they must not overflow.
        assert!(
            tokio::time::Instant::now()
                .checked_add(huge.delivery_timeout)
                .is_some()
        );
        let exact = options.clone().delivery_timeout(MAX_LIBRDKAFKA_TIMEOUT);
        assert_eq!(exact.delivery_timeout, MAX_LIBRDKAFKA_TIMEOUT);
        let short = options.delivery_timeout(Duration::from_millis(3));
        assert_eq!(short.delivery_timeout, Duration::from_millis(3));
    }
}
