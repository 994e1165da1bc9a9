use super::codec::framed;
use super::outbox::{FrameSender, outbox};
use super::{FrameReader, TcpOptions};
use crate::rng::{SharedRng, mix};
use crate::rpc::packet::{decode_reply, encode_request};
use crate::rpc::transport::{
    ClientTransport, ReplyPacket, ReplyReceiver, ReplySender, error_json, reply_channel,
};
use crate::rpc::{Kind, RawJson, RpcError, RpcRequest};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Reconnect backoff after a failed connection attempt: doubles from here...
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// ...up to here.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

type Pending = HashMap<Bytes, ReplySender>;

/// One open connection: its writer's queue and the requests waiting for replies.
struct Connection {
    frames: FrameSender,
    pending: Mutex<Pending>,
    closed: AtomicBool,
}

impl Connection {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Fails every pending request; later registrations are refused.
    fn close(&self, why: &str) {
        self.closed.store(true, Ordering::Release);
        let waiting: Vec<_> = self.pending().drain().collect();
        if !waiting.is_empty() {
            tracing::debug!(
                pending = waiting.len(),
                why,
                "connection lost; failing pending requests"
            );
        }
        let error = error_json(&RpcError::unavailable(format!("connection closed: {why}")));
        for (_, mut replies) in waiting {
            replies.try_send(ReplyPacket::Error(error.clone()));
        }
    }
}

enum State {
    Disconnected {
        failures: u32,
        retry_at: Option<Instant>,
        last_error: String,
    },
    Connected(Arc<Connection>),
}

struct Inner {
    addr: String,
    options: TcpOptions,
    state: tokio::sync::Mutex<State>,
    id_prefix: u64,
    next_id: AtomicU64,
}

/// The client side of the TCP transport: one connection, opened lazily and shared by every clone,
/// multiplexing requests by id like NestJS's `ClientTCP`.
#[derive(Clone)]
pub struct TcpTransport {
    inner: Arc<Inner>,
}

impl TcpTransport {
    /// A transport to the server at `addr` (`host:port`); nothing is opened until the first
    /// request.
    pub fn new(addr: impl Into<String>) -> Self {
        TcpTransport::with_options(addr, TcpOptions::default())
    }

