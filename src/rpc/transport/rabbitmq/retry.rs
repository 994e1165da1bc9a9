//! Failing events: redelivery with backoff through delay queues, then a dead-letter exchange.

use super::{describe, field_table};
use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use std::time::Duration;

// The dead-letter headers every transport with acknowledged events shares. (On RabbitMQ,
// `DEAD_LETTER_DELIVERIES` also counts the deliveries of an event waiting for redelivery, and
// `DEAD_LETTER_SUBJECT` holds the event's pattern.)
pub use crate::rpc::transport::{DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON, DEAD_LETTER_SUBJECT};
/// Header of a dead letter: the queue the event was consumed from.
pub const DEAD_LETTER_QUEUE: &str = "palisade-original-queue";

/// What a server does with an event whose handler failed, when acknowledgements are on
/// ([`RmqOptions::no_ack`](super::RmqOptions::no_ack) is `false`, the default) — beyond NestJS,
/// which leaves acknowledging to each handler:
///
/// - the event is redelivered after a delay from the backoff list: it is published to a delay
///   queue `<queue>.retry.<milliseconds>` (one per distinct delay, with that TTL, dead-lettering
///   back into the service's queue), then acknowledged. The wait costs the server nothing (no
///   prefetch slot is held), survives restarts when the queue is durable, and the redelivery may
///   go to any instance. The event carries its delivery count in [`DEAD_LETTER_DELIVERIES`]
///   (handlers see it among their headers; a redelivery by the broker after a server died is not
///   a failure and is not counted);
/// - after `max_deliveries` failed deliveries it is published to the dead-letter exchange
///   (a durable direct exchange, `<queue>.dead-letter` by default) with the queue's name as
///   routing key and headers saying why ([`DEAD_LETTER_REASON`], [`DEAD_LETTER_DELIVERIES`],
///   [`DEAD_LETTER_SUBJECT`], [`DEAD_LETTER_QUEUE`]); a durable queue `<queue>.dead-letter`
///   bound to it keeps them (or bind your own with [`dead_letter_queue(None)`](Self::dead_letter_queue));
/// - an event whose body is not JSON, or that no handler takes, is dead-lettered at once.
///
/// A **server-named queue** (`queue("")`, NestJS's default) is one instance's alone, named anew
/// at each start: its delay queues are exclusive (they go with the connection, as the waiting
/// events of such a queue go with it), and its dead letters go to names that stay the same,
/// derived from the exchange the queue is bound to: the exchange and queue
/// `<exchange>.dead-letter` (`palisade.dead-letter` without an exchange), with the exchange's
/// name as routing key.
///
/// Every publish is confirmed by the broker before the event is acknowledged, so an event is
/// never lost between the two (it may be seen twice if the server dies in between: delivery is
/// at least once). The delay and dead-letter queues are durable when the service's queue is.
///
/// Defaults: 5 deliveries, redelivery after 1 s, 5 s, 30 s (the last delay repeats),
/// dead letters to `<queue>.dead-letter`, kept in the queue `<queue>.dead-letter`.
///
/// ```
/// use palisade::rpc::transport::rabbitmq::{EventRetries, RmqOptions, RmqServer};
/// use std::time::Duration;
///
/// let server = RmqServer::new(RmqOptions::new(["amqp://127.0.0.1:5672"]).queue("billing"))
///     .event_retries(
///         EventRetries::new()
///             .max_deliveries(3)
///             .backoff([Duration::from_secs(2), Duration::from_secs(20)])
///             .dead_letter_exchange("dead-letters"),
///     );
/// # let _ = server;
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct EventRetries {
    max_deliveries: u32,
    backoff: Vec<Duration>,
    dead_letter_exchange: Option<String>,
    dead_letter_queue: Option<Option<String>>,
}

impl Default for EventRetries {
    fn default() -> Self {
        EventRetries::new()
    }
}

