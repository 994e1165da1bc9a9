//! A transport written outside the crate, with nothing but palisade's public API, passes the
//! exported conformance suite.
//!
//! It is a small but complete one: NestJS's JSON packets, one per line, over a Unix domain socket.
//! The client multiplexes requests on one connection with [`PendingRequests`]; the server hands
//! each message to the [`Dispatcher`] with a [`ReplySink`] that writes lines. Both refuse lines
//! over a size limit, and the harness can cut every connection to test a lost one.
#![cfg(unix)]

use bytes::Bytes;
use futures_util::future::BoxFuture;
use palisade::conformance::Harness;
use palisade::rpc::transport::{ClientTransport, ReplyPacket, ReplyReceiver, ServerTransport};
use palisade::rpc::wire::{
    PendingRequests, decode_incoming, decode_reply, encode_reply, encode_request, encoded,
    wire_pattern,
};
use palisade::rpc::{
    Client, ClientBuilder, Dispatcher, RawJson, ReplySink, RpcError, RpcRequest, SendError, Server,
    ServerHandle, TransportErrorKind,
};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

/// The longest line either side sends or accepts, in bytes.
const MAX_LINE: usize = 64 * 1024;

/// A connection's writer: lines are queued and written in order by one task, until the senders
/// are gone or the connection is cut.
fn writer(
    mut socket: OwnedWriteHalf,
    mut cut: Option<watch::Receiver<u64>>,
) -> mpsc::UnboundedSender<Bytes> {
    let (lines, mut queued) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(async move {
        loop {
            let cutting = async {
                match &mut cut {
                    Some(cut) => drop(cut.changed().await),
                    None => std::future::pending().await,
                }
            };
            let line = tokio::select! {
                line = queued.recv() => line,
                () = cutting => return,
            };
            let Some(line) = line else { break };
            if socket.write_all(&line).await.is_err() {
                return;
            }
        }
        let _ = socket.shutdown().await;
    });
    lines
}

/// `json` and a newline, if it fits.
fn line(json: Bytes) -> Result<Bytes, usize> {
    if json.len() > MAX_LINE {
        return Err(json.len());
    }
    let mut line = json.to_vec();
    line.push(b'\n');
    Ok(line.into())
}

// ---- the server half -------------------------------------------------------------------------

struct LineServer {
    listener: UnixListener,
    /// Flipped to cut every connection (a broken network, in tests).
    cut: watch::Receiver<u64>,
}

struct LineSink {
    id: RawJson,
    lines: mpsc::UnboundedSender<Bytes>,
}

impl ReplySink for LineSink {
    async fn send(&mut self, packet: ReplyPacket) -> Result<(), SendError> {
        let json = encoded(|out| encode_reply(out, &packet, Some(&self.id)));
        let line = line(json).map_err(|size| SendError::TooLarge {
            size,
            limit: MAX_LINE,
        })?;
        self.lines.send(line).map_err(|_| SendError::CallerGone)
    }
}

impl ServerTransport for LineServer {
    fn serve(self, server: Server) -> impl Future<Output = Result<ServerHandle, RpcError>> + Send {
        let dispatcher = server.into_dispatcher("lines");
        dispatcher.spawn(accept(self.listener, self.cut, dispatcher.clone()));
        std::future::ready(Ok(ServerHandle::new(dispatcher)))
    }
}

async fn accept(listener: UnixListener, cut: watch::Receiver<u64>, dispatcher: Dispatcher) {
    let draining = dispatcher.draining();
    tokio::pin!(draining);
    loop {
        let socket = tokio::select! {
            _ = &mut draining => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(_) => continue,
            },
        };
        dispatcher.spawn(serve_connection(socket, cut.clone(), dispatcher.clone()));
    }
}

async fn serve_connection(
    socket: UnixStream,
    mut cut: watch::Receiver<u64>,
    dispatcher: Dispatcher,
) {
    cut.borrow_and_update();
    let (read, write) = socket.into_split();
    let lines = writer(write, Some(cut.clone()));
    let mut read = BufReader::new(read);
    let draining = dispatcher.draining();
    tokio::pin!(draining);
    loop {
        let mut text = Vec::new();
        let read = tokio::select! {
            _ = &mut draining => return,
            _ = cut.changed() => return,
            read = read.read_until(b'\n', &mut text) => read,
        };
        if !matches!(read, Ok(n) if n > 0) || text.len() > MAX_LINE + 1 {
            return;
        }
        let Ok(packet) = decode_incoming(&Bytes::from(text)) else {
            return;
        };
        let (request, id) = packet.into_request();
        let sink = id.map(|id| LineSink {
            id,
            lines: lines.clone(),
        });
        dispatcher.dispatch(request, sink).await;
    }
}

// ---- the client half -------------------------------------------------------------------------

#[derive(Clone)]
struct LineClient {
    path: PathBuf,
    connection: Arc<tokio::sync::Mutex<Option<Connection>>>,
}