    /// With these options.
    pub fn with_options(addr: impl Into<String>, options: TcpOptions) -> Self {
        TcpTransport {
            inner: Arc::new(Inner {
                addr: addr.into(),
                options,
                state: tokio::sync::Mutex::new(State::Disconnected {
                    failures: 0,
                    retry_at: None,
                    last_error: String::new(),
                }),
                id_prefix: SharedRng::entropy(),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// The server address.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// A fresh request id: 21 lowercase hex digits, like NestJS's.
    fn next_id(&self) -> String {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        format!(
            "{:05x}{:016x}",
            self.inner.id_prefix & 0xF_FFFF,
            mix(n ^ self.inner.id_prefix)
        )
    }

    async fn connection(&self) -> Result<Arc<Connection>, RpcError> {
        let mut state = self.inner.state.lock().await;
        if let State::Connected(connection) = &*state {
            if !connection.closed.load(Ordering::Acquire) {
                return Ok(Arc::clone(connection));
            }
            *state = State::Disconnected {
                failures: 0,
                retry_at: None,
                last_error: String::new(),
            };
        }
        let State::Disconnected {
            failures,
            retry_at,
            last_error,
        } = &*state
        else {
            unreachable!("a live connection was returned above");
        };
        if let Some(retry_at) = *retry_at {
            let now = Instant::now();
            if now < retry_at {
                return Err(RpcError::unavailable(format!(
                    "cannot connect to {}: {last_error}; next attempt in {:?}",
                    self.inner.addr,
                    retry_at - now
                ))
                .with_retry_after(retry_at - now));
            }
        }
        let failures = *failures;
        match self.open().await {
            Ok(connection) => {
                *state = State::Connected(Arc::clone(&connection));
                Ok(connection)
            }
            Err(error) => {
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << failures.min(16))
                    .min(MAX_BACKOFF);
                *state = State::Disconnected {
                    failures: failures.saturating_add(1),
                    retry_at: Some(Instant::now() + backoff),
                    last_error: error.clone(),
                };
                Err(RpcError::unavailable(format!(
                    "cannot connect to {}: {error}",
                    self.inner.addr
                )))
            }
        }
    }

    async fn open(&self) -> Result<Arc<Connection>, String> {
        let stream = tokio::time::timeout(
            self.inner.options.connect_timeout,
            TcpStream::connect(&self.inner.addr),
        )
        .await
        .map_err(|_| format!("no answer within {:?}", self.inner.options.connect_timeout))?
        .map_err(|error| error.to_string())?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let (frames, writer) = outbox(write);
        let connection = Arc::new(Connection {
            frames,
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        let writer_connection = Arc::clone(&connection);
        let write_timeout = self.inner.options.write_timeout;
        tokio::spawn(async move {
            if let Err(error) = writer.run(write_timeout).await {
                writer_connection.close(&error.to_string());
            }
        });
        let reader_connection = Arc::clone(&connection);
        let mut reader = FrameReader::new(read, &self.inner.options);
        let addr = self.inner.addr.clone();
        tokio::spawn(async move {
            let why = loop {
                match reader.next().await {
                    None => break "the server closed the connection".to_owned(),
                    Some(Err(error)) => {
                        tracing::warn!(server = %addr, %error, "closing connection: invalid data received");
                        break error.to_string();
                    }
                    Some(Ok(frame)) => {
                        if let Err(error) = deliver(&reader_connection, &frame) {
                            tracing::warn!(server = %addr, %error, "closing connection: a reply is not valid JSON");
                            break format!("invalid reply: {error}");
                        }
                    }
                }
            };
            reader_connection.close(&why);
        });
        Ok(connection)
    }
}

/// Routes one reply frame to the request waiting for it; replies for unknown ids (requests
/// already given up on) are dropped, as NestJS does.
fn deliver(connection: &Connection, frame: &Bytes) -> Result<(), serde_json::Error> {
    let (id, packet) = decode_reply(frame)?;
    let Some(id) = id else {
        tracing::debug!("reply without an id dropped");
        return Ok(());
    };
    let key = Bytes::copy_from_slice(id.as_bytes());
    let mut pending = connection.pending();
    let last = packet.is_last();
    match pending.get_mut(&key) {
        Some(replies) => {
            replies.try_send(packet);
            if last {
                pending.remove(&key);
            }
        }
        None => tracing::debug!(id = %id, "late reply dropped"),
    }
    Ok(())
}

/// Forgets a request when its caller stops listening, so late replies are dropped.
struct Registration {
    connection: Arc<Connection>,
    key: Bytes,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.connection.pending().remove(&self.key);
    }
}

fn frame_of(request: &RpcRequest, id: Option<&str>) -> Vec<u8> {
    // NestJS sends an event's pattern as its route string, a request's as the raw pattern.
    let event_pattern;
    let pattern = match request.kind() {
        Kind::Request => request.pattern().raw(),
        Kind::Event => {
            event_pattern =
                RawJson::to_json(request.pattern().route()).expect("a string serialises");
            &event_pattern
        }
    };
    framed(|json| {
        encode_request(
            json,
            pattern,
            request.payload(),
            id,
            &request.wire_headers(),
        )
    })
}

impl ClientTransport for TcpTransport {
    fn request(&self, request: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>> {
        let transport = self.clone();
        Box::pin(async move {
            let connection = transport.connection().await?;
            let id = transport.next_id();
            let key = Bytes::from(format!("\"{id}\""));
            // Unbounded: the connection's reader must never wait on one slow caller.
            let (replies, receiver) = reply_channel(None);
            let alone = {
                let mut pending = connection.pending();
                if connection.closed.load(Ordering::Acquire) {
                    return Err(RpcError::unavailable("connection closed"));
                }
                pending.insert(key.clone(), replies);
                pending.len() == 1
            };
            let registration = Registration {
                connection: Arc::clone(&connection),
                key,
            };
            if connection
                .frames
                .send(&frame_of(&request, Some(&id)), alone)
                .await
                .is_err()
            {
                return Err(RpcError::unavailable("connection closed"));
            }
            Ok(receiver.with_registration(Box::new(registration)))
        })
    }

    fn emit(&self, event: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>> {
        let transport = self.clone();
        Box::pin(async move {
            let connection = transport.connection().await?;
            let alone = connection.pending().is_empty();
            connection
                .frames
                .send(&frame_of(&event, None), alone)
                .await
                .map_err(|_| RpcError::unavailable("connection closed"))
        })
    }
}

impl fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpTransport")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}
