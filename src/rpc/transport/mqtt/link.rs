//! One face over rumqttc's MQTT 3.1.1 and MQTT 5 clients: the rest of the transport is written
//! once against it.

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5_packets;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

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
    V5(rumqttc::v5::AsyncClient, BrokerLimit),
}

/// The event loop of a connection: it must be polled for anything to happen.
pub(crate) enum Events {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>, BrokerLimit),
}

/// The largest packet the broker accepts, as an MQTT 5 broker announces it in each `CONNACK`
/// (shared by a connection's [`Link`] and [`Events`]). rumqttc enforces it only when it writes
/// the packet, by failing the whole connection: a larger message must be refused before it is
/// queued. MQTT 3.1.1 brokers announce nothing (a larger packet makes them close the
/// connection).
#[derive(Clone, Default)]
pub(crate) struct BrokerLimit(Arc<AtomicU32>);

impl BrokerLimit {
    /// The limit of the current connection, if the broker announced one.
    fn get(&self) -> Option<u32> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            limit => Some(limit),
        }
    }

    fn set(&self, limit: Option<u32>) {
        self.0.store(limit.unwrap_or(0), Ordering::Relaxed);
    }
}

/// The size of a `PUBLISH` packet as rumqttc writes palisade's (no MQTT 5 properties).
fn publish_size(v5: bool, topic: &str, qos: Qos, payload: usize) -> usize {
    let packet_id = if qos == Qos::AtMostOnce { 0 } else { 2 };
    // MQTT 5 has the properties' length (0) after the packet id.
    let properties = usize::from(v5);
    let remaining = (2 + topic.len() + packet_id + properties).saturating_add(payload);
    let length_bytes: usize = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    (1 + length_bytes).saturating_add(remaining)
}

/// A packet over a limit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Oversize {
    /// The packet's size, in bytes.
    pub(crate) size: usize,
    /// The limit it is over.
    pub(crate) limit: usize,
    /// The limit is the one the broker announced (else the client's own).
    pub(crate) broker: bool,
}

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

    /// Its packet id (0 for QoS 0).
    pub(crate) fn pkid(&self) -> u16 {
        match self {
            Message::V4(publish) => publish.pkid,
            Message::V5(publish) => publish.pkid,
        }
    }
}

