//! Durable events on JetStream: at-least-once delivery, redelivery with backoff, dead letters.

use super::server::request_from;
use crate::rpc::transport::shortened;
use crate::rpc::{Dispatcher, RpcError};
use async_nats::jetstream::{self, AckKind, consumer::pull, stream};
use futures_util::StreamExt;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

pub use crate::rpc::transport::{DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON, DEAD_LETTER_SUBJECT};

/// Durable events through JetStream — beyond NestJS, for events that must not be lost:
///
/// - a stream stores every event published on the event patterns (clients publish with
///   [`NatsTransport::durable_events`](super::NatsTransport::durable_events) to be sure it was
///   stored);
/// - each event pattern gets a durable consumer; an event is acknowledged only after all of its
///   handlers succeeded, so it survives a crash of the service and is delivered at least once;
/// - when a handler fails the event is redelivered after a delay from the backoff list;
/// - after `max_deliveries` failed deliveries it is published to `<dead letter prefix>.<pattern>`
///   with headers saying why ([`DEAD_LETTER_REASON`], [`DEAD_LETTER_DELIVERIES`],
///   [`DEAD_LETTER_SUBJECT`]), kept in a stream ([`dead_letter_stream`](Self::dead_letter_stream))
///   and then removed from the consumer. A letter is made to fit the server's `max_payload`: the
///   reason is shortened first, and an event that leaves no room goes without its body, the
///   reason saying so (a letter that does not fit is refused every time);
/// - deliveries that ended without an outcome count too: an event delivered more than
///   `max_deliveries` times is dead-lettered without running the handlers, so an event that
///   crashes its server does not crash every server after it. Deliveries are counted as
///   JetStream counts them: an event received in a pull batch but not yet handled when a server
///   stopped, or whose handler a shutdown cut short, was delivered too.
///
/// Ordering is per pattern: one event at a time per consumer, in stream order.
///
/// **Existing streams and consumers** are brought to this configuration at start: the stream
/// gains the server's patterns and takes the configured replicas and limits; each consumer takes
/// its pattern as its subject and the configured [`ack_wait`](Self::ack_wait), allows more
/// than [`max_deliveries`](Self::max_deliveries) (a consumer this server makes allows any number:
/// the server settles every event itself), and keeps the rest (limits an operator set by hand,
/// metadata). What cannot change in place (a stream's
/// storage or retention, a consumer's ack policy) fails the start with `FailedPrecondition`,
/// saying what differs.
///
/// **On a cluster** give the stream replicas ([`replicas`](Self::replicas)): a stream with one
/// replica lives on one node, and while that node is down no durable event can be stored or
/// delivered. With three replicas the stream survives a node, and so do its consumers (they are
/// replicated like the stream). A consumer notices a dead node through its idle heartbeat
/// ([`heartbeat`](Self::heartbeat), 500 ms by default: about a second to resume elsewhere).
///
/// Defaults, in one place:
///
/// | setting | default |
/// |---|---|
/// | [`replicas`](Self::replicas) | 1 |
/// | [`storage`](Self::storage) | [`Storage::File`] |
/// | [`retention`](Self::retention) | [`Retention::Limits`] |
/// | [`max_age`](Self::max_age), [`max_bytes`](Self::max_bytes) | unlimited |
/// | [`duplicate_window`](Self::duplicate_window) | 2 minutes (JetStream's) |
/// | [`max_deliveries`](Self::max_deliveries) | 5 |
/// | [`backoff`](Self::backoff) | 1 s, 5 s, 30 s |
/// | [`ack_wait`](Self::ack_wait) | 30 s |
/// | [`heartbeat`](Self::heartbeat) / [`pull_expiry`](Self::pull_expiry) | 500 ms / 5 s |
/// | [`pull_batch`](Self::pull_batch) | 100 events |
/// | [`consumer_prefix`](Self::consumer_prefix) | `palisade` |
/// | [`dead_letter_prefix`](Self::dead_letter_prefix) | `palisade.dead-letter` |
/// | [`dead_letter_stream`](Self::dead_letter_stream) | `<stream>_DEAD_LETTERS` |
///
/// An event published with the header [`IDEMPOTENCY_KEY`](crate::rpc::transport::IDEMPOTENCY_KEY)
/// is stored once per key within the duplicate window (the key becomes JetStream's
/// `Nats-Msg-Id`), so a retried durable emit does not store the event twice.
///
/// ```no_run
/// use palisade::rpc::transport::nats::{DurableEvents, NatsOptions, NatsServer};
/// use std::time::Duration;
///
/// let server = NatsServer::new(NatsOptions::new(["nats://127.0.0.1:4222"])).durable_events(
///     DurableEvents::new("ORDERS")
///         .consumer_prefix("billing")
///         .max_deliveries(5)
///         .backoff([Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(60)]),
/// );
/// # let _ = server;
/// ```
#[derive(Clone, Debug)]
pub struct DurableEvents {
    stream: String,
    consumer_prefix: String,
    max_deliveries: u32,
    backoff: Vec<Duration>,
    ack_wait: Duration,
    dead_letter_prefix: String,
    /// `None`: the default name; `Some(None)`: dead letters are only published.
    dead_letter_stream: Option<Option<String>>,
    replicas: usize,
    storage: Storage,
    retention: Retention,
    max_age: Option<Duration>,
    max_bytes: Option<u64>,
    duplicate_window: Duration,
    heartbeat: Duration,
    pull_expiry: Duration,
    pull_batch: usize,
    /// The server's codec, set when it starts.
    pub(crate) codec: crate::rpc::wire::SharedCodec,
}

/// Where a durable-events stream keeps its events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Storage {
    /// On disk: events survive a restart of the node.
    #[default]
    File,
    /// In memory: faster, lost when the node stops (unless other replicas keep them).
    Memory,
}

/// When a durable-events stream removes an event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Retention {
    /// When a limit ([`max_age`](DurableEvents::max_age), [`max_bytes`](DurableEvents::max_bytes))
    /// says so; acknowledged events stay for other consumers and replays.
    #[default]
    Limits,
    /// Once every consumer that was interested acknowledged it.
    Interest,
    /// Once one consumer acknowledged it (each event is work for one service only).
    WorkQueue,
}

impl Storage {
    fn jetstream(self) -> stream::StorageType {
        match self {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        }
    }
}

