//! Redis faults, each against its own `redis-server` on a free loopback port: connections Redis
//! closes while idle, a lone responder whose renewal failed once, events read ahead in a batch,
//! and shutdown while Redis is paused.
#![cfg(feature = "redis")]

mod support;

use palisade::rpc::transport::ServerTransport;
use palisade::rpc::transport::redis::{DurableEvents, RedisOptions, RedisServer, RedisTransport};
use palisade::rpc::{Client, Payload, Router, Server};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::redis::Broker;
use tokio::time::{Instant, sleep};

/// One test at a time: they time what Redis does.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn options(broker: &Broker) -> RedisOptions {
    RedisOptions::new(broker.url())
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(300))
}

/// Two live consumers of one group, a handler well under `claim_idle` (150 ms vs 1 s): every
/// event is handled once. The first consumer reads a batch of up to 16 entries at once and works
/// through them one by one; the entries waiting their turn grow idle in Redis, and the second
/// consumer's XAUTOCLAIM took the last ones, so both handled them. A consumer now takes up an
/// entry that waited long only if it is still its own, resetting its idle time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_waiting_in_a_read_batch_are_not_claimed_and_handled_twice() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let emitter = Client::builder()
        .connect(RedisTransport::new(options(&broker)).durable_events())
        .await
        .unwrap();
    for n in 0..12u32 {
        emitter.emit("invoice", &n).await.unwrap();
    }
    let handled: Arc<Mutex<BTreeMap<u32, Vec<&'static str>>>> = Arc::default();
    let router = |who: &'static str| {
        let handled = Arc::clone(&handled);
        Router::new().event("invoice", move |Payload(n): Payload<u32>| {
            let handled = Arc::clone(&handled);
            async move {
                handled.lock().unwrap().entry(n).or_default().push(who);
                sleep(Duration::from_millis(150)).await;
            }
        })
    };
    let durable = |name: &str| {
        DurableEvents::new("accounting")
            .consumer(name)
            .claim_idle(Duration::from_secs(1))
    };
    let a = RedisServer::new(options(&broker))
        .durable_events(durable("a"))
        .serve(Server::new(router("a")))
        .await
        .unwrap();
    // a has read its batch (all 12 entries) before b starts.
    let started = Instant::now();
    while handled.lock().unwrap().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(5));
        sleep(Duration::from_millis(5)).await;
    }
    let b = RedisServer::new(options(&broker))
        .durable_events(durable("b"))
        .serve(Server::new(router("b")))
        .await
        .unwrap();
    sleep(Duration::from_secs(4)).await;
    let handled = handled.lock().unwrap().clone();
    a.shutdown().await;
    b.shutdown().await;
    assert_eq!(handled.len(), 12, "{handled:?}");
    let twice: BTreeMap<_, _> = handled.iter().filter(|(_, who)| who.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "handled more than once by two live consumers: {twice:?}"
    );
}

/// A redis-server with `timeout 1` (Redis closes a client idle for a second; common in
/// production configs; subscribers are exempt), on a free port.
struct IdleTimeoutRedis {
    child: std::process::Child,
    port: u16,
}

impl IdleTimeoutRedis {
    fn start() -> Self {
        let port = support::free_port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--timeout",
                "1",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
        IdleTimeoutRedis { child, port }
    }
}

