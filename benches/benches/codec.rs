//! The codec seam: NestJS's JSON packets against MessagePack, for the same messages.
//!
//! - `codec/*`: one request and its reply through the codec alone — the client encodes the
//!   request, the server decodes it, the server encodes the reply, the client decodes it — for a
//!   small payload (the get-user request) and a page of 100 records. The bench prints each
//!   message's size in both codecs.
//! - `codec_nats/*`: `send` round trips through a local nats-server with 64 in flight, a JSON
//!   client and server beside a MessagePack pair, in the same run.
//!
//! ```sh
//! cargo bench -p palisade-benches --bench codec
//! ```

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use palisade::rpc::transport::ReplyPacket;
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
use palisade::rpc::wire::{Codec, JsonCodec, MessagePackCodec};
use palisade::rpc::{Client, Headers, Payload, RawJson, Router, Server};
use serde_json::{Value, json};
use std::hint::black_box;
use std::time::Duration;

mod support;
use support::in_tasks;

#[path = "../../tests/support/nats.rs"]
mod broker;

fn page() -> Value {
    let records: Vec<Value> = (0..100)
        .map(|n| {
            json!({
                "id": n, "name": format!("user-{n}"), "email": format!("user{n}@example.com"),
                "age": 20 + n % 50, "score": n as f64 * 1.25, "active": n % 3 != 0,
                "tags": ["a", "b"],
            })
        })
        .collect();
    json!({"page": 1, "total": 1000, "records": records})
}

/// One request and its reply through `codec`: what a client and a server do per call.
fn round_trip(codec: &dyn Codec, pattern: &RawJson, data: &RawJson, reply: &RawJson) -> usize {
    let mut request = Vec::new();
    codec
        .encode_request(
            &mut request,
            pattern,
            data,
            Some("ae27e2a42bb78600f9957"),
            &Headers::new(),
        )
        .unwrap();
    let request = Bytes::from(request);
    let incoming = codec.decode_incoming(&request).unwrap();
    let id = incoming.id.unwrap();
    let mut answer = Vec::new();
    let packet = ReplyPacket::Value {
        response: reply.clone(),
        last: true,
    };
    codec.encode_reply(&mut answer, &packet, Some(&id)).unwrap();
    let (_, read) = codec.decode_reply(&Bytes::from(answer)).unwrap();
    match read {
        ReplyPacket::Value { response, .. } => {
            response.as_bytes().len() + incoming.data.as_bytes().len()
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn sizes(codec: &dyn Codec, pattern: &RawJson, data: &RawJson, reply: &RawJson) -> (usize, usize) {
    let mut request = Vec::new();
    codec
        .encode_request(
            &mut request,
            pattern,
            data,
            Some("ae27e2a42bb78600f9957"),
            &Headers::new(),
        )
        .unwrap();
    let mut answer = Vec::new();
    let id = RawJson::to_json("ae27e2a42bb78600f9957").unwrap();
    let packet = ReplyPacket::Value {
        response: reply.clone(),
        last: true,
    };
    codec.encode_reply(&mut answer, &packet, Some(&id)).unwrap();
    (request.len(), answer.len())
}

fn codecs(c: &mut Criterion) {
    let pattern = RawJson::to_json("get-user").unwrap();
    let cases = [
        (
            "get_user",
            RawJson::to_json(&json!({"id": "42"})).unwrap(),
            RawJson::to_json(&json!({"id": "42", "name": "Ann", "age": 36})).unwrap(),
        ),
        (
            "page_of_100",
            RawJson::to_json(&json!({"page": 1, "size": 100})).unwrap(),
            RawJson::to_json(&page()).unwrap(),
        ),
    ];
    for (name, data, reply) in &cases {
        for codec in [&JsonCodec as &dyn Codec, &MessagePackCodec] {
            let (request, answer) = sizes(codec, &pattern, data, reply);
            println!(
                "codec/{name}: {} request {request} bytes, reply {answer} bytes",
                codec.name()
            );
        }
        let mut group = c.benchmark_group(format!("codec/{name}"));
        group.bench_function("json", |b| {
            b.iter(|| {
                round_trip(
                    &JsonCodec,
                    black_box(&pattern),
                    black_box(data),
                    black_box(reply),
                )
            })
        });
        group.bench_function("messagepack", |b| {
            b.iter(|| {
                round_trip(
                    &MessagePackCodec,
                    black_box(&pattern),
                    black_box(data),
                    black_box(reply),
                )
            })
        });
        group.finish();
    }
}

fn over_nats(c: &mut Criterion) {
    let broker = broker::Broker::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let clients = runtime.block_on(async {
        let mut clients = Vec::new();
        for (name, options) in [
            ("json", NatsOptions::new([broker.url()])),
            (
                "messagepack",
                NatsOptions::new([broker.url()]).codec(MessagePackCodec),
            ),
        ] {
            let pattern = format!("echo-{name}");
            let server = NatsServer::new(options.clone())
                .serve(Server::new(Router::new().message(
                    pattern.as_str(),
                    |Payload(x): Payload<Value>| async move { x },
                )))
                .await
                .unwrap();
            std::mem::forget(server);
            let client = Client::builder().connect(options).await.unwrap();
            clients.push((name, pattern, client));
        }
        clients
    });
    let value = json!({"id": 42, "name": "Ann", "scores": [1.5, 2.5, 3.5], "active": true});
    let mut group = c.benchmark_group("codec_nats/64_in_flight");
    for (name, pattern, client) in clients {
        let value = value.clone();
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let (client, pattern, value) = (client.clone(), pattern.clone(), value.clone());
                in_tasks(iters, 64, move |_| {
                    let (client, pattern, value) = (client.clone(), pattern.clone(), value.clone());
                    async move {
                        let echoed: Value = client.send(pattern.as_str(), &value).await.unwrap();
                        assert_eq!(echoed, value);
                    }
                })
            })
        });
    }
    group.finish();
    drop(broker);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = codecs, over_nats
}
criterion_main!(benches);
