//! Durable events over MQTT: a persistent session with QoS 1, acknowledged after the handlers
//! succeeded, retries with backoff, a dead-letter topic.

use super::MqttOptions;
use super::link::{Event, Events, Link, Message, Qos};
use super::server::incoming;
use crate::rpc::transport::{
    DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON, DEAD_LETTER_SUBJECT, shortened,
};
use crate::rpc::{Dispatcher, Headers, RpcError, TransportErrorKind};
use bytes::Bytes;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

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
///   [`DEAD_LETTER_REASON`], [`DEAD_LETTER_DELIVERIES`] and [`DEAD_LETTER_SUBJECT`], and
///   acknowledged once the broker acknowledged the letter. A letter cut off by a lost connection
///   is sent again; one an MQTT 5 broker refuses (not authorised) is sent again after the last
///   backoff delay, the event unacknowledged meanwhile (an error is logged each time). Over
///   MQTT 3.1.1, whose brokers do not say their packet limit, a letter after which the
///   connection was lost at once three times (a broker closing it on the letter) is sent
///   without the event. An MQTT broker keeps a message only for the sessions subscribed to its topic:
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
    let session = Session {
        client: client.clone(),
        durable: Arc::new(durable),
        letters: Arc::default(),
        in_hand: InHand::default(),
        dispatcher: dispatcher.clone(),
        options: options.clone(),
    };
    let mut lanes = HashMap::new();
    let mut handling = Vec::new();
    for topic in &topics {
        let (tx, rx) = mpsc::unbounded_channel();
        lanes.insert(topic.to_string(), tx);
        handling.push(dispatcher.spawn(handle_topic(rx, Arc::clone(topic), session.clone())));
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
    // From here on the lanes may send dead letters: a start that fails ends their wait.
    let closed = LettersClosed(Arc::clone(&session.letters));
    let acknowledged = async {
        loop {
            match events.poll().await {
                // The session's stored events may come before the acknowledgement.
                Ok(Event::Message(message)) => forward(&lanes, &session.in_hand, &client, message),
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
                // A letter of an event that failed meanwhile.
                Ok(event) => session.letters.confirm(&event),
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
    dispatcher.spawn(run(events, filters, lanes, handling, session, closed));
    Ok(())
}

fn subscribe(client: &Link, filters: &[String]) {
    super::server::subscribe_soon(client, filters, Qos::AtLeastOnce);
}

/// The packet ids of the events in the lanes, from their delivery to their acknowledgement (or
/// until they are left unacknowledged), and the session they belong to.
///
/// A broker sends an unacknowledged event again, under the same packet id, when the session
/// reconnects. The lane that holds it acknowledges that id once: a second copy handled would be
/// acknowledged a second time, when the broker may have given the id to another event since.
/// A broker that kept no session (restarted without persistence, or the session expired)
/// numbers its deliveries afresh: an event of the earlier session is not acknowledged (the
/// broker forgot it; the ack would be another event's), and its id says nothing of a new one.
#[derive(Clone, Default)]
struct InHand {
    ids: Arc<std::sync::Mutex<HashMap<u16, u64>>>,
    session: Arc<AtomicU64>,
}

/// The session an event came in, numbered from the start of the server.
type SessionNumber = u64;

impl InHand {
    fn ids(&self) -> std::sync::MutexGuard<'_, HashMap<u16, SessionNumber>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The broker kept no session.
    fn new_session(&self) {
        let mut ids = self.ids();
        self.session.fetch_add(1, Ordering::SeqCst);
        ids.clear();
    }

    /// The session of a message to handle, or `None` if a copy of it is in hand already (a
    /// QoS 0 event has no packet id).
    fn take(&self, message: &Message) -> Option<SessionNumber> {
        let mut ids = self.ids();
        let session = self.session.load(Ordering::SeqCst);
        if message.pkid() == 0 {
            return Some(session);
        }
        // Ids of an earlier session were forgotten with it: one held is this session's.
        match ids.insert(message.pkid(), session) {
            Some(_) => None,
            None => Some(session),
        }
    }

    /// The event is acknowledged: queued (`false` if the request queue is full), unless it
    /// belongs to an earlier session; its id released.
    fn acknowledge(&self, client: &Link, message: &Message, session: SessionNumber) -> bool {
        let mut ids = self.ids();
        forget(&mut ids, message, session);
        if self.session.load(Ordering::SeqCst) != session {
            tracing::debug!(
                topic = message.topic(),
                "an event of a session the broker did not keep is not acknowledged"
            );
            return true;
        }
        // Queued under the lock a new session takes: this session's ack never goes out as the
        // next one's.
        client.try_ack(message)
    }

    /// The event is left unacknowledged (given up, or a shutdown): its id released.
    fn release(&self, message: &Message, session: SessionNumber) {
        forget(&mut self.ids(), message, session);
    }
}

/// Forgets the id of `message`, if it is still held for `session` (a new session may have
/// given it to another event since).
fn forget(ids: &mut HashMap<u16, SessionNumber>, message: &Message, session: SessionNumber) {
    if ids.get(&message.pkid()) == Some(&session) {
        ids.remove(&message.pkid());
    }
}

/// Hands an event to its topic's lane.
fn forward(
    lanes: &HashMap<String, mpsc::UnboundedSender<(Message, SessionNumber)>>,
    in_hand: &InHand,
    client: &Link,
    message: Message,
) {
    match lanes.get(message.topic()) {
        Some(lane) => match in_hand.take(&message) {
            Some(session) => {
                let _ = lane.send((message, session));
            }
            None => tracing::debug!(
                topic = message.topic(),
                pkid = message.pkid(),
                "an event sent again while its first copy is in hand ignored"
            ),
        },
        None => {
            // Not ours (a subscription of an earlier version of the service): acknowledged, or
            // the broker would deliver it again at every connection.
            tracing::warn!(
                topic = message.topic(),
                "durable event on an unknown topic acknowledged"
            );
            let _ = client.try_ack(&message);
        }
    }
}

/// What the session's event loop and its lanes share.
#[derive(Clone)]
struct Session {
    client: Link,
    durable: Arc<DurableEvents>,
    letters: Arc<DeadLetters>,
    in_hand: InHand,
    dispatcher: Dispatcher,
    options: MqttOptions,
}

async fn run(
    mut events: Events,
    filters: Vec<String>,
    lanes: HashMap<String, mpsc::UnboundedSender<(Message, SessionNumber)>>,
    handling: Vec<tokio::task::JoinHandle<()>>,
    session: Session,
    _closed: LettersClosed,
) {
    let Session {
        client,
        letters,
        in_hand,
        dispatcher,
        options,
        ..
    } = session;
    let mut draining = std::pin::pin!(dispatcher.draining());
    let mut attempt = 0u32;
    loop {
        let event = tokio::select! {
            biased;
            event = events.poll() => event,
            _ = &mut draining => break,
        };
        match event {
            Ok(Event::Message(message)) => forward(&lanes, &in_hand, &client, message),
            Ok(Event::ConnAck { session_present }) => {
                attempt = 0;
                if !session_present {
                    in_hand.new_session();
                }
                // Subscribed again at every connection: a session the broker lost (restarted
                // without persistence) has no subscriptions.
                subscribe(&client, &filters);
            }
            Ok(event) => letters.confirm(&event),
            Err(error) => {
                if attempt == 0 {
                    tracing::warn!(%error, "durable events lost the MQTT connection; reconnecting");
                }
                // What rumqttc had not yet said about the lost connection first.
                for event in events.take_buffered() {
                    match event {
                        Event::Message(message) => forward(&lanes, &in_hand, &client, message),
                        event => letters.confirm(&event),
                    }
                }
                letters.lost(&mut events);
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
            event = events.poll() => match event {
                Ok(event) => letters.confirm(&event),
                Err(_) => return,
            },
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
    mut lane: mpsc::UnboundedReceiver<(Message, SessionNumber)>,
    topic: Arc<str>,
    session: Session,
) {
    let Session {
        client,
        durable,
        letters,
        in_hand,
        dispatcher,
        options,
    } = session;
    let codec = options.shared_codec();
    'events: while let Some((message, session)) = lane.recv().await {
        let mut in_hand = InHandUntilDone::new(&in_hand, &message, session);
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
                let letter = Letter {
                    options: &options,
                    client: &client,
                    dead: durable.dead_letter_topic(&topic),
                    payload: message.payload(),
                    error: &error,
                    deliveries: attempt,
                    topic: &topic,
                };
                tracing::warn!(%topic, attempt, %error, dead_letters = %letter.dead, "event dead-lettered");
                let mut draining = std::pin::pin!(dispatcher.draining());
                let sent = tokio::select! {
                    sent = letter.send(&letters, &durable) => sent,
                    // Left unacknowledged for the session's next connection.
                    _ = &mut draining => return,
                };
                match sent {
                    LetterSent::Kept => break,
                    LetterSent::NotKept => continue 'events,
                    LetterSent::Stopped => return,
                }
            }
            let delay = durable.delay_before(attempt);
            tracing::debug!(%topic, attempt, ?delay, %error, "event failed; retrying");
            let mut draining = std::pin::pin!(dispatcher.draining());
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut draining => return,
            }
        }
        if !in_hand.acknowledge(&client) {
            // The request queue is full: waited for, outside the lock.
            if let Err(error) = client.ack(&message).await {
                tracing::warn!(%error, %topic, "could not acknowledge an event; the broker delivers it again");
            }
        }
    }
}

/// An event's packet id in hand until its lane is done with it, whichever way: acknowledged,
/// or left unacknowledged (given up, or a shutdown).
struct InHandUntilDone<'a> {
    in_hand: &'a InHand,
    message: &'a Message,
    session: SessionNumber,
    done: bool,
}

impl<'a> InHandUntilDone<'a> {
    fn new(in_hand: &'a InHand, message: &'a Message, session: SessionNumber) -> Self {
        InHandUntilDone {
            in_hand,
            message,
            session,
            done: false,
        }
    }

    /// Queues the event's acknowledgement (not for an event of an earlier session); `false` if
    /// the request queue was full.
    fn acknowledge(&mut self, client: &Link) -> bool {
        self.done = true;
        self.in_hand.acknowledge(client, self.message, self.session)
    }
}

impl Drop for InHandUntilDone<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.in_hand.release(self.message, self.session);
        }
    }
}

