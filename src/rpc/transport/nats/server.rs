use super::{DurableEvents, NatsOptions, check_subject, from_nats_headers};
use crate::rpc::transport::{ReplyPacket, ServerTransport};
use crate::rpc::wire::{CodecError, SharedCodec};
use crate::rpc::{
    Dispatcher, Pattern, RawJson, ReplySink, RpcError, RpcRequest, SendError, Server, ServerHandle,
    TransportErrorKind,
};
use futures_util::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A NestJS-compatible NATS server: one subscription per pattern on its route string.
///
/// The server subscribes to its [routes](crate::rpc::Routes): those of a
/// [`Router`](crate::rpc::Router), or those a layered service declares with
/// [`Server::with_routes`].
///
/// # Defaults
///
/// | setting | default | change with |
/// |---|---|---|
/// | queue group | none: every instance receives every message | [`queue`](Self::queue), [`queue_for`](Self::queue_for) |
/// | events | core NATS (at most once) | [`durable_events`](Self::durable_events) (JetStream, at least once) |
pub struct NatsServer {
    options: NatsOptions,
    queue: Option<String>,
    queues: HashMap<String, String>,
    durable: Option<DurableEvents>,
}

impl NatsServer {
    /// A server connecting with `options`.
    pub fn new(options: NatsOptions) -> Self {
        NatsServer {
            options,
            queue: None,
            queues: HashMap::new(),
            durable: None,
        }
    }

    /// Subscribes in this queue group, so that instances of the service share the messages
    /// (NestJS's `queue` option). Without one, every instance receives every message.
    pub fn queue(mut self, group: impl Into<String>) -> Self {
        self.queue = Some(group.into());
        self
    }

    /// Subscribes to `pattern` in its own queue group (NestJS's `@MessagePattern(p, {queue})`).
    pub fn queue_for(mut self, pattern: impl Into<Pattern>, group: impl Into<String>) -> Self {
        self.queues
            .insert(pattern.into().route().to_owned(), group.into());
        self
    }

    /// Delivers events through JetStream instead of core NATS; see [`DurableEvents`].
    pub fn durable_events(mut self, durable: DurableEvents) -> Self {
        self.durable = Some(durable);
        self
    }

    async fn start(self, server: Server) -> Result<ServerHandle, RpcError> {
        let routes = server.routes().cloned().ok_or_else(|| {
            RpcError::invalid_argument(
                "a NATS server subscribes per pattern: serve a Router, or declare the patterns of \
                 another service with Server::with_routes",
            )
        })?;
        let messages: Vec<String> = routes.messages().iter().map(|r| r.to_string()).collect();
        let events: Vec<String> = routes.events().iter().map(|r| r.to_string()).collect();
        let durable_routes: Vec<String> = match &self.durable {
            Some(_) => events.clone(),
            None => Vec::new(),
        };
        let core_routes: BTreeSet<String> = messages
            .into_iter()
            .chain(events.into_iter().filter(|_| self.durable.is_none()))
            .collect();
        for route in core_routes.iter().chain(&durable_routes) {
            check_subject(route, true)?;
        }
        if let Some(durable) = &self.durable {
            super::durable::check_names(durable, &durable_routes)?;
        }
        let client = self
            .options
            .connect(|event| match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("server lost the connection to NATS; reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("server connected to NATS"),
                other => tracing::debug!(event = %other, "NATS connection event"),
            })
            .await?;
        let dispatcher = server.into_dispatcher("nats");
        // Until the handle is out, nobody can stop what did start (subscriptions, durable
        // consumers): the guard does, if the start fails or its future is dropped.
        let starting = dispatcher.start_guard();
        match self
            .subscribe(&client, &dispatcher, core_routes, durable_routes)
            .await
        {
            Ok(()) => {
                // Replies are queued in the client: flush them before the connection goes away.
                let flush = async move {
                    if let Err(error) = client.flush().await {
                        tracing::warn!(%error, "could not flush the last replies to NATS");
                    }
                };
                Ok(starting.serving().on_shutdown(flush))
            }
            Err(error) => {
                starting.abandon().await;
                // The cancelled handlers' `Unavailable` replies are queued in the client, which
                // stops writing as soon as its last handle goes.
                let flushed = tokio::time::timeout(FLUSH_ON_FAILED_START, client.flush()).await;
                if !matches!(flushed, Ok(Ok(()))) {
                    tracing::warn!("could not flush the replies of a failed start to NATS");
                }
                Err(error)
            }
        }
    }

    /// Subscribes to the core routes and starts the durable consumers.
    async fn subscribe(
        self,
        client: &async_nats::Client,
        dispatcher: &Dispatcher,
        core_routes: BTreeSet<String>,
        durable_routes: Vec<String>,
    ) -> Result<(), RpcError> {
        let replier = Arc::new(client.clone());
        for route in core_routes {
            let queue = self.queues.get(&route).or(self.queue.as_ref()).cloned();
            let subscription = match &queue {
                Some(queue) => client.queue_subscribe(route.clone(), queue.clone()).await,
                None => client.subscribe(route.clone()).await,
            }
            .map_err(|error| {
                RpcError::transport(
                    TransportErrorKind::ConnectionLost,
                    format!("cannot subscribe to {route:?}: {error}"),
                )
            })?;
            tracing::debug!(%route, ?queue, "subscribed");
            dispatcher.spawn(serve_subscription(
                subscription,
                route.into(),
                Arc::clone(&replier),
                dispatcher.clone(),
                self.options.shared_codec().clone(),
            ));
        }
        // Subscriptions reach the server asynchronously: wait (a PING round trip) until it has
        // them all, so that a request sent as soon as `serve` returns finds its subscriber
        // instead of "no responders".
        client.flush().await.map_err(|error| {
            RpcError::transport(
                TransportErrorKind::ConnectionLost,
                format!("cannot confirm the subscriptions with the NATS server: {error}"),
            )
        })?;
        if let Some(mut durable) = self.durable {
            durable.codec = self.options.shared_codec().clone();
            super::durable::start(client, dispatcher, durable_routes, durable).await?;
        }
        Ok(())
    }
}