/// What the event loop yielded that the transport cares about.
pub(crate) enum Event {
    /// The broker accepted the connection; `session_present` if it kept the session.
    ConnAck {
        session_present: bool,
    },
    Message(Message),
    /// A subscription's acknowledgement: whether each filter was accepted.
    SubAck(Vec<bool>),
    /// The disconnect request went out.
    Disconnected,
    /// A QoS 1 message was written with this packet id (rumqttc numbers them as it writes them,
    /// in the order of its request queue).
    Published(u16),
    /// A QoS 1 message took a packet id still in flight: it is written (and reported
    /// `Published`) once that id is acknowledged.
    Collided(u16),
    /// The broker acknowledged the QoS 1 message with this packet id; `refused` says why if it
    /// did not accept it (MQTT 5 reason codes).
    PubAck {
        pkid: u16,
        refused: Option<Refusal>,
    },
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
        Events::V4(Box::new(events))
    }

    pub(crate) fn v5(events: rumqttc::v5::EventLoop, limit: BrokerLimit) -> Self {
        Events::V5(Box::new(events), limit)
    }

    pub(crate) async fn poll(&mut self) -> Result<Event, LinkError> {
        match self {
            Events::V4(events) => events.poll().await.map(v4_event).map_err(v4_error),
            Events::V5(events, limit) => {
                let event = events.poll().await.map_err(v5_error)?;
                if let rumqttc::v5::Event::Incoming(v5_packets::Packet::ConnAck(ack)) = &event {
                    limit.set(ack.properties.as_ref().and_then(|p| p.max_packet_size));
                }
                let event = v5_event(event);
                if let Event::PubAck {
                    pkid,
                    refused: Some(_),
                } = &event
                {
                    // rumqttc releases a message waiting for this packet id only when the
                    // acknowledgement accepts it: send it now, or it would hold up every request.
                    if events.state.collision.as_ref().map(|c| c.pkid) == Some(*pkid)
                        && let Some(waiting) = events.state.collision.take()
                    {
                        events
                            .pending
                            .push_front(rumqttc::v5::Request::Publish(waiting));
                    }
                }
                Ok(event)
            }
        }
    }

    /// After a lost connection: the events rumqttc had buffered and not yielded yet (it yields
    /// them first on the next connection), taken now so that they are read as the lost
    /// connection's.
    pub(crate) fn take_buffered(&mut self) -> Vec<Event> {
        match self {
            Events::V4(events) => events.state.events.drain(..).map(v4_event).collect(),
            Events::V5(events, _) => events.state.events.drain(..).map(v5_event).collect(),
        }
    }

    /// After a lost connection of a persistent session: takes the QoS 1 messages rumqttc kept
    /// to send again on the next connection (those written, from its in-flight state, and
    /// those it took back from its request queue), so that the caller decides whether they go
    /// out again. `None` if there were none, else whether any had been written.
    pub(crate) fn take_unacknowledged_after_loss(&mut self) -> Option<bool> {
        fn take<R>(
            pending: &mut std::collections::VecDeque<R>,
            written: impl Fn(&R) -> Option<bool>,
        ) -> Option<bool> {
            let mut taken = None;
            pending.retain(|request| match written(request) {
                Some(written) => {
                    taken = Some(taken.unwrap_or(false) || written);
                    false
                }
                None => true,
            });
            taken
        }
        match self {
            Events::V4(events) => take(&mut events.pending, |request| match request {
                rumqttc::Request::Publish(p) if p.qos != rumqttc::QoS::AtMostOnce => {
                    Some(p.pkid != 0)
                }
                _ => None,
            }),
            Events::V5(events, _) => take(&mut events.pending, |request| match request {
                rumqttc::v5::Request::Publish(p)
                    if p.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce =>
                {
                    Some(p.pkid != 0)
                }
                _ => None,
            }),
        }
    }

    /// After a lost connection: the QoS 1 messages rumqttc took back from its request queue,
    /// never written (no packet id yet). It drops them when it reconnects to a broker that kept
    /// no session.
    pub(crate) fn unwritten_after_loss(&self) -> usize {
        match self {
            Events::V4(events) => events
                .pending
                .iter()
                .filter(|request| {
                    matches!(request, rumqttc::Request::Publish(p)
                        if p.qos != rumqttc::QoS::AtMostOnce && p.pkid == 0)
                })
                .count(),
            Events::V5(events, _) => events
                .pending
                .iter()
                .filter(|request| {
                    matches!(request, rumqttc::v5::Request::Publish(p)
                        if p.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce && p.pkid == 0)
                })
                .count(),
        }
    }

    /// After a lost connection of a clean session, once [`take_buffered`](Self::take_buffered)
    /// and [`unwritten_after_loss`](Self::unwritten_after_loss) were read: starts the next
    /// connection from a fresh state, as the broker does. rumqttc would otherwise carry over its
    /// packet ids (past a receive maximum that a broker lowered since, they overflow), a message
    /// held back for a packet id that will never be acknowledged (it takes no request
    /// meanwhile), and its `pending` list, which it would resend if a broker claimed to have
    /// kept a session it was told not to keep.
    pub(crate) fn reset_after_loss(&mut self) {
        match self {
            Events::V4(events) => {
                events.pending.clear();
                events.state = rumqttc::MqttState::new(
                    events.mqtt_options.inflight(),
                    events.mqtt_options.manual_acks(),
                );
            }
            Events::V5(events, _) => {
                events.pending.clear();
                events.state = rumqttc::v5::MqttState::new(
                    events
                        .options
                        .get_outgoing_inflight_upper_limit()
                        .unwrap_or(u16::MAX),
                    events.options.manual_acks(),
                );
            }
        }
    }
}

fn v4_event(event: rumqttc::Event) -> Event {
    use rumqttc::{Event as E, Outgoing, Packet};
    match event {
        E::Incoming(Packet::ConnAck(ack)) => Event::ConnAck {
            session_present: ack.session_present,
        },
        E::Incoming(Packet::Publish(publish)) => Event::Message(Message::V4(publish)),
        E::Incoming(Packet::SubAck(ack)) => Event::SubAck(
            ack.return_codes
                .iter()
                .map(|code| matches!(code, rumqttc::SubscribeReasonCode::Success(_)))
                .collect(),
        ),
        E::Incoming(Packet::PubAck(ack)) => Event::PubAck {
            pkid: ack.pkid,
            refused: None,
        },
        E::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => Event::Published(pkid),
        E::Outgoing(Outgoing::AwaitAck(pkid)) => Event::Collided(pkid),
        E::Outgoing(Outgoing::Disconnect) => Event::Disconnected,
        _ => Event::Other,
    }
}

fn v4_error(error: rumqttc::ConnectionError) -> LinkError {
    use rumqttc::{ConnectReturnCode, ConnectionError};
    LinkError {
        authentication: matches!(
            error,
            ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized
            )
        ),
        text: error.to_string(),
    }
}

