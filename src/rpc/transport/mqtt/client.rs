use super::link::{Event, Events, Link, Message, Qos, Refusal};
use super::{MqttOptions, check_topic, reply_topic};
use crate::rpc::transport::{ClientTransport, Connect, ExplainSilence, ReplyReceiver};
use crate::rpc::wire::{PendingRequests, SharedCodec};
use crate::rpc::{RpcError, RpcRequest, TransportErrorKind};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The client side of the MQTT transport, before it is connected.
/// [`Client::builder().connect(..)`](crate::rpc::ClientBuilder::connect) connects it (a bad URL,
/// an unreachable broker or refused credentials fail there with a clear error); [`MqttOptions`]
/// alone connects the same way.
///
/// ```no_run
/// use palisade::rpc::Client;
/// use palisade::rpc::transport::mqtt::{MqttOptions, MqttTransport};
///
/// # #[tokio::main] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let sensors = Client::builder()
///     .connect(MqttTransport::new(MqttOptions::new("mqtt://127.0.0.1")).durable_events())
///     .await?;
/// sensors.emit("temperature", &21.5).await?; // QoS 1
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct MqttTransport {
    options: MqttOptions,
    durable_events: bool,
}

impl MqttTransport {
    /// A transport connecting with `options`.
    pub fn new(options: MqttOptions) -> Self {
        MqttTransport {
            options,
            durable_events: false,
        }
    }

    /// Publishes events with QoS 1 instead of NestJS's QoS 0, for servers with
    /// [durable events](super::DurableEvents): the broker acknowledges each event and keeps it
    /// for their persistent sessions while they are away.
    ///
    /// `emit` resolves once the broker acknowledged the event (`PUBACK`). If the connection drops
    /// first, the event is published again once the client has reconnected, so it may arrive
    /// twice (at least once); `emit` waits on, within the client's timeout. It fails with
    /// `Unavailable` (`NotAcknowledged`) if the broker refuses the event (an MQTT 5 reason code),
    /// or if the connection was lost three times after the event was sent and before it was
    /// acknowledged: a broker that closes the connection on a message would otherwise be sent it
    /// forever. A timeout or an error leaves it unknown whether the event arrived, except
    /// `NotConnected`: the client was not connected, and the event was not sent.
    pub fn durable_events(mut self) -> Self {
        self.durable_events = true;
        self
    }

    /// Connects.
    pub async fn connect(self) -> Result<MqttConnection, RpcError> {
        MqttConnection::connect(self.options, self.durable_events).await
    }
}

impl Connect for MqttTransport {
    type Transport = MqttConnection;

    async fn connect(self) -> Result<MqttConnection, RpcError> {
        MqttTransport::connect(self).await
    }
}

impl Connect for MqttOptions {
    type Transport = MqttConnection;

    async fn connect(self) -> Result<MqttConnection, RpcError> {
        MqttTransport::new(self).connect().await
    }
}

struct Shared {
    options: MqttOptions,
    client: Link,
    pending: Arc<PendingRequests>,
    /// Cleared before the pending requests are failed on a connection loss, set once the reply
    /// subscriptions are restored: a request registered while it is set is either answered or
    /// failed by the loss.
    connected: AtomicBool,
    /// The reply topics subscribed to: kept for the connection's life, restored on reconnection.
    topics: Mutex<HashSet<Arc<str>>>,
    /// The broker's subscription acknowledgements, in order. Subscribing holds this lock: one
    /// subscription at a time, so the next acknowledgement is the holder's.
    acks: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<bool>>>,
    durable_events: bool,
    /// Counts the connections to the broker: a restoration belongs to one.
    generation: AtomicU64,
    /// Durable events waiting for the broker's acknowledgement.
    confirmations: Mutex<Confirmations>,
    /// Durable events waiting for room in rumqttc's request queue...
    waiting_for_room: AtomicUsize,
    /// ...woken when the event loop took a request from it.
    room: Notify,
    /// Woken when the connection is back (and when the event loop stops).
    connection_back: Notify,
}

/// Lost connections after a durable event was sent without an acknowledgement, after which it is
/// given up: a broker that closes the connection on a message would otherwise be sent it forever.
const MAX_LOSSES: u32 = 3;

