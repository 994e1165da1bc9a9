//! NestJS's `Transport.TCP`: `<length>#<json>` frames over one TCP connection per client,
//! requests multiplexed by id.
//!
//! A palisade service joins a NestJS fleet in both directions: a NestJS `ClientProxy` can call a
//! [`TcpServer`], and a palisade [`Client`](crate::rpc::Client) over a [`TcpTransport`] can call a
//! NestJS microservice.
//!
//! ```no_run
//! use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
//! use palisade::rpc::{Client, Router, Server};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::new(Router::new().message("ping", || async { "pong" }))
//!     .serve(TcpServer::bind("127.0.0.1:3000").await?)
//!     .await?;
//!
//! let client = Client::builder().connect(TcpTransport::new("127.0.0.1:3000")).await?;
//! let pong: String = client.send("ping", &()).await?;
//! server.shutdown().await;
//! # let _ = pong; Ok(()) }
//! ```
//!
//! # Robustness
//!
//! Every limit below is a [`TcpOptions`] setting; the defaults are listed there.
//!
//! - Frames may arrive coalesced or split anywhere, even inside a multi-byte character.
//! - A malformed frame (a length that is not a number, a frame over the size limit, invalid UTF-8,
//!   invalid JSON) closes that connection with a logged, specific error; other connections carry
//!   on. Before closing, the server sends the peer a packet without an id that says why
//!   (`{"err":{"status":"error","message":"The packet length (…) exceeds the maximum allowed
//!   length (…)",…},"isDisposed":true}`): NestJS clients ignore a reply without an id, palisade
//!   clients fail their pending requests with it instead of a bare "connection closed".
//! - Each frame must arrive whole within the frame timeout, counted from its first byte: a peer
//!   that trickles a frame byte by byte (slowloris) is dropped on time. A connection with nothing
//!   in flight that sends nothing for the idle timeout is closed.
//! - The bytes of frames being received and handled count against a server-wide memory budget:
//!   a connection whose frame does not fit waits (is not read) until memory frees, so many
//!   connections cannot together exhaust the memory a frame limit alone would allow.
//! - The server handles requests concurrently: a handler that waits (on I/O, a timer, another
//!   service) does not hold up the next frame. A handler takes its first step — up to its first
//!   `.await` — on the connection's task, which saves a task per request; one that computes
//!   before its first `.await` therefore holds up its own connection's next frames meanwhile.
//!   Other connections normally carry on on tokio's other workers, but a task the blocked worker
//!   woke last can wait with it: tokio's LIFO slot is never stolen. Move such work to `tokio::task::spawn_blocking`, or serve with
//!   [`Server::spawn_handlers`](crate::rpc::Server::spawn_handlers). Events go through a lane of
//!   their own and start in the order they arrived. The server stops reading from a connection
//!   whose peer does not read its replies (and drops it if it accepts nothing for the write
//!   timeout), limits connections, and drains on shutdown.
//! - Frames are checked against the size limit when they are written, too: a request too large
//!   fails at once with `InvalidArgument`, and a reply too large is answered with an error saying
//!   so.
//! - The client opens its connection lazily, matches replies by id in any order, drops late
//!   replies, fails every pending request at once with `Unavailable` when the connection is lost,
//!   and reconnects on the next request — backing off after failed attempts so that a dead server
//!   is not hammered. A lost connection's socket and tasks are released at once; dropping the
//!   last clone of a client closes its connection.

mod client;
mod codec;
mod outbox;
mod server;

pub use self::client::{TcpAddress, TcpTransport};
pub use self::codec::{FrameError, JsonFrameCodec};
pub use self::server::TcpServer;

use crate::rpc::wire::{Codec, SharedCodec};
use crate::timeout::later;
use bytes::{BufMut, Bytes, BytesMut};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::Decoder;

