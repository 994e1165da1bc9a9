use super::{NatsOptions, check_subject, outgoing_headers};
use crate::rpc::transport::{
    ClientTransport, Connect, IDEMPOTENCY_KEY, ReplyPacket, ReplyReceiver,
};
use crate::rpc::wire::{PendingRequests, SharedCodec};
use crate::rpc::{Headers, RpcError, RpcRequest, TransportErrorKind};
use async_nats::Subject;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The client side of the NATS transport, before it is connected: how to connect and how to
/// publish events. [`Client::builder().connect(..)`](crate::rpc::ClientBuilder::connect) connects
/// it (a bad URL, an unreachable broker or refused credentials fail there with a clear error);
/// [`NatsOptions`] alone connects the same way.
///
/// ```no_run
/// use palisade::rpc::Client;
/// use palisade::rpc::transport::nats::{NatsOptions, NatsTransport};
///
/// # #[tokio::main] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let orders = Client::builder()
///     .connect(NatsTransport::new(NatsOptions::new(["nats://127.0.0.1:4222"])).durable_events())
///     .await?;
/// orders.emit("order-created", &serde_json::json!({"id": 7})).await?; // stored by JetStream
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct NatsTransport {
    options: NatsOptions,
    durable_events: bool,
}

impl NatsTransport {
    /// A transport connecting with `options`.
    pub fn new(options: NatsOptions) -> Self {
        NatsTransport {
            options,
            durable_events: false,
        }
    }

    /// Publishes events through JetStream: each `emit` resolves once a stream stored the event
    /// (at-least-once delivery to [durable event handlers](super::DurableEvents)). A stream must
    /// capture the event subjects — a [`NatsServer`](super::NatsServer) with durable events creates
    /// one — or `emit` fails with `Unavailable`.
    pub fn durable_events(mut self) -> Self {
        self.durable_events = true;
        self
    }

    /// Connects.
    pub async fn connect(self) -> Result<NatsConnection, RpcError> {
        NatsConnection::connect(&self.options, self.durable_events).await
    }
}

impl Connect for NatsTransport {
    type Transport = NatsConnection;

    async fn connect(self) -> Result<NatsConnection, RpcError> {
        NatsTransport::connect(self).await
    }
}

impl Connect for NatsOptions {
    type Transport = NatsConnection;

    async fn connect(self) -> Result<NatsConnection, RpcError> {
        NatsTransport::new(self).connect().await
    }
}