impl Drop for IdleTimeoutRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Redis itself is healthy the whole time; only idle connections are closed by its `timeout`.
/// Every request after a quiet spell is answered: the publishing connections are PINGed at
/// every health check, as the subscribers are. (Once, after every quiet spell the next request
/// failed with "broken pipe" and the next reply was lost, its caller waiting out its deadline.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_after_an_idle_pause_are_answered_when_redis_closes_idle_connections() {
    let _serial = SERIAL.lock().await;
    let redis = IdleTimeoutRedis::start();
    // Health checks more often than Redis's `timeout` (1 s), as the default 5 s is for any
    // `timeout` over it.
    let opts = RedisOptions::new(format!("redis://127.0.0.1:{}", redis.port))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(300))
        .health_check(Duration::from_millis(300));
    let server = RedisServer::new(opts.clone())
        .serve(Server::new(
            Router::new().message("echo", |Payload(v): Payload<u64>| async move { v }),
        ))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(2))
        .connect(opts)
        .await
        .unwrap();
    assert_eq!(client.send::<u64>("echo", &1).await.unwrap(), 1);
    let mut failures = Vec::new();
    for round in 0..3u64 {
        // Idle long enough for Redis's `timeout 1` (checked about every 100 ms).
        sleep(Duration::from_millis(2500)).await;
        for attempt in 0..4u64 {
            if attempt > 0 {
                sleep(Duration::from_millis(200)).await;
            }
            match client.send::<u64>("echo", &round).await {
                Ok(v) => assert_eq!(v, round),
                Err(error) => failures.push(format!("round {round} attempt {attempt}: {error}")),
            }
        }
    }
    server.shutdown().await;
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A durable server shut down while its Redis is paused (SIGSTOP: a host gone silent) stops
/// within its grace period (50 ms here) and the 2 s its subscriber waits for Redis to confirm
/// the unsubscription: its reader's steps that only wait on Redis (connect, create the group,
/// read, claim) and the subscriber's health check give way to shutdown; each waited its whole
/// timeout (4.2 s in all, in a run before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_server_stops_promptly_while_redis_is_paused() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let server = RedisServer::new(options(&broker))
        .durable_events(DurableEvents::new("audit"))
        .serve(
            Server::new(Router::new().event("ledger", |Payload(_): Payload<u32>| async {}))
                .grace_period(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    sleep(Duration::from_millis(300)).await;
    let pid = broker.pid().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    // The reader's blocking read gives up after its block and the response timeout (5 s), then
    // it reconnects.
    sleep(Duration::from_millis(6500)).await;
    let started = Instant::now();
    let report = server.shutdown().await;
    let took = started.elapsed();
    assert!(
        std::process::Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        took < Duration::from_secs(3),
        "shutdown took {took:?} ({report:?})"
    );
}

/// The only instance of a single-responder service, its lease still valid and its own: one
/// broken command connection (here: Redis kills the normal clients once; a proxy or failover
/// blip does the same) makes a renewal fail, and it stands by. It takes its own lease back at
/// once; `SET NX` alone found its own value, and it waited for the lease to expire, requests
/// failing with `NoResponders` meanwhile although the instance and Redis were fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_responder_answers_again_soon_after_one_failed_renewal() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let server = RedisServer::new(options(&broker))
        .single_responder("pricing", Duration::from_secs(6))
        .serve(Server::new(
            Router::new().message("echo", |Payload(v): Payload<u64>| async move { v }),
        ))
        .await
        .unwrap();
    let client = Client::builder()
        .timeout(Duration::from_secs(2))
        .connect(options(&broker))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.send::<u64>("echo", &1).await.is_err() {
        assert!(Instant::now() < deadline);
        sleep(Duration::from_millis(50)).await;
    }
    let redis = redis::Client::open(broker.url()).unwrap();
    let mut admin = redis.get_multiplexed_async_connection().await.unwrap();
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut admin)
        .await
        .unwrap();
    // Every 100 ms for 6 s: how long nobody was subscribed.
    let mut unanswered = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        if let Err(error) = client.send::<u64>("echo", &2).await
            && error.to_string().contains("no subscribers")
        {
            unanswered.push(started.elapsed());
        }
        sleep(Duration::from_millis(100)).await;
    }
    server.shutdown().await;
    if let (Some(first), Some(last)) = (unanswered.first(), unanswered.last()) {
        assert!(
            *last - *first < Duration::from_millis(1500),
            "{} requests found no responder, from {first:?} to {last:?} after the kill",
            unanswered.len()
        );
    }
}

