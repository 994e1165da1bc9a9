//! Durable events over MQTT: a persistent session with QoS 1, acknowledged after the handlers
//! succeeded, retries with backoff, a dead-letter topic.

use super::MqttOptions;
use super::link::{Event, Events, Link, Message, Qos};
use super::server::incoming;
use crate::rpc::transport::{DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON, DEAD_LETTER_SUBJECT};
use crate::rpc::{Dispatcher, Headers, RpcError, TransportErrorKind};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Durable events over MQTT — beyond NestJS, for events that must not be lost:
///
/// - the server receives events on a connection of its own with a **persistent session**
///   (client id `session`, clean session off) and **QoS 1** subscriptions, so the broker keeps
///   the events published with QoS 1 (clients with
///   [`MqttTransport::durable_events`](super::MqttTransport::durable_events)) while the server is
///   away, and delivers them when it comes back;
/// - an event is acknowledged (`PUBACK`) only after all of its handlers succeeded; one the server
///   did not acknowledge — it crashed, or lost its connection, while handling it — the broker
///   delivers again when the session reconnects;
/// - when a handler fails the event is handled again after a delay from the backoff list;
/// - after `max_deliveries` failed attempts it is published (QoS 1) to the dead-letter topic
///   `<dead letter prefix><topic>`, as a JSON object with the original message in `body` and
///   [`DEAD_LETTER_REASON`], [`DEAD_LETTER_DELIVERIES`] and [`DEAD_LETTER_SUBJECT`], then
///   acknowledged. An MQTT broker keeps a message only for the sessions subscribed to its topic:
///   to keep dead letters while nothing reads them, subscribe a persistent session (clean
///   session off, QoS 1) to `<dead letter prefix>#` once, and read them through it; otherwise a
///   dead letter nobody is subscribed to is dropped by the broker. A dead letter that the event
///   would make larger than a packet may be ([`max_packet_size`](super::MqttOptions::max_packet_size),
///   or the limit an MQTT 5 broker announced) goes out without it: `body` is `null` and the
///   reason says so. Such a letter would otherwise fail the session's connection at every
///   attempt, and every event with it.
///
/// Events of one topic are handled one at a time, in order. The session id must be stable across
/// restarts of an instance and unique among running ones; with
/// [`MqttServer::shared_group`](super::MqttServer::shared_group) the instances' sessions share
/// the events.
///
/// The topic is the same one NestJS publishes events on: a NestJS client's events (QoS 0) reach
/// durable handlers too, but with QoS 0's guarantee only (at most once, not kept for an absent
/// session).
///
/// ```no_run
/// use palisade::rpc::transport::mqtt::{DurableEvents, MqttOptions, MqttServer};
/// use std::time::Duration;
///
/// let server = MqttServer::new(MqttOptions::new("mqtt://127.0.0.1")).durable_events(
///     DurableEvents::new("billing-1")
///         .max_deliveries(5)
///         .backoff([Duration::from_secs(1), Duration::from_secs(10)]),
/// );
/// # let _ = server;
/// ```
#[derive(Clone, Debug)]
pub struct DurableEvents {
    session: String,
    max_deliveries: u32,
    backoff: Vec<Duration>,
    dead_letter_prefix: String,
}

impl DurableEvents {
    /// Events received in the persistent session `session` (the MQTT client id of the events'
    /// connection). Defaults: 5 attempts, retries after 1 s, 5 s, 30 s, dead letters on
    /// `palisade/dead-letter/<topic>`.
    pub fn new(session: impl Into<String>) -> Self {
        DurableEvents {
            session: session.into(),
            max_deliveries: 5,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            dead_letter_prefix: "palisade/dead-letter/".into(),
        }
    }

