use super::codec::{framed, framed_binary};
use super::outbox::{Closer, FrameSender, outbox};
use super::{FrameReader, Read, TcpOptions};
use crate::rpc::transport::{ClientTransport, ReplyPacket, ReplyReceiver};
use crate::rpc::wire::{
    CodecError, PacketIds, PendingRequests, SharedCodec, encode_request_within, wire_pattern,
};
use crate::rpc::{RpcError, RpcRequest, TransportErrorKind};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Reconnect backoff after a failed connection attempt: doubles from here...
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// ...up to here.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where a [`TcpTransport`] connects: a socket address, or a host name and port resolved at each
/// connection attempt (so a service that moves is found again).
///
/// ```
/// use palisade::rpc::transport::tcp::TcpAddress;
/// use std::net::{Ipv4Addr, SocketAddr};
///
/// let by_name = TcpAddress::from("users.internal:3000");
/// let by_pair = TcpAddress::from(("users.internal", 3000));
/// let by_socket = TcpAddress::from(SocketAddr::from((Ipv4Addr::LOCALHOST, 3000)));
/// assert_eq!(by_name.to_string(), by_pair.to_string());
/// assert_eq!(by_socket.to_string(), "127.0.0.1:3000");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TcpAddress(Address);

#[derive(Clone, PartialEq, Eq)]
enum Address {
    Socket(SocketAddr),
    Host(String, u16),
    /// Text that is not `host:port`; connecting reports it.
    Text(String),
}

impl TcpAddress {
    async fn connect(&self) -> std::io::Result<TcpStream> {
        match &self.0 {
            Address::Socket(addr) => TcpStream::connect(addr).await,
            Address::Host(host, port) => TcpStream::connect((host.as_str(), *port)).await,
            Address::Text(text) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{text:?} is not an address (expected host:port)"),
            )),
        }
    }
}

impl From<SocketAddr> for TcpAddress {
    fn from(addr: SocketAddr) -> Self {
        TcpAddress(Address::Socket(addr))
    }
}

impl From<(IpAddr, u16)> for TcpAddress {
    fn from(addr: (IpAddr, u16)) -> Self {
        TcpAddress(Address::Socket(addr.into()))
    }
}

impl From<([u8; 4], u16)> for TcpAddress {
    fn from(addr: ([u8; 4], u16)) -> Self {
        TcpAddress(Address::Socket(addr.into()))
    }
}

impl From<(&str, u16)> for TcpAddress {
    fn from((host, port): (&str, u16)) -> Self {
        match host.parse::<IpAddr>() {
            Ok(ip) => TcpAddress::from((ip, port)),
            Err(_) => TcpAddress(Address::Host(host.to_owned(), port)),
        }
    }
}

impl From<&str> for TcpAddress {
    fn from(text: &str) -> Self {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return TcpAddress::from(addr);
        }
        match text
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()))
        {
            Some((host, Ok(port))) if !host.is_empty() => {
                TcpAddress::from((host.trim_start_matches('[').trim_end_matches(']'), port))
            }
            _ => TcpAddress(Address::Text(text.to_owned())),
        }
    }
}

impl From<String> for TcpAddress {
    fn from(text: String) -> Self {
        TcpAddress::from(text.as_str())
    }
}

impl From<&String> for TcpAddress {
    fn from(text: &String) -> Self {
        TcpAddress::from(text.as_str())
    }
}

impl fmt::Display for TcpAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Address::Socket(addr) => write!(f, "{addr}"),
            Address::Host(host, port) => write!(f, "{host}:{port}"),
            Address::Text(text) => f.write_str(text),
        }
    }
}

impl fmt::Debug for TcpAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TcpAddress({self})")
    }
}

/// One open connection: its writer's queue and the requests waiting for replies. Dropping it
/// (the transport reconnected, or was dropped) stops its reader, and the writer ends when the
/// last frame is out: the socket and both tasks are released.
struct Connection {
    frames: FrameSender,
    pending: Arc<PendingRequests>,
    max_frame_len: usize,
    codec: SharedCodec,
    /// Dropped with the connection: tells the reader to stop.
    _stop_reader: oneshot::Sender<()>,
}

/// The transport's connection and reconnection state, shared by every clone.
struct Shared {
    addr: TcpAddress,
    options: TcpOptions,
    ids: PacketIds,
    /// The live connection, if any. A reader whose connection ends removes it from here, so a
    /// lost connection's socket is released at once, not at the next request.
    current: Mutex<Option<Arc<Connection>>>,
    /// Held while connecting, so concurrent requests wait for one attempt.
    connecting: tokio::sync::Mutex<Attempts>,
}

#[derive(Default)]
struct Attempts {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

impl Shared {
    fn current(&self) -> Option<Arc<Connection>> {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .filter(|connection| !connection.pending.is_closed())
            .cloned()
    }

