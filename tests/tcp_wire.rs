//! Byte-exact NestJS TCP frames, from the capture of a real NestJS 11.2.6 client and server
//! (nestjs-wire.md §2.3), over real sockets.
#![cfg(feature = "tcp")]

mod support;

use futures_util::StreamExt;
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
use palisade::rpc::{Client, Server, ServerHandle};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// (request frame, the reply frames NestJS sent for it).
const CAPTURE: &[(&str, &[&str])] = &[
    (
        r#"70#{"pattern":"get-user","data":{"id":"42"},"id":"ae27e2a42bb78600f9957"}"#,
        &[
            r#"120#{"response":{"id":"42","username":"user42","email":"user42@example.com"},"isDisposed":true,"id":"ae27e2a42bb78600f9957"}"#,
        ],
    ),
    (
        r#"75#{"pattern":"get-user","data":{"id":"missing"},"id":"e27e2a42bb78600f99573"}"#,
        &[
            r#"115#{"err":{"code":"USER_NOT_FOUND","message":"user missing not found"},"isDisposed":true,"id":"e27e2a42bb78600f99573"}"#,
        ],
    ),
    (
        r#"67#{"pattern":{"cmd":"sum"},"data":[5,6],"id":"27e2a42bb78600f99573b"}"#,
        &[r#"62#{"response":11,"isDisposed":true,"id":"27e2a42bb78600f99573b"}"#],
    ),
    (
        r#"83#{"pattern":{"role":"math","cmd":"sum"},"data":[20,22],"id":"7e2a42bb78600f99573b8"}"#,
        &[r#"62#{"response":42,"isDisposed":true,"id":"7e2a42bb78600f99573b8"}"#],
    ),
    (
        r#"57#{"pattern":"fail","data":{},"id":"e2a42bb78600f99573b8c"}"#,
        &[
            r#"90#{"err":{"status":"error","message":"boom"},"isDisposed":true,"id":"e2a42bb78600f99573b8c"}"#,
        ],
    ),
    (
        r#"58#{"pattern":"crash","data":{},"id":"2a42bb78600f99573b8c7"}"#,
        &[
            r#"107#{"err":{"status":"error","message":"Internal server error"},"isDisposed":true,"id":"2a42bb78600f99573b8c7"}"#,
        ],
    ),
    (
        r#"73#{"pattern":"no-such-pattern","data":{"x":1},"id":"a42bb78600f99573b8c74"}"#,
        &[
            r#"123#{"id":"a42bb78600f99573b8c74","status":"error","err":"There is no matching message handler defined in the remote service."}"#,
        ],
    ),
    (
        r#"145#{"pattern":"slow","data":{"ms":0,"text":"héllo wörld ✓ € 日本語 😀🚀 end","nested":{"ключ":"значение","emoji":"👍🏽"}},"id":"42bb78600f99573b8c74f"}"#,
        &[
            r#"150#{"response":{"ms":0,"text":"héllo wörld ✓ € 日本語 😀🚀 end","nested":{"ключ":"значение","emoji":"👍🏽"}},"isDisposed":true,"id":"42bb78600f99573b8c74f"}"#,
        ],
    ),
    (
        r#"57#{"pattern":"count","data":3,"id":"2bb78600f99573b8c74f1"}"#,
        &[
            r#"43#{"response":1,"id":"2bb78600f99573b8c74f1"}"#,
            r#"43#{"response":2,"id":"2bb78600f99573b8c74f1"}"#,
            r#"43#{"response":3,"id":"2bb78600f99573b8c74f1"}"#,
            r#"48#{"isDisposed":true,"id":"2bb78600f99573b8c74f1"}"#,
        ],
    ),
];

/// Events from the capture: no reply.
const EVENTS: &[&str] = &[
    r#"69#{"pattern":"user-created","data":{"id":"ev-hsklovpf-1","name":"Ann"}}"#,
    r#"42#{"pattern":"no-such-event","data":{"x":1}}"#,
    r#"56#{"pattern":"{\"cmd\":\"no-such-event\"}","data":{"x":2}}"#,
];

/// Reads `n` frames' worth of bytes: each `<len>#` plus `len` UTF-16 units of JSON.
async fn read_frames(socket: &mut TcpStream, n: usize) -> Vec<String> {
    let mut frames = Vec::new();
    let mut buffer = Vec::new();
    while frames.len() < n {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut chunk))
            .await
            .expect("a reply frame")
            .unwrap();
        assert!(
            read > 0,
            "the connection closed after {} frames",
            frames.len()
        );
        buffer.extend_from_slice(&chunk[..read]);
        loop {
            let text = match std::str::from_utf8(&buffer) {
                Ok(text) => text.to_owned(),
                Err(e) => std::str::from_utf8(&buffer[..e.valid_up_to()])
                    .unwrap()
                    .to_owned(),
            };
            let Some(hash) = text.find('#') else { break };
            let units: usize = text[..hash].parse().unwrap();
            let body: String = {
                let mut taken = 0;
                text[hash + 1..]
                    .chars()
                    .take_while(|c| {
                        let more = taken < units;
                        taken += c.len_utf16();
                        more
                    })
                    .collect()
            };
            if body.encode_utf16().count() < units {
                break;
            }
            let frame = format!("{}#{}", units, body);
            buffer.drain(..frame.len());
            frames.push(frame);
        }
    }
    frames
}