/// Connections lost just after a dead letter was written, before the broker acknowledged it,
/// after which it is sent without its event (if with the event it made the broker close the
/// connection: an MQTT 3.1.1 broker does not say its packet limit), then given up.
const MAX_LETTER_LOSSES: u32 = 3;

/// A loss this soon after the letter was written counts toward [`MAX_LETTER_LOSSES`] (a broker
/// closes the connection on a packet over its limit as soon as it reads it).
const LOST_AT_ONCE: Duration = Duration::from_secs(2);

/// The dead letter of an event, and where it goes.
struct Letter<'a> {
    options: &'a MqttOptions,
    client: &'a Link,
    dead: String,
    payload: &'a Bytes,
    error: &'a RpcError,
    deliveries: u32,
    topic: &'a str,
}

/// What became of a dead letter.
enum LetterSent {
    /// The broker acknowledged it (or none can be made: the event is dropped, with an error
    /// logged): the event is acknowledged.
    Kept,
    /// Given up: the event stays unacknowledged, and the broker delivers it again at the
    /// session's next connection.
    NotKept,
    /// The session's event loop ended.
    Stopped,
}

impl Letter<'_> {
    /// Publishes the letter (QoS 1) and waits for the broker's acknowledgement, so that the event
    /// is acknowledged only once its letter is kept: sent again after a lost connection,
    /// without the event after [`MAX_LETTER_LOSSES`] losses, again after a delay when an MQTT 5
    /// broker refuses it.
    async fn send(&self, letters: &DeadLetters, durable: &DurableEvents) -> LetterSent {
        let Some(mut body) = self.within_limits() else {
            tracing::error!(topic = self.topic, dead_letters = %self.dead, "not even a dead letter without the event fits in a packet: the event is dropped");
            return LetterSent::Kept;
        };
        let mut losses = 0;
        let mut without_event = false;
        loop {
            match letters
                .send(self.client, &self.dead, Bytes::from(body.clone()))
                .await
            {
                None => return LetterSent::Stopped,
                Some(Sent::Accepted) => return LetterSent::Kept,
                Some(Sent::Refused(reason)) => {
                    let delay = durable.delay_before(u32::MAX);
                    tracing::error!(topic = self.topic, dead_letters = %self.dead, %reason, ?delay, "the MQTT broker refused the dead letter; the event stays unacknowledged, and the letter is sent again after a delay");
                    tokio::time::sleep(delay).await;
                }
                Some(Sent::Lost { at_once }) => {
                    // Over MQTT 5 the broker's packet limit is known, and checked: a loss says
                    // nothing of the letter, which is only sent again.
                    losses += u32::from(at_once && !self.client.is_v5());
                    if losses < MAX_LETTER_LOSSES {
                        continue;
                    }
                    if without_event {
                        tracing::error!(topic = self.topic, dead_letters = %self.dead, "the connection was lost every time the dead letter was sent, even without the event: given up, the event stays unacknowledged");
                        return LetterSent::NotKept;
                    }
                    tracing::error!(topic = self.topic, dead_letters = %self.dead, bytes = self.payload.len(), "the connection was lost every time the dead letter was sent: it goes out without the event (is it over the broker's packet limit?)");
                    let reason = format!(
                        "the event ({} bytes) is left out of this dead letter: the connection to \
                         the broker was lost {MAX_LETTER_LOSSES} times after it was sent with it \
                         (over the broker's packet limit?); the handler failed with: {}",
                        self.payload.len(),
                        self.error
                    );
                    let Some(smaller) = self.fitting(None, reason) else {
                        return LetterSent::NotKept;
                    };
                    body = smaller;
                    without_event = true;
                    losses = 0;
                }
            }
        }
    }

    /// The letter, made to fit in a packet: a letter that does not fit would fail the
    /// session's connection at every attempt, and every event with it. The handler's error is
    /// shortened first (a long one may be what makes the letter too large); if the event itself
    /// leaves no room (it may be just under the limit), the letter goes without it
    /// (`"body": null`), the reason saying why. `None` only when not even a letter with neither
    /// fits (a dead-letter topic near the limit).
    fn within_limits(&self) -> Option<Vec<u8>> {
        let full = dead_letter(
            Some(self.payload),
            &self.error.to_string(),
            self.deliveries,
            self.topic,
        );
        let too_large = match self.fits(&full) {
            Ok(()) => return Some(full),
            Err(too_large) => too_large,
        };
        if let Some(letter) = self.fitting(Some(self.payload), self.error.to_string()) {
            tracing::warn!(topic = self.topic, error = %self.error, "the handler's error is shortened in the dead letter, which it would make too large");
            return Some(letter);
        }
        tracing::error!(topic = self.topic, bytes = self.payload.len(), %too_large, error = %self.error, "the dead letter goes out without the event, which would make it too large");
        // The explanation first: what may have to be cut is the handler's error, at its end.
        let reason = format!(
            "the event ({} bytes) is left out of this dead letter, which it would make too large \
             ({too_large}); the handler failed with: {}",
            self.payload.len(),
            self.error
        );
        self.fitting(None, reason)
    }

    fn fits(&self, letter: &[u8]) -> Result<(), String> {
        self.options
            .check_size(self.client, &self.dead, Qos::AtLeastOnce, letter.len())
            .map_err(|too_large| too_large.message().to_owned())
    }

    /// The letter with `payload` and `reason`, the reason shortened until the letter fits.
    fn fitting(&self, payload: Option<&[u8]>, reason: String) -> Option<Vec<u8>> {
        let letter = |reason: &str| dead_letter(payload, reason, self.deliveries, self.topic);
        let reason = shortened(reason, |reason| self.fits(&letter(reason)).is_ok())?;
        Some(letter(&reason))
    }
}