impl Retention {
    fn jetstream(self) -> stream::RetentionPolicy {
        match self {
            Retention::Limits => stream::RetentionPolicy::Limits,
            Retention::Interest => stream::RetentionPolicy::Interest,
            Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
        }
    }
}

impl DurableEvents {
    /// Events stored in the JetStream stream `stream` (created if missing, and extended to cover
    /// the server's event patterns). Defaults: 5 deliveries, redelivery after 1 s, 5 s, 30 s, a
    /// 30 s ack wait, dead letters on `palisade.dead-letter.<pattern>`, kept in the stream
    /// `<stream>_DEAD_LETTERS`.
    pub fn new(stream: impl Into<String>) -> Self {
        DurableEvents {
            stream: stream.into(),
            consumer_prefix: "palisade".into(),
            max_deliveries: 5,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            ack_wait: Duration::from_secs(30),
            dead_letter_prefix: "palisade.dead-letter".into(),
            dead_letter_stream: None,
            replicas: 1,
            storage: Storage::File,
            retention: Retention::Limits,
            max_age: None,
            max_bytes: None,
            duplicate_window: Duration::from_secs(120),
            heartbeat: Duration::from_millis(500),
            pull_expiry: Duration::from_secs(5),
            pull_batch: 100,
            codec: crate::rpc::wire::SharedCodec::default(),
        }
    }

    /// Copies of the stream kept on different nodes of a cluster (1 to 5; default 1). An existing
    /// stream is scaled to this.
    ///
    /// # Panics
    /// If `replicas` is not within 1 to 5 (JetStream's limits).
    pub fn replicas(mut self, replicas: usize) -> Self {
        assert!(
            (1..=5).contains(&replicas),
            "a JetStream stream has 1 to 5 replicas"
        );
        self.replicas = replicas;
        self
    }

    /// Where the stream keeps its events (default [`Storage::File`]). Fixed once the stream
    /// exists: a different setting is refused with an error that says so.
    pub fn storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// When the stream removes events (default [`Retention::Limits`]). Fixed once the stream
    /// exists, like [`storage`](Self::storage).
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Removes events older than this (default: kept).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Removes the oldest events once the stream holds more than this many bytes (default: no
    /// limit).
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    /// How long the stream remembers an event's idempotency key to drop duplicates (default
    /// 2 minutes).
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// The idle heartbeat of each consumer's pull requests (default 500 ms): two missed
    /// heartbeats (a dead node) and the consumer pulls again, from a node that is alive.
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        // JetStream takes nanoseconds as a signed 64-bit count: `Duration::MAX` would wrap.
        self.heartbeat = heartbeat.min(crate::timeout::FAR_FUTURE);
        self
    }

    /// How long one pull request waits for events before it is renewed (default 5 s; at least
    /// twice the [heartbeat](Self::heartbeat)).
    pub fn pull_expiry(mut self, expiry: Duration) -> Self {
        self.pull_expiry = expiry.min(crate::timeout::FAR_FUTURE);
        self
    }

    /// Events fetched ahead per pull request (default 100); handled one at a time all the same.
    ///
    /// # Panics
    /// If `events` is zero.
    pub fn pull_batch(mut self, events: usize) -> Self {
        assert!(events > 0, "pull_batch must be at least 1");
        self.pull_batch = events;
        self
    }

