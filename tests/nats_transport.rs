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
    /// Clients send the deadline as a NATS header instead of in the body.
    deadline_header: bool,
}

impl Nats {
    fn new() -> Self {
        Nats {
            broker: Broker::start(),
            deadline_header: false,
        }
    }

    fn with_deadline_header() -> Self {
        Nats {
            deadline_header: true,
            ..Nats::new()
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
            .connect(NatsOptions::new([self.broker.url()]).deadline_header(self.deadline_header))
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

/// The cases where the deadline's way over the wire matters, with the deadline as a NATS header.
mod deadline_header {
    use super::Nats;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deadlines_are_honoured_by_the_server() {
        palisade::conformance::deadlines_are_honoured_by_the_server(Nats::with_deadline_header())
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn headers_reach_handlers() {
        palisade::conformance::headers_reach_handlers(Nats::with_deadline_header()).await;
    }
}
