//! One face over rumqttc's MQTT 3.1.1 and MQTT 5 clients: the rest of the transport is written
//! once against it.

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5_packets;
use std::collections::{HashMap, HashSet};

/// The protocol version a connection speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MqttVersion {
    /// MQTT 3.1.1, NestJS's default (`protocolVersion: 4`), which every broker accepts.
    #[default]
    V311,
    /// MQTT 5 (NestJS's `protocolVersion: 5`): shared subscriptions are part of the protocol, and
    /// persistent sessions are kept for [`session_expiry`](super::MqttOptions::session_expiry).
    V5,
}

/// Quality of service, as the transport uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

impl Qos {
    fn v4(self) -> rumqttc::QoS {
        match self {
            Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
            Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        }
    }

    fn v5(self) -> rumqttc::v5::mqttbytes::QoS {
        match self {
            Qos::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            Qos::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        }
    }
}

/// The request half of a connection (cheap to clone).
#[derive(Clone)]
pub(crate) enum Link {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The event loop of a connection: it must be polled for anything to happen.
///
/// It keeps what rumqttc would lose: QoS 1 messages not acknowledged when the connection
/// drops. rumqttc moves them to its `pending` queue, and empties that queue when it reconnects to
/// a broker that kept no session (every clean session); they are taken out before that and put
/// back once the broker accepted the new connection, so they are published again (at least
/// once). A message the broker took the connection down for would be published again forever:
/// after [`MAX_LOSSES`] lost connections it is given up ([`Event::Abandoned`]).
pub(crate) struct Events {
    inner: Loop,
    /// Packet ids of held messages already sent once: their next `Published` is a resend.
    resending: HashSet<u16>,
    /// For each packet id sent and not yet acknowledged, the connections lost meanwhile.
    losses: HashMap<u16, u32>,
    /// Packet ids given up, reported one per poll.
    abandoned: Vec<u16>,
}

enum Loop {
    V4 {
        events: Box<rumqttc::EventLoop>,
        held: Vec<rumqttc::Request>,
    },
    V5 {
        events: Box<rumqttc::v5::EventLoop>,
        held: Vec<rumqttc::v5::Request>,
    },
}

/// Lost connections after which a QoS 1 message still not acknowledged is given up.
pub(crate) const MAX_LOSSES: u32 = 3;

/// A message received.
pub(crate) enum Message {
    V4(rumqttc::Publish),
    V5(v5_packets::Publish),
}

impl Message {
    /// Its topic (a topic that is not UTF-8 reads as empty: no route has that name).
    pub(crate) fn topic(&self) -> &str {
        match self {
            Message::V4(publish) => &publish.topic,
            Message::V5(publish) => std::str::from_utf8(&publish.topic).unwrap_or(""),
        }
    }

    pub(crate) fn payload(&self) -> &Bytes {
        match self {
            Message::V4(publish) => &publish.payload,
            Message::V5(publish) => &publish.payload,
        }
    }
}

/// What the event loop yielded that the transport cares about.
pub(crate) enum Event {
    /// The broker accepted the connection.
    ConnAck,
    Message(Message),
    /// A subscription's acknowledgement: whether each filter was accepted.
    SubAck(Vec<bool>),
    /// The disconnect request went out.
    Disconnected,
    /// A QoS 1 message was written with this packet id; `resent` if it was held over a lost
    /// connection and already had the id.
    Published {
        pkid: u16,
        resent: bool,
    },
    /// A QoS 1 message took a packet id still in flight: it is written (and reported
    /// `Published`) once that id is acknowledged.
    Collided(u16),
    /// The broker acknowledged the QoS 1 message with this packet id; `refused` says why if it
    /// did not accept it (MQTT 5 reason codes).
    PubAck {
        pkid: u16,
        refused: Option<Refusal>,
    },
    /// The QoS 1 message with this packet id was given up after [`MAX_LOSSES`] lost
    /// connections.
    Abandoned(u16),
    Other,
}

/// Why an MQTT 5 broker did not accept a QoS 1 message.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The reason code.
    pub(crate) reason: String,
    /// The broker does not allow this client to publish there.
    pub(crate) authorization: bool,
}