    /// The stream's configuration for `routes`.
    fn stream_config(&self, routes: Vec<String>) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: routes,
            num_replicas: self.replicas,
            storage: self.storage.jetstream(),
            retention: self.retention.jetstream(),
            max_age: self.max_age.unwrap_or(Duration::ZERO),
            max_bytes: self
                .max_bytes
                .map_or(-1, |bytes| i64::try_from(bytes).unwrap_or(i64::MAX)),
            duplicate_window: self.duplicate_window,
            ..Default::default()
        }
    }

    /// The configuration of the durable consumer `name` of `route`.
    fn consumer_config(&self, name: &str, route: &str) -> pull::Config {
        pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: route.to_owned(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Unlimited: this server settles every event itself, by acknowledging or
            // dead-lettering it. With a limit, JetStream stops delivering an event whose last
            // delivery ended without an outcome (a crash, a dead letter that could not be
            // published), and it stays in the stream, neither handled nor dead-lettered.
            max_deliver: -1,
            ..Default::default()
        }
    }

    /// How an existing stream's configuration must change to match this one: `Err` for what
    /// cannot change in place, `Ok(None)` when it matches.
    fn reconcile(
        &self,
        existing: &stream::Config,
        routes: &[String],
    ) -> Result<Option<stream::Config>, RpcError> {
        let wanted = self.stream_config(routes.to_vec());
        if existing.storage != wanted.storage || existing.retention != wanted.retention {
            return Err(RpcError::new(
                crate::rpc::Code::FailedPrecondition,
                format!(
                    "the JetStream stream {:?} exists with storage {:?} and retention {:?}, but \
                     storage {:?} and retention {:?} are configured; neither can change on an \
                     existing stream: delete the stream (its events with it) or configure what it has",
                    self.stream,
                    existing.storage,
                    existing.retention,
                    wanted.storage,
                    wanted.retention
                ),
            ));
        }
        let mut updated = existing.clone();
        for route in routes {
            if !updated.subjects.contains(route) {
                updated.subjects.push(route.clone());
            }
        }
        updated.num_replicas = wanted.num_replicas;
        updated.max_age = wanted.max_age;
        updated.max_bytes = wanted.max_bytes;
        updated.duplicate_window = wanted.duplicate_window;
        let changed = updated.subjects != existing.subjects
            || updated.num_replicas != existing.num_replicas
            || updated.max_age != existing.max_age
            || updated.max_bytes != existing.max_bytes
            || updated.duplicate_window != existing.duplicate_window;
        Ok(changed.then_some(updated))
    }

    /// Names the durable consumers `<prefix>-<pattern>`: services with different prefixes each get
    /// every event; instances sharing a prefix share the work. A prefix that makes no JetStream
    /// name (whitespace, a control character, `.`, `*`, `>`, `/` or `\`) fails the server's start
    /// with `InvalidArgument`.
    pub fn consumer_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.consumer_prefix = prefix.into();
        self
    }

    /// Deliveries before an event goes to the dead-letter subject. The consumer must deliver an
    /// event once more than this, so that one whose last delivery ended without an outcome is
    /// still dead-lettered: an existing consumer that allows no more is set to allow any number
    /// at start; one that allows more keeps its count, and this server still dead-letters at
    /// this one.
    ///
    /// # Panics
    /// If `deliveries` is zero.
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        assert!(deliveries > 0, "max_deliveries must be at least 1");
        self.max_deliveries = deliveries;
        self
    }

    /// Delays before the 1st, 2nd, ... redelivery of a failed event (the last repeats). A delay
    /// over thirty years (`Duration::MAX`, say) is taken as thirty years: JetStream reads a delay
    /// as signed 64-bit nanoseconds, and drops one that does not fit, redelivering at once.
    /// Events a stopping server gives back wait no longer than its open pull requests last
    /// ([`pull_expiry`](Self::pull_expiry)), whatever the backoff.
    pub fn backoff(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.backoff = delays
            .into_iter()
            .map(|delay| delay.min(crate::timeout::FAR_FUTURE))
            .collect();
        self
    }

    /// How long an event waits, after the server that had it stopped answering for it (crashed,
    /// or cut off from NATS), before it is delivered again. While a server handles an event, or
    /// holds it pulled ahead of its turn, it reports it in progress every `ack_wait / 2`: a
    /// handler may take longer than this. An existing consumer is updated to this wait at
    /// start, and the update reaches the instances of a rolling deployment still running with
    /// another wait.
    ///
    /// # Panics
    /// If `wait` is zero (JetStream would take its own default of 30 s).
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        assert!(!wait.is_zero(), "ack_wait must be more than zero");
        self.ack_wait = wait.min(crate::timeout::FAR_FUTURE);
        self
    }

    /// Dead letters go to `<prefix>.<pattern>`. A prefix that does not make a NATS subject with
    /// every event pattern (a space in it, say), or that holds a wildcard, fails the server's
    /// start with `InvalidArgument`.
    pub fn dead_letter_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.dead_letter_prefix = prefix.into();
        self
    }

    /// The JetStream stream that keeps dead letters (default `Some("<stream>_DEAD_LETTERS")`).
    /// At start, each dead-letter subject that no stream captures yet is added to it (created
    /// if missing, with the events stream's storage and replicas, limits retention); subjects
    /// another stream already captures (one of your own over `palisade.dead-letter.>`, say)
    /// stay there. A dead letter is published through JetStream, and its event is removed only
    /// once the stream has stored it; if it cannot be stored, the event stays and is
    /// dead-lettered again at its next delivery.
    ///
    /// `None` makes no stream: dead letters are published on core NATS only, and are lost
    /// unless something subscribes to them.
    pub fn dead_letter_stream(mut self, stream: Option<impl Into<String>>) -> Self {
        self.dead_letter_stream = Some(stream.map(Into::into));
        self
    }

    /// The name of the dead-letter stream, if dead letters are kept.
    fn dead_letter_stream_name(&self) -> Option<String> {
        match &self.dead_letter_stream {
            None => Some(format!("{}_DEAD_LETTERS", self.stream)),
            Some(name) => name.clone(),
        }
    }

    /// The delay before an event this server gives back as it stops (pulled ahead, or cut short)
    /// is delivered again: the failed event's delay, but no longer than the server's open pull
    /// requests last (at once, it could go to one of them; after a long backoff, events that
    /// never failed would wait it out at every deploy).
    fn handback_delay(&self, redelivery: u64) -> Duration {
        let pulls_last = self
            .pull_expiry
            .max(self.heartbeat.saturating_mul(2))
            .saturating_add(Duration::from_millis(100));
        self.delay_before(redelivery).min(pulls_last)
    }

    fn delay_before(&self, redelivery: u64) -> Duration {
        let index = usize::try_from(redelivery.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(index)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

fn jetstream_error(what: &str, error: impl std::fmt::Display) -> RpcError {
    RpcError::unavailable(format!("JetStream: {what}: {error}"))
}

/// A consumer name for a pattern: NATS names allow no dots, wildcards or spaces.
fn consumer_name(prefix: &str, route: &str) -> String {
    let readable: String = route
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    let hash = crate::rng::mix(
        route
            .bytes()
            .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b)),
    );
    format!("{prefix}-{readable}-{:08x}", hash as u32)
}

/// Checks the names a durable server makes from its configuration, before it connects: checked
/// now, not when the first event fails for good. An event is dead-lettered on a subject made of
/// the prefix and its route, and each route's consumer is named after the consumer prefix;
/// async-nats checks neither (palisade publishes with `skip_subject_validation`, and consumer
/// names go into JetStream's API subjects unchecked).
pub(crate) fn check_names(config: &DurableEvents, routes: &[String]) -> Result<(), RpcError> {
    // Without a durable event nothing is named: no consumer, no dead letter.
    if routes.is_empty() {
        return Ok(());
    }
    let prefix = &config.dead_letter_prefix;
    let prefix_is_literal = super::check_subject(prefix, false).is_ok();
    let unmade = routes.iter().find(|route| {
        !prefix_is_literal
            || super::check_subject(&dead_letter_subject(prefix, route), true).is_err()
    });
    if let Some(route) = unmade {
        return Err(RpcError::invalid_argument(format!(
            "the dead-letter prefix {prefix:?} does not make a valid NATS subject with the route {route:?} (NATS subjects are dot-separated tokens without spaces, and a prefix has no wildcards)"
        )));
    }
    check_consumer_prefix(&config.consumer_prefix)
}

pub(crate) async fn start(
    client: &async_nats::Client,
    dispatcher: &Dispatcher,
    routes: Vec<String>,
    config: DurableEvents,
) -> Result<(), RpcError> {
    if routes.is_empty() {
        return Ok(());
    }
    let context = jetstream::new(client.clone());
    let mut stream = context
        .get_or_create_stream(config.stream_config(routes.clone()))
        .await
        .map_err(|error| {
            jetstream_error(
                &format!("cannot create the stream {:?}", config.stream),
                error,
            )
        })?;
    let info = stream
        .info()
        .await
        .map_err(|error| jetstream_error("cannot read the stream", error))?
        .clone();
    if let Some(updated) = config.reconcile(&info.config, &routes)? {
        let updated = context.update_stream(updated).await.map_err(|error| {
            jetstream_error(
                &format!(
                    "cannot update the stream {:?} to the configured patterns, replicas and limits",
                    config.stream
                ),
                error,
            )
        })?;
        warn_if_not_replicated(&config.stream, updated.config.num_replicas, config.replicas);
    } else {
        warn_if_not_replicated(&config.stream, info.config.num_replicas, config.replicas);
    }
    let keeps_dead_letters = keep_dead_letters(&context, &config, &routes).await?;
    let config = Arc::new(config);
    for route in routes {
        let name = consumer_name(&config.consumer_prefix, &route);
        let (consumer, dead_letter_at) =
            open_consumer(&context, &stream, &name, &route, &config).await?;
        tracing::debug!(%route, consumer = %name, "consuming durable events");
        let dead_letters = DeadLetters {
            client: client.clone(),
            jetstream: keeps_dead_letters.then(|| context.clone()),
        };
        dispatcher.spawn(consume(
            consumer,
            route.into(),
            dead_letters,
            dispatcher.clone(),
            Arc::clone(&config),
            dead_letter_at,
        ));
    }
    Ok(())
}

