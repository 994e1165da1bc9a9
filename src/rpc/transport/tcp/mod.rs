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
//! let server = TcpServer::bind("127.0.0.1:3000")
//!     .await?
//!     .serve(Server::new(Router::new().message("ping", || async { "pong" })));
//!
//! let client = Client::builder().connect(TcpTransport::new("127.0.0.1:3000")).await?;
//! let pong: String = client.send("ping", &()).await?;
//! server.shutdown().await;
//! # let _ = pong; Ok(()) }
//! ```
//!
//! # Robustness
//!
//! - Frames may arrive coalesced or split anywhere, even inside a multi-byte character.
//! - A malformed frame (a length that is not a number, a frame over the size limit, invalid UTF-8,
//!   invalid JSON) closes that connection with a logged, specific error; other connections carry
//!   on. A peer that stops in the middle of a frame is dropped after an idle timeout.
//! - The server handles requests concurrently (a slow handler does not hold up the next frame),
//!   stops reading from a connection whose peer does not read its replies (and drops it if it
//!   accepts nothing for the write timeout), limits connections, and drains on shutdown.
//! - The client opens its connection lazily, matches replies by id in any order, drops late
//!   replies, fails every pending request at once with `Unavailable` when the connection is lost,
//!   and reconnects on the next request — backing off after failed attempts so that a dead server
//!   is not hammered.

mod client;
mod codec;
mod outbox;
mod server;

pub use self::client::TcpTransport;
pub use self::codec::{FrameError, JsonFrameCodec};
pub use self::server::TcpServer;

use bytes::{Bytes, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::Decoder;

/// Settings of a TCP client or server.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    max_frame_len: usize,
    incomplete_frame_timeout: Duration,
    write_timeout: Duration,
    max_connections: usize,
    max_in_flight_per_connection: usize,
    connect_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            max_frame_len: 16 * 1024 * 1024,
            incomplete_frame_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_in_flight_per_connection: 1024,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl TcpOptions {
    /// The defaults: 16 Mi UTF-16 units per frame, 30 s incomplete-frame and write timeouts,
    /// 10 000 connections, 1024 requests in flight per connection, 5 s connect timeout.
    pub fn new() -> Self {
        TcpOptions::default()
    }

    /// Frames longer than this (in UTF-16 units, the unit of the length prefix) close the
    /// connection.
    pub fn max_frame_len(mut self, units: usize) -> Self {
        self.max_frame_len = units;
        self
    }

    /// A peer that stops sending in the middle of a frame for this long is dropped (NestJS's
    /// `incompleteMessageTimeout`).
    pub fn incomplete_frame_timeout(mut self, timeout: Duration) -> Self {
        self.incomplete_frame_timeout = timeout;
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

    /// Client: how long to wait for a connection to open.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

/// Reads frames from a socket, dropping a peer that stalls mid-frame.
pub(crate) struct FrameReader<R> {
    socket: R,
    buffer: BytesMut,
    codec: JsonFrameCodec,
    idle: Duration,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(socket: R, options: &TcpOptions) -> Self {
        FrameReader {
            socket,
            buffer: BytesMut::with_capacity(8 * 1024),
            codec: JsonFrameCodec::new(options.max_frame_len),
            idle: options.incomplete_frame_timeout,
        }
    }

    /// Whether bytes of a further frame have been read already.
    pub(crate) fn has_buffered(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// The next frame's JSON text; `None` when the peer closed the connection between frames.
    pub(crate) async fn next(&mut self) -> Option<Result<Bytes, FrameError>> {
        loop {
            match self.codec.decode(&mut self.buffer) {
                Ok(Some(frame)) => return Some(Ok(frame)),
                Ok(None) => {}
                Err(error) => return Some(Err(error)),
            }
            let partial = !self.buffer.is_empty() || self.codec.is_mid_frame();
            self.buffer.reserve(8 * 1024);
            let read = if partial {
                // Refreshed on every read, so only a peer that goes silent mid-frame times out.
                match tokio::time::timeout(self.idle, self.socket.read_buf(&mut self.buffer)).await
                {
                    Ok(read) => read,
                    Err(_) => {
                        return Some(Err(FrameError::Incomplete {
                            buffered: self.buffer.len(),
                            idle: self.idle,
                        }));
                    }
                }
            } else {
                self.socket.read_buf(&mut self.buffer).await
            };
            match read {
                Ok(0) if partial => {
                    return Some(Err(FrameError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the connection closed in the middle of a packet",
                    ))));
                }
                Ok(0) => return None,
                Ok(_) => {}
                Err(error) => return Some(Err(error.into())),
            }
        }
    }
}