/// The session's dead letters in flight: one at a time, so that the packet id rumqttc gives
/// the next QoS 1 message it writes, and the acknowledgement of that id, are the letter's (the
/// session publishes nothing else with QoS 1).
#[derive(Default)]
struct DeadLetters {
    sending: tokio::sync::Mutex<()>,
    outstanding: std::sync::Mutex<Option<Outstanding>>,
    /// The event loop ended: nothing would settle a letter.
    closed: AtomicBool,
}

struct Outstanding {
    /// Its packet id, once written, and when.
    written: Option<(u16, std::time::Instant)>,
    settle: oneshot::Sender<Sent>,
}

/// What the broker did with a dead letter.
enum Sent {
    Accepted,
    /// An MQTT 5 broker's reason code.
    Refused(String),
    /// The connection was lost first; `at_once` if that came just after the letter was
    /// written (as when the broker closes the connection on it).
    Lost {
        at_once: bool,
    },
}

impl DeadLetters {
    fn outstanding(&self) -> std::sync::MutexGuard<'_, Option<Outstanding>> {
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `letter` and waits for what becomes of it; `None` once the event loop ended.
    async fn send(&self, client: &Link, topic: &str, letter: Bytes) -> Option<Sent> {
        let _one_at_a_time = self.sending.lock().await;
        let settled = loop {
            {
                // Queued and registered under the lock a lost connection takes: the letter is
                // either in what rumqttc kept from the lost connection, or goes out on the next.
                let mut outstanding = self.outstanding();
                if self.closed.load(Ordering::SeqCst) {
                    return None;
                }
                if client.try_publish(topic, Qos::AtLeastOnce, letter.clone()) {
                    let (settle, settled) = oneshot::channel();
                    *outstanding = Some(Outstanding {
                        written: None,
                        settle,
                    });
                    break settled;
                }
            }
            // rumqttc's request queue is full (dead letters are rare: no wake-up for them).
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        settled.await.ok()
    }

    /// What the event loop reported: the letter written, or acknowledged.
    fn confirm(&self, event: &Event) {
        let mut outstanding = self.outstanding();
        match (event, outstanding.as_mut()) {
            (Event::Published(pkid), Some(letter)) if letter.written.is_none() => {
                letter.written = Some((*pkid, std::time::Instant::now()));
            }
            (Event::PubAck { pkid, refused }, Some(letter))
                if letter.written.is_some_and(|(written, _)| written == *pkid) =>
            {
                let sent = match refused {
                    None => Sent::Accepted,
                    Some(refusal) => Sent::Refused(refusal.reason.clone()),
                };
                if let Some(letter) = outstanding.take() {
                    let _ = letter.settle.send(sent);
                }
            }
            _ => {}
        }
    }

    /// The connection was lost: rumqttc would send the letter again on the next one, and again
    /// at each loss, even if the letter is what makes the broker close it. The letter is taken
    /// back from rumqttc, and its sender decides.
    fn lost(&self, events: &mut Events) {
        let mut outstanding = self.outstanding();
        let taken = events.take_unacknowledged_after_loss();
        let Some(letter) = outstanding.take() else {
            return;
        };
        let at_once = letter
            .written
            .is_some_and(|(_, at)| at.elapsed() < LOST_AT_ONCE);
        match (taken, letter.written) {
            // Queued after rumqttc took its queue back: it goes out on the next connection.
            (None, None) => *outstanding = Some(letter),
            _ => {
                let _ = letter.settle.send(Sent::Lost { at_once });
            }
        }
    }

    fn close(&self) {
        let mut outstanding = self.outstanding();
        self.closed.store(true, Ordering::SeqCst);
        outstanding.take();
    }
}

/// Ends what waits for a dead letter when the event loop stops, whether it returns or panics.
struct LettersClosed(Arc<DeadLetters>);

impl Drop for LettersClosed {
    fn drop(&mut self) {
        self.0.close();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A link whose request queue holds one request, and its (unconnected) event loop.
    fn link() -> (Link, rumqttc::EventLoop) {
        let (client, events) =
            rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("in-hand", "127.0.0.1", 1), 1);
        (Link::V4(client), events)
    }

