use super::retry::{self, EventRetries, Failed, FailedEvent, Topology};
use super::{
    ExchangeType, RmqOptions, SizeLimit, describe, from_amqp_headers, is_wildcard, short_string,
    wildcard_matches,
};
use crate::rpc::json::encoded;
use crate::rpc::transport::{ReplyPacket, ServerTransport};
use crate::rpc::wire::encode_reply;
use crate::rpc::{
    Dispatcher, Kind, NO_HANDLER_MESSAGE, Pattern, RawJson, ReplySink, Routes, RpcError,
    RpcRequest, SendError, Server, ServerHandle, TransportErrorKind,
};
use bytes::{BufMut, Bytes};
use futures_util::StreamExt;
use lapin::Acker;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueBindOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

/// A NestJS-compatible RabbitMQ server: consumes the one queue of [`RmqOptions::queue`] and
/// routes each message on its body's pattern.
///
/// With acknowledgements on (the default), a message is acknowledged only once handled, the
/// prefetch count bounds the messages in flight, and failing events are retried and then
/// dead-lettered as [`EventRetries`] says. See the [module documentation](super) for what goes
/// beyond NestJS.
///
/// A router's patterns are known, so an event no handler takes is dead-lettered at once; the
/// `wildcards` mode needs them (to bind the queue), so it serves a [`Router`](crate::rpc::Router)
/// or a service that declares its patterns with [`Server::with_routes`].
pub struct RmqServer {
    options: RmqOptions,
    retries: EventRetries,
}

impl RmqServer {
    /// A server with `options`.
    pub fn new(options: RmqOptions) -> Self {
        RmqServer {
            options,
            retries: EventRetries::new(),
        }
    }

    /// What happens to events whose handlers fail (with acknowledgements on).
    pub fn event_retries(mut self, retries: EventRetries) -> Self {
        self.retries = retries;
        self
    }

    async fn start(self, server: Server) -> Result<ServerHandle, RpcError> {
        self.options.validate()?;
        let dispatcher = server.into_dispatcher("rabbitmq");
        let routes = dispatcher.routes().cloned();
        if self.options.wildcards && routes.is_none() {
            return Err(RpcError::invalid_argument(
                "the RabbitMQ wildcards mode binds the queue with every pattern: serve a Router, \
                 or declare the patterns of another service with Server::with_routes",
            ));
        }
        let mut wildcards = Vec::new();
        if let Some(routes) = &routes {
            for route in routes.all() {
                if self.options.wildcards {
                    short_string(&route, "pattern (binding key)")?;
                }
                if self.options.wildcards && is_wildcard(&route) {
                    wildcards.push(route);
                }
            }
        }
        let state = Arc::new(State {
            limit: SizeLimit::new(self.options.max_message_size),
            options: self.options,
            retries: self.retries,
            dispatcher: dispatcher.clone(),
            routes,
            wildcards,
        });
        let connection = Arc::new(state.options.open_connection("server").await?);
        let (link, consumer) = state.open(connection).await?;
        let current = Arc::new(Mutex::new(Some(Arc::clone(&link))));
        dispatcher.spawn(consume(
            Arc::clone(&state),
            link,
            consumer,
            Arc::clone(&current),
        ));
        // After the last handler: acknowledgements went out, close the connection (the broker
        // hands back anything still unacknowledged).
        let close = async move {
            let link = current
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            if let Some(link) = link
                && link.connection.status().connected()
            {
                let closing = link
                    .connection
                    .close(200, "palisade server shut down".into());
                if tokio::time::timeout(Duration::from_secs(5), closing)
                    .await
                    .is_err()
                {
                    tracing::warn!("RabbitMQ did not confirm closing the connection in time");
                }
            }
        };
        Ok(ServerHandle::new(dispatcher).on_shutdown(close))
    }
}

impl ServerTransport for RmqServer {
    /// Connects, declares the queue (and the exchange, bindings, delay and dead-letter queues
    /// its options call for) and starts consuming. Fails with a clear error if the broker cannot
    /// be reached, refuses the credentials, or already has the queue with other options.
    fn serve(self, server: Server) -> impl Future<Output = Result<ServerHandle, RpcError>> + Send {
        self.start(server)
    }
}