/// How long a failed start waits for its last replies to reach the broker.
const FLUSH_ON_FAILED_START: Duration = Duration::from_secs(5);

impl ServerTransport for NatsServer {
    /// Connects and starts serving `server`. Fails with a clear error if the broker cannot be
    /// reached, the credentials are refused, or a pattern is not a valid NATS subject.
    fn serve(self, server: Server) -> impl Future<Output = Result<ServerHandle, RpcError>> + Send {
        self.start(server)
    }
}

impl fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsServer")
            .field("options", &self.options)
            .field("queue", &self.queue)
            .field("queues", &self.queues)
            .field("durable", &self.durable)
            .finish()
    }
}

/// The request a NATS message carries, routed by the subject it was subscribed on. A body that is
/// not a NestJS packet is NestJS's "external" message: the whole body is the data.
pub(crate) fn request_from(
    codec: &SharedCodec,
    route: &Arc<str>,
    payload: &bytes::Bytes,
    headers: Option<&async_nats::HeaderMap>,
) -> Result<(RpcRequest, Option<RawJson>), CodecError> {
    let packet = codec.decode_incoming(payload)?;
    Ok(packet.into_request_on(route, payload, from_nats_headers(headers)))
}

struct NatsSink {
    /// Shared, not cloned: a client clone takes an allocation and a handful of atomic counts.
    client: Arc<async_nats::Client>,
    /// Taken by the last packet; earlier ones (a stream's) clone it.
    reply: Option<async_nats::Subject>,
    id: RawJson,
    codec: SharedCodec,
}

impl ReplySink for NatsSink {
    async fn send(&mut self, packet: ReplyPacket) -> Result<(), SendError> {
        let body = self
            .codec
            .reply_body(&packet, Some(&self.id))
            .map_err(|error| {
                SendError::Failed(RpcError::internal_with(format!(
                    "cannot encode the reply: {error}"
                )))
            })?;
        // Checked here as async-nats checks it, so that the reply subject can be moved into the
        // publish: a subject read off the socket is copied into a buffer of its own, and its
        // first clone would allocate a second (the caller still waits, and the error packet that
        // replaces this one goes there).
        let (size, limit) = (body.len(), self.client.max_payload());
        if size > limit {
            return Err(SendError::TooLarge { size, limit });
        }
        let reply = if packet.is_last() {
            self.reply.take()
        } else {
            self.reply.clone()
        };
        let Some(reply) = reply else {
            // Nothing is sent after the last packet.
            return Err(SendError::CallerGone);
        };
        // Boxed: async-nats's publish is a future of about 600 bytes, and the handling future of
        // every message, which holds this one, would otherwise be too large for the allocator's
        // per-thread cache of small blocks: a box from there costs less than the larger box.
        let publish = Box::pin(self.client.publish(reply, body));
        publish.await.map_err(|error| {
            // A smaller limit learnt between the check and the publish (a reconnection to
            // another server) ends here too: the reply counts as answered, and the caller's own
            // timeout answers it.
            SendError::Failed(RpcError::transport(
                TransportErrorKind::ConnectionLost,
                format!("cannot publish the reply: {error}"),
            ))
        })
    }
}

async fn serve_subscription(
    mut subscription: async_nats::Subscriber,
    route: Arc<str>,
    client: Arc<async_nats::Client>,
    dispatcher: Dispatcher,
    codec: SharedCodec,
) {
    // Waiting for shutdown takes the token's lock at every poll, so a waiting message is taken
    // first and the wait is polled only when there is none; the flag (a plain load) stops a busy
    // loop.
    let mut draining = std::pin::pin!(dispatcher.draining());
    loop {
        let message = if dispatcher.is_draining() {
            None
        } else {
            tokio::select! {
                biased;
                message = subscription.next() => Some(message),
                _ = &mut draining => None,
            }
        };
        let Some(message) = message else {
            // Stop taking messages: new requests find no responder (or another instance).
            let _ = subscription.unsubscribe().await;
            break;
        };
        let Some(message) = message else { break };
        let parsed = request_from(&codec, &route, &message.payload, message.headers.as_ref());
        let (request, id) = match parsed {
            Ok(parsed) => parsed,
            Err(error) => {
                tracing::warn!(%route, %error, "message not handled: its body could not be read");
                // A caller waiting on a reply subject learns why at once (no id to echo: the
                // reply subject alone routes it), instead of waiting for its timeout.
                if let Some(reply) = message.reply {
                    let refusal = RpcError::invalid_argument(format!(
                        "the server could not read the message on {route:?} (does the client use \
                         the server's codec, {}?): {error}",
                        codec.name()
                    ));
                    let packet = ReplyPacket::Error(crate::rpc::transport::error_json(&refusal));
                    if let Ok(body) = codec.reply_body(&packet, None) {
                        let _ = client.publish(reply, body).await;
                    }
                }
                continue;
            }
        };
        // A request without a reply subject is handled but never answered, as in NestJS.
        let sink = match (&id, message.reply) {
            (Some(id), Some(reply)) => Some(NatsSink {
                client: Arc::clone(&client),
                reply: Some(reply),
                id: id.clone(),
                codec: codec.clone(),
            }),
            _ => None,
        };
        dispatcher.dispatch(request, sink).await;
    }
}