/// Settings of a TCP client or server. Every setting has a default (see [`new`](Self::new)).
#[derive(Clone, Debug)]
pub struct TcpOptions {
    max_frame_len: usize,
    frame_timeout: Duration,
    idle_timeout: Option<Duration>,
    write_timeout: Duration,
    max_connections: usize,
    max_in_flight_per_connection: usize,
    max_buffered_bytes: usize,
    connect_timeout: Duration,
    codec: SharedCodec,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            max_frame_len: 16 * 1024 * 1024,
            frame_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(600)),
            write_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_in_flight_per_connection: 1024,
            max_buffered_bytes: 256 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            codec: SharedCodec::default(),
        }
    }
}

impl TcpOptions {
    /// The defaults:
    ///
    /// | setting | default | |
    /// |---|---|---|
    /// | [`max_frame_len`](Self::max_frame_len) | 16 Mi UTF-16 units | both sides |
    /// | [`frame_timeout`](Self::frame_timeout) | 30 s | both sides (NestJS's `incompleteMessageTimeout`, but per frame) |
    /// | [`idle_timeout`](Self::idle_timeout) | 10 min | server |
    /// | [`write_timeout`](Self::write_timeout) | 30 s | both sides |
    /// | [`max_connections`](Self::max_connections) | 10 000 | server |
    /// | [`max_in_flight_per_connection`](Self::max_in_flight_per_connection) | 1024 | server |
    /// | [`max_buffered_bytes`](Self::max_buffered_bytes) | 256 MiB | server |
    /// | [`connect_timeout`](Self::connect_timeout) | 5 s | client |
    pub fn new() -> Self {
        TcpOptions::default()
    }

    /// How packets are written and read: NestJS's JSON frames
    /// ([`JsonCodec`](crate::rpc::wire::JsonCodec), the default: `<length>#<json>`, the length in
    /// UTF-16 units), or another [`Codec`] such as
    /// [`MessagePackCodec`](crate::rpc::wire::MessagePackCodec) (feature `msgpack`), whose frames
    /// are `<length>#<body>` with the length in bytes ([`JsonFrameCodec::counting_bytes`]), for
    /// palisade clients and servers that all use it. A server that cannot read a frame closes the
    /// connection after a last packet saying why, in its codec.
    pub fn codec(mut self, codec: impl Codec) -> Self {
        self.codec = SharedCodec::new(codec);
        self
    }

    /// Frames longer than this, in UTF-16 units (the unit of NestJS's length prefix), are refused:
    /// a peer declaring one is disconnected, and sending one fails with `InvalidArgument`.
    pub fn max_frame_len(mut self, units: usize) -> Self {
        self.max_frame_len = units;
        self
    }

    /// A frame must arrive whole within this time from its first byte; a peer that takes longer —
    /// stalled, or trickling bytes to hold the connection (slowloris) — is dropped. NestJS's
    /// `incompleteMessageTimeout` restarts on every read; this deadline does not.
    pub fn frame_timeout(mut self, timeout: Duration) -> Self {
        self.frame_timeout = timeout;
        self
    }

    /// Server: a connection that sends nothing for this long while none of its requests is in
    /// flight is closed (`None`: never). A NestJS or palisade client reconnects on its next
    /// request; a request sent in the instant the server closes fails with `Unavailable` and may
    /// be retried.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// A peer that accepts no data for this long while replies wait to be written is dropped.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Server: connections beyond this many are closed at once.
    pub fn max_connections(mut self, limit: usize) -> Self {
        self.max_connections = limit.max(1);
        self
    }

    /// Server: with this many requests of one connection in flight, the server stops reading from
    /// it until one finishes (a peer that does not read its replies is held back this way).
    pub fn max_in_flight_per_connection(mut self, limit: usize) -> Self {
        self.max_in_flight_per_connection = limit.max(1);
        self
    }

    /// Server: the bytes of frames being received and handled, over all connections, may not
    /// exceed this. A connection whose next frame does not fit is not read until memory frees;
    /// a frame larger than the whole budget is refused like one over
    /// [`max_frame_len`](Self::max_frame_len).
    pub fn max_buffered_bytes(mut self, bytes: usize) -> Self {
        self.max_buffered_bytes = bytes.max(1);
        self
    }

