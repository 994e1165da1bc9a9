use super::{
    RmqOptions, SizeLimit, describe, is_too_large, publish_error, publish_in_order, routing_key_of,
    short_string, to_amqp_headers,
};
use crate::rpc::transport::{ClientTransport, Connect, ReplyPacket, ReplyReceiver};
use crate::rpc::wire::{PendingRequests, SharedCodec};
use crate::rpc::{Headers, Kind, RpcError, RpcRequest, TransportErrorKind};
use crate::timeout::HasDeadline;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use lapin::Confirmation;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The client side of the RabbitMQ transport, before it is connected.
/// [`Client::builder().connect(..)`](crate::rpc::ClientBuilder::connect) connects it (an
/// unreachable broker, refused credentials or a queue declared with other options fail there with
/// a clear error); [`RmqOptions`] alone connects the same way.
///
/// ```no_run
/// use palisade::rpc::Client;
/// use palisade::rpc::transport::rabbitmq::{RmqOptions, RmqTransport};
///
/// # #[tokio::main] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let orders = Client::builder()
///     .connect(RmqTransport::new(RmqOptions::new(["amqp://127.0.0.1:5672"]).queue("orders")))
///     .await?;
/// orders.emit("order-created", &serde_json::json!({"id": 7})).await?; // the broker has it
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RmqTransport {
    options: RmqOptions,
}

impl RmqTransport {
    /// A transport connecting with `options`.
    pub fn new(options: RmqOptions) -> Self {
        RmqTransport { options }
    }

    /// Connects, declares what NestJS's client declares (the queue, or the exchange in the
    /// wildcard and fanout modes) and starts consuming replies.
    pub async fn connect(self) -> Result<RmqConnection, RpcError> {
        RmqConnection::connect(self.options).await
    }
}

impl Connect for RmqTransport {
    type Transport = RmqConnection;

    async fn connect(self) -> Result<RmqConnection, RpcError> {
        RmqTransport::connect(self).await
    }
}

impl Connect for RmqOptions {
    type Transport = RmqConnection;

    async fn connect(self) -> Result<RmqConnection, RpcError> {
        RmqConnection::connect(self).await
    }
}

/// One connection and its channel: requests and events are published on the channel (in confirm
/// mode), and replies are consumed on it (direct reply-to needs the same channel).
struct Link {
    connection: Arc<Connection>,
    channel: Channel,
    /// Publishes on `channel` take their confirm's tag in order ([`publish_in_order`]).
    order: std::sync::Mutex<()>,
}

struct Shared {
    options: RmqOptions,
    pending: Arc<PendingRequests>,
    /// The live link; `None` while reconnecting.
    link: Mutex<Option<Arc<Link>>>,
    /// Cancelled when the last handle is dropped: the supervisor closes the connection.
    closed: CancellationToken,
    limit: SizeLimit,
}

/// Cancels the supervisor when the last [`RmqConnection`] clone goes.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.closed.cancel();
    }
}

/// A connected RabbitMQ client transport: requests with direct reply-to on one channel, events
/// confirmed by the broker. Clones share the connection; dropping the last one closes it.
#[derive(Clone)]
pub struct RmqConnection {
    handle: Arc<Handle>,
}