impl EventRetries {
    /// The defaults: 5 deliveries, redelivery after 1 s, 5 s, 30 s, dead letters to
    /// `<queue>.dead-letter`.
    pub fn new() -> Self {
        EventRetries {
            max_deliveries: 5,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            dead_letter_exchange: None,
            dead_letter_queue: None,
        }
    }

    /// Deliveries before an event is dead-lettered (1: never redelivered).
    ///
    /// # Panics
    /// If `deliveries` is zero.
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        assert!(deliveries > 0, "max_deliveries must be at least 1");
        self.max_deliveries = deliveries;
        self
    }

    /// Delays before the 1st, 2nd, ... redelivery of a failed event (the last repeats; empty
    /// means 1 s). Each distinct delay is a delay queue; delays are whole milliseconds, at least 1
    /// and at most about 49.7 days (2³² − 1 ms, the longest time to live every RabbitMQ version
    /// takes; a longer one is capped).
    pub fn backoff(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.backoff = delays.into_iter().collect();
        self
    }

    /// The dead-letter exchange (default `<queue>.dead-letter`), declared durable, of type
    /// direct; dead letters are published with the queue's name as routing key.
    pub fn dead_letter_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.dead_letter_exchange = Some(exchange.into());
        self
    }

    /// The queue keeping dead letters, bound to the dead-letter exchange with the queue's name
    /// (default `Some("<queue>.dead-letter")`); `None` declares none — bind your own to the
    /// exchange, or dead letters have nowhere to go (they then wait in the last delay queue and
    /// come back, rather than being lost).
    pub fn dead_letter_queue(mut self, queue: Option<impl Into<String>>) -> Self {
        self.dead_letter_queue = Some(queue.map(Into::into));
        self
    }

    /// The delay before redelivery number `redelivery` (1 is the first).
    pub(crate) fn delay_before(&self, redelivery: u32) -> Duration {
        let index = usize::try_from(redelivery.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(index)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(1), super::MAX_TTL)
    }

    /// The delays that can be used, in milliseconds, each once: one per redelivery, and the
    /// longest, where a dead letter with nowhere to go waits.
    fn delays_ms(&self) -> Vec<u64> {
        let mut delays: Vec<u64> = (1..self.max_deliveries.max(1))
            .chain([u32::MAX])
            .map(|redelivery| self.delay_before(redelivery).as_millis() as u64)
            .collect();
        delays.sort_unstable();
        delays.dedup();
        delays
    }

    pub(crate) fn max(&self) -> u32 {
        self.max_deliveries
    }
}

/// The names derived from the service's queue.
#[derive(Clone, Debug)]
pub(crate) struct Topology {
    /// The service's queue.
    pub(crate) queue: String,
    /// Prefix of the delay queues' names (names starting `amq.` are the broker's).
    base: String,
    pub(crate) dead_letter_exchange: String,
    /// The routing key of dead letters, which binds the dead-letter queue.
    dead_letter_key: String,
    /// The default dead-letter queue.
    dead_letter_queue: String,
    /// The delay queues are the connection's (exclusive): a server-named queue is one instance's
    /// alone and is named anew on each connection, so its delay queues would otherwise pile up on
    /// the broker, one set per start, with nothing ever reading them.
    exclusive_delays: bool,
}

impl Topology {
    /// The topology of the service's queue `queue`. `server_named`: the queue was configured as
    /// `''` and the broker named it; the dead letters then go to names derived from the exchange
    /// it is bound to (`shared`, `palisade` without one), the same for every instance and start.
    pub(crate) fn new(queue: &str, retries: &EventRetries, server_named: Option<&str>) -> Self {
        let not_the_brokers = |name: &str| {
            if name.starts_with("amq.") {
                format!("palisade.{name}")
            } else {
                name.to_owned()
            }
        };
        let base = not_the_brokers(queue);
        let dead_letter_key = match server_named {
            Some("") => "palisade".to_owned(),
            Some(shared) => not_the_brokers(shared),
            None => queue.to_owned(),
        };
        let dead_letter_base = match server_named {
            Some(_) => dead_letter_key.clone(),
            None => base.clone(),
        };
        Topology {
            queue: queue.to_owned(),
            dead_letter_exchange: retries
                .dead_letter_exchange
                .clone()
                .unwrap_or_else(|| format!("{dead_letter_base}.dead-letter")),
            dead_letter_queue: format!("{dead_letter_base}.dead-letter"),
            dead_letter_key,
            exclusive_delays: server_named.is_some(),
            base,
        }
    }

