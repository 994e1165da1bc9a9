//! The codec seam: MessagePack bodies between palisade services through real brokers (NATS,
//! RabbitMQ, Redis, MQTT), and a clear error when the two ends disagree on the codec.
#![cfg(all(feature = "nats", feature = "msgpack"))]

mod support;

use bytes::Bytes;
use futures_util::StreamExt;
use palisade::rpc::transport::nats::{
    DurableEvents, NatsOptions, NatsServer, NatsTransport, Storage,
};
use palisade::rpc::transport::{ReplyPacket, ServerTransport};
use palisade::rpc::wire::{Codec, JsonCodec, MessagePackCodec};
use palisade::rpc::{
    Client, Code, Headers, Payload, RawJson, Router, RpcError, Server, ServerHandle, Streaming,
};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::nats::Broker;

fn msgpack(broker: &Broker) -> NatsOptions {
    NatsOptions::new([broker.url()]).codec(MessagePackCodec)
}

fn router(events: Arc<Mutex<Vec<Value>>>) -> Router {
    Router::new()
        .message(
            "echo",
            |Payload(value): Payload<Value>| async move { value },
        )
        .message("count", |Payload(n): Payload<u64>| async move {
            Streaming::iter(1..=n)
        })
        .message("fail", || async {
            Err::<(), _>(RpcError::not_found("no such order"))
        })
        .message("tenant", |headers: Headers| async move {
            headers.get("x-tenant").unwrap_or_default().to_owned()
        })
        .event("seen", move |Payload(value): Payload<Value>| {
            events.lock().unwrap().push(value);
            async {}
        })
}

async fn serve(options: NatsOptions, events: Arc<Mutex<Vec<Value>>>) -> ServerHandle {
    NatsServer::new(options)
        .serve(Server::new(router(events)))
        .await
        .unwrap()
}

