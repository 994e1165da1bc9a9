//! Sensor readings over MQTT, NestJS-compatible: devices (or a NestJS `ClientProxy` with
//! `Transport.MQTT`) publish on `temperature`, and a NestJS service on the same broker could
//! answer the `current-temperature` requests instead of the one below.
//!
//! Two instances share the work through a shared subscription (`$share/thermostat/...`), so each
//! request is answered once; readings are durable events — a persistent session per instance,
//! QoS 1, acknowledged once handled, retried, and dead-lettered to
//! `palisade/dead-letter/temperature` after their last attempt.
//!
//! ```text
//! cargo run --example mqtt_sensors --features mqtt    # MQTT_URL, default mqtt://127.0.0.1:1883
//! ```

use palisade::rpc::transport::mqtt::{
    DurableEvents, MqttOptions, MqttServer, MqttTransport, MqttVersion,
};
use palisade::rpc::{Client, Payload, Router, RpcError, Server, ServerHandle};
use std::sync::{Arc, Mutex};
use std::time::Duration;

async fn instance(
    options: &MqttOptions,
    name: &'static str,
    last: Arc<Mutex<Option<f64>>>,
) -> Result<ServerHandle, RpcError> {
    let reading = Arc::clone(&last);
    let router = Router::new()
        .message("current-temperature", move || {
            let last = *last.lock().unwrap();
            async move { last.map(|celsius| format!("{celsius} °C, says {name}")) }
        })
        .event("temperature", move |Payload(celsius): Payload<f64>| {
            let reading = Arc::clone(&reading);
            async move {
                if !(-90.0..=60.0).contains(&celsius) {
                    // Retried after 200 ms, then dead-lettered.
                    return Err(RpcError::exception(format!(
                        "{celsius} °C is not a reading"
                    )));
                }
                *reading.lock().unwrap() = Some(celsius);
                Ok(())
            }
        });
    Server::new(router)
        .serve(
            MqttServer::new(options.clone().client_id(name))
                .shared_group("thermostat")
                .durable_events(
                    DurableEvents::new(format!("{name}-events"))
                        .max_deliveries(2)
                        .backoff([Duration::from_millis(200)]),
                ),
        )
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".to_owned());
    let options = MqttOptions::new(url).version(MqttVersion::V5);
    // Both instances see every reading they are given; the shared group gives each to one.
    let last = Arc::new(Mutex::new(None));
    let first = instance(&options, "thermostat-1", Arc::clone(&last)).await?;
    let second = instance(&options, "thermostat-2", Arc::clone(&last)).await?;

    let device = Client::builder()
        .timeout(Duration::from_secs(5))
        // QoS 1: the broker keeps readings for the instances' sessions while they are away.
        .connect(MqttTransport::new(options).durable_events())
        .await?;
    device.emit("temperature", &21.5).await?;
    device.emit("temperature", &999.0).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        let answer: Option<String> = device.send("current-temperature", &()).await?;
        println!("{answer:?}");
    }
    println!("999 °C is on palisade/dead-letter/temperature by now");
    first.shutdown().await;
    second.shutdown().await;
    Ok(())
}
