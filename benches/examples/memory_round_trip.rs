//! In-process round trips (`send` → handler → reply over the memory transport) on one
//! `current_thread` runtime: the whole request path of client and server, with no sockets and no
//! thread hops, for counting instructions under callgrind. Counts are exact and repeatable where
//! wall-clock figures on a shared machine are not, so they show a change of a few percent:
//!
//! ```sh
//! cargo build --release -p palisade-benches --example memory_round_trip
//! for n in 2000 12000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/memory_round_trip $n 2>&1 | grep Collected
//! done
//! # (difference) / 10000 = instructions per round trip; callgrind_annotate on a saved
//! # --callgrind-out-file says where they go.
//! ```
//!
//! The client has its default 5 s timeout, so the deadline travels to the server as it does over
//! the network transports.

use palisade::rpc::transport::memory::MemoryTransport;
use palisade::rpc::{Client, Payload, Router, Server};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|arg| arg.parse().expect("a number of round trips"))
        .unwrap_or(10_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let transport = MemoryTransport::new();
        let _server = transport.serve_now(Server::new(
            Router::new().message("echo", |Payload(x): Payload<u64>| async move { x }),
        ));
        let client = Client::builder().connect(transport).await.unwrap();
        for x in 0..n {
            let echoed: u64 = client.send("echo", &x).await.unwrap();
            assert_eq!(echoed, x);
        }
    });
}