impl RmqConnection {
    async fn connect(options: RmqOptions) -> Result<Self, RpcError> {
        options.validate()?;
        if !options.publishes_to_exchange() && options.queue.is_empty() {
            return Err(RpcError::invalid_argument(
                "a RabbitMQ client needs the name of the queue its server consumes (RmqOptions::queue)",
            ));
        }
        let connection = Arc::new(options.open_connection("client").await?);
        let (link, replies) = open(&options, connection).await?;
        let shared = Arc::new(Shared {
            limit: SizeLimit::new(options.max_message_size),
            options,
            pending: PendingRequests::new(),
            link: Mutex::new(Some(Arc::new(link))),
            closed: CancellationToken::new(),
        });
        tokio::spawn(supervise(Arc::clone(&shared), replies));
        Ok(RmqConnection {
            handle: Arc::new(Handle { shared }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// Replies dropped because their request was no longer waiting (it timed out, or its caller
    /// went away).
    pub fn late_replies(&self) -> u64 {
        self.shared().pending.late_replies()
    }

    /// Whether the client is connected right now (`false` while it reconnects).
    pub fn is_connected(&self) -> bool {
        self.shared().current().is_ok()
    }

    /// Requests waiting for replies.
    pub fn pending(&self) -> usize {
        self.shared().pending.len()
    }
}

impl Shared {
    fn current(&self) -> Result<Arc<Link>, RpcError> {
        self.link
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .filter(|link| link.channel.status().connected())
            .ok_or_else(|| {
                RpcError::transport(
                    TransportErrorKind::NotConnected,
                    "not connected to RabbitMQ (reconnecting)",
                )
            })
    }

    /// The exchange and routing key a message for `request` is published with.
    fn destination(&self, request: &RpcRequest) -> Result<(ShortString, ShortString), RpcError> {
        let options = &self.options;
        if options.publishes_to_exchange() {
            Ok((
                options.exchange_name().into(),
                short_string(routing_key_of(request.pattern()), "pattern (routing key)")?,
            ))
        } else {
            Ok((ShortString::default(), options.queue.as_str().into()))
        }
    }

    /// The AMQP properties every message carries: delivery mode and headers.
    fn properties(&self, request: &RpcRequest) -> Result<BasicProperties, RpcError> {
        let options = &self.options;
        let persistent =
            options.persistent || (request.kind() == Kind::Event && options.persistent_events);
        let mut properties =
            BasicProperties::default().with_delivery_mode(if persistent { 2 } else { 1 });
        let wire = request.wire_headers();
        let mut headers: Headers = options.headers.clone();
        headers.extend(
            wire.iter()
                .map(|(key, value)| (key.to_owned(), value.to_owned())),
        );
        if let Some(table) = to_amqp_headers(headers.iter())? {
            properties = properties.with_headers(table);
        }
        Ok(properties)
    }

    /// Publishes `body` mandatory and waits for the broker's confirmation.
    async fn publish(
        &self,
        link: &Link,
        (exchange, routing_key): (ShortString, ShortString),
        body: &[u8],
        properties: BasicProperties,
        what: impl Fn() -> String,
    ) -> Result<(), RpcError> {
        let limit = self.limit.get();
        if body.len() > limit {
            return Err(RpcError::transport(
                TransportErrorKind::PayloadTooLarge,
                format!(
                    "{} is {} bytes, more than the {limit} bytes RabbitMQ takes here ({}); it was not sent",
                    what(),
                    body.len(),
                    if limit < self.options.max_message_size {
                        "the broker's max_message_size, from an earlier refusal"
                    } else {
                        "RmqOptions::max_message_size"
                    }
                ),
            ));
        }
        let confirm = publish_in_order(
            &link.order,
            link.channel.basic_publish(
                exchange.clone(),
                routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            ),
        )
        .await
        .map_err(|error| {
            self.publish_failed(&format!("cannot publish {}", what()), &error, body)
        })?;
        match confirm.await {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(returned))) => Err(RpcError::transport(
                TransportErrorKind::NoResponders,
                format!(
                    "no queue took {}: RabbitMQ returned it ({} {}) from {} with routing key {:?}",
                    what(),
                    returned.reply_code,
                    returned.reply_text,
                    if exchange.as_str().is_empty() {
                        "the default exchange".to_owned()
                    } else {
                        format!("the exchange {:?}", exchange.as_str())
                    },
                    routing_key.as_str()
                ),
            )),
            Ok(Confirmation::Nack(_)) => Err(RpcError::transport(
                TransportErrorKind::NotAcknowledged,
                format!("RabbitMQ did not take {} (negative confirmation)", what()),
            )),
            Ok(Confirmation::NotRequested) => Ok(()),
            Err(error) => Err(self.publish_failed(
                &format!("RabbitMQ did not confirm {}", what()),
                &error,
                body,
            )),
        }
    }

    /// The error of a publish of `body` that failed. A size refusal of another message closed
    /// the channel under this one: the connection is lost for it (worth retrying), not too large.
    fn publish_failed(&self, what: &str, error: &lapin::Error, body: &[u8]) -> RpcError {
        if is_too_large(error) && !self.limit.refused(error, body.len()) {
            return RpcError::transport(
                TransportErrorKind::ConnectionLost,
                format!(
                    "{what}: the broker closed the channel, refusing another message for its size ({})",
                    describe(error)
                ),
            );
        }
        publish_error(what, error)
    }
}

/// Opens the channel on `connection`, declares what NestJS's client declares, and consumes the
/// reply queue (direct reply-to: before any request is published, on the same channel).
async fn open(
    options: &RmqOptions,
    connection: Arc<Connection>,
) -> Result<(Link, lapin::Consumer), RpcError> {
    let lost = |what: &str, error: &lapin::Error| {
        RpcError::transport(
            TransportErrorKind::Connect,
            format!("{what}: {}", describe(error)),
        )
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(|error| lost("cannot open a RabbitMQ channel", &error))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|error| lost("cannot turn on publisher confirms", &error))?;
    if options.publishes_to_exchange() {
        options.declare_exchange(&channel).await?;
    } else {
        options.declare_queue(&channel).await?;
        if let (Some(exchange), Some(key)) = (&options.exchange, &options.routing_key) {
            channel
                .queue_bind(
                    options.queue.as_str().into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|error| {
                    super::declare_error(
                        &format!("cannot bind the queue {:?} to {exchange:?}", options.queue),
                        &error,
                    )
                })?;
        }
    }
    let replies = channel
        .basic_consume(
            options.reply_queue.as_str().into(),
            ShortString::default(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|error| {
            super::declare_error(
                &format!("cannot consume the reply queue {:?}", options.reply_queue),
                &error,
            )
        })?;
    Ok((
        Link {
            connection,
            channel,
            order: std::sync::Mutex::new(()),
        },
        replies,
    ))
}

/// Reads replies into the pending requests; when the channel or connection is lost, fails every
/// request in flight and reconnects with backoff. Ends (closing the connection) when the last
/// handle is dropped.
async fn supervise(shared: Arc<Shared>, mut replies: lapin::Consumer) {
    loop {
        let reason = loop {
            let delivery = tokio::select! {
                biased;
                delivery = replies.next() => delivery,
                _ = shared.closed.cancelled() => {
                    close(&shared).await;
                    return;
                }
            };
            match delivery {
                Some(Ok(delivery)) => deliver(&shared.pending, &shared.options.codec, delivery),
                Some(Err(error)) => break describe(&error),
                None => break "the reply consumer was cancelled".to_owned(),
            }
        };
        tracing::warn!(%reason, "lost the RabbitMQ channel; reconnecting");
        let old = shared
            .link
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        // Replies to the old channel's reply-to can never arrive.
        shared.pending.fail_all(&RpcError::transport(
            TransportErrorKind::ConnectionLost,
            format!("the connection to RabbitMQ was lost: {reason}"),
        ));
        let mut reuse = old.map(|link| link.connection.clone());
        let mut attempt = 0u32;
        replies = loop {
            let connection = match reuse.take().filter(|c| c.status().connected()) {
                Some(connection) => Ok(connection),
                None => shared.options.open_connection("client").await.map(Arc::new),
            };
            let opened = match connection {
                Ok(connection) => open(&shared.options, connection).await,
                Err(error) => Err(error),
            };
            match opened {
                Ok((link, replies)) => {
                    *shared
                        .link
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(link));
                    tracing::info!("reconnected to RabbitMQ");
                    break replies;
                }
                Err(error) => {
                    let delay = shared.options.backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::debug!(%error, retry_in = ?delay, "cannot reconnect to RabbitMQ yet");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shared.closed.cancelled() => {
                            close(&shared).await;
                            return;
                        }
                    }
                }
            }
        };
    }
}

/// The last handle is gone: nobody waits for anything, close the connection.
async fn close(shared: &Shared) {
    shared.pending.close(&RpcError::transport(
        TransportErrorKind::ConnectionLost,
        "the RabbitMQ client was closed",
    ));
    let link = shared
        .link
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    if let Some(link) = link
        && link.connection.status().connected()
    {
        let closing = link.connection.close(200, "palisade client closed".into());
        let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
    }
}

/// Routes one reply to the request waiting for it, by its correlation id (RabbitMQ replies carry
/// no `id` in the body).
fn deliver(pending: &PendingRequests, codec: &SharedCodec, delivery: lapin::message::Delivery) {
    let Some(n) = delivery
        .properties
        .correlation_id()
        .as_ref()
        .and_then(|id| pending.ids().parse(id.as_str()))
    else {
        tracing::debug!("a reply without one of our correlation ids ignored");
        return;
    };
    let body = Bytes::from(delivery.data);
    let packet = match codec.decode_reply(&body) {
        Ok((_, packet)) => packet,
        Err(error) => {
            tracing::warn!(%error, "a reply could not be read");
            ReplyPacket::Failed(RpcError::transport(
                TransportErrorKind::Protocol,
                format!(
                    "invalid reply (does the server use the client's codec, {}?): {error}",
                    codec.name()
                ),
            ))
        }
    };
    pending.deliver(n, packet);
}

fn body(codec: &SharedCodec, request: &RpcRequest, id: Option<&str>) -> Result<Bytes, RpcError> {
    // Headers travel as AMQP headers; NestJS's RabbitMQ client puts the raw pattern in the body
    // of requests and events alike.
    codec
        .request_body(
            request.pattern().raw(),
            request.payload(),
            id,
            &Headers::new(),
        )
        .map_err(|error| {
            RpcError::invalid_argument(format!(
                "cannot encode the message for '{}': {error}",
                request.pattern()
            ))
        })
}

impl ClientTransport for RmqConnection {
    fn request(&self, request: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>> {
        let handle = Arc::clone(&self.handle);
        Box::pin(async move {
            let shared = &handle.shared;
            let link = shared.current()?;
            let destination = shared.destination(&request)?;
            let registered = shared.pending.register(request.pattern())?;
            let id = registered.id();
            let payload = body(&shared.options.codec, &request, Some(id.as_str()))?;
            let mut properties = shared
                .properties(&request)?
                .with_correlation_id(id.as_str().into())
                .with_reply_to(shared.options.reply_queue.as_str().into());
            if let Some(deadline) = request.deadline() {
                // The broker drops the request once nobody waits for its reply. A deadline beyond
                // the longest expiration the broker takes (a `Duration::MAX` timeout) is capped:
                // refused, it would fail the request and close the channel under every other.
                let millis = deadline.remaining().min(super::MAX_TTL).as_millis().max(1);
                properties = properties.with_expiration(millis.to_string().into());
            }
            shared
                .publish(&link, destination, &payload, properties, || {
                    format!("the request for '{}'", request.pattern())
                })
                .await?;
            Ok(registered.into_replies())
        })
    }

    fn emit(&self, event: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>> {
        let handle = Arc::clone(&self.handle);
        Box::pin(async move {
            let shared = &handle.shared;
            let link = shared.current()?;
            let destination = shared.destination(&event)?;
            let payload = body(&shared.options.codec, &event, None)?;
            let properties = shared.properties(&event)?;
            shared
                .publish(&link, destination, &payload, properties, || {
                    format!("the event '{}'", event.pattern())
                })
                .await
        })
    }
}

impl fmt::Debug for RmqConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = self.shared();
        f.debug_struct("RmqConnection")
            .field("queue", &shared.options.queue)
            .field("connected", &self.is_connected())
            .field("pending", &shared.pending.len())
            .finish_non_exhaustive()
    }
}
