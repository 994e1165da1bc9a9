use super::link::{Event, Events, Link, Message, Qos};
use super::{DurableEvents, MqttOptions, check_topic, reply_topic};
use crate::rpc::transport::{ReplyPacket, ServerTransport};
use crate::rpc::wire::{IncomingPacket, SharedCodec, decode_incoming};
use crate::rpc::{
    Dispatcher, Headers, RawJson, ReplySink, RpcError, SendError, Server, ServerHandle,
    TransportErrorKind,
};
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// A NestJS-compatible MQTT server: one subscription per pattern, on its route string as the
/// topic; replies published on `<topic>/reply`.
///
/// The server subscribes to its [routes](crate::rpc::Routes): those of a
/// [`Router`](crate::rpc::Router), or those a layered service declares with
/// [`Server::with_routes`].
///
/// **Every server subscribed to a pattern handles every message on it** (as NestJS's): run one
/// instance per broker, or opt in to [`shared_group`](Self::shared_group).
pub struct MqttServer {
    options: MqttOptions,
    group: Option<String>,
    durable: Option<DurableEvents>,
}

impl MqttServer {
    /// A server connecting with `options`.
    pub fn new(options: MqttOptions) -> Self {
        MqttServer {
            options,
            group: None,
            durable: None,
        }
    }

    /// Subscribes through the shared subscriptions `$share/<group>/<topic>`: the broker delivers
    /// each message to one of the servers of the group (instances of a service share the load,
    /// and a request is answered once). Replies still go to `<topic>/reply`, so NestJS clients
    /// are unaffected. The broker must offer shared subscriptions (MQTT 5 brokers do, and
    /// Mosquitto, EMQX and HiveMQ also to 3.1.1 clients); `serve` fails if it refuses them.
    ///
    /// With [durable events](Self::durable_events), the persistent session keeps what it
    /// subscribed to before: a session that ran without a group has its plain subscriptions
    /// dropped at start, but one that ran in another group stays a member of it (MQTT gives no
    /// way to list a session's subscriptions). To change or drop a group, start the instances
    /// with new session ids (after the old sessions have no events left).
    pub fn shared_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Receives events through a persistent session with QoS 1 instead of QoS 0; see
    /// [`DurableEvents`].
    pub fn durable_events(mut self, durable: DurableEvents) -> Self {
        self.durable = Some(durable);
        self
    }

    fn filter(&self, topic: &str) -> String {
        match &self.group {
            Some(group) => format!("$share/{group}/{topic}"),
            None => topic.to_owned(),
        }
    }

    async fn start(self, server: Server) -> Result<ServerHandle, RpcError> {
        let routes = server.routes().cloned().ok_or_else(|| {
            RpcError::invalid_argument(
                "an MQTT server subscribes per pattern: serve a Router, or declare the patterns \
                 of another service with Server::with_routes",
            )
        })?;
        let events: Vec<Arc<str>> = routes.events().to_vec();
        let topics: BTreeSet<Arc<str>> = routes
            .messages()
            .iter()
            .chain(events.iter().filter(|_| self.durable.is_none()))
            .cloned()
            .collect();
        for topic in topics.iter().chain(&events) {
            check_topic(topic)?;
        }
        let filters: Vec<String> = topics.iter().map(|t| self.filter(t)).collect();
        let (client, mut events_loop) = self.options.session(true, false)?;
        self.options.connected(&mut events_loop).await?;
        let dispatcher = server.into_dispatcher("mqtt");
        // Stops what did start if the start fails or its future is dropped before the handle is
        // out.
        let starting = dispatcher.start_guard();
        let (messages_tx, messages) = mpsc::unbounded_channel();
        let (ready_tx, ready) = oneshot::channel();
        let reader = Reader {
            options: self.options.clone(),
            client: client.clone(),
            filters,
            messages: messages_tx,
            ready: Some(ready_tx),
        };
        if let Some(durable) = self.durable {
            let group = self.group.clone();
            let started = super::durable::start(&self.options, &dispatcher, events, durable, group);
            if let Err(error) = started.await {
                starting.abandon().await;
                return Err(error);
            }
        }
        // The event loop never waits on a handler: it hands messages to the dispatching task
        // (publishing replies goes through the event loop, which must keep turning).
        let routes: HashMap<Arc<str>, Arc<str>> =
            topics.into_iter().map(|t| (Arc::clone(&t), t)).collect();
        let dispatching = dispatcher.spawn(dispatch(
            messages,
            routes,
            client,
            self.options.clone(),
            dispatcher.clone(),
        ));
        dispatcher.spawn(reader.run(events_loop, dispatcher.clone(), dispatching));
        let failed = match tokio::time::timeout(self.options.response_timeout, ready).await {
            Ok(Ok(Ok(()))) => return Ok(starting.serving()),
            Ok(Ok(Err(error))) => error,
            Ok(Err(_)) => RpcError::transport(
                TransportErrorKind::ConnectionLost,
                "the MQTT connection closed before the subscriptions were made",
            ),
            Err(_) => RpcError::transport(
                TransportErrorKind::ConnectionLost,
                "the MQTT broker did not acknowledge the subscriptions in time",
            ),
        };
        starting.abandon().await;
        Err(failed)
    }
}