    /// Attempts before an event goes to the dead-letter topic.
    ///
    /// # Panics
    /// If `deliveries` is zero.
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        assert!(deliveries > 0, "max_deliveries must be at least 1");
        self.max_deliveries = deliveries;
        self
    }

    /// Delays before the 1st, 2nd, ... retry of a failed event (the last repeats).
    pub fn backoff(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.backoff = delays.into_iter().collect();
        self
    }

    /// Dead letters go to `<prefix><topic>`.
    pub fn dead_letter_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.dead_letter_prefix = prefix.into();
        self
    }

    /// The dead-letter topic of an event topic.
    pub fn dead_letter_topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.dead_letter_prefix)
    }

    fn delay_before(&self, retry: u32) -> Duration {
        let index = usize::try_from(retry.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(index)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// Connects the persistent session, subscribes the event topics with QoS 1 and starts handling.
pub(super) async fn start(
    options: &MqttOptions,
    dispatcher: &Dispatcher,
    topics: Vec<Arc<str>>,
    durable: DurableEvents,
    group: Option<String>,
) -> Result<(), RpcError> {
    if topics.is_empty() {
        return Ok(());
    }
    let options = options.clone().client_id(durable.session.clone());
    let (client, mut events) = options.session(false, true)?;
    options.connected(&mut events).await?;
    let filters: Vec<String> = topics
        .iter()
        .map(|topic| match &group {
            Some(group) => format!("$share/{group}/{topic}"),
            None => topic.to_string(),
        })
        .collect();
    let durable = Arc::new(durable);
    let mut lanes = HashMap::new();
    let mut handling = Vec::new();
    for topic in &topics {
        let (tx, rx) = mpsc::unbounded_channel();
        lanes.insert(topic.to_string(), tx);
        handling.push(dispatcher.spawn(handle_topic(
            rx,
            Arc::clone(topic),
            client.clone(),
            Arc::clone(&durable),
            dispatcher.clone(),
            options.clone(),
        )));
    }
    if group.is_some() {
        // A persistent session keeps its subscriptions: one made before the group was set would
        // still bring this instance every event, besides its share.
        for topic in &topics {
            if let Err(error) = client.try_unsubscribe(topic.to_string()) {
                tracing::warn!(%topic, %error, "cannot drop the session's plain subscription");
            }
        }
    }
    // Subscribed before `serve` returns: events published from then on reach the session.
    subscribe(&client, &filters);
    let acknowledged = async {
        loop {
            match events.poll().await {
                // The session's stored events may come before the acknowledgement.
                Ok(Event::Message(message)) => forward(&lanes, &client, message),
                Ok(Event::SubAck(ack)) => {
                    return if ack.iter().any(|accepted| !accepted) {
                        Err(RpcError::transport(
                            TransportErrorKind::Authorization,
                            format!(
                                "the MQTT broker refused the durable subscriptions {filters:?}"
                            ),
                        ))
                    } else {
                        Ok(())
                    };
                }
                Ok(_) => {}
                Err(error) => return Err(options.connect_error(&error)),
            }
        }
    };
    match tokio::time::timeout(options.response_timeout, acknowledged).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(RpcError::transport(
                TransportErrorKind::ConnectionLost,
                "the MQTT broker did not acknowledge the durable subscriptions in time",
            ));
        }
    }
    dispatcher.spawn(run(
        events,
        client,
        filters,
        lanes,
        handling,
        options,
        dispatcher.clone(),
    ));
    Ok(())
}

fn subscribe(client: &Link, filters: &[String]) {
    super::server::subscribe_soon(client, filters, Qos::AtLeastOnce);
}

/// Hands an event to its topic's lane.
fn forward(
    lanes: &HashMap<String, mpsc::UnboundedSender<Message>>,
    client: &Link,
    message: Message,
) {
    match lanes.get(message.topic()) {
        Some(lane) => {
            let _ = lane.send(message);
        }
        None => {
            // Not ours (a subscription of an earlier version of the service): acknowledged, or
            // the broker would deliver it again at every connection.
            tracing::warn!(
                topic = message.topic(),
                "durable event on an unknown topic acknowledged"
            );
            client.try_ack(&message);
        }
    }
}

