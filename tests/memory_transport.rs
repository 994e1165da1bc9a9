//! The conformance suite over the in-memory transport.

mod support;

use palisade::conformance::Harness;
use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};

struct Memory(MemoryTransport);

impl Harness for Memory {
    async fn serve(&mut self, server: Server) -> ServerHandle {
        self.0.serve_now(server)
    }

    async fn client(&self, builder: ClientBuilder) -> Client {
        builder.connect(self.0.clone()).await.unwrap()
    }
}

palisade::conformance_tests!(Memory(MemoryTransport::new()));

/// A transport served again (a restarted service) sends to the new server, even through a client
/// connected before.
#[tokio::test]
async fn a_server_served_later_replaces_the_first() {
    use palisade::rpc::{Code, Router};
    let transport = MemoryTransport::new();
    let client = Client::builder().connect(transport.clone()).await.unwrap();
    let no_server = client.send::<String>("who", &()).await.unwrap_err();
    assert_eq!(no_server.code(), Code::Unavailable);

    let first = transport.serve_now(Server::new(
        Router::new().message("who", || async { "first" }),
    ));
    assert_eq!(client.send::<String>("who", &()).await.unwrap(), "first");
    first.shutdown().await;
    let stopped = client.send::<String>("who", &()).await.unwrap_err();
    assert_eq!(stopped.code(), Code::Unavailable);

    for name in ["second", "third"] {
        let _server = transport.serve_now(Server::new(
            Router::new().message("who", move || async move { name }),
        ));
        assert_eq!(client.send::<String>("who", &()).await.unwrap(), name);
    }
}