/// What became of a durable event's publish.
#[derive(Debug)]
enum Confirmed {
    /// The broker acknowledged it.
    Acknowledged,
    /// The broker refused it (MQTT 5).
    Refused(RpcError),
    /// The connection dropped before the acknowledgement. `written`: it went out (the broker may
    /// have it); otherwise it never left rumqttc, which drops it when it reconnects.
    Lost { written: bool },
}

/// Resolves one publish of a durable event.
type Confirmation = oneshot::Sender<Confirmed>;

/// Durable events on their way to the broker, matched with its acknowledgements (`PUBACK`) by
/// packet id. rumqttc gives a QoS 1 message its packet id only when it writes it, in the order of
/// its request queue, and says nothing else about it: an event is queued and its confirmation put
/// in `queued` under one lock, and each `Published` takes the first one. Nothing else goes
/// through rumqttc's queue as QoS 1 on this connection, and rumqttc's own list of messages to
/// send first (`pending`) is emptied at each connection of a clean session, so the two orders
/// stay the same; a lost connection is accounted for in [`lost`](Self::lost).
#[derive(Default)]
struct Confirmations {
    /// Events in rumqttc's queue, in queue order.
    queued: VecDeque<Confirmation>,
    /// Events written and not yet acknowledged, by packet id.
    written: HashMap<u16, Confirmation>,
    /// An event that took a packet id still in flight: written once that one is acknowledged.
    collided: Option<(u16, Confirmation)>,
    /// The event loop stopped: nothing is confirmed any more.
    closed: bool,
}

impl Confirmations {
    fn written(&mut self, pkid: u16) {
        let confirmation = match self.collided.take() {
            Some((collided, confirmation)) if collided == pkid => Some(confirmation),
            other => {
                self.collided = other;
                self.queued.pop_front()
            }
        };
        match confirmation {
            Some(confirmation) => {
                if let Some(replaced) = self.written.insert(pkid, confirmation) {
                    // Cannot happen while the orders agree; if it did, the event is sent again
                    // rather than confirmed by another's acknowledgement.
                    let _ = replaced.send(Confirmed::Lost { written: true });
                }
            }
            None => tracing::debug!(pkid, "an MQTT message written that no event waits for"),
        }
    }

    fn collided(&mut self, pkid: u16) {
        if let Some(confirmation) = self.queued.pop_front()
            && let Some((_, earlier)) = self.collided.replace((pkid, confirmation))
        {
            let _ = earlier.send(Confirmed::Lost { written: false });
        }
    }

    fn settle(&mut self, pkid: u16, outcome: Confirmed) {
        if let Some(confirmation) = self.written.remove(&pkid) {
            // The caller may have stopped waiting.
            let _ = confirmation.send(outcome);
        }
    }

    /// The connection dropped, and rumqttc took back `unwritten` QoS 1 messages from the head of
    /// its queue (it drops them when it reconnects). Those, the written ones and a collided one
    /// are lost; the rest of `queued` was queued after rumqttc took its queue back and goes out
    /// on the next connection, in order.
    fn lost(&mut self, unwritten: usize) {
        let unwritten = unwritten.min(self.queued.len());
        for confirmation in self.queued.drain(..unwritten) {
            let _ = confirmation.send(Confirmed::Lost { written: false });
        }
        for (_, confirmation) in self.written.drain() {
            let _ = confirmation.send(Confirmed::Lost { written: true });
        }
        if let Some((_, confirmation)) = self.collided.take() {
            let _ = confirmation.send(Confirmed::Lost { written: false });
        }
    }

    /// The event loop stopped: every confirmation is dropped (its `emit` fails) and none is taken
    /// any more.
    fn close(&mut self) {
        self.closed = true;
        self.queued.clear();
        self.written.clear();
        self.collided = None;
    }
}

/// Counts an event waiting for room in the request queue while it waits.
struct WaitingForRoom<'a>(&'a AtomicUsize);

impl<'a> WaitingForRoom<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        WaitingForRoom(count)
    }
}