impl fmt::Debug for RmqServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RmqServer")
            .field("options", &self.options)
            .field("retries", &self.retries)
            .finish()
    }
}

struct State {
    options: RmqOptions,
    retries: EventRetries,
    dispatcher: Dispatcher,
    routes: Option<Routes>,
    /// Handlers with wildcard patterns, in route order (the wildcards mode only).
    wildcards: Vec<Arc<str>>,
    limit: SizeLimit,
}

/// A channel opened when first needed and again after it closed.
struct LazyChannel {
    connection: Arc<Connection>,
    confirm: bool,
    channel: Mutex<Option<Channel>>,
    opening: tokio::sync::Mutex<()>,
    /// Publishes take their confirm's tag in order ([`publish_in_order`](super::publish_in_order)).
    order: Mutex<()>,
}

impl LazyChannel {
    fn new(connection: Arc<Connection>, confirm: bool) -> Self {
        LazyChannel {
            connection,
            confirm,
            channel: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            order: Mutex::new(()),
        }
    }

    fn current(&self) -> Option<Channel> {
        self.channel
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .filter(|channel| channel.status().connected())
    }

    async fn get(&self) -> Result<Channel, lapin::Error> {
        if let Some(channel) = self.current() {
            return Ok(channel);
        }
        let _opening = self.opening.lock().await;
        if let Some(channel) = self.current() {
            return Ok(channel);
        }
        let channel = self.connection.create_channel().await?;
        if self.confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        *self
            .channel
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(channel.clone());
        Ok(channel)
    }
}

/// One connection: the channel the queue is consumed on (and messages acknowledged on), one for
/// replies and one for delayed and dead-lettered events, both in confirm mode (a reply the broker
/// refuses for its size closes no channel messages wait on, and says so). Every message in flight
/// holds its link, so the channel it must be acknowledged on lives until it is.
struct Link {
    connection: Arc<Connection>,
    consume: Channel,
    replies: LazyChannel,
    confirms: LazyChannel,
    topology: Topology,
}

impl State {
    /// Opens the consuming channel on `connection`, declares the topology and starts consuming.
    async fn open(
        &self,
        connection: Arc<Connection>,
    ) -> Result<(Arc<Link>, lapin::Consumer), RpcError> {
        let options = &self.options;
        let consume = connection.create_channel().await.map_err(|error| {
            RpcError::transport(
                TransportErrorKind::Connect,
                format!("cannot open a RabbitMQ channel: {}", describe(&error)),
            )
        })?;
        let queue = options.declare_queue(&consume).await?;
        if options.exchange_mode() {
            options.declare_exchange(&consume).await?;
            let exchange = options.exchange_name();
            let fanout = options.exchange_type == ExchangeType::Fanout;
            let mut keys: Vec<String> = Vec::new();
            if fanout {
                keys.push(String::new());
            } else if let Some(key) = &options.routing_key {
                keys.push(key.clone());
            }
            if options.wildcards
                && let Some(routes) = &self.routes
            {
                keys.extend(routes.all().iter().map(|route| route.to_string()));
            }
            for key in keys {
                consume
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|error| {
                        super::declare_error(
                            &format!(
                                "cannot bind the queue {queue:?} to {exchange:?} with {key:?}"
                            ),
                            &error,
                        )
                    })?;
            }
        }
        let server_named = options
            .queue
            .is_empty()
            .then(|| options.exchange.as_deref().unwrap_or(""));
        let topology = Topology::new(&queue, &self.retries, server_named);
        if !options.no_ack {
            topology
                .declare(&consume, &self.retries, options.queue_options.is_durable())
                .await?;
        }
        consume
            .basic_qos(
                options.prefetch_count,
                BasicQosOptions {
                    global: options.global_prefetch,
                },
            )
            .await
            .map_err(|error| {
                RpcError::transport(
                    TransportErrorKind::ConnectionLost,
                    format!("cannot set the prefetch count: {}", describe(&error)),
                )
            })?;
        let consumer = consume
            .basic_consume(
                queue.as_str().into(),
                options.consumer_tag.as_deref().unwrap_or("").into(),
                BasicConsumeOptions {
                    no_ack: options.no_ack,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|error| {
                super::declare_error(&format!("cannot consume the queue {queue:?}"), &error)
            })?;
        tracing::debug!(%queue, prefetch = options.prefetch_count, no_ack = options.no_ack, "consuming");
        let link = Link {
            replies: LazyChannel::new(Arc::clone(&connection), true),
            confirms: LazyChannel::new(Arc::clone(&connection), true),
            connection,
            consume,
            topology,
        };
        Ok((Arc::new(link), consumer))
    }

