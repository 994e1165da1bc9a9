use super::{NatsOptions, check_subject, to_nats_headers};
use crate::rng::{SharedRng, mix};
use crate::rpc::json::encoded;
use crate::rpc::packet::{decode_reply, encode_request};
use crate::rpc::transport::{
    ClientTransport, Connect, ReplyPacket, ReplyReceiver, ReplySender, error_json, reply_channel,
};
use crate::rpc::{Headers, RawJson, RpcError, RpcRequest};
use async_nats::Subject;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

struct Waiting {
    replies: ReplySender,
    /// For the no-responders error.
    route: Arc<str>,
}

const PACKET_ID_LEN: usize = 21;

/// Shards of the pending-request map.
const PENDING_SHARDS: usize = 16;

/// A request's packet id, formatted on the stack.
struct PacketId([u8; PACKET_ID_LEN]);

impl PacketId {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

/// What the connection-event callback shares with the transport.
struct State {
    /// Requests waiting for replies, sharded by request number: callers register and forget
    /// requests on their threads while the inbox reader delivers on another, and one map behind
    /// one lock made them queue for it (a contended lock is a futex call each time).
    pending: [Mutex<HashMap<u64, Waiting>>; PENDING_SHARDS],
    connected: AtomicBool,
    /// Mixed into packet ids, so that ids differ between clients.
    id_prefix: u64,
}

impl State {
    /// The packet id of request `n`: 21 hex digits, derived again when its replies arrive
    /// instead of being stored per request.
    fn packet_id(&self, n: u64) -> PacketId {
        let mut id = [0u8; PACKET_ID_LEN];
        let mut digits =
            (u128::from(self.id_prefix & 0xF_FFFF) << 64) | u128::from(mix(n ^ self.id_prefix));
        for byte in id.iter_mut().rev() {
            *byte = b"0123456789abcdef"[(digits & 0xF) as usize];
            digits >>= 4;
        }
        PacketId(id)
    }

    fn new(id_prefix: u64) -> State {
        State {
            pending: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            connected: AtomicBool::new(true),
            id_prefix,
        }
    }

    /// The shard holding request `n`.
    fn pending(&self, n: u64) -> MutexGuard<'_, HashMap<u64, Waiting>> {
        self.pending[(n % PENDING_SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Fails every pending request (the connection to the broker is gone; replies could not
    /// arrive, or could arrive for a request its caller has long given up on).
    fn fail_all(&self, why: &str) {
        let waiting: Vec<_> = (0..PENDING_SHARDS as u64)
            .flat_map(|shard| self.pending(shard).drain().collect::<Vec<_>>())
            .collect();
        if waiting.is_empty() {
            return;
        }
        tracing::debug!(
            pending = waiting.len(),
            why,
            "failing pending NATS requests"
        );
        let error = error_json(&RpcError::unavailable(why.to_owned()));
        for (_, mut waiting) in waiting {
            waiting.replies.try_send(ReplyPacket::Error(error.clone()));
        }
    }
}

struct Inner {
    client: async_nats::Client,
    state: Arc<State>,
    /// Replies come to `<inbox>.<n>`, one subscription on `<inbox>.*` for all requests.
    inbox: String,
    next: AtomicU64,
    jetstream: Option<async_nats::jetstream::Context>,
}

/// The client side of the NATS transport: requests with a reply subject on one multiplexed inbox,
/// events by plain publish (or, with [`durable_events`](Self::durable_events), by JetStream
/// publish, acknowledged by the stream).
///
/// Usually created through [`ClientBuilder::connect`](crate::rpc::ClientBuilder::connect) with
/// [`NatsOptions`]; clones share the connection.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

impl NatsTransport {
    /// Connects to NATS; a bad URL, an unreachable broker or refused credentials fail here with a
    /// clear error.
    pub async fn connect(options: &NatsOptions) -> Result<NatsTransport, RpcError> {
        let state = Arc::new(State::new(SharedRng::entropy()));
        let events = Arc::clone(&state);
        let client = options
            .connect(move |event| match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("lost the connection to the NATS server; reconnecting");
                    events.connected.store(false, Ordering::Release);
                    events.fail_all("connection to the NATS server lost");
                }
                async_nats::Event::Connected => {
                    tracing::info!("connected to the NATS server");
                    events.connected.store(true, Ordering::Release);
                }
                other => tracing::debug!(event = %other, "NATS connection event"),
            })
            .await?;
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|error| {
                RpcError::unavailable(format!("cannot subscribe to the reply inbox: {error}"))
            })?;
        let router = Arc::clone(&state);
        tokio::spawn(async move {
            while let Some(message) = replies.next().await {
                deliver(&router, message);
            }
        });
        Ok(NatsTransport {
            inner: Arc::new(Inner {
                client,
                state,
                inbox,
                next: AtomicU64::new(0),
                jetstream: None,
            }),
        })
    }

    /// Publishes events through JetStream: each `emit` resolves once a stream stored the event
    /// (at-least-once delivery to [durable event handlers](super::DurableEvents)). A stream must
    /// capture the event subjects — a [`NatsServer`](super::NatsServer) with durable events creates
    /// one — or `emit` fails with `Unavailable`.
    ///
    /// # Panics
    /// If the transport was cloned before (configure it first).
    pub fn durable_events(mut self) -> Self {
        let inner =
            Arc::get_mut(&mut self.inner).expect("configure the NATS transport before cloning it");
        inner.jetstream = Some(async_nats::jetstream::new(inner.client.clone()));
        self
    }

    /// The underlying `async-nats` client.
    pub fn nats_client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    fn check_connected(&self) -> Result<(), RpcError> {
        if self.inner.state.connected.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(RpcError::unavailable(
                "not connected to the NATS server (reconnecting)",
            ))
        }
    }
}