/// A palisade server running the NestJS sample service's handlers, and a raw connection to it.
async fn nest_like_server(
    events: &Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) -> (ServerHandle, TcpStream) {
    let server = TcpServer::bind("127.0.0.1:0")
        .await
        .unwrap()
        .serve(Server::new(support::nest_like::router(Arc::clone(events))))
        .await
        .unwrap();
    let socket = TcpStream::connect(server.local_addr().unwrap())
        .await
        .unwrap();
    (server, socket)
}

#[tokio::test]
async fn the_server_answers_nests_requests_byte_for_byte() {
    let events: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Arc::default();
    let (server, mut socket) = nest_like_server(&events).await;
    for (request, replies) in CAPTURE {
        socket.write_all(request.as_bytes()).await.unwrap();
        let got = read_frames(&mut socket, replies.len()).await;
        assert_eq!(got, *replies, "replies to {request}");
    }
    for event in EVENTS {
        socket.write_all(event.as_bytes()).await.unwrap();
    }
    // The event handler ran (frames of one connection are handled in order of arrival).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        *events.lock().unwrap(),
        [json!({"id": "ev-hsklovpf-1", "name": "Ann"})]
    );
    // Events get no reply; the connection still serves requests.
    socket.write_all(CAPTURE[2].0.as_bytes()).await.unwrap();
    assert_eq!(read_frames(&mut socket, 1).await, CAPTURE[2].1);
    server.shutdown().await;
}

#[tokio::test]
async fn requests_split_into_single_bytes_are_reassembled() {
    let (server, mut socket) = nest_like_server(&Arc::default()).await;
    socket.set_nodelay(true).unwrap();
    // The unicode request, one byte per write: splits inside every multi-byte character.
    let (request, replies) = CAPTURE[7];
    for byte in request.as_bytes() {
        socket.write_all(&[*byte]).await.unwrap();
        socket.flush().await.unwrap();
    }
    assert_eq!(read_frames(&mut socket, 1).await, replies);
    // All requests in one write: coalesced frames.
    let all: String = CAPTURE.iter().map(|(request, _)| *request).collect();
    socket.write_all(all.as_bytes()).await.unwrap();
    let expected: usize = CAPTURE.iter().map(|(_, replies)| replies.len()).sum();
    let mut got = read_frames(&mut socket, expected).await;
    let mut want: Vec<String> = CAPTURE
        .iter()
        .flat_map(|(_, r)| r.iter().map(|s| s.to_string()))
        .collect();
    // Requests are handled concurrently, so replies may come in any order.
    got.sort();
    want.sort();
    assert_eq!(got, want);
    server.shutdown().await;
}