    /// Whether some handler takes `route` (unknown when the service declared no routes).
    fn takes(&self, route: &str) -> bool {
        match &self.routes {
            Some(routes) => {
                routes.events().iter().any(|r| &**r == route)
                    || routes.messages().iter().any(|r| &**r == route)
                    || self.wildcard_for(route).is_some()
            }
            None => true,
        }
    }

    /// The wildcard handler's route for a message no exact pattern takes (wildcards mode).
    fn wildcard_for(&self, route: &str) -> Option<&Arc<str>> {
        self.wildcards
            .iter()
            .find(|pattern| wildcard_matches(pattern, route))
    }

    /// Whether an exact handler takes `route`.
    fn exact(&self, route: &str) -> bool {
        self.routes.as_ref().is_some_and(|routes| {
            routes.events().iter().any(|r| &**r == route)
                || routes.messages().iter().any(|r| &**r == route)
        })
    }
}

/// Takes the first step of `task` here, so that messages read by one loop start in order, and
/// runs the rest in a task the server's shutdown waits for.
async fn start_in_order(dispatcher: &Dispatcher, task: impl Future<Output = ()> + Send + 'static) {
    let mut task = Box::pin(task);
    let finished = std::future::poll_fn(|cx| Poll::Ready(task.as_mut().poll(cx).is_ready())).await;
    if !finished {
        dispatcher.spawn(task);
    }
}

/// Consumes the queue until shutdown, re-establishing the connection, topology and consumer with
/// backoff when they are lost.
async fn consume(
    state: Arc<State>,
    mut link: Arc<Link>,
    mut consumer: lapin::Consumer,
    current: Arc<Mutex<Option<Arc<Link>>>>,
) {
    let dispatcher = state.dispatcher.clone();
    // Made once: each new wait registers with the shared token under its lock.
    let mut draining = std::pin::pin!(dispatcher.draining());
    loop {
        let next = if dispatcher.is_draining() {
            None
        } else {
            tokio::select! {
                biased;
                next = consumer.next() => Some(next),
                _ = &mut draining => None,
            }
        };
        let Some(next) = next else {
            stop(&state, &link, consumer).await;
            return;
        };
        let reason = match next {
            Some(Ok(delivery)) => {
                handle(&state, &link, delivery).await;
                continue;
            }
            Some(Err(error)) => describe(&error),
            None => "the broker cancelled the consumer".to_owned(),
        };
        tracing::warn!(%reason, "lost the RabbitMQ consumer; reconnecting");
        let reuse = Some(link.connection.clone());
        match reconnect(&state, reuse, &mut draining).await {
            Some((new_link, new_consumer)) => {
                *current
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::clone(&new_link));
                link = new_link;
                consumer = new_consumer;
                tracing::info!("consuming again after reconnecting to RabbitMQ");
            }
            None => return,
        }
    }
}

/// Reconnects with backoff (on `reuse` while it is still connected); `None` if shutdown started
/// meanwhile.
async fn reconnect(
    state: &State,
    mut reuse: Option<Arc<Connection>>,
    draining: &mut std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
) -> Option<(Arc<Link>, lapin::Consumer)> {
    let mut attempt = 0u32;
    loop {
        if state.dispatcher.is_draining() {
            return None;
        }
        let connection = match reuse.take().filter(|c| c.status().connected()) {
            Some(connection) => Ok(connection),
            None => state.options.open_connection("server").await.map(Arc::new),
        };
        let opened = match connection {
            Ok(connection) => state.open(connection).await,
            Err(error) => Err(error),
        };
        match opened {
            Ok(opened) => return Some(opened),
            Err(error) => {
                let delay = state.options.backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::debug!(%error, retry_in = ?delay, "cannot consume from RabbitMQ yet");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = draining.as_mut() => return None,
                }
            }
        }
    }
}

