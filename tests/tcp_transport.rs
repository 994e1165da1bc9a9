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

/// A stream still producing at the caller's deadline is stopped by the server: the caller gets
/// the values sent before it, then the deadline's error. The deadline travels as the timeout
/// header of a client that enforces none itself, so only the server can end the stream.
#[tokio::test]
async fn a_stream_still_running_at_the_callers_deadline_is_stopped_by_the_server() {
    use futures_util::StreamExt;
    use palisade::conformance::Harness as _;
    use palisade::rpc::{Code, Router, RpcError, Streaming, TIMEOUT_HEADER};
    use std::time::Duration;
    let router = Router::new().message("ticks", || async {
        Streaming(futures_util::stream::unfold(0u64, |n| async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Some((Ok::<_, RpcError>(n + 1), n + 1))
        }))
    });
    let mut tcp = Tcp::default();
    let server = tcp.serve(Server::new(router)).await;
    let client = tcp
        .client(Client::builder().no_timeout().header(TIMEOUT_HEADER, "750"))
        .await;
    let items: Vec<Result<u64, RpcError>> = tokio::time::timeout(
        Duration::from_secs(10),
        client
            .send_stream::<u64>("ticks", &())
            .await
            .unwrap()
            .take(4)
            .collect(),
    )
    .await
    .expect("the stream was never stopped");
    let values: Vec<u64> = items
        .iter()
        .filter_map(|item| item.as_ref().ok().copied())
        .collect();
    assert_eq!(values, [1, 2], "{items:?}");
    let error = items.last().unwrap().as_ref().unwrap_err();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
    server.shutdown().await;
}
