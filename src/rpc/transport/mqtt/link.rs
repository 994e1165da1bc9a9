//! One face over rumqttc's MQTT 3.1.1 and MQTT 5 clients: the rest of the transport is written
//! once against it.

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5_packets;

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
pub(crate) enum Events {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
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
    Other,
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
    pub(crate) async fn poll(&mut self) -> Result<Event, LinkError> {
        match self {
            Events::V4(events) => {
                use rumqttc::{ConnectReturnCode, ConnectionError, Event as E, Outgoing, Packet};
                match events.poll().await {
                    Ok(E::Incoming(Packet::ConnAck(_))) => Ok(Event::ConnAck),
                    Ok(E::Incoming(Packet::Publish(publish))) => {
                        Ok(Event::Message(Message::V4(publish)))
                    }
                    Ok(E::Incoming(Packet::SubAck(ack))) => Ok(Event::SubAck(
                        ack.return_codes
                            .iter()
                            .map(|code| matches!(code, rumqttc::SubscribeReasonCode::Success(_)))
                            .collect(),
                    )),
                    Ok(E::Outgoing(Outgoing::Disconnect)) => Ok(Event::Disconnected),
                    Ok(_) => Ok(Event::Other),
                    Err(error) => Err(LinkError {
                        authentication: matches!(
                            error,
                            ConnectionError::ConnectionRefused(
                                ConnectReturnCode::BadUserNamePassword
                                    | ConnectReturnCode::NotAuthorized
                            )
                        ),
                        text: error.to_string(),
                    }),
                }
            }
            Events::V5(events) => {
                use rumqttc::Outgoing;
                use rumqttc::v5::{ConnectionError, Event as E};
                use v5_packets::{ConnectReturnCode, Packet};
                match events.poll().await {
                    Ok(E::Incoming(Packet::ConnAck(_))) => Ok(Event::ConnAck),
                    Ok(E::Incoming(Packet::Publish(publish))) => {
                        Ok(Event::Message(Message::V5(publish)))
                    }
                    Ok(E::Incoming(Packet::SubAck(ack))) => Ok(Event::SubAck(
                        ack.return_codes
                            .iter()
                            .map(|code| matches!(code, v5_packets::SubscribeReasonCode::Success(_)))
                            .collect(),
                    )),
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
        }
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