/// Makes sure a stream keeps the dead letters of `routes` (unless none is configured): each
/// dead-letter subject no stream captures yet goes to the configured dead-letter stream.
/// Whether dead letters are published through JetStream.
async fn keep_dead_letters(
    context: &jetstream::Context,
    config: &DurableEvents,
    routes: &[String],
) -> Result<bool, RpcError> {
    let Some(name) = config.dead_letter_stream_name() else {
        return Ok(false);
    };
    let mut uncaptured = Vec::new();
    for route in routes {
        let subject = dead_letter_subject(&config.dead_letter_prefix, route);
        match context.stream_by_subject(subject.clone()).await {
            Ok(_) => {}
            Err(error)
                if error.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound =>
            {
                uncaptured.push(subject)
            }
            Err(error) => {
                return Err(jetstream_error(
                    &format!("cannot find which stream keeps the dead letters on {subject:?}"),
                    error,
                ));
            }
        }
    }
    if uncaptured.is_empty() {
        return Ok(true);
    }
    let wanted = stream::Config {
        name: name.clone(),
        subjects: uncaptured.clone(),
        num_replicas: config.replicas,
        storage: config.storage.jetstream(),
        retention: stream::RetentionPolicy::Limits,
        ..Default::default()
    };
    let mut stream = context
        .get_or_create_stream(wanted)
        .await
        .map_err(|error| {
            jetstream_error(
                &format!("cannot create the dead-letter stream {name:?}"),
                error,
            )
        })?;
    let existing = stream
        .info()
        .await
        .map_err(|error| jetstream_error("cannot read the dead-letter stream", error))?
        .config
        .clone();
    let mut updated = existing.clone();
    for subject in uncaptured {
        if !updated.subjects.contains(&subject) {
            updated.subjects.push(subject);
        }
    }
    if updated.subjects != existing.subjects {
        context.update_stream(updated).await.map_err(|error| {
            jetstream_error(
                &format!("cannot add the dead-letter subjects to the stream {name:?}"),
                error,
            )
        })?;
    }
    Ok(true)
}

/// Where a server's dead letters go.
struct DeadLetters {
    client: async_nats::Client,
    /// Set when a stream keeps them: published through JetStream and confirmed.
    jetstream: Option<jetstream::Context>,
}

impl DeadLetters {
    async fn publish(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<(), String> {
        match &self.jetstream {
            Some(jetstream) => {
                let ack = jetstream
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|error| error.to_string())?;
                ack.await.map(drop).map_err(|error| error.to_string())
            }
            None => self
                .client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|error| error.to_string()),
        }
    }
}

/// Opens the durable consumer `name` of `route`: creates it, or brings an existing one to the
/// configuration ([`reconcile_consumer`]). Returns it with the delivery at which its failing
/// events are dead-lettered: the configured count, or the consumer's own if it allows fewer (an
/// instance starting at the same moment with a lower count, or an operator, can make it so), since
/// the consumer delivers no more than that and a failing event would otherwise never be
/// dead-lettered.
async fn open_consumer(
    context: &jetstream::Context,
    stream: &stream::Stream,
    name: &str,
    route: &str,
    config: &DurableEvents,
) -> Result<(jetstream::consumer::Consumer<pull::Config>, u64), RpcError> {
    let stream_name = &config.stream;
    // Read raw: async-nats's typed configuration drops the fields it does not know (metadata,
    // priority groups, a pause), and an update sent from it would erase them.
    let info: serde_json::Value = context
        .request(
            format!("CONSUMER.INFO.{stream_name}.{name}"),
            &serde_json::json!({}),
        )
        .await
        .map_err(|error| jetstream_error(&format!("cannot read the consumer {name:?}"), error))?;
    match info.get("error") {
        Some(error) if error.get("code").and_then(serde_json::Value::as_u64) == Some(404) => {
            stream
                .create_consumer(config.consumer_config(name, route))
                .await
                .map_err(|error| {
                    jetstream_error(&format!("cannot create the consumer for {route:?}"), error)
                })?;
        }
        Some(error) => {
            return Err(jetstream_error(
                &format!("cannot read the consumer {name:?}"),
                api_error(error),
            ));
        }
        None => {
            let existing = info.get("config").unwrap_or(&serde_json::Value::Null);
            if let Some(updated) = reconcile_consumer(name, existing, route, config)? {
                update_consumer(context, stream_name, name, updated).await?;
            }
        }
    }
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_consumer(name)
        .await
        .map_err(|error| jetstream_error(&format!("cannot open the consumer {name:?}"), error))?;
    let allowed = consumer.cached_info().config.max_deliver;
    let dead_letter_at = dead_letter_at(config.max_deliveries, allowed);
    if dead_letter_at < u64::from(config.max_deliveries) {
        tracing::warn!(
            consumer = name,
            allowed,
            configured = config.max_deliveries,
            "the durable consumer delivers an event fewer times than configured (lowered since \
             this server raised it?); failing events are dead-lettered after its count"
        );
    }
    Ok((consumer, dead_letter_at))
}

/// The delivery at which a failing event is dead-lettered: the configured count, or the
/// consumer's own if it allows fewer (zero or less allows any number).
fn dead_letter_at(configured: u32, allowed: i64) -> u64 {
    match u64::try_from(allowed) {
        Ok(allowed) if allowed > 0 => allowed.min(u64::from(configured)),
        _ => u64::from(configured),
    }
}