/// NestJS parses packets with `JSON.parse`, where a key that appears twice keeps its last value.
#[tokio::test]
async fn a_duplicated_key_keeps_its_last_value_as_in_nestjs() {
    let (server, mut socket) = nest_like_server(&Arc::default()).await;
    let request =
        r#"{"pattern":"fail","data":[1,2],"id":"first","pattern":{"cmd":"sum"},"id":"second"}"#;
    socket
        .write_all(format!("{}#{request}", request.len()).as_bytes())
        .await
        .unwrap();
    assert_eq!(
        read_frames(&mut socket, 1).await,
        [r#"46#{"response":3,"isDisposed":true,"id":"second"}"#]
    );
    server.shutdown().await;
}

/// JavaScript strings may hold a lone UTF-16 surrogate, Rust strings may not: palisade decodes
/// each as U+FFFD (the replacement character) instead of refusing the payload, and the connection
/// carries on.
#[tokio::test]
async fn lone_surrogates_in_a_payload_become_replacement_characters() {
    let (server, mut socket) = nest_like_server(&Arc::default()).await;
    // `get-user` decodes the payload into a Rust struct (a handler echoing the payload's text,
    // as `slow` does, sends the escapes back as they came, as NestJS does).
    let request = r#"{"pattern":"get-user","data":{"id":"x\ud800y\udfff"},"id":"s"}"#;
    socket
        .write_all(format!("{}#{request}", request.len()).as_bytes())
        .await
        .unwrap();
    let reply = r#"{"response":{"id":"x�y�","username":"userx�y�","email":"userx�y�@example.com"},"isDisposed":true,"id":"s"}"#;
    assert_eq!(
        read_frames(&mut socket, 1).await,
        [format!("{}#{reply}", reply.encode_utf16().count())]
    );
    socket.write_all(CAPTURE[2].0.as_bytes()).await.unwrap();
    assert_eq!(read_frames(&mut socket, 1).await, CAPTURE[2].1);
    server.shutdown().await;
}

/// A fake NestJS server that answers each request with the captured reply frames, re-addressed to
/// the request's id, and records the request frames it received.
async fn replaying_server() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (log, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buffer = String::new();
        let mut chunk = [0u8; 4096];
        loop {
            let read = socket.read(&mut chunk).await.unwrap();
            if read == 0 {
                return;
            }
            buffer.push_str(std::str::from_utf8(&chunk[..read]).unwrap());
            while let Some(hash) = buffer.find('#') {
                let units: usize = buffer[..hash].parse().unwrap();
                let body: String = buffer[hash + 1..]
                    .chars()
                    .scan(0, |taken, c| {
                        (*taken < units).then(|| {
                            *taken += c.len_utf16();
                            c
                        })
                    })
                    .collect();
                if body.encode_utf16().count() < units {
                    break;
                }
                buffer.drain(..hash + 1 + body.len());
                log.send(format!("{units}#{body}")).unwrap();
                let request: Value = serde_json::from_str(&body).unwrap();
                let Some(id) = request["id"].as_str() else {
                    continue;
                };
                let pattern = &request["pattern"];
                let (captured, replies) = CAPTURE
                    .iter()
                    .find(|(r, _)| {
                        let captured: Value =
                            serde_json::from_str(r.split_once('#').unwrap().1).unwrap();
                        &captured["pattern"] == pattern && captured["data"] == request["data"]
                    })
                    .expect("a captured request");
                let captured_id = serde_json::from_str::<Value>(
                    captured.split_once('#').unwrap().1,
                )
                .unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                for reply in *replies {
                    // Same length: both ids are 21 characters.
                    socket
                        .write_all(reply.replace(&captured_id, id).as_bytes())
                        .await
                        .unwrap();
                }
            }
        }
    });
    (addr, received)
}

