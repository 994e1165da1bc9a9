//! The write side of a connection, shared by everyone who sends on it.
//!
//! A sender with the connection to itself — the only request in flight, nothing queued, nobody
//! writing — writes its frame straight to the socket with a non-blocking write, in its own task:
//! one request at a time pays no hop through a writer task. Otherwise frames are appended to a
//! queue that the connection's writer task writes out in one go, so many requests in flight share
//! few system calls (writing each directly would cost one call per frame). Either way bytes reach
//! the socket in the order frames were sent, and only one party writes at a time.

use super::FrameError;
use bytes::BytesMut;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

/// Queued bytes beyond which senders wait for the writer (the peer is not reading).
const QUEUE_LIMIT: usize = 1 << 20;

struct Outbox {
    socket: OwnedWriteHalf,
    state: Mutex<State>,
    /// Wakes the writer task: bytes were queued, or the outbox finished or closed.
    wake_writer: Notify,
    /// Wakes senders waiting for room in the queue, or for the outbox to close.
    room: Notify,
    /// Wakes those waiting for the peer to be gone ([`FrameSender::peer_gone`]).
    gone: Notify,
}

#[derive(Default)]
struct State {
    queued: BytesMut,
    /// A sender or the writer task is writing to the socket.
    writing: bool,
    /// No sender is left: the writer writes what is queued and stops.
    finished: bool,
    /// Writing failed or was given up: sends fail from now on.
    closed: bool,
    /// A last frame is queued: the writer writes what is queued, then closes the connection;
    /// sends fail from now on.
    closing: bool,
    /// The peer closed its side: it sends no more requests, and is taken to read no more
    /// replies a handler has yet to produce.
    peer_closed: bool,
}

/// The connection is closed; the frame was not sent.
#[derive(Debug)]
pub(crate) struct Closed;

impl Outbox {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn send(&self, frame: &[u8], alone: bool) -> Result<(), Closed> {
        loop {
            // Registered before the lock is released, so a wake-up in between is not missed.
            let mut room = std::pin::pin!(self.room.notified());
            {
                let mut state = self.state();
                if state.closed || state.closing {
                    return Err(Closed);
                }
                if alone && !state.writing && state.queued.is_empty() {
                    state.writing = true;
                    drop(state);
                    return self.write_directly(frame);
                }
                if state.queued.len() < QUEUE_LIMIT {
                    state.queued.extend_from_slice(frame);
                    drop(state);
                    self.wake_writer.notify_one();
                    return Ok(());
                }
                room.as_mut().enable();
            }
            room.await;
        }
    }

    /// Writes what the socket takes without waiting; queues the rest for the writer task, ahead
    /// of whatever others queued meanwhile. Called holding the `writing` token.
    fn write_directly(&self, frame: &[u8]) -> Result<(), Closed> {
        let written = match self.socket.try_write(frame) {
            Ok(written) => written,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
            Err(error) => {
                tracing::debug!(%error, "writing to the connection failed");
                self.close();
                return Err(Closed);
            }
        };
        self.direct_write_done(frame, written);
        Ok(())
    }

    /// Hands the `writing` token back after a direct write of `frame` that got `written` bytes
    /// out, queueing the rest.
    fn direct_write_done(&self, frame: &[u8], written: usize) {
        let mut state = self.state();
        state.writing = false;
        if written < frame.len() {
            let queued_meanwhile = state.queued.split();
            state.queued.extend_from_slice(&frame[written..]);
            state.queued.extend_from_slice(&queued_meanwhile);
        }
        let wake = !state.queued.is_empty() || state.finished || state.closing;
        drop(state);
        if wake {
            self.wake_writer.notify_one();
        }
    }

    fn close(&self) {
        self.state().closed = true;
        // The peer learns at once, even while handlers still hold senders.
        let _ = socket2::SockRef::from(self.socket.as_ref()).shutdown(std::net::Shutdown::Both);
        self.wake_writer.notify_one();
        self.room.notify_waiters();
        self.gone.notify_waiters();
    }

    fn close_with(&self, frame: &[u8]) {
        {
            let mut state = self.state();
            if state.closed || state.closing {
                return;
            }
            state.queued.extend_from_slice(frame);
            state.closing = true;
        }
        self.wake_writer.notify_one();
        self.room.notify_waiters();
        self.gone.notify_waiters();
    }

    fn finish(&self) {
        self.state().finished = true;
        self.wake_writer.notify_one();
    }
}

/// Sends frames on a connection. Clones share it; when the last is dropped, the writer writes
/// what is still queued and half-closes the connection.
#[derive(Clone)]
pub(crate) struct FrameSender {
    guard: Arc<SenderGuard>,
}

struct SenderGuard(Arc<Outbox>);