/// Sends an existing consumer's updated configuration (raw, as read).
async fn update_consumer(
    context: &jetstream::Context,
    stream_name: &str,
    name: &str,
    updated: serde_json::Value,
) -> Result<(), RpcError> {
    let subject = format!("CONSUMER.CREATE.{stream_name}.{name}");
    tracing::info!(
        consumer = name,
        ack_wait_ns = %updated["ack_wait"],
        max_deliver = %updated["max_deliver"],
        "updating the durable consumer to the configured ack wait and deliveries"
    );
    let response: serde_json::Value = context
        .request(
            subject,
            &serde_json::json!({"stream_name": stream_name, "config": updated}),
        )
        .await
        .map_err(|error| jetstream_error(&format!("cannot update the consumer {name:?}"), error))?;
    if let Some(error) = response.get("error") {
        return Err(RpcError::new(
            crate::rpc::Code::FailedPrecondition,
            format!(
                "the NATS server refused to update the JetStream consumer {name:?} to the \
                 configured ack wait and deliveries: {}",
                api_error(error)
            ),
        ));
    }
    let applied = response
        .get("config")
        .and_then(|config| config.get("ack_wait"));
    if applied != updated.get("ack_wait") {
        tracing::warn!(
            consumer = name,
            applied_ns = ?applied,
            "the NATS server keeps another ack wait for the durable consumer (a backoff set on the \
             consumer decides it)"
        );
    }
    Ok(())
}

/// A JetStream API error, as its description and codes.
fn api_error(error: &serde_json::Value) -> String {
    format!(
        "{} (code {}, error code {})",
        error
            .get("description")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("no description"),
        error.get("code").unwrap_or(&serde_json::Value::Null),
        error.get("err_code").unwrap_or(&serde_json::Value::Null)
    )
}

/// How an existing durable consumer's configuration (raw, as the server reports it) must change
/// for this server: `Err` for what cannot change in place, `Ok(None)` when nothing has to.
///
/// The subject (the route) and the ack wait are made to match. The deliveries are raised to the
/// configured count, never lowered: this server dead-letters a failing event at its own count,
/// so a consumer that gives up sooner would drop the event unseen, while one that allows more is
/// never asked for them — and during a rolling deployment, instances still running with a
/// higher count keep theirs. The rest of the configuration (limits an operator set, metadata)
/// stays as it is.
fn reconcile_consumer(
    name: &str,
    existing: &serde_json::Value,
    route: &str,
    config: &DurableEvents,
) -> Result<Option<serde_json::Value>, RpcError> {
    use serde_json::Value;
    let refuse = |what: String| {
        Err(RpcError::new(
            crate::rpc::Code::FailedPrecondition,
            format!(
                "the JetStream consumer {name:?} {what}, which cannot change in place: delete \
                 the consumer, or give the server another consumer prefix and delete the old \
                 consumer (a new consumer receives every event still in the stream, and an \
                 unused one holds on to the events an interest retention would remove)"
            ),
        ))
    };
    let Some(fields) = existing.as_object() else {
        return refuse(format!(
            "has no configuration the server reported ({existing})"
        ));
    };
    if fields
        .get("deliver_subject")
        .and_then(Value::as_str)
        .is_some_and(|subject| !subject.is_empty())
    {
        return refuse("is a push consumer, and durable events pull".into());
    }
    match fields.get("ack_policy").and_then(Value::as_str) {
        Some("explicit") => {}
        other => {
            return refuse(format!(
                "acknowledges with policy {}, and durable events need explicit acknowledgements",
                other.unwrap_or("(none given)")
            ));
        }
    }
    let ack_wait = u64::try_from(config.ack_wait.as_nanos()).unwrap_or(u64::MAX);
    let deliveries = i64::from(config.max_deliveries);
    let subject_matches = fields.get("filter_subject").and_then(Value::as_str) == Some(route)
        || fields.get("filter_subjects") == Some(&serde_json::json!([route]));
    // Zero, less, or none given: no limit.
    let allowed = fields
        .get("max_deliver")
        .and_then(Value::as_i64)
        .unwrap_or(-1);
    // More than configured, so that an event whose last delivery ended without an outcome is
    // delivered once more, and dead-lettered then.
    let enough_deliveries = allowed <= 0 || allowed > deliveries;
    let same_wait = fields.get("ack_wait").and_then(Value::as_u64) == Some(ack_wait);
    if subject_matches && same_wait && enough_deliveries {
        return Ok(None);
    }
    let mut updated = fields.clone();
    updated.insert("ack_wait".into(), ack_wait.into());
    if !enough_deliveries {
        updated.insert("max_deliver".into(), (-1).into());
    }
    if !subject_matches {
        updated.remove("filter_subjects");
        updated.insert("filter_subject".into(), route.into());
    }
    Ok(Some(Value::Object(updated)))
}

/// A JetStream that is not clustered keeps one replica whatever is asked: fine on a developer's
/// machine, a surprise in production. Said once, at startup.
fn warn_if_not_replicated(stream: &str, has: usize, configured: usize) {
    if has < configured {
        tracing::warn!(
            stream,
            replicas = has,
            configured,
            "the durable-events stream has fewer replicas than configured (JetStream is not clustered?)"
        );
    }
}