fn v5_event(event: rumqttc::v5::Event) -> Event {
    use rumqttc::Outgoing;
    use rumqttc::v5::Event as E;
    use v5_packets::{Packet, PubAckReason};
    match event {
        E::Incoming(Packet::ConnAck(ack)) => Event::ConnAck {
            session_present: ack.session_present,
        },
        E::Incoming(Packet::Publish(publish)) => Event::Message(Message::V5(publish)),
        E::Incoming(Packet::SubAck(ack)) => Event::SubAck(
            ack.return_codes
                .iter()
                .map(|code| matches!(code, v5_packets::SubscribeReasonCode::Success(_)))
                .collect(),
        ),
        E::Incoming(Packet::PubAck(ack)) => Event::PubAck {
            pkid: ack.pkid,
            refused: match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                reason => Some(Refusal {
                    reason: format!("{reason:?}"),
                    authorization: reason == PubAckReason::NotAuthorized,
                }),
            },
        },
        E::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => Event::Published(pkid),
        E::Outgoing(Outgoing::AwaitAck(pkid)) => Event::Collided(pkid),
        E::Outgoing(Outgoing::Disconnect) => Event::Disconnected,
        _ => Event::Other,
    }
}

fn v5_error(error: rumqttc::v5::ConnectionError) -> LinkError {
    use rumqttc::v5::ConnectionError;
    use v5_packets::ConnectReturnCode;
    LinkError {
        authentication: matches!(
            error,
            ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword
                    | ConnectReturnCode::NotAuthorized
                    | ConnectReturnCode::BadAuthenticationMethod
            )
        ),
        text: error.to_string(),
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
            Link::V5(client, _) => client
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
            Link::V5(client, _) => client
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
            Link::V5(client, _) => client.try_unsubscribe(filter).map_err(|e| e.to_string()),
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
            Link::V5(client, _) => client
                .publish_bytes(topic, qos.v5(), false, payload)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Whether a message of `payload` bytes on `topic` fits in a packet: measured as rumqttc
    /// writes it, against `own_limit` and against the maximum packet size the broker announced
    /// (MQTT 5).
    pub(crate) fn check_size(
        &self,
        own_limit: usize,
        topic: &str,
        qos: Qos,
        payload: usize,
    ) -> Result<(), Oversize> {
        let size = publish_size(matches!(self, Link::V5(..)), topic, qos, payload);
        if size > own_limit {
            return Err(Oversize {
                size,
                limit: own_limit,
                broker: false,
            });
        }
        if let Link::V5(_, announced) = self
            && let Some(limit) = announced.get()
        {
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            if size > limit {
                return Err(Oversize {
                    size,
                    limit,
                    broker: true,
                });
            }
        }
        Ok(())
    }

    /// Queues a publish without waiting: `false` if the queue is full or the event loop gone.
    pub(crate) fn try_publish(&self, topic: &str, qos: Qos, payload: Bytes) -> bool {
        match self {
            Link::V4(client) => client.try_publish(topic, qos.v4(), false, payload).is_ok(),
            Link::V5(client, _) => client.try_publish(topic, qos.v5(), false, payload).is_ok(),
        }
    }

    pub(crate) fn try_disconnect(&self) {
        let _ = match self {
            Link::V4(client) => client.try_disconnect().map_err(|e| e.to_string()),
            Link::V5(client, _) => client.try_disconnect().map_err(|e| e.to_string()),
        };
    }

    /// Acknowledges a QoS 1 message received with manual acknowledgements.
    pub(crate) async fn ack(&self, message: &Message) -> Result<(), RequestError> {
        match (self, message) {
            (Link::V4(client), Message::V4(publish)) => {
                client.ack(publish).await.map_err(|e| e.to_string())
            }
            (Link::V5(client, _), Message::V5(publish)) => {
                client.ack(publish).await.map_err(|e| e.to_string())
            }
            _ => Err("a message acknowledged on a connection of another protocol".into()),
        }
    }

    /// [`ack`](Self::ack) without waiting (for the task that polls the event loop).
    /// `false` if the request queue is full or the event loop gone.
    pub(crate) fn try_ack(&self, message: &Message) -> bool {
        match (self, message) {
            (Link::V4(client), Message::V4(publish)) => client.try_ack(publish).is_ok(),
            (Link::V5(client, _), Message::V5(publish)) => client.try_ack(publish).is_ok(),
            _ => false,
        }
    }

    /// Whether the connection speaks MQTT 5.
    pub(crate) fn is_v5(&self) -> bool {
        matches!(self, Link::V5(..))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size checked before publishing is the size rumqttc writes, on both sides of each
    /// step of the remaining length's prefix (one to four bytes), for both versions and both
    /// qualities of service.
    #[test]
    fn a_publish_is_measured_as_rumqttc_writes_it() {
        let topic = "orders/eu";
        for v5 in [false, true] {
            for qos in [Qos::AtMostOnce, Qos::AtLeastOnce] {
                let overhead = publish_size(v5, topic, qos, 0) - 2;
                let mut payloads = vec![0];
                for step in [127, 16_383, 2_097_151] {
                    payloads.extend([step - overhead, step - overhead + 1]);
                }
                for payload in payloads {
                    let theirs = if v5 {
                        let qos = match qos {
                            Qos::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                            Qos::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        };
                        let mut publish =
                            v5_packets::Publish::new(topic, qos, vec![0u8; payload], None);
                        publish.pkid = u16::from(qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce);
                        publish.size()
                    } else {
                        let mut publish =
                            rumqttc::Publish::new(topic, qos.v4(), vec![0u8; payload]);
                        publish.pkid = u16::from(qos == Qos::AtLeastOnce);
                        publish.size()
                    };
                    assert_eq!(
                        publish_size(v5, topic, qos, payload),
                        theirs,
                        "{payload} bytes, {qos:?}, MQTT 5: {v5}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_announced_limit_follows_each_connack_and_the_own_limit_always_holds() {
        let announced = BrokerLimit::default();
        let (client, _events) = rumqttc::v5::AsyncClient::new(
            rumqttc::v5::MqttOptions::new("measure", "127.0.0.1", 1),
            1,
        );
        let link = Link::V5(client, announced.clone());
        let empty = publish_size(true, "t", Qos::AtLeastOnce, 0);
        assert_eq!(
            link.check_size(usize::MAX, "t", Qos::AtLeastOnce, 1 << 30),
            Ok(())
        );
        assert_eq!(
            link.check_size(100, "t", Qos::AtLeastOnce, 101 - empty),
            Err(Oversize {
                size: 101,
                limit: 100,
                broker: false
            })
        );
        announced.set(Some(100));
        assert_eq!(
            link.check_size(usize::MAX, "t", Qos::AtLeastOnce, 100 - empty),
            Ok(())
        );
        assert_eq!(
            link.check_size(usize::MAX, "t", Qos::AtLeastOnce, 101 - empty),
            Err(Oversize {
                size: 101,
                limit: 100,
                broker: true
            })
        );
        // A later connection's broker announced none.
        announced.set(None);
        assert_eq!(
            link.check_size(usize::MAX, "t", Qos::AtLeastOnce, 1 << 30),
            Ok(())
        );
    }

    /// What rumqttc kept to send again after a loss: the QoS 1 publishes are taken (whether any
    /// had been written is said), everything else stays.
    #[test]
    fn the_qos_1_messages_kept_after_a_loss_are_taken_back_and_nothing_else() {
        let (_client, events) =
            rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("taken", "127.0.0.1", 1), 1);
        let mut events = Events::v4(events);
        let publish = |qos, pkid| {
            let mut publish = rumqttc::Publish::new("t", qos, vec![1u8]);
            publish.pkid = pkid;
            rumqttc::Request::Publish(publish)
        };
        let Events::V4(inner) = &mut events else {
            unreachable!()
        };
        inner.pending.extend([
            publish(rumqttc::QoS::AtMostOnce, 0),
            publish(rumqttc::QoS::AtLeastOnce, 0),
            rumqttc::Request::PubAck(rumqttc::PubAck::new(4)),
        ]);
        assert_eq!(
            events.take_unacknowledged_after_loss(),
            Some(false),
            "never written"
        );
        let Events::V4(inner) = &mut events else {
            unreachable!()
        };
        assert_eq!(inner.pending.len(), 2, "the QoS 0 publish and the ack stay");
        inner.pending.extend([
            publish(rumqttc::QoS::AtLeastOnce, 3),
            publish(rumqttc::QoS::AtLeastOnce, 0),
        ]);
        assert_eq!(
            events.take_unacknowledged_after_loss(),
            Some(true),
            "one was written"
        );
        assert_eq!(events.take_unacknowledged_after_loss(), None, "none left");

        let (_client, events) = rumqttc::v5::AsyncClient::new(
            rumqttc::v5::MqttOptions::new("taken", "127.0.0.1", 1),
            1,
        );
        let mut events = Events::v5(events, BrokerLimit::default());
        let publish = |qos, pkid| {
            let mut publish = v5_packets::Publish::new("t", qos, vec![1u8], None);
            publish.pkid = pkid;
            rumqttc::v5::Request::Publish(publish)
        };
        let Events::V5(inner, _) = &mut events else {
            unreachable!()
        };
        inner.pending.extend([
            publish(rumqttc::v5::mqttbytes::QoS::AtMostOnce, 0),
            publish(rumqttc::v5::mqttbytes::QoS::AtLeastOnce, 7),
        ]);
        assert_eq!(events.take_unacknowledged_after_loss(), Some(true));
        let Events::V5(inner, _) = &mut events else {
            unreachable!()
        };
        assert_eq!(inner.pending.len(), 1, "the QoS 0 publish stays");
        assert_eq!(events.take_unacknowledged_after_loss(), None);
    }
}
