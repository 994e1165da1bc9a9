//! The conformance suite over real TCP sockets on loopback.
#![cfg(feature = "tcp")]

mod support;

use palisade::conformance::Harness;
use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::tcp::{TcpOptions, TcpServer, TcpTransport};
use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};

#[derive(Default)]
struct Tcp {
    addr: Option<String>,
}

/// A small frame limit, so that the size-limit cases move little data.
const MAX_FRAME: usize = 64 * 1024;

fn options() -> TcpOptions {
    TcpOptions::new().max_frame_len(MAX_FRAME)
}

impl Harness for Tcp {
    fn max_message_size(&self) -> Option<usize> {
        Some(MAX_FRAME)
    }

    async fn serve(&mut self, server: Server) -> ServerHandle {
        let handle = TcpServer::bind("127.0.0.1:0")
            .await
            .unwrap()
            .options(options())
            .serve(server)
            .await
            .unwrap();
        self.addr = Some(handle.local_addr().unwrap().to_string());
        handle
    }

    async fn client(&self, builder: ClientBuilder) -> Client {
        let addr = self.addr.clone().expect("serve before connecting");
        builder
            .connect(TcpTransport::with_options(addr, options()))
            .await
            .unwrap()
    }
}

palisade::conformance_tests!(Tcp::default());

/// The cases where the server stops a handler (the caller's deadline, the end of a shutdown's
/// grace period) again with every handler in a task of its own from its first step: nothing but
/// that task ever polls it, so its timer and the shutdown token must be armed there.
mod spawned_handlers {
    use super::*;

    #[derive(Default)]
    struct Spawning(Tcp);

    impl Harness for Spawning {
        fn max_message_size(&self) -> Option<usize> {
            self.0.max_message_size()
        }

        async fn serve(&mut self, server: Server) -> ServerHandle {
            self.0.serve(server.spawn_handlers(true)).await
        }

        async fn client(&self, builder: ClientBuilder) -> Client {
            self.0.client(builder).await
        }
    }

    #[tokio::test]
    async fn deadlines_are_honoured_by_the_server() {
        palisade::conformance::deadlines_are_honoured_by_the_server(Spawning::default()).await;
    }

    #[tokio::test]
    async fn shutdown_past_the_grace_period_answers_everyone() {
        palisade::conformance::shutdown_past_the_grace_period_answers_everyone(Spawning::default())
            .await;
    }
}