async fn consume(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    route: Arc<str>,
    dead_letters: DeadLetters,
    dispatcher: Dispatcher,
    config: Arc<DurableEvents>,
    dead_letter_at: u64,
) {
    // Made once, not per message (each new one registers with the shared token under its lock).
    let mut draining = std::pin::pin!(dispatcher.draining());
    'reconnect: loop {
        let mut messages = tokio::select! {
            biased;
            _ = &mut draining => return,
            messages = consumer
                .stream()
                .max_messages_per_batch(config.pull_batch)
                .heartbeat(config.heartbeat)
                .expires(config.pull_expiry.max(config.heartbeat.saturating_mul(2)))
                .messages() => match messages {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!(%route, %error, "cannot pull durable events; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'reconnect,
                        _ = &mut draining => return,
                    }
                }
            },
        };
        // Events pulled ahead of their turn. JetStream's `ack_wait` runs from delivery, for
        // these too: the stream is read while an event is handled (up to `pull_batch` ahead,
        // about what async-nats pulled ahead before), and every half `ack_wait` the event at work
        // and those waiting are reported in progress, so that none is delivered again while this
        // server has it (`ack_wait` is then how long an event waits after its server stopped
        // answering for it).
        let mut waiting: VecDeque<jetstream::Message> = VecDeque::new();
        let mut pull_again = false;
        // The consumer's own wait: another instance (a rolling deployment) may have changed it.
        // A NATS gone silent must not hold up shutdown for this question's timeout.
        let info = tokio::select! {
            biased;
            _ = &mut draining => return,
            info = consumer.get_info() => info,
        };
        let ack_wait = match info {
            Ok(info) if !info.config.ack_wait.is_zero() => {
                info.config.ack_wait.min(config.ack_wait)
            }
            _ => config.ack_wait,
        };
        // One clock for the whole pull: events wait through many handlings.
        let every = (ack_wait / 2).max(Duration::from_millis(1));
        let mut progress = tokio::time::interval_at(
            crate::timeout::later(tokio::time::Instant::now(), every),
            every,
        );
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if dispatcher.is_draining() {
                give_back(&waiting, &route, &config).await;
                return;
            }
            let message = match waiting.pop_front() {
                Some(message) => message,
                None if pull_again => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'reconnect;
                }
                None => {
                    // The message first: polling the wait for shutdown takes the token's lock.
                    let message = tokio::select! {
                        biased;
                        message = messages.next() => message,
                        _ = &mut draining => return,
                    };
                    match next_message(message, &route) {
                        Ok(message) => message,
                        Err(()) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue 'reconnect;
                        }
                    }
                }
            };
            let handling = handle(
                &message,
                &route,
                &dead_letters,
                &dispatcher,
                &config,
                dead_letter_at,
            );
            let mut handling = std::pin::pin!(handling);
            // Reports go out beside the handler, not in its way (a full command queue while
            // NATS is away would hold them up), one round at a time, each within a period.
            let mut reporting: Option<futures_util::future::BoxFuture<'static, ()>> = None;
            loop {
                tokio::select! {
                    biased;
                    () = &mut handling => break,
                    next = messages.next(),
                        if !pull_again
                            && waiting.len() < config.pull_batch
                            && !dispatcher.is_draining() =>
                    {
                        match next_message(next, &route) {
                            Ok(next) => waiting.push_back(next),
                            // Pulled again once what was pulled is handled.
                            Err(()) => pull_again = true,
                        }
                    }
                    () = async { reporting.as_mut().expect("guarded").await }, if reporting.is_some() => {
                        reporting = None;
                    }
                    _ = progress.tick(), if reporting.is_none() => {
                        let at_work: Vec<jetstream::Message> =
                            std::iter::once(&message).chain(&waiting).cloned().collect();
                        let route = Arc::clone(&route);
                        reporting = Some(Box::pin(async move {
                            let reported = tokio::time::timeout(every, async {
                                for message in &at_work {
                                    message.ack_with(AckKind::Progress).await?;
                                }
                                Ok::<(), async_nats::Error>(())
                            })
                            .await;
                            if !matches!(reported, Ok(Ok(()))) {
                                tracing::debug!(%route, "could not report the durable events at work in progress");
                            }
                        }));
                    }
                }
            }
        }
    }
}

/// At shutdown, the events pulled ahead go back to the stream for another server (after the
/// first backoff delay: at once, they could go to this server's own pull requests, still open
/// on the NATS server while it stops).
async fn give_back(waiting: &VecDeque<jetstream::Message>, route: &str, config: &DurableEvents) {
    let delay = config.handback_delay(1);
    for message in waiting {
        if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::debug!(%route, %error, "could not give a pulled event back; it comes back after ack_wait");
        }
    }
}

/// A message of the pull stream, or `Err` when the stream must be pulled again (a missed
/// heartbeat: the node serving the pull died; or the stream ended).
fn next_message(
    message: Option<Result<jetstream::Message, pull::MessagesError>>,
    route: &str,
) -> Result<jetstream::Message, ()> {
    match message {
        Some(Ok(message)) => Ok(message),
        Some(Err(error)) => {
            // The client has failed over by then, or will have.
            tracing::debug!(%route, %error, "durable event stream interrupted; pulling again");
            Err(())
        }
        None => Err(()),
    }
}

async fn handle(
    message: &jetstream::Message,
    route: &Arc<str>,
    dead_letters: &DeadLetters,
    dispatcher: &Dispatcher,
    config: &DurableEvents,
    dead_letter_at: u64,
) {
    let delivered = message
        .info()
        .map(|info| info.delivered)
        .unwrap_or(1)
        .max(1) as u64;
    if delivered > dead_letter_at {
        // Its earlier deliveries ended without an outcome: the servers that had it stopped,
        // crashed or lost NATS while handling it, or could not publish its dead letter. Handled
        // again, an event that crashes its server would crash every server after it.
        let error = RpcError::new(
            crate::rpc::Code::ResourceExhausted,
            format!(
                "delivered {delivered} times without being settled (max_deliveries is \
                 {dead_letter_at}): the servers that had it stopped, crashed or lost NATS while \
                 handling it"
            ),
        );
        let acked = dead_letter(message, route, dead_letters, config, delivered, &error).await;
        if let Some(Err(error)) = acked {
            tracing::warn!(%route, %error, "cannot acknowledge a dead-lettered event; it will be delivered again");
        }
        return;
    }
    let parsed = request_from(
        &config.codec,
        route,
        &message.payload,
        message.headers.as_ref(),
    );
    let outcome = match parsed {
        Ok((request, _)) => dispatcher.handle_event(request).await,
        Err(error) => Err(RpcError::invalid_argument(format!(
            "the event could not be read: {error}"
        ))),
    };
    let acked = match outcome {
        Ok(()) => Some(message.ack().await),
        // Shutdown, not the event: never dead-lettered for it. Delivered again after the delay
        // (at once, it could go to this server's own pull requests, still open on the NATS
        // server while it stops).
        Err(_) if dispatcher.is_draining() => {
            let delay = config.handback_delay(delivered);
            Some(message.ack_with(AckKind::Nak(Some(delay))).await)
        }
        Err(error) if delivered >= dead_letter_at => {
            dead_letter(message, route, dead_letters, config, delivered, &error).await
        }
        Err(error) => {
            let delay = config.delay_before(delivered);
            tracing::warn!(%route, deliveries = delivered, %error, retry_in = ?delay, "event handler failed; it will be redelivered");
            Some(message.ack_with(AckKind::Nak(Some(delay))).await)
        }
    };
    if let Some(Err(error)) = acked {
        tracing::warn!(%route, %error, "cannot acknowledge a durable event; it will be redelivered");
    }
}