/// A connection failure.
#[derive(Debug)]
pub(crate) struct LinkError {
    pub(crate) text: String,
    /// The broker refused the credentials.
    pub(crate) authentication: bool,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Events {
    pub(crate) fn v4(events: rumqttc::EventLoop) -> Self {
        Events::with(Loop::V4 {
            events: Box::new(events),
            held: Vec::new(),
        })
    }

    pub(crate) fn v5(events: rumqttc::v5::EventLoop) -> Self {
        Events::with(Loop::V5 {
            events: Box::new(events),
            held: Vec::new(),
        })
    }

    fn with(inner: Loop) -> Self {
        Events {
            inner,
            resending: HashSet::new(),
            losses: HashMap::new(),
            abandoned: Vec::new(),
        }
    }

    pub(crate) async fn poll(&mut self) -> Result<Event, LinkError> {
        if let Some(pkid) = self.abandoned.pop() {
            return Ok(Event::Abandoned(pkid));
        }
        let polled = match &mut self.inner {
            Loop::V4 { events, .. } => poll_v4(events).await,
            Loop::V5 { events, .. } => poll_v5(events).await,
        };
        match &polled {
            Err(_) => self.hold(),
            Ok(Event::ConnAck) => self.release(),
            Ok(Event::Published { pkid, resent }) if !*resent => {
                if self.resending.remove(pkid) {
                    return Ok(Event::Published {
                        pkid: *pkid,
                        resent: true,
                    });
                }
            }
            Ok(Event::PubAck { pkid, .. }) => {
                self.losses.remove(pkid);
            }
            Ok(_) => {}
        }
        polled
    }

    /// After a lost connection: takes the QoS 1 messages out of rumqttc's `pending` queue,
    /// giving up those sent on [`MAX_LOSSES`] lost connections.
    fn hold(&mut self) {
        match &mut self.inner {
            Loop::V4 { events, held } => {
                let pending = std::mem::take(&mut events.pending);
                for request in pending {
                    let pkid = match &request {
                        rumqttc::Request::Publish(publish)
                            if publish.qos != rumqttc::QoS::AtMostOnce =>
                        {
                            publish.pkid
                        }
                        _ => {
                            events.pending.push_back(request);
                            continue;
                        }
                    };
                    if Self::keep(
                        &mut self.losses,
                        &mut self.resending,
                        &mut self.abandoned,
                        pkid,
                    ) {
                        held.push(request);
                    }
                }
            }
            Loop::V5 { events, held } => {
                let pending = std::mem::take(&mut events.pending);
                for request in pending {
                    let pkid = match &request {
                        rumqttc::v5::Request::Publish(publish)
                            if publish.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce =>
                        {
                            publish.pkid
                        }
                        _ => {
                            events.pending.push_back(request);
                            continue;
                        }
                    };
                    if Self::keep(
                        &mut self.losses,
                        &mut self.resending,
                        &mut self.abandoned,
                        pkid,
                    ) {
                        held.push(request);
                    }
                }
            }
        }
    }

    /// Whether a QoS 1 message with `pkid` (0: never sent) is published again.
    fn keep(
        losses: &mut HashMap<u16, u32>,
        resending: &mut HashSet<u16>,
        abandoned: &mut Vec<u16>,
        pkid: u16,
    ) -> bool {
        if pkid == 0 {
            return true;
        }
        let lost = losses.entry(pkid).or_insert(0);
        *lost += 1;
        if *lost >= MAX_LOSSES {
            losses.remove(&pkid);
            resending.remove(&pkid);
            abandoned.push(pkid);
            false
        } else {
            resending.insert(pkid);
            true
        }
    }

    /// Once the broker accepted a connection: the held messages go first.
    fn release(&mut self) {
        match &mut self.inner {
            Loop::V4 { events, held } => {
                for request in held.drain(..).rev() {
                    events.pending.push_front(request);
                }
            }
            Loop::V5 { events, held } => {
                for request in held.drain(..).rev() {
                    events.pending.push_front(request);
                }
            }
        }
    }
}

async fn poll_v4(events: &mut rumqttc::EventLoop) -> Result<Event, LinkError> {
    use rumqttc::{ConnectReturnCode, ConnectionError, Event as E, Outgoing, Packet};
    match events.poll().await {
        Ok(E::Incoming(Packet::ConnAck(_))) => Ok(Event::ConnAck),
        Ok(E::Incoming(Packet::Publish(publish))) => Ok(Event::Message(Message::V4(publish))),
        Ok(E::Incoming(Packet::SubAck(ack))) => Ok(Event::SubAck(
            ack.return_codes
                .iter()
                .map(|code| matches!(code, rumqttc::SubscribeReasonCode::Success(_)))
                .collect(),
        )),
        Ok(E::Incoming(Packet::PubAck(ack))) => Ok(Event::PubAck {
            pkid: ack.pkid,
            refused: None,
        }),
        Ok(E::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => Ok(Event::Published {
            pkid,
            resent: false,
        }),
        Ok(E::Outgoing(Outgoing::AwaitAck(pkid))) => Ok(Event::Collided(pkid)),
        Ok(E::Outgoing(Outgoing::Disconnect)) => Ok(Event::Disconnected),
        Ok(_) => Ok(Event::Other),
        Err(error) => Err(LinkError {
            authentication: matches!(
                error,
                ConnectionError::ConnectionRefused(
                    ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized
                )
            ),
            text: error.to_string(),
        }),
    }
}

async fn poll_v5(events: &mut rumqttc::v5::EventLoop) -> Result<Event, LinkError> {
    use rumqttc::Outgoing;
    use rumqttc::v5::{ConnectionError, Event as E};
    use v5_packets::{ConnectReturnCode, Packet, PubAckReason};
    match events.poll().await {
        Ok(E::Incoming(Packet::ConnAck(_))) => Ok(Event::ConnAck),
        Ok(E::Incoming(Packet::Publish(publish))) => Ok(Event::Message(Message::V5(publish))),
        Ok(E::Incoming(Packet::SubAck(ack))) => Ok(Event::SubAck(
            ack.return_codes
                .iter()
                .map(|code| matches!(code, v5_packets::SubscribeReasonCode::Success(_)))
                .collect(),
        )),
        Ok(E::Incoming(Packet::PubAck(ack))) => Ok(Event::PubAck {
            pkid: ack.pkid,
            refused: match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                reason => Some(Refusal {
                    reason: format!("{reason:?}"),
                    authorization: reason == PubAckReason::NotAuthorized,
                }),
            },
        }),
        Ok(E::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => Ok(Event::Published {
            pkid,
            resent: false,
        }),
        Ok(E::Outgoing(Outgoing::AwaitAck(pkid))) => Ok(Event::Collided(pkid)),
        Ok(E::Outgoing(Outgoing::Disconnect)) => Ok(Event::Disconnected),
        Ok(_) => Ok(Event::Other),
        Err(error) => Err(LinkError {
            authentication: matches!(
                error,
                ConnectionError::ConnectionRefused(
                    ConnectReturnCode::BadUserNamePassword
                        | ConnectReturnCode::NotAuthorized
                        | ConnectReturnCode::BadAuthenticationMethod
                )
            ),
            text: error.to_string(),
        }),
    }
}

/// A request that could not be handed to the event loop (it is gone, or its queue is full).
pub(crate) type RequestError = String;

impl Link {
    pub(crate) async fn subscribe_many(
        &self,
        filters: Vec<String>,
        qos: Qos,
    ) -> Result<(), RequestError> {
        match self {
            Link::V4(client) => client
                .subscribe_many(
                    filters
                        .into_iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f, qos.v4())),
                )
                .await
                .map_err(|e| e.to_string()),
            Link::V5(client) => client
                .subscribe_many(
                    filters
                        .into_iter()
                        .map(|f| v5_packets::Filter::new(f, qos.v5())),
                )
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a subscription without waiting (for the task that polls the event loop).
    pub(crate) fn try_subscribe_many(
        &self,
        filters: &[String],
        qos: Qos,
    ) -> Result<(), RequestError> {
        if filters.is_empty() {
            return Ok(());
        }
        match self {
            Link::V4(client) => client
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos.v4())),
                )
                .map_err(|e| e.to_string()),
            Link::V5(client) => client
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| v5_packets::Filter::new(f.clone(), qos.v5())),
                )
                .map_err(|e| e.to_string()),
        }
    }

    pub(crate) fn try_unsubscribe(&self, filter: String) -> Result<(), RequestError> {
        match self {
            Link::V4(client) => client.try_unsubscribe(filter).map_err(|e| e.to_string()),
            Link::V5(client) => client.try_unsubscribe(filter).map_err(|e| e.to_string()),
        }
    }

    pub(crate) async fn publish(
        &self,
        topic: &str,
        qos: Qos,
        payload: Bytes,
    ) -> Result<(), RequestError> {
        match self {
            Link::V4(client) => client
                .publish_bytes(topic, qos.v4(), false, payload)
                .await
                .map_err(|e| e.to_string()),
            Link::V5(client) => client
                .publish_bytes(topic, qos.v5(), false, payload)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a publish without waiting: `false` if the queue is full or the event loop gone.
    pub(crate) fn try_publish(&self, topic: &str, qos: Qos, payload: Bytes) -> bool {
        match self {
            Link::V4(client) => client.try_publish(topic, qos.v4(), false, payload).is_ok(),
            Link::V5(client) => client.try_publish(topic, qos.v5(), false, payload).is_ok(),
        }
    }

    pub(crate) fn try_disconnect(&self) {
        let _ = match self {
            Link::V4(client) => client.try_disconnect().map_err(|e| e.to_string()),
            Link::V5(client) => client.try_disconnect().map_err(|e| e.to_string()),
        };
    }

    /// Acknowledges a QoS 1 message received with manual acknowledgements.
    pub(crate) async fn ack(&self, message: &Message) -> Result<(), RequestError> {
        match (self, message) {
            (Link::V4(client), Message::V4(publish)) => {
                client.ack(publish).await.map_err(|e| e.to_string())
            }
            (Link::V5(client), Message::V5(publish)) => {
                client.ack(publish).await.map_err(|e| e.to_string())
            }
            _ => Err("a message acknowledged on a connection of another protocol".into()),
        }
    }

    /// [`ack`](Self::ack) without waiting (for the task that polls the event loop).
    pub(crate) fn try_ack(&self, message: &Message) {
        let _ = match (self, message) {
            (Link::V4(client), Message::V4(publish)) => {
                client.try_ack(publish).map_err(|e| e.to_string())
            }
            (Link::V5(client), Message::V5(publish)) => {
                client.try_ack(publish).map_err(|e| e.to_string())
            }
            _ => Ok(()),
        };
    }
}