/// Shutdown: stop the consumer, and hand back what was delivered but not started.
async fn stop(state: &Arc<State>, link: &Arc<Link>, mut consumer: lapin::Consumer) {
    let cancelled = link
        .consume
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    if let Err(error) = cancelled {
        tracing::debug!(error = %describe(&error), "cannot cancel the consumer (the channel is gone)");
        return;
    }
    // Deliveries already on their way before the broker took the cancel.
    let mut handed_back = 0usize;
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
    {
        if state.options.no_ack {
            // Already acknowledged by the broker: nothing can give it back. Run it through the
            // dispatcher, which answers a request `Unavailable` and logs a dropped event.
            handle(state, link, delivery).await;
            continue;
        }
        handed_back += 1;
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        if let Err(error) = delivery.acker.nack(requeue).await {
            tracing::debug!(error = %describe(&error), "cannot hand a message back");
        }
    }
    if handed_back > 0 {
        tracing::info!(
            handed_back,
            "messages not started were handed back to the queue"
        );
    }
}

/// Handles one delivery.
async fn handle(state: &Arc<State>, link: &Arc<Link>, delivery: lapin::message::Delivery) {
    let lapin::message::Delivery {
        data,
        properties,
        acker,
        redelivered,
        ..
    } = delivery;
    let acks = !state.options.no_ack;
    let body = Bytes::from(data);
    let mut packet = match state.options.codec.decode_incoming(&body) {
        Ok(packet) => packet,
        Err(error) => {
            let reason = format!("the message could not be read: {error}");
            tracing::warn!(%reason, "message dropped");
            // A caller waiting on reply_to learns why at once instead of at its timeout.
            if let Some(reply_to) = properties.reply_to().clone() {
                let mut sink = RmqSink {
                    link: Arc::clone(link),
                    reply_to,
                    correlation_id: properties.correlation_id().clone(),
                    id: RawJson::null(),
                    state: Arc::clone(state),
                    acker: None,
                    redelivered,
                };
                let refusal = RpcError::invalid_argument(format!(
                    "the server could not read the message (does the client use the server's \
                     codec, {}?): {error}",
                    state.options.codec.name()
                ));
                let _ = sink.send(ReplyPacket::Failed(refusal)).await;
            }
            if acks {
                let event = FailedEvent {
                    route: "",
                    body: &body,
                    properties: &properties,
                    deliveries: None,
                    reason: &reason,
                };
                dead_letter(state, link, &acker, event).await;
            }
            return;
        }
    };
    packet.headers.extend(
        from_amqp_headers(properties.headers().as_ref())
            .iter()
            .map(|(key, value)| (key.to_owned(), value.to_owned())),
    );
    let raw = packet.pattern.take().unwrap_or_else(RawJson::null);
    let mut pattern = Pattern::received(raw.clone());
    if !state.wildcards.is_empty()
        && !state.exact(pattern.route())
        && let Some(wildcard) = state.wildcard_for(pattern.route())
    {
        pattern = Pattern::received_on(Arc::clone(wildcard), raw);
    }
    let kind = if packet.id.is_some() {
        Kind::Request
    } else {
        Kind::Event
    };
    let route = pattern.route().to_owned();
    let request = RpcRequest::received(pattern, packet.data, kind, packet.headers)
        .with_timeout_ms(packet.timeout_ms);
    let dispatcher = &state.dispatcher;
    match (packet.id, properties.reply_to().clone()) {
        (Some(id), Some(reply_to)) => {
            let sink = RmqSink {
                link: Arc::clone(link),
                reply_to,
                correlation_id: properties.correlation_id().clone(),
                id,
                state: Arc::clone(state),
                acker: acks.then_some(acker),
                redelivered,
            };
            dispatcher.dispatch(request, Some(sink)).await;
        }
        (Some(_), None) if acks => {
            // A request nobody waits for: handled, never answered (as in NestJS), then
            // acknowledged.
            let dispatcher = dispatcher.clone();
            let link = Arc::clone(link);
            start_in_order(&state.dispatcher, async move {
                if let Err(error) = dispatcher.handle_event(request).await {
                    tracing::warn!(%error, "a request without reply_to failed");
                }
                settle(&acker, Settle::Ack).await;
                drop(link);
            })
            .await;
        }
        (None, _) if acks => {
            if !state.takes(&route) {
                let reason = format!(
                    "There is no matching event handler defined in the remote service. Event pattern: {route}"
                );
                let event = FailedEvent {
                    route: &route,
                    body: &body,
                    properties: &properties,
                    deliveries: None,
                    reason: &reason,
                };
                dead_letter(state, link, &acker, event).await;
                return;
            }
            let state = Arc::clone(state);
            let link = Arc::clone(link);
            start_in_order(&state.dispatcher.clone(), async move {
                let outcome = state.dispatcher.handle_event(request).await;
                let error = match outcome {
                    Ok(()) => return settle(&acker, Settle::Ack).await,
                    Err(_) if state.dispatcher.is_draining() => {
                        // Not done: back to the queue, for this server's successor.
                        return settle(&acker, Settle::Requeue).await;
                    }
                    Err(error) => error,
                };
                let deliveries = retry::deliveries_so_far(&properties).saturating_add(1);
                let reason = error.to_string();
                let event = FailedEvent {
                    route: &route,
                    body: &body,
                    properties: &properties,
                    deliveries: Some(deliveries),
                    reason: &reason,
                };
                dead_letter(&state, &link, &acker, event).await;
            })
            .await;
        }
        // No acknowledgements: the broker forgot the message on delivery.
        (_, _) => dispatcher.dispatch::<RmqSink>(request, None).await,
    }
}