/// Publishes `message` to its dead-letter subject and terminates it; `None` if the dead letter
/// could not be published (it is left unacknowledged, and dead-lettered on its next delivery).
async fn dead_letter(
    message: &jetstream::Message,
    route: &Arc<str>,
    dead_letters: &DeadLetters,
    config: &DurableEvents,
    delivered: u64,
    error: &RpcError,
) -> Option<Result<(), async_nats::Error>> {
    let subject = dead_letter_subject(&config.dead_letter_prefix, route);
    tracing::error!(%route, deliveries = delivered, %error, dead_letter = %subject, "event failed for good; dead-lettered");
    let max_payload = dead_letters.client.server_info().max_payload;
    let reason = super::one_line(&error.to_string()).into_owned();
    // Names the event in a letter that goes without it (the events stream may still hold it).
    let sequence = message.info().ok().map(|info| info.stream_sequence);
    let Some((headers, payload)) = letter_within(
        max_payload,
        &message.payload,
        reason,
        delivered,
        route,
        sequence,
    ) else {
        tracing::error!(%route, max_payload, "not even a dead letter without the event fits in a message: the event is dropped");
        return Some(message.ack_with(AckKind::Term).await);
    };
    if let Err(error) = dead_letters.publish(subject, headers, payload).await {
        // Left unacknowledged: delivered again, and dead-lettered then.
        tracing::error!(%error, "cannot publish the dead letter");
        return None;
    }
    Some(message.ack_with(AckKind::Term).await)
}

/// The dead letter's headers and payload, made to fit in a message of `max_payload` bytes
/// (headers count): a letter that does not fit is refused every time, and its event would be
/// delivered again every `ack_wait`, for good. The handler's error is shortened first; if the
/// event leaves no room (it may be just under the limit), the letter goes without it, the
/// reason saying why. `None` when not even that fits.
fn letter_within(
    max_payload: usize,
    payload: &bytes::Bytes,
    reason: String,
    delivered: u64,
    route: &str,
    sequence: Option<u64>,
) -> Option<(async_nats::HeaderMap, bytes::Bytes)> {
    let deliveries = delivered.to_string();
    // NATS's header block: `NATS/1.0\r\n`, a `name: value\r\n` line each, and `\r\n`.
    let size = |reason: &str, payload: usize| {
        12 + [
            (DEAD_LETTER_REASON, reason),
            (DEAD_LETTER_DELIVERIES, deliveries.as_str()),
            (DEAD_LETTER_SUBJECT, route),
        ]
        .iter()
        .map(|(name, value)| name.len() + value.len() + 4)
        .sum::<usize>()
            + payload
    };
    let letter = |reason: &str, payload: bytes::Bytes| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(DEAD_LETTER_REASON, reason);
        headers.insert(DEAD_LETTER_DELIVERIES, deliveries.as_str());
        headers.insert(DEAD_LETTER_SUBJECT, route);
        (headers, payload)
    };
    if let Some(reason) = shortened(reason.clone(), |reason| {
        size(reason, payload.len()) <= max_payload
    }) {
        return Some(letter(&reason, payload.clone()));
    }
    tracing::error!(%route, bytes = payload.len(), max_payload, "the dead letter goes out without the event, which would make it too large");
    let at = sequence.map_or(String::new(), |sequence| {
        format!(", stream sequence {sequence}")
    });
    let without = format!(
        "the event ({} bytes{at}) is left out of this dead letter, which it would make larger than \
         the server's max_payload ({max_payload} bytes); the handler failed with: {reason}",
        payload.len()
    );
    let reason = shortened(without, |reason| size(reason, 0) <= max_payload)?;
    Some(letter(&reason, bytes::Bytes::new()))
}

/// Refuses a consumer prefix that makes no JetStream consumer name: a name goes into the
/// subjects of JetStream's API (`$JS.API.CONSUMER.CREATE.<stream>.<name>`), where a space or a
/// line break would break the protocol line and a `.`, `*` or `>` would change the subject.
fn check_consumer_prefix(prefix: &str) -> Result<(), RpcError> {
    let valid = !prefix
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'));
    if valid {
        Ok(())
    } else {
        Err(RpcError::invalid_argument(format!(
            "the consumer prefix {prefix:?} makes no JetStream consumer name (names have no spaces, control characters, '.', '*', '>', '/' or '\\')"
        )))
    }
}

