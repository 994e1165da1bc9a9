//! The conformance suite over RabbitMQ: the machine's broker, a queue of its own per test
//! (auto-deleted once its server stops consuming, so a request nobody serves fails at once as
//! unroutable), reached through a proxy that can cut every connection.
#![cfg(feature = "rabbitmq")]

mod support;

use palisade::conformance::Harness;
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::rabbitmq::{QueueOptions, RmqOptions, RmqServer};
use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};
use std::time::Duration;
use support::rabbitmq::{Cleanup, Proxy, machine_url, unique};

/// The message size limit both sides are configured with.
const LIMIT: usize = 1024 * 1024;

struct Rmq {
    proxy: Proxy,
    queue: String,
    _cleanup: Cleanup,
}

impl Rmq {
    fn new() -> Self {
        let queue = unique("conformance");
        Rmq {
            proxy: Proxy::start(("127.0.0.1", 5672)),
            _cleanup: Cleanup::new(machine_url()).service_queue(&queue, &[1000, 5000, 30000]),
            queue,
        }
    }

    fn options(&self) -> RmqOptions {
        RmqOptions::new([self.proxy.url()])
            .queue(&self.queue)
            .queue_options(QueueOptions::default().durable(false).auto_delete(true))
            .max_message_size(LIMIT)
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
    }
}

impl Harness for Rmq {
    async fn serve(&mut self, server: Server) -> ServerHandle {
        RmqServer::new(self.options()).serve(server).await.unwrap()
    }

    async fn client(&self, builder: ClientBuilder) -> Client {
        builder.connect(self.options()).await.unwrap()
    }

    fn max_message_size(&self) -> Option<usize> {
        Some(LIMIT)
    }

    async fn interrupt(&mut self) -> bool {
        self.proxy.cut();
        true
    }

    async fn restore(&mut self) {
        self.proxy.restore();
    }
}

palisade::conformance_tests!(Rmq::new());