/// Sends a failed event on (delay queue or dead-letter exchange) and settles it.
async fn dead_letter(state: &State, link: &Link, acker: &Acker, event: FailedEvent<'_>) {
    let outcome = match link.confirms.get().await {
        Ok(channel) => {
            let channel = (&channel, &link.confirms.order);
            retry::on_failure(channel, &link.topology, &state.retries, event).await
        }
        Err(error) => {
            tracing::error!(error = %describe(&error), "cannot open a channel to retry or dead-letter an event");
            Failed::Kept
        }
    };
    let settlement = match outcome {
        Failed::Retried | Failed::DeadLettered => Settle::Ack,
        Failed::Kept => {
            // The broker refuses to take it anywhere right now: hand it back, after a pause that
            // keeps this from spinning.
            tokio::time::sleep(state.retries.delay_before(1).min(Duration::from_secs(1))).await;
            Settle::Requeue
        }
    };
    settle(acker, settlement).await;
}

#[derive(Clone, Copy, Debug)]
enum Settle {
    Ack,
    Requeue,
}

async fn settle(acker: &Acker, settlement: Settle) {
    let done = match settlement {
        Settle::Ack => acker.ack(BasicAckOptions::default()).await,
        Settle::Requeue => {
            acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        }
    };
    if let Err(error) = done {
        // The channel is gone: the broker hands the message to another consumer anyway.
        tracing::debug!(error = %describe(&error), ?settlement, "cannot settle a message");
    }
}

/// Where one request's replies go: its `reply_to`, with its `correlation_id`; acknowledges the
/// request once the last reply went out.
struct RmqSink {
    link: Arc<Link>,
    reply_to: ShortString,
    correlation_id: Option<ShortString>,
    id: RawJson,
    /// The server's options and size limit.
    state: Arc<State>,
    /// Taken when the request is settled.
    acker: Option<Acker>,
    redelivered: bool,
}

