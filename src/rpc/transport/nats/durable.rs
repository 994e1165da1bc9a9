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
        }
    }

    /// Names the durable consumers `<prefix>-<pattern>`: services with different prefixes each get
    /// every event; instances sharing a prefix share the work.
    pub fn consumer_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.consumer_prefix = prefix.into();
        self
    }

    /// Deliveries before an event goes to the dead-letter subject.
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

    /// How long a handler may run before its event is delivered again.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// Dead letters go to `<prefix>.<pattern>`.
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
        .get_or_create_stream(stream::Config {
            name: config.stream.clone(),
            subjects: routes.clone(),
            ..Default::default()
        })
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
    let missing: Vec<_> = routes
        .iter()
        .filter(|r| !info.config.subjects.contains(r))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let mut updated = info.config.clone();
        updated.subjects.extend(missing);
        context.update_stream(updated).await.map_err(|error| {
            jetstream_error("cannot add the event patterns to the stream", error)
        })?;
    }
    let config = Arc::new(config);
    for route in routes {
        let name = consumer_name(&config.consumer_prefix, &route);
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: route.clone(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    max_deliver: i64::from(config.max_deliveries),
                    ..Default::default()
                },
            )
            .await
            .map_err(|error| {
                jetstream_error(&format!("cannot create the consumer for {route:?}"), error)
            })?;
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
            messages = consumer.messages() => match messages {
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
                    tracing::debug!(%route, %error, "durable event stream interrupted; resuming");
                    continue;
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
    let outcome = match request_from(route, &message.payload, message.headers.as_ref()) {
        Ok((request, _)) => dispatcher.handle_event(request).await,
        Err(error) => Err(RpcError::invalid_argument(format!(
            "the event is not valid JSON: {error}"
        ))),
    };
    let acked = match outcome {
        Ok(()) => message.ack().await,
        Err(error) if delivered >= u64::from(config.max_deliveries) => {
            let subject = format!("{}.{route}", config.dead_letter_prefix);
            tracing::error!(%route, deliveries = delivered, %error, dead_letter = %subject, "event failed for good; dead-lettered");
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(DEAD_LETTER_REASON, error.to_string().as_str());
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