/// Numbers of every kind, text that needs escapes, nesting, nulls: what JSON carries must come
/// out of MessagePack the same.
fn awkward_value() -> Value {
    json!({
        "u": u64::MAX, "i": i64::MIN, "f": 0.1, "big": 1.5e300, "neg": -0.0,
        "text": "ünïcødé \"quoted\" \\ \n\t \u{1F600}", "empty": "",
        "list": [1, [2, [3, []]], {}], "null": null, "yes": true, "no": false,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_streams_errors_headers_and_events_cross_in_messagepack() {
    let broker = Broker::start();
    let events = Arc::new(Mutex::new(Vec::new()));
    let _server = serve(msgpack(&broker), Arc::clone(&events)).await;
    let client = Client::builder().connect(msgpack(&broker)).await.unwrap();

    let value = awkward_value();
    assert_eq!(client.send::<Value>("echo", &value).await.unwrap(), value);

    let counted: Vec<u64> = client
        .send_stream::<u64>("count", &3)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(counted, [1, 2, 3]);

    let error = client.send::<()>("fail", &()).await.unwrap_err();
    assert_eq!(
        (error.code(), error.message()),
        (Code::NotFound, "no such order")
    );

    let error = client.send::<()>("nobody-home", &()).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");

    let tenant_client = Client::builder()
        .header("x-tenant", "acme")
        .connect(msgpack(&broker))
        .await
        .unwrap();
    let tenant: String = tenant_client.send("tenant", &()).await.unwrap();
    assert_eq!(tenant, "acme");

    client.emit("seen", &value).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while events.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*events.lock().unwrap(), [value]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bodies_on_the_wire_are_messagepack_that_any_reader_reads() {
    let broker = Broker::start();
    let raw = async_nats::connect(broker.url()).await.unwrap();
    let mut requests = raw.subscribe("echo").await.unwrap();
    raw.flush().await.unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(2))
        .connect(msgpack(&broker))
        .await
        .unwrap();
    let call = tokio::spawn(async move { client.send::<Value>("echo", &json!({"n": 300})).await });
    let request = requests.next().await.unwrap();
    // Decoded with a plain MessagePack library, not palisade: a map with the packet's fields.
    let body: Value = rmp_serde::from_slice(&request.payload).unwrap();
    assert_eq!(body["pattern"], "echo");
    assert_eq!(body["data"], json!({"n": 300}));
    assert!(body["id"].is_string(), "{body}");
    // 300 as a MessagePack uint16 (0xcd 0x01 0x2c), not the text "300".
    assert!(
        request.payload.windows(3).any(|w| w == [0xcd, 0x01, 0x2c]),
        "{:x?}",
        request.payload
    );
    let reply = MessagePackCodec
        .reply_body_for_test(&body["id"], &json!({"n": 301}))
        .unwrap();
    raw.publish(request.reply.unwrap(), reply).await.unwrap();
    assert_eq!(call.await.unwrap().unwrap(), json!({"n": 301}));
}

/// Encodes a last reply the way a MessagePack peer would, through the public `Codec` trait.
trait ReplyForTest {
    fn reply_body_for_test(&self, id: &Value, response: &Value) -> Result<Bytes, RpcError>;
}

impl ReplyForTest for MessagePackCodec {
    fn reply_body_for_test(&self, id: &Value, response: &Value) -> Result<Bytes, RpcError> {
        let mut body = Vec::new();
        let packet = ReplyPacket::Value {
            response: RawJson::to_json(response).unwrap(),
            last: true,
        };
        let id = RawJson::to_json(id).unwrap();
        self.encode_reply(&mut body, &packet, Some(&id))
            .map_err(|error| RpcError::internal_with(error.to_string()))?;
        Ok(Bytes::from(body))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_codec_mismatch_fails_at_once_and_says_so_both_ways() {
    let broker = Broker::start();
    let events = Arc::new(Mutex::new(Vec::new()));
    let _msgpack_server = serve(msgpack(&broker), Arc::clone(&events)).await;
    let json_client = Client::builder()
        .timeout(Duration::from_secs(30))
        .connect(NatsOptions::new([broker.url()]))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let error = json_client.send::<Value>("echo", &1).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{error}");
    assert!(error.message().contains("codec"), "{error}");
    drop(_msgpack_server);

    let json_broker = Broker::start();
    let _json_server = serve(
        NatsOptions::new([json_broker.url()]).codec(JsonCodec),
        Arc::clone(&events),
    )
    .await;
    let msgpack_client = Client::builder()
        .timeout(Duration::from_secs(30))
        .connect(msgpack(&json_broker))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let error = msgpack_client.send::<Value>("echo", &1).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{error}");
    assert!(error.message().contains("codec"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_events_are_read_with_the_servers_codec() {
    let broker = Broker::start_with(&["--jetstream"]);
    let events = Arc::new(Mutex::new(Vec::new()));
    let _server = NatsServer::new(msgpack(&broker))
        .durable_events(DurableEvents::new("SEEN").storage(Storage::Memory))
        .serve(Server::new(router(Arc::clone(&events))))
        .await
        .unwrap();
    let transport = NatsTransport::new(msgpack(&broker))
        .durable_events()
        .connect()
        .await
        .unwrap();
    let client = Client::builder().build(transport);
    for n in 0..20 {
        client.emit("seen", &json!({"n": n})).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while events.lock().unwrap().len() < 20 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut seen: Vec<u64> = events
        .lock()
        .unwrap()
        .iter()
        .map(|event| event["n"].as_u64().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
}

#[test]
fn messagepack_reads_nests_reply_rules_and_refuses_what_is_not_messagepack() {
    let codec = MessagePackCodec;
    let mut body = Vec::new();
    let id = RawJson::to_json("7").unwrap();
    codec
        .encode_reply(&mut body, &ReplyPacket::NoHandler, Some(&id))
        .unwrap();
    let (read_id, packet) = codec.decode_reply(&Bytes::from(body)).unwrap();
    assert_eq!(read_id.unwrap().as_str(), r#""7""#);
    assert!(matches!(packet, ReplyPacket::NoHandler));

    for packet in [
        ReplyPacket::Complete,
        ReplyPacket::Error(RawJson::to_json(&json!({"message": "x"})).unwrap()),
        ReplyPacket::Value {
            response: RawJson::to_json(&json!([1, 2])).unwrap(),
            last: false,
        },
    ] {
        let mut body = Vec::new();
        codec.encode_reply(&mut body, &packet, Some(&id)).unwrap();
        let (_, read) = codec.decode_reply(&Bytes::from(body)).unwrap();
        assert_eq!(format!("{read:?}"), format!("{packet:?}"));
    }

    // JSON text, a truncated map, trailing bytes: errors that name the codec, never a panic.
    for bad in [
        &br#"{"response":1}"#[..],
        &[0x83, 0xa7][..],
        &[0xc0, 0xc0][..],
    ] {
        let error = codec
            .decode_reply(&Bytes::copy_from_slice(bad))
            .unwrap_err();
        assert_eq!(error.codec(), "MessagePack");
        assert!(error.to_string().contains("MessagePack"), "{error}");
    }
    // A value that is not a packet is an event's data, as NestJS reads an external message.
    let mut body = Vec::new();
    rmp::encode::write_u8(&mut body, 42).unwrap();
    let incoming = codec.decode_incoming(&Bytes::from(body)).unwrap();
    assert_eq!(
        (incoming.data.as_str(), incoming.id.is_none()),
        ("42", true)
    );
}

#[cfg(feature = "rabbitmq")]
mod rabbitmq {
    use super::*;
    use palisade::rpc::transport::rabbitmq::{QueueOptions, RmqOptions, RmqServer};
    use support::rabbitmq::{Cleanup, machine_url, unique};

    fn options(queue: &str) -> RmqOptions {
        RmqOptions::new([machine_url()])
            .queue(queue)
            .queue_options(QueueOptions::default().durable(false))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_streams_errors_and_events_cross_in_messagepack_and_a_mismatch_fails_fast() {
        let queue = unique("codec");
        let _cleanup = Cleanup::new(machine_url()).service_queue(&queue, &[1000, 5000, 30000]);
        let events = Arc::new(Mutex::new(Vec::new()));
        let _server = RmqServer::new(options(&queue).codec(MessagePackCodec))
            .serve(Server::new(router(Arc::clone(&events))))
            .await
            .unwrap();
        let client = Client::builder()
            .connect(options(&queue).codec(MessagePackCodec))
            .await
            .unwrap();
        let value = awkward_value();
        assert_eq!(client.send::<Value>("echo", &value).await.unwrap(), value);
        let counted: Vec<u64> = client
            .send_stream::<u64>("count", &3)
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(counted, [1, 2, 3]);
        let error = client.send::<()>("fail", &()).await.unwrap_err();
        assert_eq!(
            (error.code(), error.message()),
            (Code::NotFound, "no such order")
        );
        let error = client.send::<()>("nobody-home", &()).await.unwrap_err();
        assert!(
            error.message().contains("no matching message handler"),
            "{error}"
        );
        client.emit("seen", &value).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while events.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*events.lock().unwrap(), [value]);

        let json_client = Client::builder()
            .timeout(Duration::from_secs(30))
            .connect(options(&queue))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let error = json_client.send::<Value>("echo", &1).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "{error}");
        assert!(error.message().contains("codec"), "{error}");
    }
}

/// The same conversation on a transport whose replies travel by id on a shared channel.
async fn converse(client: &Client, events: &Arc<Mutex<Vec<Value>>>) {
    let value = awkward_value();
    assert_eq!(client.send::<Value>("echo", &value).await.unwrap(), value);
    let counted: Vec<u64> = client
        .send_stream::<u64>("count", &3)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(counted, [1, 2, 3]);
    let error = client.send::<()>("fail", &()).await.unwrap_err();
    assert_eq!(
        (error.code(), error.message()),
        (Code::NotFound, "no such order")
    );
    client.emit("seen", &value).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while events.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(events.lock().unwrap().last(), Some(&value));
}

/// A JSON client against a MessagePack server: the server cannot read the request, so it cannot
/// answer it; the client is told nothing before its timeout, and the server handled nothing.
async fn mismatch_times_out(client: &Client) {
    let error = client.send::<Value>("echo", &1).await.unwrap_err();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use palisade::rpc::transport::redis::{RedisOptions, RedisServer};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_streams_errors_and_events_cross_in_messagepack() {
        let broker = support::redis::Broker::start();
        let events = Arc::new(Mutex::new(Vec::new()));
        let options = RedisOptions::new(broker.url()).codec(MessagePackCodec);
        let _server = RedisServer::new(options.clone())
            .serve(Server::new(router(Arc::clone(&events))))
            .await
            .unwrap();
        let client = Client::builder().connect(options).await.unwrap();
        converse(&client, &events).await;
        let json_client = Client::builder()
            .timeout(Duration::from_millis(500))
            .connect(RedisOptions::new(broker.url()))
            .await
            .unwrap();
        mismatch_times_out(&json_client).await;
    }
}

#[cfg(feature = "mqtt")]
mod mqtt {
    use super::*;
    use palisade::rpc::transport::mqtt::{MqttOptions, MqttServer};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_streams_errors_and_events_cross_in_messagepack() {
        let broker = support::mqtt::Broker::start();
        let events = Arc::new(Mutex::new(Vec::new()));
        let options = MqttOptions::new(broker.url()).codec(MessagePackCodec);
        let _server = MqttServer::new(options.clone())
            .serve(Server::new(router(Arc::clone(&events))))
            .await
            .unwrap();
        let client = Client::builder().connect(options).await.unwrap();
        converse(&client, &events).await;
        let json_client = Client::builder()
            .timeout(Duration::from_millis(500))
            .connect(MqttOptions::new(broker.url()))
            .await
            .unwrap();
        mismatch_times_out(&json_client).await;
    }
}

#[cfg(feature = "kafka")]
mod kafka {
    use super::*;
    use palisade::rpc::transport::kafka::{KafkaServer, KafkaTransport};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn values_cross_in_messagepack_and_a_json_client_is_refused_at_once() {
        let broker = support::kafka::Broker::start();
        let events = Arc::new(Mutex::new(Vec::new()));
        let options = support::kafka::options(&broker).codec(MessagePackCodec);
        let _server = KafkaServer::new(options.clone())
            .serve(Server::new(router(Arc::clone(&events))))
            .await
            .unwrap();
        let client = Client::builder()
            .timeout(Duration::from_secs(20))
            .connect(KafkaTransport::new(options))
            .await
            .unwrap();
        converse(&client, &events).await;
        // A NestJS-shaped message still picks the record's key; its value goes in MessagePack.
        client
            .emit("seen", &json!({"key": "k-1", "value": {"n": 7}}))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while events.lock().unwrap().last() != Some(&json!({"n": 7}))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(events.lock().unwrap().last(), Some(&json!({"n": 7})));

        let json_client = Client::builder()
            .timeout(Duration::from_secs(20))
            .connect(KafkaTransport::new(support::kafka::options(&broker)))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let error = json_client
            .send::<Value>("echo", &json!({"a": 1}))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(15), "{error}");
        assert!(error.message().contains("codec"), "{error}");
    }
}

#[cfg(feature = "tcp")]
mod tcp {
    use super::*;
    use palisade::rpc::transport::tcp::{TcpOptions, TcpServer, TcpTransport};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_json_client_and_a_messagepack_server_part_at_once_both_ways() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let serve = |options: TcpOptions| {
            let events = Arc::clone(&events);
            async move {
                TcpServer::bind("127.0.0.1:0")
                    .await
                    .unwrap()
                    .options(options)
                    .serve(Server::new(router(events)))
                    .await
                    .unwrap()
            }
        };
        let msgpack_server = serve(TcpOptions::new().codec(MessagePackCodec)).await;
        let json_server = serve(TcpOptions::new()).await;
        for (server, client_options) in [
            (&msgpack_server, TcpOptions::new()),
            (&json_server, TcpOptions::new().codec(MessagePackCodec)),
        ] {
            let addr = server.local_addr().unwrap().to_string();
            let client = Client::builder()
                .timeout(Duration::from_secs(30))
                .connect(TcpTransport::with_options(addr, client_options))
                .await
                .unwrap();
            let started = std::time::Instant::now();
            let error = client
                .send::<Value>("echo", &json!({"a": 1}))
                .await
                .unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(5), "{error}");
        }
        // Neither handler ran.
        assert!(events.lock().unwrap().is_empty());
    }
}
