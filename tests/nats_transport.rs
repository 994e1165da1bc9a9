//! The conformance suite over NATS, each test against its own `nats-server`.
#![cfg(feature = "nats")]

mod support;

use palisade::conformance::{Harness, UnknownPatterns};
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};
use support::nats::Broker;

struct Nats {
    broker: Broker,
}

impl Nats {
    fn new() -> Self {
        Nats {
            broker: Broker::start(),
        }
    }
}

impl Harness for Nats {
    async fn serve(&mut self, server: Server) -> ServerHandle {
        NatsServer::new(NatsOptions::new([self.broker.url()]))
            .serve(server)
            .await
            .unwrap()
    }

    async fn client(&self, builder: ClientBuilder) -> Client {
        builder
            .connect(NatsOptions::new([self.broker.url()]))
            .await
            .unwrap()
    }

    fn unknown_patterns(&self) -> UnknownPatterns {
        UnknownPatterns::NoResponders
    }

    fn max_message_size(&self) -> Option<usize> {
        // nats-server's default max_payload.
        Some(1024 * 1024)
    }

    async fn interrupt(&mut self) -> bool {
        self.broker.stop();
        true
    }

    async fn restore(&mut self) {
        self.broker.restart();
    }
}

palisade::conformance_tests!(Nats::new());
