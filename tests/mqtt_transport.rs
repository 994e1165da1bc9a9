//! The conformance suite over MQTT 3.1.1 and MQTT 5, each test against its own `mosquitto`
//! (topics are global to a broker: tests sharing one would answer each other's requests).
#![cfg(feature = "mqtt")]

mod support;

use palisade::conformance::{Harness, UnknownPatterns};
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::mqtt::{MqttOptions, MqttServer, MqttVersion};
use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};
use std::time::Duration;
use support::mqtt::Broker;

/// The packet size limit both sides are configured with.
const LIMIT: usize = 1024 * 1024;

struct Mqtt {
    broker: Broker,
    version: MqttVersion,
}

impl Mqtt {
    fn new(version: MqttVersion) -> Self {
        Mqtt {
            broker: Broker::start(),
            version,
        }
    }

    fn options(&self) -> MqttOptions {
        MqttOptions::new(self.broker.url())
            .version(self.version)
            .max_packet_size(LIMIT)
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
    }
}

impl Harness for Mqtt {
    async fn serve(&mut self, server: Server) -> ServerHandle {
        MqttServer::new(self.options()).serve(server).await.unwrap()
    }

    async fn client(&self, builder: ClientBuilder) -> Client {
        builder.connect(self.options()).await.unwrap()
    }

    fn unknown_patterns(&self) -> UnknownPatterns {
        // MQTT cannot tell whether anyone subscribed.
        UnknownPatterns::Silence
    }

    fn max_message_size(&self) -> Option<usize> {
        Some(LIMIT)
    }

    async fn interrupt(&mut self) -> bool {
        self.broker.stop();
        true
    }

    async fn restore(&mut self) {
        self.broker.restart();
        // The suite's client must not publish before the server resubscribed: MQTT cannot tell
        // a request nobody is subscribed to yet, which would meet silence until its 30 s
        // deadline. Both reconnect within the 200 ms backoff cap; a second covers a busy machine.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

palisade::conformance_tests!(Mqtt::new(MqttVersion::V311));

mod mqtt5 {
    use super::*;

    palisade::conformance_tests!(Mqtt::new(MqttVersion::V5));
}
