//! The conformance suite over Kafka, each test against its own broker (Tansu, memory storage).
#![cfg(feature = "kafka")]

mod support;

use palisade::conformance::{Harness, REQUEST_PATTERNS, UnknownPatterns};
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::kafka::{KafkaOptions, KafkaServer, KafkaTransport};
use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};
use std::time::Duration;
use support::kafka::Broker;

/// A small record limit, so that the size-limit cases move little data.
const MAX_RECORD: usize = 64 * 1024;

struct Kafka {
    broker: Broker,
}

impl Kafka {
    fn new() -> Self {
        Kafka {
            broker: Broker::start(),
        }
    }

    fn options(&self) -> KafkaOptions {
        support::kafka::options(&self.broker).max_message_bytes(MAX_RECORD)
    }
}

impl Harness for Kafka {
    async fn serve(&mut self, server: Server) -> ServerHandle {
        KafkaServer::new(self.options())
            .serve(server)
            .await
            .unwrap()
    }

    async fn client(&self, builder: ClientBuilder) -> Client {
        // As a NestJS ClientKafka must (`subscribeToResponseOf`), the client declares the patterns
        // it calls, and connecting waits until it reads their reply topics.
        builder
            .connect(KafkaTransport::new(self.options()).reply_to(REQUEST_PATTERNS.iter().copied()))
            .await
            .unwrap()
    }

    fn acknowledged_events(&self) -> bool {
        true
    }

    fn object_patterns(&self) -> bool {
        false
    }

    fn unknown_patterns(&self) -> UnknownPatterns {
        UnknownPatterns::Silence
    }

    fn max_message_size(&self) -> Option<usize> {
        Some(MAX_RECORD)
    }

    async fn interrupt(&mut self) -> bool {
        self.broker.stop();
        true
    }

    async fn restore(&mut self) {
        // A broker is down for seconds, not milliseconds. (librdkafka 2.12.1 crashes in its
        // metadata cache when a broker that lost every topic — Tansu's memory storage — is back
        // within a second or so; see ARCHITECTURE.md.)
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.broker.restart();
    }
}

palisade::conformance_tests!(Kafka::new());