/// The subject an event of `route` is dead-lettered on.
fn dead_letter_subject(prefix: &str, route: &str) -> String {
    format!("{prefix}.{route}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// The size NATS counts for `headers` and `payload` against `max_payload`.
    fn letter_size(headers: &async_nats::HeaderMap, payload: &bytes::Bytes) -> usize {
        let lines: usize = headers
            .iter()
            .map(|(name, values)| {
                let name: &str = name.as_ref();
                values
                    .iter()
                    .map(|value| name.len() + value.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum();
        12 + lines + payload.len()
    }

    /// A dead letter fits `max_payload` (headers count): whole when it does, with the reason
    /// shortened (at a character boundary) when that is enough, without the event when not,
    /// and not at all when not even its headers fit.
    #[test]
    fn a_dead_letter_is_made_to_fit_max_payload() {
        let payload = bytes::Bytes::from(vec![b'x'; 1000]);
        let reason = "é".repeat(300);
        let whole = 12
            + (DEAD_LETTER_REASON.len() + reason.len() + 4)
            + (DEAD_LETTER_DELIVERIES.len() + 1 + 4)
            + (DEAD_LETTER_SUBJECT.len() + "orders".len() + 4)
            + payload.len();
        let letter = |max| letter_within(max, &payload, reason.clone(), 3, "orders", Some(7));
        let said = |headers: &async_nats::HeaderMap, name: &str| {
            headers.get(name).map(|value| value.as_str().to_owned())
        };

        let (headers, body) = letter(whole).unwrap();
        assert_eq!(letter_size(&headers, &body), whole);
        assert_eq!(
            said(&headers, DEAD_LETTER_REASON).as_deref(),
            Some(&*reason)
        );
        assert_eq!(said(&headers, DEAD_LETTER_DELIVERIES).as_deref(), Some("3"));
        assert_eq!(
            said(&headers, DEAD_LETTER_SUBJECT).as_deref(),
            Some("orders")
        );
        assert_eq!(body, payload);

        let (headers, body) = letter(whole - 1).unwrap();
        let shortened = said(&headers, DEAD_LETTER_REASON).unwrap();
        assert!(shortened.len() < reason.len() && reason.starts_with(&shortened));
        assert!(letter_size(&headers, &body) < whole);
        assert_eq!(body, payload);

        let (headers, body) = letter(400).unwrap();
        assert!(body.is_empty());
        assert!(letter_size(&headers, &body) <= 400);
        let without = said(&headers, DEAD_LETTER_REASON).unwrap();
        assert!(
            without.starts_with("the event (1000 bytes, stream sequence 7) is left out"),
            "{without}"
        );
        let (headers, _) = letter(1000).unwrap();
        assert!(
            said(&headers, DEAD_LETTER_REASON)
                .unwrap()
                .ends_with(&*reason)
        );

        assert!(letter(50).is_none());
    }

    const THIRTY_SECONDS: u64 = 30_000_000_000;

    /// A consumer as `CONSUMER.INFO` reports it, with fields async-nats does not know.
    fn existing(max_deliver: i64, ack_wait_ns: u64) -> Value {
        json!({
            "durable_name": "palisade-audit",
            "deliver_policy": "all",
            "ack_policy": "explicit",
            "ack_wait": ack_wait_ns,
            "max_deliver": max_deliver,
            "filter_subject": "audit",
            "max_ack_pending": 7,
            "metadata": {"owner": "billing"},
            "priority_groups": ["jobs"],
        })
    }

    fn configured(deliveries: u32, ack_wait: Duration) -> DurableEvents {
        DurableEvents::new("AUDIT")
            .max_deliveries(deliveries)
            .ack_wait(ack_wait)
    }

    fn reconcile(existing: &Value, config: &DurableEvents) -> Result<Option<Value>, RpcError> {
        reconcile_consumer("palisade-audit", existing, "audit", config)
    }

    #[test]
    fn a_consumer_is_raised_to_the_configured_deliveries_and_never_lowered() {
        let wait = Duration::from_secs(30);
        let raised = reconcile(&existing(2, THIRTY_SECONDS), &configured(5, wait))
            .unwrap()
            .expect("two deliveries are raised");
        assert_eq!(raised["max_deliver"], -1, "to any number");
        assert_eq!(raised["ack_wait"], THIRTY_SECONDS);
        let raised = reconcile(&existing(5, THIRTY_SECONDS), &configured(5, wait))
            .unwrap()
            .expect("as many leaves no delivery to dead-letter an unsettled event");
        assert_eq!(raised["max_deliver"], -1);
        for (has, why) in [
            (6, "one more"),
            (9, "more"),
            (-1, "no limit"),
            (0, "no limit"),
        ] {
            assert_eq!(
                reconcile(&existing(has, THIRTY_SECONDS), &configured(5, wait)).unwrap(),
                None,
                "{why}: nothing to change"
            );
        }
        let mut unset = existing(6, THIRTY_SECONDS);
        unset.as_object_mut().unwrap().remove("max_deliver");
        assert_eq!(reconcile(&unset, &configured(5, wait)).unwrap(), None);
    }

    #[test]
    fn an_update_changes_the_ack_wait_and_subject_and_keeps_everything_else() {
        let updated = reconcile(
            &existing(9, THIRTY_SECONDS),
            &configured(5, Duration::from_secs(2)),
        )
        .unwrap()
        .expect("the ack wait changes");
        let mut expected = existing(9, 2_000_000_000);
        assert_eq!(
            updated, expected,
            "more deliveries, metadata, groups and limits stay"
        );

        let mut moved = existing(9, THIRTY_SECONDS);
        moved["filter_subject"] = json!("other");
        let updated = reconcile(&moved, &configured(5, Duration::from_secs(30)))
            .unwrap()
            .expect("the subject changes");
        expected = existing(9, THIRTY_SECONDS);
        assert_eq!(updated, expected);

        // Servers from 2.10 may report the subject as a list: one that is the route matches, and
        // an update replaces any other list with the single subject (a server refuses both).
        let mut listed = existing(9, THIRTY_SECONDS);
        listed.as_object_mut().unwrap().remove("filter_subject");
        listed["filter_subjects"] = json!(["audit"]);
        assert_eq!(
            reconcile(&listed, &configured(5, Duration::from_secs(30))).unwrap(),
            None
        );
        listed["filter_subjects"] = json!(["audit", "other"]);
        let updated = reconcile(&listed, &configured(5, Duration::from_secs(30)))
            .unwrap()
            .expect("the subjects change");
        assert_eq!(updated.get("filter_subjects"), None);
        assert_eq!(updated["filter_subject"], "audit");
    }

    #[test]
    fn what_cannot_change_in_place_is_refused_with_what_to_do() {
        let config = configured(5, Duration::from_secs(30));
        let mut all = existing(5, THIRTY_SECONDS);
        all["ack_policy"] = json!("all");
        let mut push = existing(5, THIRTY_SECONDS);
        push["deliver_subject"] = json!("deliver.audit");
        let mut silent = existing(5, THIRTY_SECONDS);
        silent.as_object_mut().unwrap().remove("ack_policy");
        for (consumer, says) in [
            (all, "policy all"),
            (push, "push consumer"),
            (silent, "(none given)"),
            (Value::Null, "no configuration"),
        ] {
            let error = reconcile(&consumer, &config).unwrap_err();
            assert_eq!(error.code(), crate::rpc::Code::FailedPrecondition);
            for part in [
                says,
                "\"palisade-audit\"",
                "every event still in the stream",
            ] {
                assert!(error.message().contains(part), "{part:?} in {error}");
            }
            assert!(!error.message().contains("  "), "{error}");
        }
    }

    #[test]
    fn events_are_dead_lettered_at_the_lower_of_the_two_counts() {
        assert_eq!(dead_letter_at(5, 3), 3, "a consumer that stops sooner");
        assert_eq!(dead_letter_at(5, 5), 5);
        assert_eq!(dead_letter_at(5, 9), 5, "a consumer that allows more");
        assert_eq!(dead_letter_at(5, 1), 1);
        assert_eq!(dead_letter_at(5, 0), 5, "no limit");
        assert_eq!(dead_letter_at(5, -1), 5, "no limit");
    }

    #[test]
    #[should_panic(expected = "ack_wait must be more than zero")]
    fn a_zero_ack_wait_is_refused() {
        let _ = DurableEvents::new("AUDIT").ack_wait(Duration::ZERO);
    }

    #[test]
    fn api_errors_say_what_the_server_said() {
        let text = api_error(&json!({"code": 400, "err_code": 10012, "description": "bad"}));
        assert_eq!(text, "bad (code 400, error code 10012)");
        assert_eq!(
            api_error(&json!({})),
            "no description (code null, error code null)"
        );
    }
}