    /// Client: how long to wait for a connection to open.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

/// Reading more than this at once from a connection is not needed for speed, and it bounds what a
/// connection holds between frames.
const READ_CHUNK: usize = 64 * 1024;

/// A frame read off a connection, with its share of the memory budget (released when the frame,
/// and the request it carries, are done with).
pub(crate) struct Frame {
    pub(crate) json: Bytes,
    pub(crate) budget: Option<OwnedSemaphorePermit>,
}

/// A connection's share of the server-wide memory budget: it holds permits for every byte it
/// buffers.
struct Budgeted {
    budget: Arc<Semaphore>,
    total: usize,
    held: Option<OwnedSemaphorePermit>,
}

impl Budgeted {
    fn held(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Holds at least `bytes`, waiting until memory frees. `None` when `bytes` exceeds the whole
    /// budget.
    async fn hold(&mut self, bytes: usize) -> Option<()> {
        let missing = bytes.saturating_sub(self.held());
        if missing == 0 {
            return Some(());
        }
        if bytes > self.total {
            return None;
        }
        let permits = u32::try_from(missing).ok()?;
        let permit = Arc::clone(&self.budget)
            .acquire_many_owned(permits)
            .await
            .expect("the budget semaphore is never closed");
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        Some(())
    }

    /// Splits off the permits of `bytes`, to travel with them.
    fn take(&mut self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let held = self.held.as_mut()?;
        if bytes >= held.num_permits() {
            return self.held.take();
        }
        held.split(bytes)
    }

    /// Gives back what is held beyond `bytes`.
    fn keep(&mut self, bytes: usize) {
        if let Some(held) = &mut self.held {
            let extra = held.num_permits().saturating_sub(bytes);
            if extra > 0 {
                drop(held.split(extra));
            }
        }
    }
}

/// Reads frames from a socket: drops a peer that takes longer than the frame timeout for a frame,
/// reports an idle connection, and keeps what it buffers within the memory budget.
pub(crate) struct FrameReader {
    socket: OwnedReadHalf,
    buffer: BytesMut,
    codec: JsonFrameCodec,
    frame_timeout: Duration,
    /// When the frame being received must be complete.
    frame_deadline: Option<Instant>,
    idle_timeout: Option<Duration>,
    budget: Option<Budgeted>,
}

/// What [`FrameReader::next`] found.
pub(crate) enum Read {
    Frame(Frame),
    /// The peer closed the connection between frames.
    Closed,
    /// Nothing arrived for the idle timeout, between frames.
    Idle,
}

impl FrameReader {
    pub(crate) fn new(socket: OwnedReadHalf, options: &TcpOptions) -> Self {
        FrameReader {
            socket,
            buffer: BytesMut::new(),
            codec: if options.codec.is_json() {
                JsonFrameCodec::new(options.max_frame_len)
            } else {
                JsonFrameCodec::counting_bytes(options.max_frame_len)
            },
            frame_timeout: options.frame_timeout,
            frame_deadline: None,
            idle_timeout: None,
            budget: None,
        }
    }