#[derive(Clone)]
struct Connection {
    lines: mpsc::UnboundedSender<Bytes>,
    pending: Arc<PendingRequests>,
}

impl LineClient {
    fn new(path: &Path) -> Self {
        LineClient {
            path: path.to_owned(),
            connection: Arc::default(),
        }
    }

    async fn connection(&self) -> Result<Connection, RpcError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| !c.pending.is_closed()) {
            return Ok(connection.clone());
        }
        let socket = UnixStream::connect(&self.path).await.map_err(|error| {
            RpcError::transport(
                TransportErrorKind::Connect,
                format!("cannot connect: {error}"),
            )
        })?;
        let (read, write) = socket.into_split();
        let connection = Connection {
            lines: writer(write, None),
            pending: PendingRequests::new(),
        };
        let pending = Arc::clone(&connection.pending);
        tokio::spawn(async move {
            let mut read = BufReader::new(read);
            loop {
                let mut text = Vec::new();
                match read.read_until(b'\n', &mut text).await {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
                let Ok((Some(id), packet)) = decode_reply(&Bytes::from(text)) else {
                    continue;
                };
                if let Some(n) = pending.ids().parse_json(id.as_bytes()) {
                    pending.deliver(n, packet);
                }
            }
            pending.close(&RpcError::transport(
                TransportErrorKind::ConnectionLost,
                "the connection closed",
            ));
        });
        *slot = Some(connection.clone());
        Ok(connection)
    }

    fn encode(request: &RpcRequest, id: Option<&str>) -> Result<Bytes, RpcError> {
        let json = encoded(|out| {
            encode_request(
                out,
                &wire_pattern(request),
                request.payload(),
                id,
                &request.wire_headers(),
            )
        });
        line(json).map_err(|size| {
            RpcError::transport(
                TransportErrorKind::PayloadTooLarge,
                format!("the message is {size} bytes, over the limit of {MAX_LINE}"),
            )
        })
    }
}