async fn run(
    mut events: Events,
    client: Link,
    filters: Vec<String>,
    lanes: HashMap<String, mpsc::UnboundedSender<Message>>,
    handling: Vec<tokio::task::JoinHandle<()>>,
    options: MqttOptions,
    dispatcher: Dispatcher,
) {
    let mut draining = std::pin::pin!(dispatcher.draining());
    let mut attempt = 0u32;
    loop {
        let event = tokio::select! {
            biased;
            event = events.poll() => event,
            _ = &mut draining => break,
        };
        match event {
            Ok(Event::Message(message)) => forward(&lanes, &client, message),
            Ok(Event::ConnAck) => {
                attempt = 0;
                // Subscribed again at every connection: a session the broker lost (restarted
                // without persistence) has no subscriptions.
                subscribe(&client, &filters);
            }
            Ok(_) => {}
            Err(error) => {
                if attempt == 0 {
                    tracing::warn!(%error, "durable events lost the MQTT connection; reconnecting");
                }
                tokio::select! {
                    _ = tokio::time::sleep(options.backoff(attempt)) => {}
                    _ = &mut draining => break,
                }
                attempt = attempt.saturating_add(1);
            }
        }
    }
    // Events not acknowledged stay with the session: the broker delivers them again when it
    // reconnects. Acknowledgements queued by handlers that finished go out first.
    drop(lanes);
    // The lanes end once their running handler did (the grace period bounds this) and its
    // acknowledgement is queued; the loop keeps turning meanwhile to send the acknowledgements.
    let mut handled = std::pin::pin!(futures_util::future::join_all(handling));
    loop {
        tokio::select! {
            _ = &mut handled => break,
            event = events.poll() => if event.is_err() { return },
        }
    }
    client.try_disconnect();
    let disconnecting = async {
        loop {
            match events.poll().await {
                Ok(Event::Disconnected) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), disconnecting).await;
}

async fn handle_topic(
    mut lane: mpsc::UnboundedReceiver<Message>,
    topic: Arc<str>,
    client: Link,
    durable: Arc<DurableEvents>,
    dispatcher: Dispatcher,
    options: MqttOptions,
) {
    let codec = options.shared_codec();
    while let Some(message) = lane.recv().await {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let outcome = match incoming(codec, message.payload().clone()) {
                Some((payload, packet)) => {
                    let (request, _) = packet.into_request_on(&topic, &payload, Headers::new());
                    dispatcher.handle_event(request).await
                }
                None => Err(RpcError::invalid_argument(format!(
                    "the event cannot be read with the server's codec ({codec:?})"
                ))),
            };
            let error = match outcome {
                Ok(()) => break,
                Err(error) => error,
            };
            if dispatcher.is_draining() {
                // Shutdown, not the event: left unacknowledged for the session's next connection.
                return;
            }
            if attempt >= durable.max_deliveries {
                let dead = durable.dead_letter_topic(&topic);
                tracing::warn!(%topic, attempt, %error, dead_letters = %dead, "event dead-lettered");
                let Some(letter) = letter_within_limits(
                    &options,
                    &client,
                    &dead,
                    message.payload(),
                    &error,
                    attempt,
                    &topic,
                ) else {
                    tracing::error!(%topic, dead_letters = %dead, "not even a dead letter without the event fits in a packet: the event is dropped");
                    break;
                };
                if let Err(error) = client.publish(&dead, Qos::AtLeastOnce, letter.into()).await {
                    tracing::error!(%error, "could not publish a dead letter; the event stays unacknowledged");
                    return;
                }
                break;
            }
            let delay = durable.delay_before(attempt);
            tracing::debug!(%topic, attempt, ?delay, %error, "event failed; retrying");
            let mut draining = std::pin::pin!(dispatcher.draining());
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut draining => return,
            }
        }
        if let Err(error) = client.ack(&message).await {
            tracing::warn!(%error, %topic, "could not acknowledge an event; the broker delivers it again");
        }
    }
}