impl Drop for SenderGuard {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl FrameSender {
    /// Sends one encoded frame; waits only while the queue is full (a peer that does not read).
    /// `alone`: the caller's request is the only one in flight on the connection, so there is
    /// nothing to batch it with and it may be written directly.
    pub(crate) async fn send(&self, frame: &[u8], alone: bool) -> Result<(), Closed> {
        self.guard.0.send(frame, alone).await
    }

    /// Gives up on the connection: nothing more is written, sends fail, and the socket is shut
    /// down.
    #[cfg(test)]
    pub(crate) fn close(&self) {
        self.guard.0.close();
    }

    /// Writes `frame` after what is queued, then closes the connection; sends fail from now on
    /// (a last word to a peer before it is disconnected).
    pub(crate) fn close_with(&self, frame: &[u8]) {
        self.guard.0.close_with(frame);
    }

    /// The peer closed its side of the connection (the reader met its end): what waits in
    /// [`peer_gone`](Self::peer_gone) stops waiting. Replies already produced still go out.
    pub(crate) fn peer_closed(&self) {
        self.guard.0.state().peer_closed = true;
        self.guard.0.gone.notify_waiters();
    }

    /// Resolves once the peer closed its side or the connection is closed: a handler that has
    /// yet to produce a reply (a stream waiting for its next value) need not go on.
    pub(crate) async fn peer_gone(&self) {
        let outbox = &*self.guard.0;
        loop {
            let mut gone = std::pin::pin!(outbox.gone.notified());
            gone.as_mut().enable();
            {
                let state = outbox.state();
                if state.peer_closed || state.closed || state.closing {
                    return;
                }
            }
            gone.await;
        }
    }

    /// A handle that can close the connection without keeping it open.
    pub(crate) fn closer(&self) -> Closer {
        Closer(Arc::downgrade(&self.guard.0))
    }
}

/// Closes a connection's outbox, if it still exists, without keeping it alive.
pub(crate) struct Closer(Weak<Outbox>);

impl Closer {
    /// See [`FrameSender::close`].
    pub(crate) fn close(&self) {
        if let Some(outbox) = self.0.upgrade() {
            outbox.close();
        }
    }
}

/// The connection's writer task: writes queued bytes until every sender is gone.
pub(crate) struct FrameWriter {
    outbox: Arc<Outbox>,
}

/// A sender and the writer for `socket`.
pub(crate) fn outbox(socket: OwnedWriteHalf) -> (FrameSender, FrameWriter) {
    let outbox = Arc::new(Outbox {
        socket,
        state: Mutex::new(State::default()),
        wake_writer: Notify::new(),
        room: Notify::new(),
        gone: Notify::new(),
    });
    let sender = FrameSender {
        guard: Arc::new(SenderGuard(Arc::clone(&outbox))),
    };
    (sender, FrameWriter { outbox })
}

impl FrameWriter {
    /// Writes until the senders are gone (then half-closes the connection) or the outbox is
    /// closed. Fails, closing the outbox, when writing fails or the peer accepts no data for
    /// `timeout`.
    pub(crate) async fn run(self, timeout: Duration) -> Result<(), FrameError> {
        let outbox = &*self.outbox;
        loop {
            let wake = outbox.wake_writer.notified();
            let batch = {
                let mut state = outbox.state();
                if state.closed {
                    return Ok(());
                }
                if state.writing {
                    None // a sender is writing directly and wakes us when it is done
                } else if !state.queued.is_empty() {
                    state.writing = true;
                    Some(state.queued.split())
                } else if state.closing {
                    state.closed = true;
                    drop(state);
                    let _ = socket2::SockRef::from(outbox.socket.as_ref())
                        .shutdown(std::net::Shutdown::Both);
                    outbox.room.notify_waiters();
                    outbox.gone.notify_waiters();
                    return Ok(());
                } else if state.finished {
                    drop(state);
                    let _ = socket2::SockRef::from(outbox.socket.as_ref())
                        .shutdown(std::net::Shutdown::Write);
                    return Ok(());
                } else {
                    None
                }
            };
            let Some(batch) = batch else {
                wake.await;
                continue;
            };
            outbox.room.notify_waiters();
            let written = tokio::time::timeout(timeout, write_all(&outbox.socket, &batch)).await;
            let error = match written {
                Ok(Ok(())) => {
                    outbox.state().writing = false;
                    continue;
                }
                Ok(Err(error)) => FrameError::Io(error),
                Err(_) => FrameError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer accepted no data for {}ms", timeout.as_millis()),
                )),
            };
            outbox.close();
            return Err(error);
        }
    }
}

