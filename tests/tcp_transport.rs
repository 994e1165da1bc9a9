//! The conformance suite over real TCP sockets on loopback.
#![cfg(feature = "tcp")]

mod conformance;
mod support;

use conformance::Harness;
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::tcp::{TcpServer, TcpTransport};
use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};

#[derive(Default)]
struct Tcp {
    addr: Option<String>,
}

impl Harness for Tcp {
    async fn serve(&mut self, server: Server) -> ServerHandle {
        let handle = TcpServer::bind("127.0.0.1:0")
            .await
            .unwrap()
            .serve(server)
            .await
            .unwrap();
        self.addr = Some(handle.local_addr().unwrap().to_string());
        handle
    }

    async fn client(&self, builder: ClientBuilder) -> Client {
        let addr = self.addr.clone().expect("serve before connecting");
        builder.connect(TcpTransport::new(addr)).await.unwrap()
    }
}

conformance_tests!(Tcp::default());
