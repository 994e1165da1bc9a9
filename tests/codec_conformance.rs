//! The transport conformance suite with MessagePack bodies: over TCP (frames whose length counts
//! bytes) and over NATS, each case against its own server or broker.
#![cfg(all(feature = "msgpack", feature = "tcp", feature = "nats"))]

mod support;

mod tcp {
    use palisade::conformance::Harness;
    use palisade::rpc::transport::ServerTransport;
    use palisade::rpc::transport::tcp::{TcpOptions, TcpServer, TcpTransport};
    use palisade::rpc::wire::MessagePackCodec;
    use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};

    #[derive(Default)]
    struct MsgpackTcp {
        addr: Option<String>,
    }

    /// A small frame limit, so that the size-limit cases move little data.
    const MAX_FRAME: usize = 64 * 1024;

    fn options() -> TcpOptions {
        TcpOptions::new()
            .max_frame_len(MAX_FRAME)
            .codec(MessagePackCodec)
    }

    impl Harness for MsgpackTcp {
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

    palisade::conformance_tests!(MsgpackTcp::default());
}

mod nats {
    use super::support::nats::Broker;
    use palisade::conformance::{Harness, UnknownPatterns};
    use palisade::rpc::transport::ServerTransport;
    use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
    use palisade::rpc::wire::MessagePackCodec;
    use palisade::rpc::{Client, ClientBuilder, Server, ServerHandle};

    struct MsgpackNats {
        broker: Broker,
    }

    impl MsgpackNats {
        fn new() -> Self {
            MsgpackNats {
                broker: Broker::start(),
            }
        }

        fn options(&self) -> NatsOptions {
            NatsOptions::new([self.broker.url()]).codec(MessagePackCodec)
        }
    }

    impl Harness for MsgpackNats {
        async fn serve(&mut self, server: Server) -> ServerHandle {
            NatsServer::new(self.options()).serve(server).await.unwrap()
        }

        async fn client(&self, builder: ClientBuilder) -> Client {
            builder.connect(self.options()).await.unwrap()
        }

        fn unknown_patterns(&self) -> UnknownPatterns {
            UnknownPatterns::NoResponders
        }

        fn max_message_size(&self) -> Option<usize> {
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

    palisade::conformance_tests!(MsgpackNats::new());
}