struct Inner {
    client: async_nats::Client,
    pending: Arc<PendingRequests>,
    connected: Arc<AtomicBool>,
    /// Replies come to `<inbox>.<n>`, one subscription on `<inbox>.*` for all requests.
    inbox: String,
    /// Shared with each durable event's future, which needs it after `emit` returns.
    jetstream: Option<Arc<async_nats::jetstream::Context>>,
    codec: SharedCodec,
    /// The deadline travels as a NATS header rather than in the body.
    deadline_header: bool,
    /// Ends the reply reader when the last clone goes: its subscription would otherwise keep
    /// async-nats's connection open (and its task, and the socket) for good.
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A connected NATS client transport: requests with a reply subject on one multiplexed inbox,
/// events by plain publish (or by JetStream publish, acknowledged by the stream, with
/// [`NatsTransport::durable_events`]). Clones share the connection.
#[derive(Clone)]
pub struct NatsConnection {
    inner: Arc<Inner>,
}

impl NatsConnection {
    async fn connect(options: &NatsOptions, durable_events: bool) -> Result<Self, RpcError> {
        let pending = PendingRequests::new();
        let connected = Arc::new(AtomicBool::new(true));
        let (events_pending, events_connected) = (Arc::clone(&pending), Arc::clone(&connected));
        let client = options
            .connect(move |event| match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("lost the connection to the NATS server; reconnecting");
                    events_connected.store(false, Ordering::Release);
                    // Replies could not arrive now, or could arrive for requests their callers
                    // have long given up on.
                    events_pending.fail_all(&RpcError::transport(
                        TransportErrorKind::ConnectionLost,
                        "connection to the NATS server lost",
                    ));
                }
                async_nats::Event::Connected => {
                    tracing::info!("connected to the NATS server");
                    events_connected.store(true, Ordering::Release);
                }
                other => tracing::debug!(event = %other, "NATS connection event"),
            })
            .await?;
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|error| {
                RpcError::transport(
                    TransportErrorKind::ConnectionLost,
                    format!("cannot subscribe to the reply inbox: {error}"),
                )
            })?;
        let reader_pending = Arc::clone(&pending);
        let codec = options.shared_codec().clone();
        let reader_codec = codec.clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = replies.next() => match message {
                        Some(message) => deliver(&reader_pending, &reader_codec, message),
                        None => break,
                    },
                    _ = stopped.cancelled() => break,
                }
            }
            // Dropped here, the subscription ends on the server, and with the client's last
            // handle async-nats closes the connection.
            drop(replies);
            // Nobody answers what is pending.
            reader_pending.close(&RpcError::transport(
                TransportErrorKind::ConnectionLost,
                "the client was dropped, or its reply subscription ended",
            ));
        });
        let jetstream =
            durable_events.then(|| Arc::new(async_nats::jetstream::new(client.clone())));
        Ok(NatsConnection {
            inner: Arc::new(Inner {
                client,
                pending,
                connected,
                inbox,
                jetstream,
                codec,
                deadline_header: options.deadline_header,
                stop,
            }),
        })
    }

    /// The underlying `async-nats` client.
    ///
    /// It does not check the subjects it publishes to (palisade checks its own before use, and
    /// connects with async-nats's `skip_subject_validation`): check a subject made from outside
    /// input before publishing to it through this client, since a space or a line break in it
    /// breaks the protocol line and the broker closes the connection.
    pub fn nats_client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Replies dropped because their request was no longer waiting (it timed out, or its caller
    /// went away).
    pub fn late_replies(&self) -> u64 {
        self.inner.pending.late_replies()
    }

    fn check_connected(&self) -> Result<(), RpcError> {
        if self.inner.connected.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(RpcError::transport(
                TransportErrorKind::NotConnected,
                "not connected to the NATS server (reconnecting)",
            ))
        }
    }
}