/// The dead letter of an event, made to fit in a packet: a letter that does not fit would fail
/// the session's connection at every attempt, and every event with it. The handler's error is
/// shortened first (a long one may be what makes the letter too large); if the event itself
/// leaves no room (it may be just under the limit), the letter goes without it (`"body": null`),
/// the reason saying why. `None` only when not even a letter with neither fits (a dead-letter
/// topic near the limit).
fn letter_within_limits(
    options: &MqttOptions,
    client: &Link,
    dead: &str,
    payload: &[u8],
    error: &RpcError,
    deliveries: u32,
    topic: &str,
) -> Option<Vec<u8>> {
    let fits = |letter: &[u8]| {
        options
            .check_size(client, dead, Qos::AtLeastOnce, letter.len())
            .map_err(|too_large| too_large.message().to_owned())
    };
    let with_event = |reason: &str| dead_letter(Some(payload), reason, deliveries, topic);
    let too_large = match fits(&with_event(&error.to_string())) {
        Ok(()) => return Some(with_event(&error.to_string())),
        Err(too_large) => too_large,
    };
    if let Some(letter) = shortened(error.to_string(), |reason| {
        let letter = with_event(reason);
        fits(&letter).is_ok().then_some(letter)
    }) {
        tracing::warn!(%topic, %error, "the handler's error is shortened in the dead letter, which it would make too large");
        return Some(letter);
    }
    tracing::error!(%topic, bytes = payload.len(), %too_large, %error, "the dead letter goes out without the event, which would make it too large");
    // The explanation first: what may have to be cut is the handler's error, at its end.
    let reason = format!(
        "the event ({} bytes) is left out of this dead letter, which it would make too large \
         ({too_large}); the handler failed with: {error}",
        payload.len(),
    );
    shortened(reason, |reason| {
        let letter = dead_letter(None, reason, deliveries, topic);
        fits(&letter).is_ok().then_some(letter)
    })
}

/// The first letter `make` accepts with `reason` cut to half its length, again and again (at
/// character boundaries), down to nothing.
fn shortened(mut reason: String, make: impl Fn(&str) -> Option<Vec<u8>>) -> Option<Vec<u8>> {
    loop {
        if let Some(letter) = make(&reason) {
            return Some(letter);
        }
        if reason.is_empty() {
            return None;
        }
        let mut keep = reason.len() / 2;
        while !reason.is_char_boundary(keep) {
            keep -= 1;
        }
        reason.truncate(keep);
    }
}

/// `{"body":<the message>,"palisade-dead-letter-reason":...,"palisade-deliveries":n,
/// "palisade-original-subject":topic}`; `body` is the original JSON, or the text as a string
/// (`null` without the message).
fn dead_letter(payload: Option<&[u8]>, reason: &str, deliveries: u32, topic: &str) -> Vec<u8> {
    let body = payload.map_or(serde_json::Value::Null, |payload| {
        let body: Box<RawValue> = std::str::from_utf8(payload)
            .ok()
            .and_then(|text| serde_json::from_str::<Box<RawValue>>(text).ok())
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(payload);
                serde_json::value::to_raw_value(&*text).expect("a string serialises")
            });
        serde_json::from_str(body.get()).unwrap_or(serde_json::Value::Null)
    });
    let mut letter = serde_json::Map::new();
    letter.insert("body".into(), body);
    letter.insert(DEAD_LETTER_REASON.into(), reason.into());
    letter.insert(DEAD_LETTER_DELIVERIES.into(), deliveries.into());
    letter.insert(DEAD_LETTER_SUBJECT.into(), topic.into());
    serde_json::to_vec(&letter).expect("a JSON object serialises")
}