    fn event(pkid: u16) -> Message {
        let mut publish = rumqttc::Publish::new("order", rumqttc::QoS::AtLeastOnce, b"{}".to_vec());
        publish.pkid = pkid;
        Message::V4(publish)
    }

    /// Whether a request (an acknowledgement) was queued since the last look: the queue holds
    /// one, so a probe finds it full. Empties the queue.
    fn queued(client: &Link, events: &mut rumqttc::EventLoop) -> bool {
        let full = !client.try_publish("probe", Qos::AtMostOnce, Bytes::new());
        events.clean();
        events.pending.clear();
        full
    }

    #[test]
    fn a_copy_of_an_event_in_hand_is_ignored_until_it_is_done_with() {
        let (client, mut events) = link();
        let in_hand = InHand::default();
        let first = event(7);
        let session = in_hand.take(&first).expect("a new event");
        assert_eq!(in_hand.take(&event(7)), None, "a copy");
        // QoS 0 events have no packet id: never copies.
        assert!(in_hand.take(&event(0)).is_some());
        assert!(in_hand.take(&event(0)).is_some());
        assert!(in_hand.acknowledge(&client, &first, session));
        assert!(queued(&client, &mut events), "acknowledged");
        assert!(
            in_hand.take(&event(7)).is_some(),
            "released by its acknowledgement"
        );
        // Left unacknowledged: released, not acknowledged.
        in_hand.release(&event(7), session);
        assert!(!queued(&client, &mut events));
        assert!(in_hand.take(&event(7)).is_some(), "released");
    }

