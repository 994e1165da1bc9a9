//! Durable events on JetStream: at-least-once delivery, redelivery with backoff, dead letters.

use super::server::request_from;
use crate::rpc::{Dispatcher, RpcError};
use async_nats::jetstream::{self, AckKind, consumer::pull, stream};
use futures_util::StreamExt;
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
///   [`DEAD_LETTER_SUBJECT`]) and removed from the consumer.
///
/// Ordering is per pattern: one event at a time per consumer, in stream order.
///
/// **Existing streams and consumers** are brought to this configuration at start: the stream
/// gains the server's patterns and takes the configured replicas and limits; each consumer takes
/// the configured [`ack_wait`](Self::ack_wait), allows at least
/// [`max_deliveries`](Self::max_deliveries), and keeps the rest (limits an operator set by hand). What cannot change in place (a stream's
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
    /// 30 s ack wait, dead letters on `palisade.dead-letter.<pattern>`.
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
        self.heartbeat = heartbeat;
        self
    }

    /// How long one pull request waits for events before it is renewed (default 5 s; at least
    /// twice the [heartbeat](Self::heartbeat)).
    pub fn pull_expiry(mut self, expiry: Duration) -> Self {
        self.pull_expiry = expiry;
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
            max_deliver: i64::from(self.max_deliveries),
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

    /// Deliveries before an event goes to the dead-letter subject. An existing consumer that
    /// allows fewer is raised to this count at start (one that allows more keeps its count: the
    /// server dead-letters at this one all the same).
    ///
    /// # Panics
    /// If `deliveries` is zero.
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        assert!(deliveries > 0, "max_deliveries must be at least 1");
        self.max_deliveries = deliveries;
        self
    }

    /// Delays before the 1st, 2nd, ... redelivery of a failed event (the last repeats).
    pub fn backoff(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.backoff = delays.into_iter().collect();
        self
    }

    /// How long a handler may run before its event is delivered again. An existing consumer is
    /// updated to this wait at start.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// Dead letters go to `<prefix>.<pattern>`. A prefix that does not make a NATS subject with
    /// every event pattern (a space in it, say), or that holds a wildcard, fails the server's
    /// start with `InvalidArgument`.
    pub fn dead_letter_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.dead_letter_prefix = prefix.into();
        self
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
    let config = Arc::new(config);
    for route in routes {
        let name = consumer_name(&config.consumer_prefix, &route);
        let wanted = config.consumer_config(&name, &route);
        let mut consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(&name, wanted.clone())
            .await
            .map_err(|error| {
                jetstream_error(&format!("cannot create the consumer for {route:?}"), error)
            })?;
        if let Some(updated) = reconcile_consumer(&name, &consumer.cached_info().config, &wanted)? {
            consumer = stream.create_consumer(updated).await.map_err(|error| {
                jetstream_error(
                    &format!(
                        "cannot update the consumer {name:?} to the configured ack wait and \
                         deliveries"
                    ),
                    error,
                )
            })?;
        }
        tracing::debug!(%route, consumer = %name, "consuming durable events");
        dispatcher.spawn(consume(
            consumer,
            route.into(),
            client.clone(),
            dispatcher.clone(),
            Arc::clone(&config),
        ));
    }
    Ok(())
}

/// How an existing durable consumer must change to match `wanted`: `Err` for what cannot change
/// in place, `Ok(None)` when it matches.
///
/// The subject and the ack wait are made to match. The deliveries are raised to the configured
/// count, never lowered: the server dead-letters an event at its own count, so a consumer that
/// gives up sooner would drop a failing event unseen, while one that allows more is never asked
/// for them — and during a rolling deployment, instances still running with a higher count keep
/// theirs. The rest of the existing configuration (limits an operator set, say) stays.
fn reconcile_consumer(
    name: &str,
    existing: &jetstream::consumer::Config,
    wanted: &pull::Config,
) -> Result<Option<pull::Config>, RpcError> {
    if existing.ack_policy != wanted.ack_policy {
        return Err(RpcError::new(
            crate::rpc::Code::FailedPrecondition,
            format!(
                "the JetStream consumer {name:?} exists with ack policy {:?}, but durable events \
                 need {:?} acknowledgements, and an existing consumer's ack policy cannot change: \
                 delete the consumer, or give the server another consumer prefix",
                existing.ack_policy, wanted.ack_policy
            ),
        ));
    }
    // Zero or less: no limit.
    let enough_deliveries = existing.max_deliver <= 0 || existing.max_deliver >= wanted.max_deliver;
    if existing.filter_subject == wanted.filter_subject
        && existing.ack_wait == wanted.ack_wait
        && enough_deliveries
    {
        return Ok(None);
    }
    let mut updated =
        <pull::Config as jetstream::consumer::FromConsumer>::try_from_consumer_config(
            existing.clone(),
        )
        .map_err(|error| {
            RpcError::new(
                crate::rpc::Code::FailedPrecondition,
                format!("the JetStream consumer {name:?} is not a pull consumer: {error}"),
            )
        })?;
    updated.filter_subject.clone_from(&wanted.filter_subject);
    updated.ack_wait = wanted.ack_wait;
    if !enough_deliveries {
        updated.max_deliver = wanted.max_deliver;
    }
    tracing::info!(
        consumer = name,
        ack_wait = ?updated.ack_wait,
        max_deliver = updated.max_deliver,
        "updating the durable consumer to the configured ack wait and deliveries"
    );
    Ok(Some(updated))
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
    client: async_nats::Client,
    dispatcher: Dispatcher,
    config: Arc<DurableEvents>,
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
                .expires(config.pull_expiry.max(config.heartbeat * 2))
                .messages() => match messages {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!(%route, %error, "cannot pull durable events; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue 'reconnect;
                }
            },
        };
        loop {
            if dispatcher.is_draining() {
                return;
            }
            // The message first: polling the wait for shutdown takes the token's lock.
            let message = tokio::select! {
                biased;
                message = messages.next() => message,
                _ = &mut draining => return,
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    // A missed heartbeat: the node serving the pull died. Pull again (the client
                    // has failed over by then, or will have).
                    tracing::debug!(%route, %error, "durable event stream interrupted; pulling again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'reconnect;
                }
                None => continue 'reconnect,
            };
            handle(&message, &route, &client, &dispatcher, &config).await;
        }
    }
}