/// Redis keeps a stream whole, in memory: with `trim_acknowledged`, what every group is done
/// with is deleted (here two groups, one of them behind), and a consumer that stops with
/// nothing pending leaves its group. Five restarts under random names left five consumers, and
/// all 500 events stayed in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_are_trimmed_and_stopped_consumers_leave_their_group() {
    let _serial = SERIAL.lock().await;
    let broker = Broker::start();
    let emitter = Client::builder()
        .connect(RedisTransport::new(options(&broker)).durable_events())
        .await
        .unwrap();
    let redis = redis::Client::open(broker.url()).unwrap();
    let mut admin = redis.get_multiplexed_async_connection().await.unwrap();
    // A second service's group, which has read nothing yet: it keeps every event.
    let _: redis::Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("ledger")
        .arg("reporting")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut admin)
        .await
        .unwrap();
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let serve = |trim: bool| {
        let seen = Arc::clone(&handled);
        RedisServer::new(options(&broker))
            .durable_events(
                DurableEvents::new("audit")
                    .claim_idle(Duration::from_millis(200))
                    .trim_acknowledged(trim),
            )
            .serve(Server::new(Router::new().event(
                "ledger",
                move |Payload(_): Payload<u32>| {
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async {}
                },
            )))
    };
    let length = |admin: &mut redis::aio::MultiplexedConnection| {
        let mut admin = admin.clone();
        async move {
            redis::cmd("XLEN")
                .arg("ledger")
                .query_async::<u64>(&mut admin)
                .await
                .unwrap()
        }
    };
    for restart in 0..5 {
        let server = serve(true).await.unwrap();
        for n in 0..100u32 {
            emitter.emit("ledger", &n).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while handled.load(std::sync::atomic::Ordering::SeqCst) < (restart + 1) * 100 {
            assert!(Instant::now() < deadline);
            sleep(Duration::from_millis(10)).await;
        }
        sleep(Duration::from_millis(300)).await;
        server.shutdown().await;
    }
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg("ledger")
        .arg("audit")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(consumers.is_empty(), "{} consumers left", consumers.len());
    // The reporting group read nothing: every event stays for it.
    assert_eq!(length(&mut admin).await, 500);
    let _: redis::Value = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg("ledger")
        .arg("reporting")
        .query_async(&mut admin)
        .await
        .unwrap();
    // With only the audit group left, what it acknowledged goes (all but its last delivery).
    let server = serve(true).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while length(&mut admin).await > 1 {
        assert!(
            Instant::now() < deadline,
            "{} entries",
            length(&mut admin).await
        );
        sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
    // Without the setting, nothing is deleted.
    for n in 0..10u32 {
        emitter.emit("ledger", &n).await.unwrap();
    }
    let server = serve(false).await.unwrap();
    while handled.load(std::sync::atomic::Ordering::SeqCst) < 510 {
        sleep(Duration::from_millis(10)).await;
    }
    sleep(Duration::from_millis(500)).await;
    server.shutdown().await;
    assert_eq!(length(&mut admin).await, 11);
}

/// The same for durable events: the connection acknowledgements go through, idle between
/// events, is found closed after a quiet spell. The acknowledgement is made once more on a
/// fresh connection; it failed, the reader reconnected and handled the event again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_events_after_quiet_spells_are_handled_once_when_redis_closes_idle_connections() {
    let _serial = SERIAL.lock().await;
    let redis = IdleTimeoutRedis::start();
    let opts = RedisOptions::new(format!("redis://127.0.0.1:{}", redis.port))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(300))
        .health_check(Duration::from_millis(300));
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let handled = Arc::clone(&seen);
    let server = RedisServer::new(opts.clone())
        .durable_events(DurableEvents::new("audit").consumer("one"))
        .serve(Server::new(Router::new().event(
            "ledger",
            move |Payload(n): Payload<u32>| {
                let handled = Arc::clone(&handled);
                async move { handled.lock().unwrap().push(n) }
            },
        )))
        .await
        .unwrap();
    let emitter = Client::builder()
        .connect(RedisTransport::new(opts).durable_events())
        .await
        .unwrap();
    for n in 0..3u32 {
        sleep(Duration::from_millis(2500)).await;
        emitter.emit("ledger", &n).await.unwrap();
    }
    sleep(Duration::from_millis(2000)).await;
    server.shutdown().await;
    assert_eq!(*seen.lock().unwrap(), [0, 1, 2]);
}