    /// Forgets the connection at `address` if it is still the current one.
    fn forget(&self, address: usize) {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current
            .as_ref()
            .is_some_and(|live| Arc::as_ptr(live) as usize == address)
        {
            *current = None;
        }
    }
}

/// The client side of the TCP transport: one connection, opened lazily and shared by every clone,
/// multiplexing requests by id like NestJS's `ClientTCP`. Dropping the last clone closes the
/// connection (requests still waiting fail with `Unavailable`).
#[derive(Clone)]
pub struct TcpTransport {
    shared: Arc<Shared>,
}

impl TcpTransport {
    /// A transport to the server at `addr` (a `SocketAddr`, `"host:port"`, `("host", port)`, ...;
    /// see [`TcpAddress`]); nothing is opened until the first request.
    pub fn new(addr: impl Into<TcpAddress>) -> Self {
        TcpTransport::with_options(addr, TcpOptions::default())
    }

    /// With these options.
    pub fn with_options(addr: impl Into<TcpAddress>, options: TcpOptions) -> Self {
        TcpTransport {
            shared: Arc::new(Shared {
                addr: addr.into(),
                options,
                ids: PacketIds::new(),
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(Attempts::default()),
            }),
        }
    }

    /// The server address.
    pub fn addr(&self) -> &TcpAddress {
        &self.shared.addr
    }

    /// Replies dropped because their request was no longer waiting (it timed out, or its caller
    /// went away), on the current connection.
    pub fn late_replies(&self) -> u64 {
        self.shared
            .current()
            .map_or(0, |connection| connection.pending.late_replies())
    }

    async fn connection(&self) -> Result<Arc<Connection>, RpcError> {
        if let Some(connection) = self.shared.current() {
            return Ok(connection);
        }
        let mut attempts = self.shared.connecting.lock().await;
        // Someone else may have connected while we waited.
        if let Some(connection) = self.shared.current() {
            return Ok(connection);
        }
        if let Some(retry_at) = attempts.retry_at {
            let now = Instant::now();
            if now < retry_at {
                return Err(RpcError::transport(
                    TransportErrorKind::Connect,
                    format!(
                        "cannot connect to {}: {}; next attempt in {:?}",
                        self.shared.addr,
                        attempts.last_error,
                        retry_at - now
                    ),
                )
                .with_retry_after(retry_at - now));
            }
        }
        match self.open().await {
            Ok(connection) => {
                *attempts = Attempts::default();
                *self
                    .shared
                    .current
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                    Some(Arc::clone(&connection));
                Ok(connection)
            }
            Err(error) => {
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << attempts.failures.min(16))
                    .min(MAX_BACKOFF);
                attempts.failures = attempts.failures.saturating_add(1);
                attempts.retry_at = Some(Instant::now() + backoff);
                attempts.last_error.clone_from(&error);
                Err(RpcError::transport(
                    TransportErrorKind::Connect,
                    format!("cannot connect to {}: {error}", self.shared.addr),
                ))
            }
        }
    }

    async fn open(&self) -> Result<Arc<Connection>, String> {
        let options = &self.shared.options;
        let stream = tokio::time::timeout(options.connect_timeout, self.shared.addr.connect())
            .await
            .map_err(|_| format!("no answer within {:?}", options.connect_timeout))?
            .map_err(|error| error.to_string())?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let (frames, writer) = outbox(write);
        let pending = PendingRequests::with_ids(self.shared.ids);
        let (stop_reader, stopped) = oneshot::channel();
        let connection = Arc::new(Connection {
            frames,
            pending: Arc::clone(&pending),
            max_frame_len: options.max_frame_len,
            codec: options.codec.clone(),
            _stop_reader: stop_reader,
        });
        // The writer holds only the socket's write half: it ends when the connection's senders
        // are gone (after writing what they queued) or the connection is closed.
        let write_timeout = options.write_timeout;
        let closer = connection.frames.closer();
        let writer_pending = Arc::clone(&pending);
        tokio::spawn(async move {
            if let Err(error) = writer.run(write_timeout).await {
                writer_pending.close(&RpcError::transport(
                    TransportErrorKind::Io,
                    format!("connection closed: {error}"),
                ));
            }
        });
        let reader = FrameReader::new(read, options);
        tokio::spawn(read_replies(
            reader,
            pending,
            options.codec.clone(),
            closer,
            stopped,
            Arc::downgrade(&self.shared),
            Arc::as_ptr(&connection) as usize,
        ));
        Ok(connection)
    }
}

