//! The bare `async-nats` loops the NATS bench measures palisade against: a subscriber that
//! publishes each payload back to its reply subject, and `Client::request`. Shared by
//! `benches/nats.rs` and `examples/nats_cpu.rs`.

use futures::StreamExt;

/// Subscribes to `bare-echo` on its own connection and answers each request with its payload.
pub async fn serve_bare_echo(url: &str) {
    let responder = async_nats::connect(url).await.unwrap();
    let mut requests = responder.subscribe("bare-echo").await.unwrap();
    responder.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            if let Some(reply) = message.reply {
                responder.publish(reply, message.payload).await.unwrap();
            }
        }
    });
}

/// One request to the bare echo, checked.
pub async fn bare_call(client: &async_nats::Client, x: u64) {
    let reply = client
        .request("bare-echo", x.to_string().into())
        .await
        .unwrap();
    assert_eq!(reply.payload, x.to_string().as_bytes());
}

/// Subscribes to `bare-nest-echo` on its own connection and answers each request as the bare
/// Redis and MQTT servers do: the NestJS packet parsed into a `serde_json::Value`, a reply
/// packet written with its id. The same work as palisade's server, without palisade.
#[allow(dead_code)] // for nats_cpu only
pub async fn serve_bare_nest_echo(url: &str) {
    let responder = async_nats::connect(url).await.unwrap();
    let mut requests = responder.subscribe("bare-nest-echo").await.unwrap();
    responder.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let packet: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            if let (Some(reply), Some(id)) = (message.reply, packet.get("id")) {
                let body = format!(
                    r#"{{"response":{},"isDisposed":true,"id":{id}}}"#,
                    packet["data"]
                );
                responder.publish(reply, body.into()).await.unwrap();
            }
        }
    });
}

/// One request to the NestJS-packet echo, the packet written and the reply read as the bare
/// Redis and MQTT clients do.
#[allow(dead_code)] // for nats_cpu only
pub async fn bare_nest_call(client: &async_nats::Client, x: u64) {
    let body = format!(r#"{{"pattern":"bare-nest-echo","data":{x},"id":"{x}"}}"#);
    let reply = client.request("bare-nest-echo", body.into()).await.unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["response"].as_u64(), Some(x));
}