async fn write_all(socket: &OwnedWriteHalf, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        socket.writable().await?;
        match socket.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::tcp::OwnedReadHalf;
    use tokio::net::{TcpListener, TcpStream};

    /// Our write half, our read half (kept so the socket stays open) and the peer's socket.
    async fn connected() -> (OwnedWriteHalf, OwnedReadHalf, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (read, write) = client.unwrap().into_split();
        (write, read, server.unwrap().0)
    }

    /// Frames of many concurrent senders, some large enough to fill the socket buffers (partial
    /// direct writes, a queue at its limit): each arrives whole, and each sender's in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_frames_arrive_whole_and_in_order() {
        let (write, _read, mut peer) = connected().await;
        let (sender, writer) = outbox(write);
        let writer = tokio::spawn(writer.run(Duration::from_secs(10)));
        const SENDERS: u8 = 8;
        const FRAMES: u32 = 200;
        let tasks: Vec<_> = (0..SENDERS)
            .map(|task| {
                let sender = sender.clone();
                tokio::spawn(async move {
                    for n in 0..FRAMES {
                        // [task][n: u32][len: u32][len bytes of `task`]
                        let len = if n % 5 == 2 { 200_000 } else { 40 + n as usize };
                        let mut frame = vec![task];
                        frame.extend_from_slice(&n.to_le_bytes());
                        frame.extend_from_slice(&(len as u32).to_le_bytes());
                        frame.resize(9 + len, task);
                        sender.send(&frame, n % 3 == 0).await.unwrap();
                    }
                })
            })
            .collect();
        drop(sender);
        let reading = tokio::spawn(async move {
            let mut received = Vec::new();
            // A slow reader at first, so the socket buffers fill up.
            tokio::time::sleep(Duration::from_millis(50)).await;
            peer.read_to_end(&mut received).await.unwrap();
            received
        });
        for task in tasks {
            task.await.unwrap();
        }
        writer.await.unwrap().unwrap();
        let received = reading.await.unwrap(); // ends: the writer half-closed when senders left
        let mut next = [0u32; SENDERS as usize];
        let mut rest = &received[..];
        while !rest.is_empty() {
            let task = rest[0];
            let n = u32::from_le_bytes(rest[1..5].try_into().unwrap());
            let len = u32::from_le_bytes(rest[5..9].try_into().unwrap()) as usize;
            assert_eq!(
                n, next[task as usize],
                "sender {task}'s frames out of order"
            );
            assert!(
                rest[9..9 + len].iter().all(|&byte| byte == task),
                "a torn frame"
            );
            next[task as usize] += 1;
            rest = &rest[9 + len..];
        }
        assert!(next.iter().all(|&count| count == FRAMES));
    }

    /// While a sender writes directly, others queue; what its write left over goes out before
    /// their frames.
    #[tokio::test]
    async fn the_rest_of_a_partial_direct_write_goes_before_frames_queued_meanwhile() {
        let (write, _read, _peer) = connected().await;
        let (sender, _writer) = outbox(write);
        let outbox = &sender.guard.0;
        outbox.state().writing = true; // a direct write is under way
        sender.send(b"[second]", true).await.unwrap();
        outbox.direct_write_done(b"[first]", 3);
        let state = outbox.state();
        assert_eq!(&state.queued[..], b"rst][second]");
        assert!(!state.writing);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_outbox_refuses_frames_and_wakes_waiting_senders() {
        let (write, _read, _peer) = connected().await;
        let (sender, writer) = outbox(write);
        // No writer running and a peer that never reads: the queue fills and a sender waits.
        let waiting = {
            let sender = sender.clone();
            tokio::spawn(async move {
                let frame = vec![0u8; 64 * 1024];
                loop {
                    if sender.send(&frame, true).await.is_err() {
                        return;
                    }
                }
            })
        };
        // The paused clock advances only once every task waits: the sender is stuck by then.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "the sender should wait for room");
        sender.close();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a waiting sender is woken when the outbox closes")
            .unwrap();
        assert!(sender.send(b"late", true).await.is_err());
        assert!(writer.run(Duration::from_secs(1)).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_accepts_nothing_fails_the_writer_after_the_timeout() {
        let (write, _read, _peer) = connected().await;
        let (sender, writer) = outbox(write);
        let writer = tokio::spawn(writer.run(Duration::from_secs(3)));
        let frame = vec![0u8; 64 * 1024];
        let filling =
            tokio::spawn(async move { while sender.send(&frame, false).await.is_ok() {} });
        let error = writer.await.unwrap().unwrap_err();
        assert!(
            error.to_string().contains("accepted no data for 3000ms"),
            "{error}"
        );
        tokio::time::timeout(Duration::from_secs(5), filling)
            .await
            .expect("senders fail once the writer gave up")
            .unwrap();
    }
}