/// The connection's reader: delivers replies until the connection ends, then fails what is still
/// pending, closes the connection and forgets it.
async fn read_replies(
    mut reader: FrameReader,
    pending: Arc<PendingRequests>,
    codec: SharedCodec,
    closer: Closer,
    mut stopped: oneshot::Receiver<()>,
    shared: Weak<Shared>,
    connection: usize,
) {
    let addr = shared
        .upgrade()
        .map(|shared| shared.addr.to_string())
        .unwrap_or_default();
    let mut dropped = false;
    let error = loop {
        let next = tokio::select! {
            biased;
            next = reader.next() => next,
            _ = &mut stopped => {
                dropped = true;
                break RpcError::transport(
                    TransportErrorKind::ConnectionLost,
                    "connection closed: the client was dropped before the reply came",
                );
            }
        };
        match next {
            Ok(Read::Frame(frame)) => {
                if let Err(error) = deliver(&pending, &codec, &frame.json) {
                    tracing::warn!(server = %addr, %error, "closing connection: a reply could not be read");
                    break RpcError::transport(
                        TransportErrorKind::Protocol,
                        format!("connection closed: invalid reply from {addr}: {error}"),
                    );
                }
            }
            Ok(Read::Closed) => {
                break RpcError::transport(
                    TransportErrorKind::ConnectionLost,
                    format!("connection closed by the server at {addr}"),
                );
            }
            Ok(Read::Idle) => {}
            Err(error) => {
                tracing::warn!(server = %addr, %error, "closing connection: invalid data received");
                break RpcError::transport(
                    TransportErrorKind::Protocol,
                    format!("connection closed: data from {addr} is not valid: {error}"),
                );
            }
        }
    };
    pending.close(&error);
    // A dropped client's writer still writes what was queued (an event just emitted), then
    // half-closes; a broken connection is shut at once.
    if !dropped {
        closer.close();
    }
    if let Some(shared) = shared.upgrade() {
        shared.forget(connection);
    }
}

/// Routes one reply frame to the request waiting for it; replies for unknown ids (requests
/// already given up on) are dropped and counted, as NestJS drops them. A reply without an id
/// that carries an error is the server explaining why it is about to close the connection: every
/// waiting request fails with it, and the connection takes no new ones.
fn deliver(
    pending: &PendingRequests,
    codec: &SharedCodec,
    frame: &Bytes,
) -> Result<(), CodecError> {
    let (id, packet) = codec.decode_reply(frame)?;
    let Some(id) = id else {
        if let ReplyPacket::Error(err) = packet {
            let error = RpcError::from_wire_json(&err);
            tracing::warn!(%error, "the server refused the connection's data");
            // It closes the connection next: no request goes out on it any more.
            pending.close(&error);
        } else {
            tracing::debug!("reply without an id dropped");
        }
        return Ok(());
    };
    match pending.ids().parse_json(id.as_bytes()) {
        Some(n) => {
            pending.deliver(n, packet);
        }
        None => tracing::debug!(%id, "reply for an id this client never sent dropped"),
    }
    Ok(())
}

fn frame_of(
    codec: &SharedCodec,
    request: &RpcRequest,
    id: Option<&str>,
    max_units: usize,
) -> Result<Vec<u8>, RpcError> {
    // NestJS sends an event's pattern as its route string, a request's as the raw pattern.
    let pattern = wire_pattern(request);
    if !codec.is_json() {
        let headers = request.wire_headers();
        return framed_binary(max_units, |body| {
            codec.encode_request(body, &pattern, request.payload(), id, &headers)
        })
        .map_err(|error| {
            RpcError::invalid_argument(format!(
                "cannot encode the message for '{}': {error}",
                request.pattern()
            ))
        })?
        .map_err(|bytes| {
            RpcError::transport(
                TransportErrorKind::PayloadTooLarge,
                format!(
                    "the message for '{}' is {bytes} bytes, over the frame limit of {max_units}",
                    request.pattern()
                ),
            )
        });
    }
    framed(max_units, |json| {
        encode_request_within(
            json,
            &pattern,
            request.payload(),
            id,
            request.headers(),
            request.wire_timeout_millis(),
        )
    })
    .map_err(|units| {
        RpcError::transport(
            TransportErrorKind::PayloadTooLarge,
            format!(
                "the message for '{}' is {units} UTF-16 units, over the frame limit of {max_units}",
                request.pattern()
            ),
        )
    })
}

fn closed() -> RpcError {
    RpcError::transport(TransportErrorKind::ConnectionLost, "the connection closed")
}

impl ClientTransport for TcpTransport {
    fn request(&self, request: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>> {
        let transport = self.clone();
        Box::pin(async move {
            let connection = transport.connection().await?;
            let registered = connection.pending.register(request.pattern())?;
            let frame = frame_of(
                &connection.codec,
                &request,
                Some(registered.id().as_str()),
                connection.max_frame_len,
            )?;
            // Alone on the connection: nothing to batch this request with.
            let alone = connection.pending.len() == 1;
            connection
                .frames
                .send(&frame, alone)
                .await
                .map_err(|_| closed())?;
            Ok(registered.into_replies())
        })
    }

    fn emit(&self, event: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>> {
        let transport = self.clone();
        Box::pin(async move {
            let connection = transport.connection().await?;
            let frame = frame_of(&connection.codec, &event, None, connection.max_frame_len)?;
            let alone = connection.pending.is_empty();
            connection
                .frames
                .send(&frame, alone)
                .await
                .map_err(|_| closed())
        })
    }
}

impl fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpTransport")
            .field("addr", &self.shared.addr)
            .field("connected", &self.shared.current().is_some())
            .finish_non_exhaustive()
    }
}