    #[test]
    fn a_new_session_forgets_the_old_ids_and_their_acknowledgements() {
        let (client, mut events) = link();
        let in_hand = InHand::default();
        let old = event(1);
        let old_session = in_hand.take(&old).unwrap();
        in_hand.new_session();
        // The new session's first event takes the same id: a new event.
        let new = event(1);
        let new_session = in_hand.take(&new).expect("a new session's event");
        assert_ne!(new_session, old_session);
        // The old event's lane finishes: no ack (it would be the new event's), and the new
        // event stays in hand.
        assert!(in_hand.acknowledge(&client, &old, old_session));
        assert!(
            !queued(&client, &mut events),
            "an old session's event acknowledged"
        );
        assert_eq!(
            in_hand.take(&event(1)),
            None,
            "the new event is still in hand"
        );
        in_hand.release(&old, old_session);
        assert_eq!(
            in_hand.take(&event(1)),
            None,
            "the new event is still in hand"
        );
        assert!(in_hand.acknowledge(&client, &new, new_session));
        assert!(queued(&client, &mut events));
    }

    #[test]
    fn a_lane_done_with_an_event_releases_it_once_whichever_way() {
        let (client, mut events) = link();
        let in_hand = InHand::default();
        let message = event(3);
        let session = in_hand.take(&message).unwrap();
        {
            let _done = InHandUntilDone::new(&in_hand, &message, session);
            // Given up, or a shutdown: dropped without an acknowledgement.
        }
        assert!(!queued(&client, &mut events));
        let session = in_hand.take(&event(3)).expect("released");
        let mut done = InHandUntilDone::new(&in_hand, &message, session);
        assert!(done.acknowledge(&client));
        drop(done);
        assert!(queued(&client, &mut events), "acknowledged");
        // Dropped after its acknowledgement: nothing more (a second copy is no longer in hand,
        // and the id is not released twice into another event's hands).
        let next = in_hand.take(&event(3)).expect("released");
        assert!(!queued(&client, &mut events));
        in_hand.release(&event(3), next);
    }