    /// Reports [`Read::Idle`] after this long without a byte between frames.
    pub(crate) fn idle_after(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Counts buffered bytes against `budget` (of `total` bytes).
    pub(crate) fn within(mut self, budget: Arc<Semaphore>, total: usize) -> Self {
        self.budget = Some(Budgeted {
            budget,
            total,
            held: None,
        });
        self
    }

    /// Whether bytes of a further frame have been read already.
    pub(crate) fn has_buffered(&self) -> bool {
        !self.buffer.is_empty()
    }

    fn incomplete(&self) -> FrameError {
        FrameError::Incomplete {
            buffered: self.buffer.len(),
            timeout: self.frame_timeout,
        }
    }

    /// Waits until the socket has something to read, or the idle timeout passed (`false`).
    async fn wait_readable(&self) -> Result<bool, FrameError> {
        match self.idle_timeout {
            Some(idle) => match tokio::time::timeout(idle, self.socket.readable()).await {
                Ok(ready) => ready.map(|()| true).map_err(FrameError::Io),
                Err(_) => Ok(false),
            },
            None => self
                .socket
                .readable()
                .await
                .map(|()| true)
                .map_err(FrameError::Io),
        }
    }

    /// Holds budget for `bytes`, waiting until memory frees (until the frame deadline, when a
    /// frame is under way).
    async fn hold(&mut self, bytes: usize) -> Result<usize, FrameError> {
        let Some(budget) = &mut self.budget else {
            return Ok(usize::MAX);
        };
        let held = match self.frame_deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, budget.hold(bytes))
                .await
                .map_err(|_| FrameError::Incomplete {
                    buffered: self.buffer.len(),
                    timeout: self.frame_timeout,
                })?,
            None => budget.hold(bytes).await,
        };
        match held {
            Some(()) => Ok(budget.held()),
            None => Err(FrameError::OverBudget {
                needed: bytes,
                budget: budget.total,
            }),
        }
    }

    /// The next frame's JSON text.
    pub(crate) async fn next(&mut self) -> Result<Read, FrameError> {
        loop {
            // A frame whose length is known is paid for before the decoder reserves room for it.
            let frame_bytes = self.codec.frame_bytes_at_least(&self.buffer)?;
            if let Some(bytes) = frame_bytes {
                self.hold(bytes.max(self.buffer.len())).await?;
            }
            if let Some(json) = self.codec.decode(&mut self.buffer)? {
                // The next frame, if any of it is here already, is on the clock from now.
                self.frame_deadline =
                    (!self.buffer.is_empty()).then(|| later(Instant::now(), self.frame_timeout));
                let budget = self.budget.as_mut().and_then(|budget| {
                    let permits = budget.take(json.len());
                    budget.keep(self.buffer.len());
                    permits
                });
                return Ok(Read::Frame(Frame { json, budget }));
            }
            let partial = !self.buffer.is_empty() || self.codec.is_mid_frame();
            if !partial {
                self.frame_deadline = None;
                // Between frames: hold no memory while waiting (an idle connection costs its socket
                // and its task, nothing more), and wake for the first byte.
                if self.buffer.capacity() > READ_CHUNK / 8 {
                    self.buffer = BytesMut::new();
                }
                if !self.wait_readable().await? {
                    return Ok(Read::Idle);
                }
            }
            // Room to read into, paid for: the rest of a declared frame (a frame that does not fit
            // waits here, before more of it is read), or a chunk.
            let wanted = self
                .codec
                .frame_bytes_at_least(&self.buffer)?
                .unwrap_or(0)
                .max(self.buffer.len() + READ_CHUNK);
            let held = self.hold(wanted).await?;
            let limit = held.saturating_sub(self.buffer.len()).clamp(1, READ_CHUNK);
            self.buffer.reserve(limit);
            let read = match self.frame_deadline.filter(|_| partial) {
                Some(deadline) => {
                    let mut limited = (&mut self.buffer).limit(limit);
                    match tokio::time::timeout_at(deadline, self.socket.read_buf(&mut limited))
                        .await
                    {
                        Ok(read) => read,
                        Err(_) => return Err(self.incomplete()),
                    }
                }
                // Readable a moment ago; a wake-up can be spurious, so do not wait here (that
                // would be a wait without the idle timeout): go back to waiting if nothing is
                // there.
                None => match self
                    .socket
                    .try_read_buf(&mut (&mut self.buffer).limit(limit))
                {
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                    read => read,
                },
            };
            match read {
                Ok(0) if partial => {
                    return Err(FrameError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the connection closed in the middle of a packet",
                    )));
                }
                Ok(0) => return Ok(Read::Closed),
                Ok(_) => {
                    // The first bytes of a frame start its clock.
                    self.frame_deadline
                        .get_or_insert_with(|| later(Instant::now(), self.frame_timeout));
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}