impl Drop for WaitingForRoom<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Stops the event loop when the last clone of the connection is dropped.
struct Owner {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A connected MQTT client transport: requests published on their route's topic, replies read
/// from `<route>/reply` (one subscription per route, kept) and matched by id; events published on
/// their route's topic. Clones share the connection.
#[derive(Clone)]
pub struct MqttConnection {
    owner: Arc<Owner>,
}

impl MqttConnection {
    async fn connect(options: MqttOptions, durable_events: bool) -> Result<Self, RpcError> {
        let (client, mut events) = options.session(true, false)?;
        options.connected(&mut events).await?;
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            options,
            client,
            pending: PendingRequests::new(),
            connected: AtomicBool::new(true),
            topics: Mutex::new(HashSet::new()),
            acks: tokio::sync::Mutex::new(acks),
            durable_events,
            generation: AtomicU64::new(0),
            confirmations: Mutex::default(),
            waiting_for_room: AtomicUsize::new(0),
            room: Notify::new(),
            connection_back: Notify::new(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(run(Arc::clone(&shared), events, acks_tx, stop.clone()));
        Ok(MqttConnection {
            owner: Arc::new(Owner { shared, stop }),
        })
    }

    /// Replies dropped because their request was no longer waiting (it timed out, or its caller
    /// went away).
    pub fn late_replies(&self) -> u64 {
        self.owner.shared.pending.late_replies()
    }

    /// Whether the connection to the broker is up (`false` while reconnecting).
    pub fn is_connected(&self) -> bool {
        self.owner.shared.connected.load(Ordering::SeqCst)
    }
}

impl Shared {
    fn not_connected(&self) -> RpcError {
        RpcError::transport(
            TransportErrorKind::NotConnected,
            format!(
                "not connected to the MQTT broker at {} (reconnecting)",
                self.options.address_text()
            ),
        )
    }

    fn check_connected(&self) -> Result<(), RpcError> {
        if self.connected.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(self.not_connected())
        }
    }

    fn has(&self, topic: &str) -> bool {
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(topic)
    }

    /// Subscribes `filters` and waits for the broker's acknowledgement; the caller holds `acks`.
    async fn subscribe(
        &self,
        acks: &mut mpsc::UnboundedReceiver<Vec<bool>>,
        filters: Vec<String>,
    ) -> Result<(), RpcError> {
        // An acknowledgement left over from a subscription that timed out is not ours.
        while acks.try_recv().is_ok() {}
        let count = filters.len();
        self.client
            .subscribe_many(filters, Qos::AtMostOnce)
            .await
            .map_err(|error| {
                RpcError::transport(
                    TransportErrorKind::ConnectionLost,
                    format!("cannot subscribe: {error}"),
                )
            })?;
        let ack = tokio::time::timeout(self.options.response_timeout, acks.recv())
            .await
            .map_err(|_| {
                RpcError::transport(
                    TransportErrorKind::ConnectionLost,
                    "the MQTT broker did not acknowledge a subscription in time",
                )
            })?
            .ok_or_else(|| self.not_connected())?;
        if ack.len() != count || ack.iter().any(|accepted| !accepted) {
            return Err(RpcError::transport(
                TransportErrorKind::Authorization,
                "the MQTT broker refused a reply-topic subscription",
            ));
        }
        Ok(())
    }

    /// Subscribes `topic` once (acknowledged by the broker); later requests find it subscribed.
    async fn ensure_subscribed(&self, topic: &str) -> Result<(), RpcError> {
        if self.has(topic) {
            return Ok(());
        }
        let mut acks = self.acks.lock().await;
        if self.has(topic) {
            return Ok(());
        }
        self.check_connected()?;
        self.subscribe(&mut acks, vec![topic.to_owned()]).await?;
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Arc::from(topic));
        Ok(())
    }