    /// A letter sent on a link of its own (queue of ten), and the task awaiting its outcome.
    fn sending(
        letters: &Arc<DeadLetters>,
    ) -> (
        Link,
        rumqttc::EventLoop,
        tokio::task::JoinHandle<Option<Sent>>,
    ) {
        let (client, events) =
            rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("letters", "127.0.0.1", 1), 10);
        let client = Link::V4(client);
        let sent = {
            let (letters, client) = (Arc::clone(letters), client.clone());
            tokio::spawn(async move {
                letters
                    .send(
                        &client,
                        "palisade/dead-letter/order",
                        Bytes::from_static(b"{}"),
                    )
                    .await
            })
        };
        (client, events, sent)
    }

    async fn settled(sent: tokio::task::JoinHandle<Option<Sent>>) -> Option<Sent> {
        tokio::time::timeout(Duration::from_secs(5), sent)
            .await
            .expect("the letter's sender was never told")
            .unwrap()
    }

    async fn registered(letters: &DeadLetters) {
        while letters.outstanding().is_none() {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_letter_is_settled_by_the_acknowledgement_of_its_own_packet_id() {
        let letters = Arc::new(DeadLetters::default());
        let (_client, _events, sent) = sending(&letters);
        registered(&letters).await;
        letters.confirm(&Event::PubAck {
            pkid: 5,
            refused: None,
        });
        letters.confirm(&Event::Published(5));
        // Another id's acknowledgement, and a second write, change nothing.
        letters.confirm(&Event::PubAck {
            pkid: 6,
            refused: None,
        });
        letters.confirm(&Event::Published(6));
        assert!(letters.outstanding().is_some(), "settled by another id");
        letters.confirm(&Event::PubAck {
            pkid: 5,
            refused: None,
        });
        assert!(matches!(settled(sent).await, Some(Sent::Accepted)));
        assert!(letters.outstanding().is_none());
    }

    #[tokio::test]
    async fn a_refused_letter_says_why() {
        let letters = Arc::new(DeadLetters::default());
        let (_client, _events, sent) = sending(&letters);
        registered(&letters).await;
        letters.confirm(&Event::Published(9));
        letters.confirm(&Event::PubAck {
            pkid: 9,
            refused: Some(super::super::link::Refusal {
                reason: "NotAuthorized".into(),
                authorization: true,
            }),
        });
        assert!(
            matches!(settled(sent).await, Some(Sent::Refused(reason)) if reason == "NotAuthorized")
        );
    }

    #[tokio::test]
    async fn a_lost_letter_is_taken_back_from_rumqttc_and_its_sender_told() {
        // Written, then lost at once: taken out of what rumqttc would send again.
        let letters = Arc::new(DeadLetters::default());
        let (_client, events, sent) = sending(&letters);
        registered(&letters).await;
        letters.confirm(&Event::Published(3));
        let mut events = Events::v4(events);
        if let Events::V4(events) = &mut events {
            // As rumqttc's `clean` leaves it at a loss: the letter back in `pending`.
            events.clean();
            if let Some(rumqttc::Request::Publish(letter)) = events.pending.front_mut() {
                letter.pkid = 3;
            }
        }
        letters.lost(&mut events);
        assert!(matches!(
            settled(sent).await,
            Some(Sent::Lost { at_once: true })
        ));
        assert_eq!(events.take_unacknowledged_after_loss(), None, "taken back");
        // Queued after rumqttc took its queue back (nothing in `pending`): it goes out on the
        // next connection, still awaited.
        let (_client, _queued, sent) = sending(&letters);
        registered(&letters).await;
        letters.lost(&mut events);
        assert!(!sent.is_finished());
        assert!(letters.outstanding().is_some());
        // The event loop ends: the sender is told.
        letters.close();
        assert!(settled(sent).await.is_none());
        let (_client, _events, sent) = sending(&letters);
        assert!(settled(sent).await.is_none(), "closed: nothing is sent");
    }
}
