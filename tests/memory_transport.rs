//! The conformance suite over the in-memory transport.

mod conformance;
mod support;

use conformance::Harness;
use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};

struct Memory(MemoryTransport);

impl Harness for Memory {
    async fn serve(&mut self, server: Server) -> ServerHandle {
        self.0.serve(server)
    }

    async fn client(&self, builder: ClientBuilder) -> Client {
        builder.connect(self.0.clone()).await.unwrap()
    }
}

conformance_tests!(Memory(MemoryTransport::new()));
