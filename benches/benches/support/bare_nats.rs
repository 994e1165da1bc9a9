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