    /// After the reconnection numbered `generation`: subscribes every reply topic again (retrying
    /// with backoff while that connection lasts), then takes requests again.
    async fn restore(self: Arc<Self>, generation: u64) {
        let mut attempt = 0;
        loop {
            if self.generation.load(Ordering::SeqCst) != generation || self.pending.is_closed() {
                // A newer connection restores its own; or the client is gone.
                return;
            }
            let restored = {
                let mut acks = self.acks.lock().await;
                let topics: Vec<String> = self
                    .topics
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|t| t.to_string())
                    .collect();
                if topics.is_empty() {
                    Ok(())
                } else {
                    self.subscribe(&mut acks, topics).await
                }
            };
            match restored {
                Ok(()) => {
                    let restored = {
                        // A loss bumps the generation under this lock: checked and marked
                        // connected in one step.
                        let _lost = self.confirmations();
                        let current = self.generation.load(Ordering::SeqCst) == generation;
                        if current {
                            self.connected.store(true, Ordering::SeqCst);
                        }
                        current
                    };
                    if restored {
                        self.connection_back.notify_waiters();
                        tracing::info!(broker = %self.options.address_text(), "reconnected to the MQTT broker");
                    }
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "could not restore the reply subscriptions; retrying");
                    tokio::time::sleep(self.options.backoff(attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    async fn publish(&self, topic: &str, qos: Qos, payload: Bytes) -> Result<(), RpcError> {
        self.options
            .check_size(&self.client, topic, qos, payload.len())?;
        self.client
            .publish(topic, qos, payload)
            .await
            .map_err(|error| {
                RpcError::transport(
                    TransportErrorKind::ConnectionLost,
                    format!("cannot publish to {topic:?} on MQTT: {error}"),
                )
            })
    }
}

impl Shared {
    fn confirmations(&self) -> std::sync::MutexGuard<'_, Confirmations> {
        self.confirmations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a durable event (QoS 1) and waits for the broker's acknowledgement. If the
    /// connection drops first, the event is published again once the client has reconnected.
    async fn publish_durable(&self, topic: &str, payload: Bytes) -> Result<(), RpcError> {
        self.options
            .check_size(&self.client, topic, Qos::AtLeastOnce, payload.len())?;
        let mut confirmed = self.queue_durable(topic, &payload, false).await?;
        let mut losses = 0;
        loop {
            match confirmed.await {
                Ok(Confirmed::Acknowledged) => return Ok(()),
                Ok(Confirmed::Refused(error)) => return Err(error),
                Ok(Confirmed::Lost { written }) => {
                    if written {
                        losses += 1;
                        if losses >= MAX_LOSSES {
                            return Err(self.abandoned());
                        }
                    }
                }
                Err(_) => return Err(self.dropped()),
            }
            // Published again on the next connection (the broker may already have it: at least
            // once).
            confirmed = self.queue_durable(topic, &payload, true).await?;
        }
    }

    /// Queues a durable event's publish in rumqttc's request queue (waiting for room) and
    /// registers its confirmation. While the client is not connected a first publish fails at
    /// once with `NotConnected`, as every request does, and a `resend` waits for the connection.
    async fn queue_durable(
        &self,
        topic: &str,
        payload: &Bytes,
        resend: bool,
    ) -> Result<oneshot::Receiver<Confirmed>, RpcError> {
        loop {
            let room = self.room.notified();
            let mut room = std::pin::pin!(room);
            room.as_mut().enable();
            let back = self.connection_back.notified();
            let mut back = std::pin::pin!(back);
            back.as_mut().enable();
            // Counted before trying: a request the event loop takes after a failed try wakes us.
            let _waiting = WaitingForRoom::new(&self.waiting_for_room);
            let connected = {
                // Queued and registered under one lock, so that the order of `queued` is the
                // order of rumqttc's queue.
                let mut confirmations = self.confirmations();
                if confirmations.closed {
                    return Err(self.dropped());
                }
                let connected = self.connected.load(Ordering::SeqCst);
                if connected {
                    // Checked on the connection it goes out on: a broker that came back may
                    // announce a lower limit.
                    self.options.check_size(
                        &self.client,
                        topic,
                        Qos::AtLeastOnce,
                        payload.len(),
                    )?;
                }
                if connected
                    && self
                        .client
                        .try_publish(topic, Qos::AtLeastOnce, payload.clone())
                {
                    let (confirmation, confirmed) = oneshot::channel();
                    confirmations.queued.push_back(confirmation);
                    return Ok(confirmed);
                }
                connected
            };
            match (connected, resend) {
                (true, _) => room.await,
                (false, true) => back.await,
                (false, false) => return Err(self.not_connected()),
            }
        }
    }

    fn dropped(&self) -> RpcError {
        RpcError::transport(
            TransportErrorKind::ConnectionLost,
            "the MQTT client was dropped",
        )
    }

    fn abandoned(&self) -> RpcError {
        RpcError::transport(
            TransportErrorKind::NotAcknowledged,
            format!(
                "the MQTT broker at {} did not acknowledge the event: the connection was lost \
                 {MAX_LOSSES} times after it was sent (does the broker close the connection on \
                 this message?)",
                self.options.address_text()
            ),
        )
    }

    /// What the event loop reported about durable events.
    fn confirm(&self, event: &Event) {
        match *event {
            Event::Published(pkid) => self.confirmations().written(pkid),
            Event::Collided(pkid) => self.confirmations().collided(pkid),
            Event::PubAck { pkid, ref refused } => {
                let outcome = match refused {
                    None => Confirmed::Acknowledged,
                    Some(refusal) => Confirmed::Refused(refused_event(refusal)),
                };
                self.confirmations().settle(pkid, outcome)
            }
            _ => {}
        }
        if self.waiting_for_room.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }

    /// Handles an event of the connection.
    fn on_event(self: &Arc<Self>, event: Event, acks: &mpsc::UnboundedSender<Vec<bool>>) {
        match event {
            Event::Message(message) => {
                deliver(&self.pending, self.options.shared_codec(), &message)
            }
            Event::SubAck(ack) => {
                let _ = acks.send(ack);
            }
            Event::ConnAck { .. } => {
                // Clean session: the broker forgot the subscriptions.
                let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(Arc::clone(self).restore(generation));
            }
            event => self.confirm(&event),
        }
    }
}

fn refused_event(refusal: &Refusal) -> RpcError {
    let kind = if refusal.authorization {
        TransportErrorKind::Authorization
    } else {
        TransportErrorKind::NotAcknowledged
    };
    RpcError::transport(
        kind,
        format!("the MQTT broker refused the event: {}", refusal.reason),
    )
}

/// Polls the connection: delivers replies, passes subscription acknowledgements on, and on a lost
/// connection fails what is pending and reconnects with backoff.
async fn run(
    shared: Arc<Shared>,
    mut events: Events,
    acks: mpsc::UnboundedSender<Vec<bool>>,
    stop: CancellationToken,
) {
    let _stopped = EventLoopStopped(Arc::clone(&shared));
    let mut attempt = 0u32;
    // A connection was up since the last loss: rumqttc took its request queue back when it
    // failed (a failed attempt to connect does not).
    let mut was_up = true;
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            event = events.poll() => event,
        };
        match event {
            Ok(event) => {
                if matches!(event, Event::ConnAck { .. }) {
                    attempt = 0;
                    was_up = true;
                }
                shared.on_event(event, &acks);
            }
            Err(error) => {
                let was_connected = {
                    // Under the lock a restoration takes to say it is done: it belongs to the
                    // connection just lost.
                    let _restoring = shared.confirmations();
                    shared.generation.fetch_add(1, Ordering::SeqCst);
                    shared.connected.swap(false, Ordering::SeqCst)
                };
                if was_connected {
                    tracing::warn!(%error, broker = %shared.options.address_text(), "lost the connection to the MQTT broker; reconnecting");
                }
                if std::mem::take(&mut was_up) {
                    // What rumqttc had not yet said about the lost connection first, then what
                    // it lost with it.
                    for event in events.take_buffered() {
                        shared.on_event(event, &acks);
                    }
                    shared.confirmations().lost(events.unwritten_after_loss());
                    events.reset_after_loss();
                }
                // Events waiting for room fail now (they find the client not connected).
                shared.room.notify_waiters();
                shared.pending.fail_all(&RpcError::transport(
                    TransportErrorKind::ConnectionLost,
                    format!(
                        "the connection to the MQTT broker at {} was lost: {error}",
                        shared.options.address_text()
                    ),
                ));
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(shared.options.backoff(attempt)) => {}
                }
                attempt = attempt.saturating_add(1);
            }
        }
    }
    shared.client.try_disconnect();
}

/// Ends what waits on the event loop when it stops, whether it returns or panics (a panic in
/// rumqttc would otherwise leave every caller waiting for good).
struct EventLoopStopped(Arc<Shared>);

impl Drop for EventLoopStopped {
    fn drop(&mut self) {
        let shared = &self.0;
        shared.connected.store(false, Ordering::SeqCst);
        shared.pending.close(&shared.dropped());
        shared.confirmations().close();
        shared.room.notify_waiters();
        shared.connection_back.notify_waiters();
    }
}

/// Why a request nobody answered is failed just before its deadline: MQTT cannot tell whether
/// anyone subscribed to a topic, and the caller's own timer would only say that time ran out.
fn silence(route: &str) -> RpcError {
    RpcError::deadline_exceeded(format!(
        "no reply to {route:?} before the deadline: MQTT cannot tell whether a server \
         subscribed to {route:?}; none may be running, or the pattern may be wrong"
    ))
}

/// Routes one reply to the request waiting for it. Every client calling a pattern receives every
/// reply on its reply topic: ids this client did not make are someone else's and ignored.
fn deliver(pending: &PendingRequests, codec: &SharedCodec, message: &Message) {
    match codec.decode_reply(message.payload()) {
        Ok((Some(id), packet)) => {
            if let Some(n) = pending.ids().parse_json(id.as_bytes()) {
                pending.deliver(n, packet);
            }
        }
        Ok((None, _)) => tracing::debug!(topic = message.topic(), "a reply without id ignored"),
        Err(error) => {
            tracing::debug!(topic = message.topic(), %error, "an unreadable reply ignored (is its server using another codec?)")
        }
    }
}

pub(super) fn body(
    codec: &SharedCodec,
    request: &RpcRequest,
    id: Option<&str>,
) -> Result<Bytes, RpcError> {
    codec
        .request_body_within(
            request.pattern().raw(),
            request.payload(),
            id,
            request.headers(),
            request.wire_timeout_millis(),
        )
        .map_err(|error| {
            RpcError::invalid_argument(format!(
                "cannot encode the message for '{}': {error}",
                request.pattern()
            ))
        })
}

impl ClientTransport for MqttConnection {
    fn request(&self, request: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>> {
        let shared = Arc::clone(&self.owner.shared);
        Box::pin(async move {
            shared.check_connected()?;
            let topic = request.pattern().route();
            check_topic(topic)?;
            // Subscribed (and acknowledged) before publishing: with QoS 0 a reply published
            // before the broker took the subscription would be lost.
            shared.ensure_subscribed(&reply_topic(topic)).await?;
            let registered = shared.pending.register(request.pattern())?;
            // Checked after registering: a loss from now on fails this request (see `connected`).
            shared.check_connected()?;
            let payload = body(
                shared.options.shared_codec(),
                &request,
                Some(registered.id().as_str()),
            )?;
            shared.publish(topic, Qos::AtMostOnce, payload).await?;
            Ok(registered.into_replies())
        })
    }

    fn explain_silence(&self) -> Option<ExplainSilence> {
        Some(silence)
    }

    fn emit(&self, event: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>> {
        let shared = Arc::clone(&self.owner.shared);
        Box::pin(async move {
            shared.check_connected()?;
            let topic = event.pattern().route();
            check_topic(topic)?;
            let payload = body(shared.options.shared_codec(), &event, None)?;
            if shared.durable_events {
                shared.publish_durable(topic, payload).await
            } else {
                shared.publish(topic, Qos::AtMostOnce, payload).await
            }
        })
    }
}

impl fmt::Debug for MqttConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.owner.shared;
        f.debug_struct("MqttConnection")
            .field("options", &shared.options)
            .field("connected", &shared.connected.load(Ordering::Relaxed))
            .field("pending", &shared.pending.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirmations(count: usize) -> (Confirmations, Vec<oneshot::Receiver<Confirmed>>) {
        let mut confirmations = Confirmations::default();
        let receivers = (0..count)
            .map(|_| {
                let (confirmation, confirmed) = oneshot::channel();
                confirmations.queued.push_back(confirmation);
                confirmed
            })
            .collect();
        (confirmations, receivers)
    }

    fn outcome(confirmed: &mut oneshot::Receiver<Confirmed>) -> String {
        match confirmed.try_recv() {
            Ok(outcome) => format!("{outcome:?}"),
            Err(oneshot::error::TryRecvError::Empty) => "waiting".into(),
            Err(oneshot::error::TryRecvError::Closed) => "dropped".into(),
        }
    }

    #[test]
    fn each_message_written_takes_the_first_confirmation_and_its_acknowledgement_settles_it() {
        let (mut confirmations, mut confirmed) = confirmations(2);
        confirmations.written(7);
        confirmations.written(8);
        confirmations.settle(8, Confirmed::Acknowledged);
        assert_eq!(outcome(&mut confirmed[0]), "waiting");
        assert_eq!(outcome(&mut confirmed[1]), "Acknowledged");
        confirmations.settle(7, Confirmed::Acknowledged);
        assert_eq!(outcome(&mut confirmed[0]), "Acknowledged");
        // An acknowledgement nobody waits for, and a message written that nobody queued.
        confirmations.settle(7, Confirmed::Acknowledged);
        confirmations.written(9);
        assert!(confirmations.written.is_empty());
    }

    #[test]
    fn a_collided_message_keeps_its_confirmation_until_its_packet_id_is_written() {
        let (mut confirmations, mut confirmed) = confirmations(3);
        confirmations.written(1);
        // The second message waits for packet id 1, still in flight.
        confirmations.collided(1);
        assert_eq!(confirmations.queued.len(), 1);
        // Another id written meanwhile is not the collided message's.
        confirmations.written(2);
        confirmations.settle(1, Confirmed::Acknowledged);
        assert_eq!(outcome(&mut confirmed[0]), "Acknowledged");
        confirmations.written(1);
        confirmations.settle(1, Confirmed::Acknowledged);
        assert_eq!(outcome(&mut confirmed[1]), "Acknowledged");
        confirmations.settle(2, Confirmed::Acknowledged);
        assert_eq!(outcome(&mut confirmed[2]), "Acknowledged");
    }

    #[test]
    fn a_replaced_confirmation_is_lost_not_confirmed_by_another_acknowledgement() {
        let (mut confirmations, mut confirmed) = confirmations(4);
        confirmations.written(5);
        confirmations.written(5);
        assert_eq!(outcome(&mut confirmed[0]), "Lost { written: true }");
        confirmations.collided(6);
        confirmations.collided(6);
        assert_eq!(outcome(&mut confirmed[2]), "Lost { written: false }");
        assert_eq!(outcome(&mut confirmed[3]), "waiting");
    }

    #[test]
    fn a_lost_connection_loses_what_was_written_collided_or_taken_back_and_keeps_the_rest() {
        let (mut confirmations, mut confirmed) = confirmations(5);
        confirmations.written(1);
        confirmations.collided(1);
        // Two taken back by rumqttc; the last one was queued after and goes out next time.
        confirmations.lost(2);
        assert_eq!(outcome(&mut confirmed[0]), "Lost { written: true }");
        assert_eq!(outcome(&mut confirmed[1]), "Lost { written: false }");
        assert_eq!(outcome(&mut confirmed[2]), "Lost { written: false }");
        assert_eq!(outcome(&mut confirmed[3]), "Lost { written: false }");
        assert_eq!(outcome(&mut confirmed[4]), "waiting");
        assert!(confirmations.written.is_empty() && confirmations.collided.is_none());
        // More taken back than queued: all of them.
        confirmations.lost(9);
        assert_eq!(outcome(&mut confirmed[4]), "Lost { written: false }");
        assert!(confirmations.queued.is_empty());
    }

    #[test]
    fn closed_confirmations_drop_every_waiting_one() {
        let (mut confirmations, mut confirmed) = confirmations(3);
        confirmations.written(1);
        confirmations.collided(1);
        confirmations.close();
        assert!(confirmations.closed);
        for confirmed in &mut confirmed {
            assert_eq!(outcome(confirmed), "dropped");
        }
    }

    #[test]
    fn an_event_waiting_for_room_is_counted_while_it_waits() {
        let count = AtomicUsize::new(0);
        {
            let _first = WaitingForRoom::new(&count);
            let _second = WaitingForRoom::new(&count);
            assert_eq!(count.load(Ordering::SeqCst), 2);
        }
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }
}