impl ServerTransport for MqttServer {
    /// Connects, subscribes (acknowledged by the broker) and starts serving `server`. Fails with
    /// a clear error if the broker cannot be reached, refuses the credentials or a subscription,
    /// or a pattern is not a valid MQTT topic name.
    fn serve(self, server: Server) -> impl Future<Output = Result<ServerHandle, RpcError>> + Send {
        self.start(server)
    }
}

impl fmt::Debug for MqttServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttServer")
            .field("options", &self.options)
            .field("group", &self.group)
            .field("durable", &self.durable)
            .finish()
    }
}

struct Reader {
    options: MqttOptions,
    client: Link,
    filters: Vec<String>,
    messages: mpsc::UnboundedSender<Message>,
    /// Told once the first subscriptions are acknowledged (or refused).
    ready: Option<oneshot::Sender<Result<(), RpcError>>>,
}

impl Reader {
    fn subscribe(&self) {
        subscribe_soon(&self.client, &self.filters, Qos::AtMostOnce);
    }

    async fn run(
        mut self,
        mut events: Events,
        dispatcher: Dispatcher,
        mut dispatching: tokio::task::JoinHandle<()>,
    ) {
        let mut draining = std::pin::pin!(dispatcher.draining());
        self.subscribe();
        if self.filters.is_empty()
            && let Some(ready) = self.ready.take()
        {
            let _ = ready.send(Ok(()));
        }
        let mut attempt = 0u32;
        loop {
            let event = tokio::select! {
                biased;
                event = events.poll() => event,
                _ = &mut draining => break,
            };
            match event {
                Ok(Event::Message(message)) => {
                    let _ = self.messages.send(message);
                }
                Ok(Event::SubAck(ack)) => {
                    let refused = ack
                        .iter()
                        .zip(&self.filters)
                        .filter(|(accepted, _)| !**accepted)
                        .map(|(_, filter)| filter.as_str())
                        .collect::<Vec<_>>();
                    let result = if refused.is_empty() {
                        Ok(())
                    } else {
                        Err(RpcError::transport(
                            TransportErrorKind::Authorization,
                            format!("the MQTT broker refused the subscriptions {refused:?}"),
                        ))
                    };
                    match self.ready.take() {
                        Some(ready) => {
                            let _ = ready.send(result);
                        }
                        None => {
                            if let Err(error) = result {
                                tracing::error!(%error, "after reconnecting");
                            }
                        }
                    }
                }
                Ok(Event::ConnAck { .. }) => {
                    if attempt > 0 {
                        tracing::info!("server reconnected to the MQTT broker");
                    }
                    attempt = 0;
                    // Clean session: the broker forgot the subscriptions.
                    self.subscribe();
                }
                Ok(_) => {}
                Err(error) => {
                    if attempt == 0 {
                        tracing::warn!(%error, broker = %self.options.address_text(), "server lost the connection to the MQTT broker; reconnecting");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(self.options.backoff(attempt)) => {}
                        _ = &mut draining => break,
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        }
        // Stop taking messages; replies of requests still running go out while the loop turns.
        for filter in &self.filters {
            if let Err(error) = self.client.try_unsubscribe(filter.clone()) {
                tracing::debug!(%error, "could not unsubscribe");
            }
        }
        drop(self.messages);
        // Keep the loop turning (it sends the replies) until the messages already received are
        // dispatched and the last request is answered (the grace period bounds this).
        let mut dispatched = false;
        while !dispatched || dispatcher.in_flight() > 0 {
            tokio::select! {
                event = events.poll() => if event.is_err() { return },
                _ = &mut dispatching, if !dispatched => dispatched = true,
                _ = tokio::time::sleep(std::time::Duration::from_millis(5)), if dispatched => {}
            }
        }
        // The disconnect is queued behind the last replies: once it is out, so are they.
        self.client.try_disconnect();
        let disconnecting = async {
            loop {
                match events.poll().await {
                    Ok(Event::Disconnected) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), disconnecting).await;
    }
}

/// Queues a subscription from the task that polls the event loop, which must not wait for room in
/// the request queue it drains itself: when the queue is full, a task of its own waits instead.
pub(super) fn subscribe_soon(client: &Link, filters: &[String], qos: Qos) {
    if client.try_subscribe_many(filters, qos).is_err() {
        let client = client.clone();
        let filters = filters.to_vec();
        tokio::spawn(async move {
            if let Err(error) = client.subscribe_many(filters, qos).await {
                tracing::warn!(%error, "could not subscribe on MQTT");
            }
        });
    }
}

/// Reads a message as NestJS does: a body that is not JSON is the data (as a string) of an
/// event on the topic (nestjs-wire-brokers.md §2.2, verified on MQTT too).
pub(super) fn incoming(codec: &SharedCodec, payload: Bytes) -> Option<(Bytes, IncomingPacket)> {
    if !codec.is_json() {
        return codec
            .decode_incoming(&payload)
            .ok()
            .map(|packet| (payload, packet));
    }
    match decode_incoming(&payload) {
        Ok(packet) => Some((payload, packet)),
        Err(_) => {
            let text = std::str::from_utf8(&payload).ok()?;
            let quoted = Bytes::from(serde_json::to_vec(text).ok()?);
            let packet = decode_incoming(&quoted).ok()?;
            Some((quoted, packet))
        }
    }
}

async fn dispatch(
    mut messages: mpsc::UnboundedReceiver<Message>,
    routes: HashMap<Arc<str>, Arc<str>>,
    client: Link,
    options: MqttOptions,
    dispatcher: Dispatcher,
) {
    let client = Arc::new(client);
    while let Some(message) = messages.recv().await {
        let topic = message.topic();
        let Some(route) = routes.get(topic) else {
            tracing::debug!(%topic, "message on a topic not subscribed to ignored");
            continue;
        };
        let Some((payload, packet)) = incoming(options.shared_codec(), message.payload().clone())
        else {
            tracing::warn!(%topic, codec = ?options.shared_codec(), "message dropped: unreadable with the server's codec");
            continue;
        };
        let (request, id) = packet.into_request_on(route, &payload, Headers::new());
        let sink = id.map(|id| MqttSink {
            client: Arc::clone(&client),
            topic: reply_topic(topic),
            id,
            limit: options.max_packet_size,
            done: false,
            codec: options.shared_codec().clone(),
        });
        dispatcher.dispatch(request, sink).await;
    }
}

struct MqttSink {
    client: Arc<Link>,
    topic: String,
    id: RawJson,
    limit: usize,
    done: bool,
    codec: SharedCodec,
}

impl ReplySink for MqttSink {
    async fn send(&mut self, packet: ReplyPacket) -> Result<(), SendError> {
        if self.done {
            return Err(SendError::CallerGone);
        }
        let body = self
            .codec
            .reply_body(&packet, Some(&self.id))
            .map_err(|error| {
                SendError::Failed(RpcError::internal_with(format!(
                    "cannot encode the reply: {error}"
                )))
            })?;
        if let Err(oversize) =
            self.client
                .check_size(self.limit, &self.topic, Qos::AtMostOnce, body.len())
        {
            // The caller still waits: the error packet that replaces this one goes there.
            return Err(SendError::TooLarge {
                size: oversize.size,
                limit: oversize.limit,
            });
        }
        self.done = packet.is_last();
        // Boxed: rumqttc's publish is a large future, and the handling future of every message,
        // which holds this one, would otherwise be too large for the allocator's per-thread
        // cache of small blocks: a box from there costs less than the larger box.
        let publish = Box::pin(self.client.publish(&self.topic, Qos::AtMostOnce, body));
        publish.await.map_err(|error| {
            SendError::Failed(RpcError::transport(
                TransportErrorKind::ConnectionLost,
                format!("cannot publish the reply: {error}"),
            ))
        })
    }
}