impl RmqSink {
    fn body(&self, packet: &ReplyPacket) -> Bytes {
        let codec = &self.state.options.codec;
        if !codec.is_json() {
            let id = matches!(packet, ReplyPacket::NoHandler).then_some(&self.id);
            return match codec.reply_body(packet, id) {
                Ok(body) => body,
                Err(error) => {
                    let failure =
                        RpcError::internal_with(format!("cannot encode the reply: {error}"));
                    let packet = ReplyPacket::Failed(failure);
                    codec.reply_body(&packet, None).unwrap_or_default()
                }
            };
        }
        encoded(|body| match packet {
            // NestJS's RabbitMQ server writes its no-handler packet with its own key order, and
            // the only id a RabbitMQ reply carries.
            ReplyPacket::NoHandler => {
                body.put_slice(b"{\"id\":");
                body.put_slice(self.id.as_bytes());
                body.put_slice(b",\"err\":");
                serde_json::to_writer(body.writer(), NO_HANDLER_MESSAGE)
                    .expect("writing to memory cannot fail");
                body.put_slice(b",\"status\":\"error\"}");
            }
            // Replies carry no id: the correlation id is the request's.
            other => encode_reply(body, other, None),
        })
    }
}

impl ReplySink for RmqSink {
    async fn send(&mut self, packet: ReplyPacket) -> Result<(), SendError> {
        let body = self.body(&packet);
        let limit = &self.state.limit;
        // Values are held to the limit; the error saying one did not fit must go out whatever
        // the limit (the broker's own still applies).
        let held_to_limit = || match packet {
            ReplyPacket::Value { .. } if body.len() > limit.get() => Err(SendError::TooLarge {
                size: body.len(),
                limit: limit.get(),
            }),
            _ => Ok(()),
        };
        held_to_limit()?;
        let mut properties = BasicProperties::default();
        if let Some(correlation_id) = &self.correlation_id {
            properties = properties.with_correlation_id(correlation_id.clone());
        }
        let mut closed_under_it = false;
        let failure = loop {
            let published = async {
                let channel = self.link.replies.get().await?;
                super::publish_in_order(
                    &self.link.replies.order,
                    channel.basic_publish(
                        ShortString::default(),
                        self.reply_to.clone(),
                        // Not mandatory: RabbitMQ 3 returns messages to a direct reply-to as
                        // unroutable even as it delivers them.
                        BasicPublishOptions::default(),
                        &body,
                        properties.clone(),
                    ),
                )
                .await?
                .await
            }
            .await;
            break match published {
                // (Not mandatory: nothing comes back for a reply-to nobody consumes any more.)
                Ok(Confirmation::Ack(_) | Confirmation::NotRequested) => {
                    if packet.is_last() {
                        self.settle(Settle::Ack).await;
                    }
                    return Ok(());
                }
                Ok(Confirmation::Nack(_)) => {
                    "the broker refused the reply (negative confirmation)".to_owned()
                }
                Err(error) if limit.refused(&error, body.len()) => {
                    // The broker's limit is below ours: the caller still waits for the error
                    // packet that replaces this one.
                    return Err(SendError::TooLarge {
                        size: body.len(),
                        limit: limit.get(),
                    });
                }
                // Another reply's refusal closed the shared channel under this one: once more,
                // on a fresh channel — unless it is over the limit that refusal taught, when it
                // would only close the fresh channel too. (Requeued, the request would run again
                // from the start. One published before the refused reply may have gone out all
                // the same, its confirm lost in the close: a value may then come twice, rather
                // than a whole stream again.)
                Err(error) if super::is_too_large(&error) && !closed_under_it => {
                    held_to_limit()?;
                    closed_under_it = true;
                    continue;
                }
                Err(error) => describe(&error),
            };
        };
        // Not answered: let another instance (or this one, once reconnected) answer it — once; a
        // request whose reply failed before gives up here.
        let settlement = if self.redelivered {
            Settle::Ack
        } else {
            Settle::Requeue
        };
        self.settle(settlement).await;
        Err(SendError::Failed(RpcError::transport(
            TransportErrorKind::ConnectionLost,
            format!("cannot publish the reply: {failure}"),
        )))
    }
}

impl RmqSink {
    async fn settle(&mut self, settlement: Settle) {
        if let Some(acker) = self.acker.take() {
            settle(&acker, settlement).await;
        }
    }
}

impl Drop for RmqSink {
    fn drop(&mut self) {
        // Unsettled (the handler's task ended without a last reply): hand it back.
        if let Some(acker) = self.acker.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move { settle(&acker, Settle::Requeue).await });
        }
    }
}