impl ClientTransport for LineClient {
    fn request(&self, request: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>> {
        let client = self.clone();
        Box::pin(async move {
            let connection = client.connection().await?;
            let registered = connection.pending.register(request.pattern())?;
            let line = LineClient::encode(&request, Some(registered.id().as_str()))?;
            connection.lines.send(line).map_err(|_| {
                RpcError::transport(TransportErrorKind::ConnectionLost, "the connection closed")
            })?;
            Ok(registered.into_replies())
        })
    }

    fn emit(&self, event: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>> {
        let client = self.clone();
        Box::pin(async move {
            let connection = client.connection().await?;
            let line = LineClient::encode(&event, None)?;
            connection.lines.send(line).map_err(|_| {
                RpcError::transport(TransportErrorKind::ConnectionLost, "the connection closed")
            })
        })
    }
}

// ---- the harness -----------------------------------------------------------------------------

struct Lines {
    _dir: TempDir,
    path: PathBuf,
    cut: watch::Sender<u64>,
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Lines {
    fn new() -> Self {
        static NEXT: Mutex<u32> = Mutex::new(0);
        let n = {
            let mut next = NEXT.lock().unwrap();
            *next += 1;
            *next
        };
        let dir = std::env::temp_dir().join(format!("palisade-lines-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Lines {
            path: dir.join("socket"),
            _dir: TempDir(dir),
            cut: watch::channel(0).0,
        }
    }
}

impl Harness for Lines {
    async fn serve(&mut self, server: Server) -> ServerHandle {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).unwrap();
        server
            .serve(LineServer {
                listener,
                cut: self.cut.subscribe(),
            })
            .await
            .unwrap()
    }

    async fn client(&self, builder: ClientBuilder) -> Client {
        builder.connect(LineClient::new(&self.path)).await.unwrap()
    }

    fn max_message_size(&self) -> Option<usize> {
        Some(MAX_LINE)
    }

    async fn interrupt(&mut self) -> bool {
        self.cut.send_modify(|n| *n += 1);
        true
    }
}

palisade::conformance_tests!(Lines::new());

// ---- a start that does not finish ------------------------------------------------------------

/// How [`StallingStart`]'s start ends after its reading task took a request.
#[derive(Clone, Copy)]
enum StartEnd {
    /// It never finishes: the caller drops it.
    Never,
    /// It fails, and abandons what it started.
    Fails,
    /// It succeeds.
    Serves,
}

/// A transport whose start begins serving — its reading task hands one request for `slow` to the
/// dispatcher — and then waits for something that never comes, or fails.
struct StallingStart {
    end: StartEnd,
    /// The request's reply packets.
    replies: mpsc::UnboundedSender<ReplyPacket>,
    /// Dropped when the reading task ends.
    reader_alive: Arc<()>,
}

struct RecordingSink(mpsc::UnboundedSender<ReplyPacket>);

impl ReplySink for RecordingSink {
    async fn send(&mut self, packet: ReplyPacket) -> Result<(), SendError> {
        self.0.send(packet).map_err(|_| SendError::CallerGone)
    }
}

impl ServerTransport for StallingStart {
    async fn serve(self, server: Server) -> Result<ServerHandle, RpcError> {
        let dispatcher = server.into_dispatcher("stalling");
        let starting = dispatcher.start_guard();
        assert_eq!(format!("{starting:?}"), "StartGuard { armed: true }");
        let (taken, request_taken) = tokio::sync::oneshot::channel();
        let reader = dispatcher.clone();
        let alive = self.reader_alive;
        dispatcher.spawn(async move {
            let _alive = alive;
            let request = RpcRequest::new("slow".into(), RawJson::null());
            let sink = RecordingSink(self.replies);
            reader.dispatch(request, Some(sink)).await;
            let _ = taken.send(());
            reader.draining().await;
        });
        request_taken.await.unwrap();
        match self.end {
            StartEnd::Never => std::future::pending().await,
            StartEnd::Fails => {
                starting.abandon().await;
                Err(RpcError::unavailable(
                    "the broker went away during the start",
                ))
            }
            StartEnd::Serves => Ok(starting.serving()),
        }
    }
}

fn slow_server() -> Server {
    let router = palisade::rpc::Router::new().message("slow", || async {
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        "done"
    });
    // A grace period far longer than the test waits: what it sees is the guard, not shutdown.
    Server::new(router).grace_period(std::time::Duration::from_secs(600))
}

/// Asserts that the in-flight request was answered `Unavailable`.
async fn answered_unavailable(replies: &mut mpsc::UnboundedReceiver<ReplyPacket>) {
    let packet = tokio::time::timeout(std::time::Duration::from_secs(1), replies.recv())
        .await
        .expect("the in-flight request is answered at once")
        .expect("the sink got a packet");
    match packet {
        ReplyPacket::Error(error) => {
            let error: serde_json::Value = error.decode().unwrap();
            assert_eq!(error["code"], "UNAVAILABLE", "{error}");
        }
        other => panic!("expected an Unavailable error, got {other:?}"),
    }
}

/// A start dropped half way (the caller's timeout ran out) stops what it had started: the reading
/// task ends, and the request it took is answered `Unavailable` at once. Nobody holds a handle
/// that could stop them, so without the guard they would serve on, unseen.
#[tokio::test(start_paused = true)]
async fn a_start_dropped_half_way_stops_what_it_started() {
    let (replies, mut received) = mpsc::unbounded_channel();
    let reader_alive = Arc::new(());
    let start = slow_server().serve(StallingStart {
        end: StartEnd::Never,
        replies,
        reader_alive: Arc::clone(&reader_alive),
    });
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), start).await;
    assert!(outcome.is_err(), "the start never finishes");
    answered_unavailable(&mut received).await;
    for _ in 0..100 {
        if Arc::strong_count(&reader_alive) == 1 {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the reading task still runs after its start was dropped");
}

/// A start that fails abandons what it started: the request in flight is answered `Unavailable`
/// at once rather than after the grace period, and the reading task has ended by the time the
/// error comes back.
#[tokio::test(start_paused = true)]
async fn a_failed_start_stops_what_it_started_before_it_returns() {
    let (replies, mut received) = mpsc::unbounded_channel();
    let reader_alive = Arc::new(());
    let began = tokio::time::Instant::now();
    let start = slow_server().serve(StallingStart {
        end: StartEnd::Fails,
        replies,
        reader_alive: Arc::clone(&reader_alive),
    });
    let error = tokio::time::timeout(std::time::Duration::from_secs(10), start)
        .await
        .expect("the failed start returns")
        .expect_err("the start fails");
    assert!(error.message().contains("went away"), "{error}");
    assert!(
        began.elapsed() < std::time::Duration::from_secs(1),
        "the failed start waited {:?}",
        began.elapsed()
    );
    assert_eq!(
        Arc::strong_count(&reader_alive),
        1,
        "the reading task outlived the failed start"
    );
    answered_unavailable(&mut received).await;
}

/// A start that hands out its handle disarms its guard: the server runs on, its request still in
/// flight, until the handle shuts it down.
#[tokio::test(start_paused = true)]
async fn a_start_that_serves_keeps_running_until_its_shutdown() {
    let (replies, mut received) = mpsc::unbounded_channel();
    let reader_alive = Arc::new(());
    let handle = slow_server()
        .serve(StallingStart {
            end: StartEnd::Serves,
            replies,
            reader_alive: Arc::clone(&reader_alive),
        })
        .await
        .unwrap();
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(handle.in_flight(), 1, "the request is still being handled");
    assert_eq!(Arc::strong_count(&reader_alive), 2, "the reading task runs");
    assert!(received.try_recv().is_err(), "nothing was answered yet");
    let report = handle.shutdown().await;
    assert_eq!(report.cancelled, 1, "{report:?}");
    assert_eq!(
        Arc::strong_count(&reader_alive),
        1,
        "the reading task ended"
    );
    answered_unavailable(&mut received).await;
}