async fn handle(
    message: &jetstream::Message,
    route: &Arc<str>,
    client: &async_nats::Client,
    dispatcher: &Dispatcher,
    config: &DurableEvents,
) {
    let delivered = message
        .info()
        .map(|info| info.delivered)
        .unwrap_or(1)
        .max(1) as u64;
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
        Ok(()) => message.ack().await,
        Err(error) if delivered >= u64::from(config.max_deliveries) => {
            let subject = dead_letter_subject(&config.dead_letter_prefix, route);
            tracing::error!(%route, deliveries = delivered, %error, dead_letter = %subject, "event failed for good; dead-lettered");
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(DEAD_LETTER_REASON, &*super::one_line(&error.to_string()));
            headers.insert(DEAD_LETTER_DELIVERIES, delivered.to_string().as_str());
            headers.insert(DEAD_LETTER_SUBJECT, &**route);
            if let Err(error) = client
                .publish_with_headers(subject, headers, message.payload.clone())
                .await
            {
                // Leave it unacknowledged: it will be delivered again, and dead-lettered again.
                tracing::error!(%error, "cannot publish the dead letter");
                return;
            }
            message.ack_with(AckKind::Term).await
        }
        Err(error) => {
            let delay = config.delay_before(delivered);
            tracing::warn!(%route, deliveries = delivered, %error, retry_in = ?delay, "event handler failed; it will be redelivered");
            message.ack_with(AckKind::Nak(Some(delay))).await
        }
    };
    if let Err(error) = acked {
        tracing::warn!(%route, %error, "cannot acknowledge a durable event; it will be redelivered");
    }
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
    use jetstream::consumer::{AckPolicy, Config};

    fn existing(max_deliver: i64, ack_wait: Duration) -> Config {
        Config {
            durable_name: Some("palisade-audit".into()),
            filter_subject: "audit".into(),
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            max_deliver,
            ..Default::default()
        }
    }

    fn wanted(deliveries: u32, ack_wait: Duration) -> pull::Config {
        DurableEvents::new("AUDIT")
            .max_deliveries(deliveries)
            .ack_wait(ack_wait)
            .consumer_config("palisade-audit", "audit")
    }

    #[test]
    fn a_consumer_is_raised_to_the_configured_deliveries_and_never_lowered() {
        let wait = Duration::from_secs(30);
        let raised = reconcile_consumer("c", &existing(2, wait), &wanted(5, wait))
            .unwrap()
            .expect("two deliveries are raised to five");
        assert_eq!(raised.max_deliver, 5);
        assert_eq!(raised.ack_wait, wait);
        for (has, why) in [
            (5, "as many"),
            (9, "more"),
            (-1, "no limit"),
            (0, "no limit"),
        ] {
            assert!(
                reconcile_consumer("c", &existing(has, wait), &wanted(5, wait))
                    .unwrap()
                    .is_none(),
                "{why}: nothing to change"
            );
        }
    }

    #[test]
    fn a_consumer_takes_the_configured_ack_wait_and_subject_and_keeps_its_deliveries() {
        let updated = reconcile_consumer(
            "c",
            &existing(9, Duration::from_secs(30)),
            &wanted(5, Duration::from_secs(2)),
        )
        .unwrap()
        .expect("the ack wait changes");
        assert_eq!(updated.ack_wait, Duration::from_secs(2));
        assert_eq!(updated.max_deliver, 9, "more deliveries stay");
        let mut moved = existing(5, Duration::from_secs(30));
        moved.filter_subject = "other".into();
        let updated = reconcile_consumer("c", &moved, &wanted(5, Duration::from_secs(30)))
            .unwrap()
            .expect("the subject changes");
        assert_eq!(updated.filter_subject, "audit");
    }

    #[test]
    fn a_consumer_with_another_ack_policy_is_refused() {
        let mut other = existing(5, Duration::from_secs(30));
        other.ack_policy = AckPolicy::All;
        let error =
            reconcile_consumer("c", &other, &wanted(5, Duration::from_secs(30))).unwrap_err();
        assert_eq!(error.code(), crate::rpc::Code::FailedPrecondition);
        assert!(error.message().contains("ack policy"), "{error}");
    }
}