    fn retry_queue(&self, delay_ms: u64) -> String {
        format!("{}.retry.{delay_ms}", self.base)
    }

    /// Declares the delay queues, the dead-letter exchange and its queue.
    pub(crate) async fn declare(
        &self,
        channel: &Channel,
        retries: &EventRetries,
        durable: bool,
    ) -> Result<(), crate::rpc::RpcError> {
        let queue_options = QueueDeclareOptions {
            durable,
            ..Default::default()
        };
        let delay_options = QueueDeclareOptions {
            durable: durable && !self.exclusive_delays,
            exclusive: self.exclusive_delays,
            ..Default::default()
        };
        for delay in retries.delays_ms() {
            let name = self.retry_queue(delay);
            let arguments = field_table(
                serde_json::json!({
                    "x-message-ttl": delay,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.queue,
                })
                .as_object()
                .expect("an object"),
            );
            channel
                .queue_declare(name.as_str().into(), delay_options, arguments)
                .await
                .map_err(|error| {
                    super::declare_error(
                        &format!("cannot declare the delay queue {name:?}"),
                        &error,
                    )
                })?;
        }
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                lapin::ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|error| {
                super::declare_error(
                    &format!(
                        "cannot declare the dead-letter exchange {:?}",
                        self.dead_letter_exchange
                    ),
                    &error,
                )
            })?;
        let dead_letter_queue = match &retries.dead_letter_queue {
            Some(queue) => queue.clone(),
            None => Some(self.dead_letter_queue.clone()),
        };
        if let Some(name) = dead_letter_queue {
            channel
                .queue_declare(name.as_str().into(), queue_options, FieldTable::default())
                .await
                .map_err(|error| {
                    super::declare_error(
                        &format!("cannot declare the dead-letter queue {name:?}"),
                        &error,
                    )
                })?;
            channel
                .queue_bind(
                    name.as_str().into(),
                    self.dead_letter_exchange.as_str().into(),
                    self.dead_letter_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|error| {
                    super::declare_error(
                        &format!("cannot bind the dead-letter queue {name:?}"),
                        &error,
                    )
                })?;
        }
        Ok(())
    }
}

/// What became of a failed event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Failed {
    /// Waiting in a delay queue for its next delivery.
    Retried,
    /// Published to the dead-letter exchange.
    DeadLettered,
    /// Could not be published anywhere: leave it to the broker (requeue it).
    Kept,
}

