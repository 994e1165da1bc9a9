//! The conformance suite over NATS, each test against its own `nats-server`.
#![cfg(feature = "nats")]

mod conformance;
mod support;

use conformance::Harness;
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

    fn unknown_patterns_have_no_responders(&self) -> bool {
        true
    }
}

conformance_tests!(Nats::new());