#[tokio::test]
async fn the_client_reads_nests_replies_and_writes_nests_requests() {
    let (addr, mut sent) = replaying_server().await;
    // No timeout: the default one sends its deadline as a header (tests/rpc_api.rs), and this
    // test compares frames with NestJS's byte for byte.
    let client = Client::builder()
        .no_timeout()
        .connect(TcpTransport::new(addr))
        .await
        .unwrap();

    let user: Value = client.send("get-user", &json!({"id": "42"})).await.unwrap();
    assert_eq!(
        user,
        json!({"id": "42", "username": "user42", "email": "user42@example.com"})
    );
    let frame = sent.recv().await.unwrap();
    let id = serde_json::from_str::<Value>(frame.split_once('#').unwrap().1).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 21, "NestJS-style 21-character ids");
    assert!(
        id.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    // Without tracing (no subscriber here) nothing beyond NestJS's packet goes out: the frame is
    // exactly NestJS's, with our id.
    let json = format!(r#"{{"pattern":"get-user","data":{{"id":"42"}},"id":"{id}"}}"#);
    assert_eq!(frame, format!("{}#{json}", json.len()));

    let missing = client
        .send::<Value>("get-user", &json!({"id": "missing"}))
        .await
        .unwrap_err();
    assert_eq!(missing.domain_code(), Some("USER_NOT_FOUND"));
    assert_eq!(
        client
            .send::<i64>(json!({"cmd": "sum"}), &[5, 6])
            .await
            .unwrap(),
        11
    );
    // An object pattern goes on the wire as the object (NestJS's request form).
    let _ = sent.recv().await.unwrap();
    let sum_frame = sent.recv().await.unwrap();
    assert!(
        sum_frame
            .split_once('#')
            .unwrap()
            .1
            .starts_with(r#"{"pattern":{"cmd":"sum"},"data":[5,6],"id":""#),
        "{sum_frame}"
    );
    assert_eq!(
        client
            .send::<i64>(json!({"role": "math", "cmd": "sum"}), &[20, 22])
            .await
            .unwrap(),
        42
    );
    let fail = client.send::<()>("fail", &json!({})).await.unwrap_err();
    assert_eq!(fail.err(), json!({"status": "error", "message": "boom"}));
    let crash = client.send::<()>("crash", &json!({})).await.unwrap_err();
    assert_eq!(crash.code(), palisade::rpc::Code::Internal);
    let unknown = client
        .send::<()>("no-such-pattern", &json!({"x": 1}))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), palisade::rpc::Code::Unimplemented);
    let unicode = json!({"ms":0,"text":"héllo wörld ✓ € 日本語 😀🚀 end","nested":{"ключ":"значение","emoji":"👍🏽"}});
    assert_eq!(
        client.send::<Value>("slow", &unicode).await.unwrap(),
        unicode
    );
    let counts: Vec<u32> = client
        .send_stream::<u32>("count", &3)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(counts, [1, 2, 3]);
}

#[tokio::test]
async fn events_go_out_like_nests_with_the_route_string_as_pattern() {
    let (addr, mut sent) = replaying_server().await;
    let client = Client::builder()
        .connect(TcpTransport::new(addr))
        .await
        .unwrap();
    client
        .emit("no-such-event", &json!({"x": 1}))
        .await
        .unwrap();
    client
        .emit(json!({"cmd": "no-such-event"}), &json!({"x": 2}))
        .await
        .unwrap();
    let strip = |frame: String| {
        // Drop palisade's headers extension (written last) to compare with NestJS's frame, as
        // text: the key order is part of what is compared.
        let body = frame.split_once('#').unwrap().1.to_owned();
        let text = match body.find(r#","headers":{"#) {
            Some(at) => format!("{}}}", &body[..at]),
            None => body,
        };
        format!("{}#{}", text.encode_utf16().count(), text)
    };
    assert_eq!(strip(sent.recv().await.unwrap()), EVENTS[1]);
    assert_eq!(strip(sent.recv().await.unwrap()), EVENTS[2]);
}