/// Routes one message from the inbox to the request waiting for it.
fn deliver(pending: &PendingRequests, codec: &SharedCodec, message: async_nats::Message) {
    let Some(n) = message
        .subject
        .rsplit('.')
        .next()
        .and_then(|token| token.parse::<u64>().ok())
    else {
        return;
    };
    let no_responders =
        message.status == Some(async_nats::StatusCode::NO_RESPONDERS) || message.payload.is_empty();
    if no_responders {
        // NestJS: "Empty response. There are no subscribers listening to that message".
        let route = pending.route_of(n).unwrap_or_else(|| Arc::from("?"));
        let error = RpcError::transport(
            TransportErrorKind::NoResponders,
            format!("There are no subscribers listening to that message (\"{route}\")"),
        );
        pending.fail(n, &error);
        return;
    }
    let packet = match codec.decode_reply(&message.payload) {
        Ok((id, packet)) => {
            if id.is_some_and(|id| !is_json_id_of(id.as_bytes(), n)) {
                tracing::debug!("reply for another request id ignored");
                return;
            }
            packet
        }
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

/// A message's body: NestJS's packet, with the deadline in its `headers` field unless it travels
/// as a NATS header (the request's own headers always do).
fn body(
    codec: &SharedCodec,
    request: &RpcRequest,
    id: Option<&str>,
    deadline_header: bool,
) -> Result<Bytes, RpcError> {
    let in_body = request.wire_timeout_millis().filter(|_| !deadline_header);
    codec
        .request_body_within(
            request.pattern().raw(),
            request.payload(),
            id,
            &Headers::new(),
            in_body,
        )
        .map_err(|error| {
            RpcError::invalid_argument(format!(
                "cannot encode the message for '{}': {error}",
                request.pattern()
            ))
        })
}

/// The subject of a pattern's route, sharing the route's bytes: one allocation, and the copy
/// async-nats takes of it only counts a reference (a subject made from a `String` would be copied
/// once more, and its first clone would allocate again).
fn route_subject(route: &Arc<str>) -> Subject {
    struct Route(Arc<str>);
    impl AsRef<[u8]> for Route {
        fn as_ref(&self) -> &[u8] {
            self.0.as_bytes()
        }
    }
    Subject::from_utf8(Bytes::from_owner(Route(Arc::clone(route)))).expect("a str is UTF-8")
}

/// The packet id of request `n`: its number in decimal. The reply subject `<inbox>.<n>` already
/// leads a reply to its request (the inbox is this client's alone), so the id only has to repeat
/// the number, and a short one takes up to 20 bytes off every request and every reply (16 or more
/// for a client's first 100 000 requests). NestJS's servers echo any id; its own clients send
/// 36-character UUIDs.
fn packet_id(n: u64, buffer: &mut [u8; 20]) -> &str {
    std::str::from_utf8(crate::rpc::json::decimal(n, buffer)).expect("decimal digits are ASCII")
}

/// Whether a reply's `id` (as JSON: a quoted string) is the packet id of request `n`.
fn is_json_id_of(id: &[u8], n: u64) -> bool {
    let mut buffer = [0u8; 20];
    id.strip_prefix(b"\"")
        .and_then(|id| id.strip_suffix(b"\""))
        .is_some_and(|id| id == crate::rpc::json::decimal(n, &mut buffer))
}

/// Longest reply subject built without a heap buffer of its own.
const REPLY_SUBJECT_INLINE: usize = 96;

/// `<inbox>.<n>`, built in place: one allocation, where formatting a `String` takes three.
fn reply_subject(inbox: &str, n: u64) -> Subject {
    struct Inline {
        bytes: [u8; REPLY_SUBJECT_INLINE],
        len: usize,
    }
    impl AsRef<[u8]> for Inline {
        fn as_ref(&self) -> &[u8] {
            &self.bytes[..self.len]
        }
    }
    let mut buffer = [0u8; 20];
    let digits = crate::rpc::json::decimal(n, &mut buffer);
    let len = inbox.len() + 1 + digits.len();
    if len > REPLY_SUBJECT_INLINE {
        return Subject::from(format!("{inbox}.{n}"));
    }
    let mut bytes = [0u8; REPLY_SUBJECT_INLINE];
    bytes[..inbox.len()].copy_from_slice(inbox.as_bytes());
    bytes[inbox.len()] = b'.';
    bytes[inbox.len() + 1..len].copy_from_slice(digits);
    Subject::from_utf8(Bytes::from_owner(Inline { bytes, len }))
        .expect("an inbox and digits are UTF-8")
}

fn publish_error(error: async_nats::PublishError, what: &RpcRequest) -> RpcError {
    use async_nats::client::PublishErrorKind as Kind;
    let kind = match error.kind() {
        Kind::MaxPayloadExceeded => TransportErrorKind::PayloadTooLarge,
        Kind::InvalidSubject => TransportErrorKind::InvalidRoute,
        Kind::Send => TransportErrorKind::ConnectionLost,
    };
    RpcError::transport(
        kind,
        format!("cannot publish to '{}' on NATS: {error}", what.pattern()),
    )
}

fn jetstream_error(error: async_nats::jetstream::context::PublishError, what: &str) -> RpcError {
    use async_nats::jetstream::context::PublishErrorKind as Kind;
    let kind = match error.kind() {
        Kind::MaxPayloadExceeded => TransportErrorKind::PayloadTooLarge,
        Kind::BrokenPipe => TransportErrorKind::ConnectionLost,
        _ => TransportErrorKind::NotAcknowledged,
    };
    RpcError::transport(kind, format!("{what}: {error}"))
}

/// A durable emit JetStream did not acknowledge, said as what happened. "No stream found" is what
/// async-nats reports for any publish nobody answered: no stream captures the subject, or the
/// stream exists but has no leader (an election after a node loss). Asking which one costs a
/// round trip, on a path that failed anyway.
async fn explain_unacknowledged(
    jetstream: &async_nats::jetstream::Context,
    route: &str,
    error: async_nats::jetstream::context::PublishError,
    what: &str,
) -> RpcError {
    use async_nats::jetstream::context::PublishErrorKind as Kind;
    if error.kind() != Kind::StreamNotFound {
        return jetstream_error(error, &format!("{what} the event on {route:?}"));
    }
    let lookup = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        jetstream.stream_by_subject(route),
    )
    .await;
    let message = match lookup {
        Ok(Ok(stream)) => format!(
            "{what} the event on {route:?}: the JetStream stream {stream:?} stores it but did not \
             answer (no stream leader: an election after a node loss?); it may or may not be stored"
        ),
        Ok(Err(lookup))
            if lookup.kind()
                == async_nats::jetstream::context::GetStreamByNameErrorKind::NotFound =>
        {
            format!(
                "{what} the event on {route:?}: no JetStream stream stores this subject (a server with \
                 DurableEvents creates one)"
            )
        }
        _ => format!(
            "{what} the event on {route:?}: JetStream did not answer (the stream's leader or \
             JetStream's meta leader is unavailable); it may or may not be stored"
        ),
    };
    RpcError::transport(TransportErrorKind::NotAcknowledged, message)
}

impl ClientTransport for NatsConnection {
    fn request(&self, request: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>> {
        let transport = self.clone();
        // The future is allocated for every request: what it keeps across the publish is kept
        // small (tests/nats.rs holds it under 1024 bytes). The packet is built in a block, so
        // that its temporaries end before the publish, which is most of the future (about 700
        // bytes in async-nats 0.51).
        Box::pin(async move {
            transport.check_connected()?;
            let inner = &transport.inner;
            let (registered, subject, reply_subject, payload, headers) = {
                check_subject(request.pattern().route(), false)?;
                let registered = inner.pending.register(request.pattern())?;
                let n = registered.number();
                let mut digits = [0u8; 20];
                let payload = body(
                    &inner.codec,
                    &request,
                    Some(packet_id(n, &mut digits)),
                    inner.deadline_header,
                )?;
                let headers = outgoing_headers(&request, inner.deadline_header)?;
                let subject = route_subject(request.pattern().route_arc());
                (
                    registered,
                    subject,
                    reply_subject(&inner.inbox, n),
                    payload,
                    headers,
                )
            };
            let published = match headers {
                Some(headers) => {
                    inner
                        .client
                        .publish_with_reply_and_headers(subject, reply_subject, headers, payload)
                        .await
                }
                None => {
                    inner
                        .client
                        .publish_with_reply(subject, reply_subject, payload)
                        .await
                }
            };
            published.map_err(|error| publish_error(error, &request))?;
            Ok(registered.into_replies())
        })
    }

    fn emit(&self, event: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>> {
        let transport = self.clone();
        // Two futures rather than one with both paths: the JetStream publish is the larger (about
        // 950 bytes in async-nats 0.51), and every plain event would otherwise carry its room. An
        // event to JetStream waits for the stream's acknowledgement, a round trip anyway, and
        // keeps its size (about 1 350 bytes).
        if let Some(jetstream) = &self.inner.jetstream {
            let jetstream = Arc::clone(jetstream);
            return Box::pin(async move { emit_durable(&transport, &jetstream, &event).await });
        }
        Box::pin(async move { emit_plain(&transport, &event).await })
    }
}

/// Publishes an event with a plain NATS publish.
async fn emit_plain(transport: &NatsConnection, event: &RpcRequest) -> Result<(), RpcError> {
    let (route, payload, headers) = transport.prepare_event(event)?;
    let client = &transport.inner.client;
    match headers {
        Some(headers) => client.publish_with_headers(route, headers, payload).await,
        None => client.publish(route, payload).await,
    }
    .map_err(|error| publish_error(error, event))
}

impl NatsConnection {
    /// An event's subject, body and headers, once the connection and the subject are checked.
    fn prepare_event(
        &self,
        event: &RpcRequest,
    ) -> Result<(String, Bytes, Option<async_nats::HeaderMap>), RpcError> {
        self.check_connected()?;
        let route = event.pattern().route().to_owned();
        check_subject(&route, false)?;
        let inner = &self.inner;
        let payload = body(&inner.codec, event, None, inner.deadline_header)?;
        let headers = outgoing_headers(event, inner.deadline_header)?;
        Ok((route, payload, headers))
    }
}

/// Publishes an event to JetStream and waits for the stream's acknowledgement.
async fn emit_durable(
    transport: &NatsConnection,
    jetstream: &async_nats::jetstream::Context,
    event: &RpcRequest,
) -> Result<(), RpcError> {
    let (route, payload, mut headers) = transport.prepare_event(event)?;
    // One key, one stored event (within the stream's duplicate window).
    if let Some(key) = event.headers().get(IDEMPOTENCY_KEY) {
        headers
            .get_or_insert_with(async_nats::HeaderMap::new)
            .insert(async_nats::header::NATS_MESSAGE_ID, key);
    }
    let acknowledged = match headers {
        Some(headers) => {
            jetstream
                .publish_with_headers(route.clone(), headers, payload)
                .await
        }
        None => jetstream.publish(route.clone(), payload).await,
    };
    let ack = match acknowledged {
        Ok(ack) => ack,
        Err(error) => {
            return Err(explain_unacknowledged(jetstream, &route, error, "cannot publish").await);
        }
    };
    match ack.await {
        Ok(_) => Ok(()),
        Err(error) => {
            Err(
                explain_unacknowledged(jetstream, &route, error, "JetStream did not acknowledge")
                    .await,
            )
        }
    }
}

impl fmt::Debug for NatsConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConnection")
            .field("inbox", &self.inner.inbox)
            .field("connected", &self.inner.connected.load(Ordering::Relaxed))
            .field("pending", &self.inner.pending.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_subjects_are_the_inbox_and_the_request_number() {
        assert_eq!(reply_subject("_INBOX.abc", 0).as_str(), "_INBOX.abc.0");
        assert_eq!(
            reply_subject("_INBOX.abc", u64::MAX).as_str(),
            format!("_INBOX.abc.{}", u64::MAX)
        );
        let long = "x".repeat(REPLY_SUBJECT_INLINE);
        assert_eq!(reply_subject(&long, 42).as_str(), format!("{long}.42"));
        let route: Arc<str> = Arc::from("get-user");
        assert_eq!(route_subject(&route).as_str(), "get-user");
    }

    #[test]
    fn packet_ids_are_the_request_number_and_replies_must_repeat_it_exactly() {
        let mut buffer = [0u8; 20];
        assert_eq!(packet_id(0, &mut buffer), "0");
        assert_eq!(packet_id(u64::MAX, &mut buffer), u64::MAX.to_string());
        assert!(is_json_id_of(b"\"42\"", 42));
        assert!(is_json_id_of(
            format!("\"{}\"", u64::MAX).as_bytes(),
            u64::MAX
        ));
        for other in [
            &b"\"43\""[..],
            b"\"042\"",
            b"\"4\"",
            b"\"420\"",
            b"42",
            b"\"42",
            b"42\"",
            b"\"\"",
            b"",
            b"\"",
        ] {
            assert!(
                !is_json_id_of(other, 42),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