/// Routes one message from the inbox to the request waiting for it.
fn deliver(state: &State, message: async_nats::Message) {
    let Some(n) = message
        .subject
        .rsplit('.')
        .next()
        .and_then(|token| token.parse::<u64>().ok())
    else {
        return;
    };
    let mut pending = state.pending(n);
    let Some(waiting) = pending.get_mut(&n) else {
        tracing::debug!(subject = %message.subject, "late reply dropped");
        return;
    };
    let no_responders =
        message.status == Some(async_nats::StatusCode::NO_RESPONDERS) || message.payload.is_empty();
    let packet = if no_responders {
        // NestJS: "Empty response. There are no subscribers listening to that message".
        let error = RpcError::unavailable(format!(
            "There are no subscribers listening to that message (\"{}\")",
            waiting.route
        ));
        ReplyPacket::Error(error_json(&error))
    } else {
        match decode_reply(&message.payload) {
            Ok((id, packet)) => {
                let expected = state.packet_id(n);
                let matches = |id: &RawJson| {
                    id.as_str()
                        .strip_prefix('"')
                        .and_then(|id| id.strip_suffix('"'))
                        == Some(expected.as_str())
                };
                if id.as_ref().is_some_and(|id| !matches(id)) {
                    tracing::debug!("reply for another request id ignored");
                    return;
                }
                packet
            }
            Err(error) => {
                tracing::warn!(%error, "a reply is not valid JSON");
                let error = RpcError::unavailable(format!("invalid reply: {error}"));
                ReplyPacket::Error(error_json(&error))
            }
        }
    };
    let last = packet.is_last();
    waiting.replies.try_send(packet);
    if last {
        pending.remove(&n);
    }
}

/// Forgets a request when its caller stops listening.
struct Registration {
    state: Arc<State>,
    n: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.state.pending(self.n).remove(&self.n);
    }
}

fn body(request: &RpcRequest, id: Option<&str>) -> Bytes {
    encoded(|body| {
        // Headers travel as NATS headers, not in the body.
        encode_request(
            body,
            request.pattern().raw(),
            request.payload(),
            id,
            &Headers::new(),
        )
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
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = n;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let digits = &digits[start..];
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

fn publish_error(error: impl fmt::Display) -> RpcError {
    RpcError::unavailable(format!("cannot publish to NATS: {error}"))
}

impl ClientTransport for NatsTransport {
    fn request(&self, request: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>> {
        let transport = self.clone();
        Box::pin(async move {
            transport.check_connected()?;
            let route = request.pattern().route();
            check_subject(route, false)?;
            let inner = &transport.inner;
            let n = inner.next.fetch_add(1, Ordering::Relaxed);
            let id = inner.state.packet_id(n);
            // Unbounded: the inbox's reader must never wait on one slow caller.
            let (replies, receiver) = reply_channel(None);
            inner.state.pending(n).insert(
                n,
                Waiting {
                    replies,
                    route: Arc::clone(request.pattern().route_arc()),
                },
            );
            let registration = Registration {
                state: Arc::clone(&inner.state),
                n,
            };
            let reply_subject = reply_subject(&inner.inbox, n);
            let payload = body(&request, Some(id.as_str()));
            let published = match to_nats_headers(&request.wire_headers()) {
                Some(headers) => {
                    inner
                        .client
                        .publish_with_reply_and_headers(
                            route_subject(request.pattern().route_arc()),
                            reply_subject,
                            headers,
                            payload,
                        )
                        .await
                }
                None => {
                    inner
                        .client
                        .publish_with_reply(
                            route_subject(request.pattern().route_arc()),
                            reply_subject,
                            payload,
                        )
                        .await
                }
            };
            published.map_err(publish_error)?;
            Ok(receiver.with_registration(Box::new(registration)))
        })
    }

    fn emit(&self, event: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>> {
        let transport = self.clone();
        Box::pin(async move {
            transport.check_connected()?;
            let route = event.pattern().route().to_owned();
            check_subject(&route, false)?;
            let inner = &transport.inner;
            let payload = body(&event, None);
            let headers = to_nats_headers(&event.wire_headers());
            if let Some(jetstream) = &inner.jetstream {
                let acknowledged = match headers {
                    Some(headers) => {
                        jetstream
                            .publish_with_headers(route.clone(), headers, payload)
                            .await
                    }
                    None => jetstream.publish(route.clone(), payload).await,
                };
                let ack = acknowledged.map_err(publish_error)?;
                return ack.await.map(drop).map_err(|error| {
                    RpcError::unavailable(format!(
                        "no JetStream stream stored the event on {route:?}: {error}"
                    ))
                });
            }
            match headers {
                Some(headers) => {
                    inner
                        .client
                        .publish_with_headers(route, headers, payload)
                        .await
                }
                None => inner.client.publish(route, payload).await,
            }
            .map_err(publish_error)
        })
    }
}

impl fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsTransport")
            .field("inbox", &self.inner.inbox)
            .field(
                "connected",
                &self.inner.state.connected.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl Connect for NatsOptions {
    type Transport = NatsTransport;

    async fn connect(self) -> Result<NatsTransport, RpcError> {
        NatsTransport::connect(&self).await
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
    fn packet_ids_are_21_hex_digits_unique_per_request() {
        let state = State::new(0x1234_5678_9abc_def0);
        let id = state.packet_id(7);
        assert_eq!(
            id.as_str(),
            format!(
                "{:05x}{:016x}",
                0x1234_5678_9abc_def0_u64 & 0xF_FFFF,
                mix(7 ^ 0x1234_5678_9abc_def0)
            )
        );
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|n| state.packet_id(n).as_str().to_owned())
            .collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| id.len() == 21));
    }
}
