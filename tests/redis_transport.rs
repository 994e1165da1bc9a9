//! The conformance suite over Redis, each test against its own `redis-server` (pub/sub channels
//! are global to a Redis: tests sharing one would answer each other's requests).
#![cfg(feature = "redis")]

mod support;

use palisade::conformance::{Harness, UnknownPatterns};
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::redis::{RedisOptions, RedisServer};
use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};
use std::time::Duration;
use support::redis::Broker;

struct Redis {
    broker: Broker,
}

impl Redis {
    fn new() -> Self {
        Redis {
            broker: Broker::start(),
        }
    }

    fn options(&self) -> RedisOptions {
        RedisOptions::new(self.broker.url())
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
    }
}

impl Harness for Redis {
    async fn serve(&mut self, server: Server) -> ServerHandle {
        RedisServer::new(self.options())
            .serve(server)
            .await
            .unwrap()
    }

    async fn client(&self, builder: ClientBuilder) -> Client {
        builder.connect(self.options()).await.unwrap()
    }

    fn unknown_patterns(&self) -> UnknownPatterns {
        // PUBLISH says how many subscribers received the request.
        UnknownPatterns::NoResponders
    }

    async fn interrupt(&mut self) -> bool {
        self.broker.stop();
        true
    }

    async fn restore(&mut self) {
        self.broker.restart();
    }
}

palisade::conformance_tests!(Redis::new());