/// The delivery count an event carries (0 when it was never retried).
pub(crate) fn deliveries_so_far(properties: &BasicProperties) -> u32 {
    properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(DEAD_LETTER_DELIVERIES))
        .and_then(|value| match value {
            AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok()?.parse().ok(),
            AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

fn with_headers(
    properties: &BasicProperties,
    extra: impl IntoIterator<Item = (&'static str, String)>,
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    for (key, value) in extra {
        headers.insert(ShortString::from(key), AMQPValue::LongString(value.into()));
    }
    properties.clone().with_headers(headers)
}

/// Publishes on a confirm channel (with the lock that orders its publishes), mandatory;
/// `Ok(true)` when the broker routed and stored it.
async fn publish_confirmed(
    (channel, order): (&Channel, &std::sync::Mutex<()>),
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<bool, String> {
    let exchange = ShortString::try_new(exchange).map_err(|error| error.to_string())?;
    let routing_key = ShortString::try_new(routing_key).map_err(|error| error.to_string())?;
    let confirm = super::publish_in_order(
        order,
        channel.basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        ),
    )
    .await
    .map_err(|error| describe(&error))?;
    match confirm.await {
        Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(true),
        Ok(Confirmation::Ack(Some(_))) => Ok(false),
        Ok(Confirmation::Nack(_)) => Err("the broker refused it (negative confirmation)".into()),
        Err(error) => Err(describe(&error)),
    }
}

/// Sends a failed event on: to a delay queue for its next delivery, or, after its last one, to the
/// dead-letter exchange. `deliveries` counts the delivery that just failed; `None` dead-letters
/// at once.
pub(crate) async fn on_failure(
    channel: (&Channel, &std::sync::Mutex<()>),
    topology: &Topology,
    retries: &EventRetries,
    event: FailedEvent<'_>,
) -> Failed {
    let FailedEvent {
        route,
        body,
        properties,
        deliveries,
        reason,
    } = event;
    let retry = deliveries.filter(|&n| n < retries.max());
    if let Some(deliveries) = retry {
        let delay = retries.delay_before(deliveries).as_millis() as u64;
        let queue = topology.retry_queue(delay);
        let properties = with_headers(
            properties,
            [(DEAD_LETTER_DELIVERIES, deliveries.to_string())],
        );
        match publish_confirmed(channel, "", &queue, body, properties).await {
            Ok(true) => {
                tracing::warn!(%route, deliveries, %reason, retry_in_ms = delay, "event handler failed; it will be redelivered");
                return Failed::Retried;
            }
            Ok(false) => {
                tracing::error!(%route, %queue, "the delay queue is gone; the event goes back to the queue")
            }
            Err(error) => {
                tracing::error!(%route, %queue, %error, "cannot delay the event; it goes back to the queue")
            }
        }
        return Failed::Kept;
    }
    let deliveries = deliveries.unwrap_or(1);
    let dead = with_headers(
        properties,
        [
            (DEAD_LETTER_REASON, reason.to_owned()),
            (DEAD_LETTER_DELIVERIES, deliveries.to_string()),
            (DEAD_LETTER_SUBJECT, route.to_owned()),
            (DEAD_LETTER_QUEUE, topology.queue.clone()),
        ],
    );
    match publish_confirmed(
        channel,
        &topology.dead_letter_exchange,
        &topology.dead_letter_key,
        body,
        dead.clone(),
    )
    .await
    {
        Ok(true) => {
            tracing::error!(%route, deliveries, %reason, dead_letter = %topology.dead_letter_exchange, "event failed for good; dead-lettered");
            Failed::DeadLettered
        }
        Ok(false) => {
            // Nowhere to go: rather than lose it or spin on it, let it come back after the
            // longest delay.
            let delay = retries.delay_before(u32::MAX).as_millis() as u64;
            let queue = topology.retry_queue(delay);
            tracing::error!(%route, exchange = %topology.dead_letter_exchange, "no queue is bound to the dead-letter exchange; the event will come back after {delay} ms");
            match publish_confirmed(channel, "", &queue, body, dead).await {
                Ok(true) => Failed::Retried,
                _ => Failed::Kept,
            }
        }
        Err(error) => {
            tracing::error!(%route, %error, "cannot publish the dead letter; the event goes back to the queue");
            Failed::Kept
        }
    }
}

/// A failed event, as [`on_failure`] sends it on.
pub(crate) struct FailedEvent<'a> {
    pub(crate) route: &'a str,
    pub(crate) body: &'a [u8],
    pub(crate) properties: &'a BasicProperties,
    /// The delivery that failed (1 is the first); `None` to dead-letter at once.
    pub(crate) deliveries: Option<u32>,
    pub(crate) reason: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_repeat_the_last_and_are_declared_once_each() {
        let retries = EventRetries::new()
            .max_deliveries(6)
            .backoff([Duration::from_millis(100), Duration::from_secs(1)]);
        assert_eq!(retries.delay_before(1), Duration::from_millis(100));
        assert_eq!(retries.delay_before(2), Duration::from_secs(1));
        assert_eq!(retries.delay_before(9), Duration::from_secs(1));
        assert_eq!(retries.delay_before(u32::MAX), Duration::from_secs(1));
        assert_eq!(retries.delays_ms(), [100, 1000]);
        // The longest delay is always there: dead letters with nowhere to go wait in it.
        assert_eq!(EventRetries::new().max_deliveries(1).delays_ms(), [30_000]);
        let empty = EventRetries::new().backoff([]);
        assert_eq!(empty.delay_before(1), Duration::from_secs(1));
        let zero = EventRetries::new().backoff([Duration::ZERO]);
        assert_eq!(zero.delay_before(1), Duration::from_millis(1));
        // Capped at the longest time to live the broker takes: `Duration::MAX` used to be sent
        // as a float, and the server could not declare its delay queue.
        let long = EventRetries::new().backoff([Duration::MAX]);
        assert_eq!(
            long.delay_before(1),
            crate::rpc::transport::rabbitmq::MAX_TTL
        );
        assert_eq!(long.delays_ms(), [4_294_967_295]);
    }

    #[test]
    fn names_derive_from_the_queue() {
        let topology = Topology::new("orders", &EventRetries::new(), None);
        assert_eq!(topology.retry_queue(1000), "orders.retry.1000");
        assert_eq!(topology.dead_letter_exchange, "orders.dead-letter");
        assert_eq!(topology.dead_letter_queue, "orders.dead-letter");
        assert_eq!(topology.dead_letter_key, "orders");
        assert!(!topology.exclusive_delays);
        let amq = Topology::new("amq.orders", &EventRetries::new(), None);
        assert_eq!(amq.retry_queue(5), "palisade.amq.orders.retry.5");
        assert_eq!(amq.dead_letter_exchange, "palisade.amq.orders.dead-letter");
        let named = Topology::new(
            "orders",
            &EventRetries::new().dead_letter_exchange("dlx"),
            None,
        );
        assert_eq!(named.dead_letter_exchange, "dlx");
    }

    #[test]
    fn a_server_named_queue_dead_letters_under_stable_names() {
        let bound = Topology::new("amq.gen-abc", &EventRetries::new(), Some("users"));
        assert_eq!(bound.retry_queue(5), "palisade.amq.gen-abc.retry.5");
        assert!(
            bound.exclusive_delays,
            "the delay queues go with the connection"
        );
        assert_eq!(bound.dead_letter_exchange, "users.dead-letter");
        assert_eq!(bound.dead_letter_queue, "users.dead-letter");
        assert_eq!(bound.dead_letter_key, "users");
        let unbound = Topology::new("amq.gen-abc", &EventRetries::new(), Some(""));
        assert_eq!(unbound.dead_letter_exchange, "palisade.dead-letter");
        assert_eq!(unbound.dead_letter_key, "palisade");
        let amq = Topology::new("amq.gen-abc", &EventRetries::new(), Some("amq.topic"));
        assert_eq!(amq.dead_letter_exchange, "palisade.amq.topic.dead-letter");
    }

    #[test]
    fn the_delivery_count_is_read_from_the_header() {
        let none = BasicProperties::default();
        assert_eq!(deliveries_so_far(&none), 0);
        let counted = with_headers(&none, [(DEAD_LETTER_DELIVERIES, "3".to_owned())]);
        assert_eq!(deliveries_so_far(&counted), 3);
        let mut table = FieldTable::default();
        table.insert(DEAD_LETTER_DELIVERIES.into(), AMQPValue::LongLongInt(4));
        assert_eq!(deliveries_so_far(&none.clone().with_headers(table)), 4);
        for value in [AMQPValue::LongInt(5), AMQPValue::LongUInt(5)] {
            let mut table = FieldTable::default();
            table.insert(DEAD_LETTER_DELIVERIES.into(), value);
            assert_eq!(deliveries_so_far(&none.clone().with_headers(table)), 5);
        }
        let mut junk = FieldTable::default();
        junk.insert(
            DEAD_LETTER_DELIVERIES.into(),
            AMQPValue::LongString("x".into()),
        );
        assert_eq!(deliveries_so_far(&none.with_headers(junk)), 0);
    }
}
