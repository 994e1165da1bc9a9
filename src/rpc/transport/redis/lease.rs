//! One responder per service among several instances: a lease key in Redis (see
//! [`RedisServer::single_responder`](super::RedisServer::single_responder)).

use super::server::{Serving, SingleResponder, Stopped};
use super::{RedisOptions, command_error};
use crate::rpc::{RpcError, TransportErrorKind};
use redis::aio::MultiplexedConnection;
use std::sync::Arc;
use std::time::Duration;

/// Extends the lease if this instance still holds it: 1 if so, 0 if another does (or nobody).
const RENEW: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
                     return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";
/// Gives the lease up if this instance holds it.
const RELEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
                       return redis.call('del', KEYS[1]) else return 0 end";

struct Lease {
    spec: SingleResponder,
    me: String,
    commands: Option<MultiplexedConnection>,
}

impl Lease {
    async fn connection(
        &mut self,
        options: &RedisOptions,
    ) -> Result<&mut MultiplexedConnection, RpcError> {
        if self.commands.is_none() {
            self.commands = Some(options.commands().await?);
        }
        Ok(self.commands.as_mut().expect("just connected"))
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.spec.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Takes the lease if it is free, or takes it back if it is still this instance's (after a
    /// renewal that failed on a broken connection: nobody else can hold it until it expires, so
    /// waiting for that would leave the service without a responder).
    async fn acquire(&mut self, options: &RedisOptions) -> Result<bool, RpcError> {
        let (key, me, ttl) = (self.spec.key.clone(), self.me.clone(), self.ttl_ms());
        let connection = self.connection(options).await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&me)
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .query_async(connection)
            .await
            .map_err(|error| command_error(&error, "cannot take the responder lease"))?;
        if set.is_some() {
            return Ok(true);
        }
        self.script(options, RENEW).await
    }

    async fn script(&mut self, options: &RedisOptions, script: &str) -> Result<bool, RpcError> {
        let (key, me, ttl) = (self.spec.key.clone(), self.me.clone(), self.ttl_ms());
        let connection = self.connection(options).await?;
        let kept: i64 = redis::cmd("EVAL")
            .arg(script)
            .arg(1)
            .arg(&key)
            .arg(&me)
            .arg(ttl)
            .query_async(connection)
            .await
            .map_err(|error| command_error(&error, "cannot renew the responder lease"))?;
        Ok(kept == 1)
    }
}

/// Takes the lease when it is free and serves while holding it; renews it every third of its
/// time to live and stops serving as soon as a renewal fails (even for a lost connection: the
/// lease may then expire, and another instance take over, before this one learns it lost it).
pub(super) async fn run(serving: Serving, spec: SingleResponder) {
    let me = format!("{:016x}", crate::rng::mix(crate::rng::SharedRng::entropy()));
    let period = spec.ttl / 3;
    let lease = Arc::new(tokio::sync::Mutex::new(Lease {
        spec,
        me,
        commands: None,
    }));
    let mut draining = std::pin::pin!(serving.dispatcher.draining());
    loop {
        let acquired = {
            let mut lease = lease.lock().await;
            match lease.acquire(&serving.options).await {
                Ok(acquired) => acquired,
                Err(error) => {
                    tracing::debug!(%error, "could not try the responder lease");
                    lease.commands = None;
                    false
                }
            }
        };
        if !acquired {
            tokio::select! {
                _ = tokio::time::sleep(period) => continue,
                _ = &mut draining => return,
            }
        }
        tracing::info!("took the responder lease: answering requests");
        // Renewed on a task of its own: the serving loop waits for the dispatcher (a slot under
        // `max_in_flight`, a handler run inline) and would renew late, letting the lease expire
        // and a standby answer too while this instance still does.
        let (lost, lost_signal) = tokio::sync::oneshot::channel::<()>();
        let renewing = AbortOnDrop(tokio::spawn(renew(
            Arc::clone(&lease),
            serving.options.clone(),
            period,
            lost,
        )));
        let stopped = serving
            .serve_until(None, async {
                // Lost, or the renewing task ended in a panic.
                let _ = lost_signal.await;
            })
            .await;
        drop(renewing);
        match stopped {
            Stopped::Draining => {
                // Hand over at once rather than after the lease's time to live.
                let mut lease = lease.lock().await;
                let released = tokio::time::timeout(
                    Duration::from_secs(1),
                    lease.script(&serving.options, RELEASE),
                )
                .await;
                if !matches!(released, Ok(Ok(_))) {
                    tracing::debug!("could not release the responder lease; it expires by itself");
                }
                return;
            }
            Stopped::Told => {}
        }
    }
}

/// Renews the lease every `period` until a renewal fails or finds another holder; then says so
/// on `lost`.
async fn renew(
    lease: Arc<tokio::sync::Mutex<Lease>>,
    options: RedisOptions,
    period: Duration,
    lost: tokio::sync::oneshot::Sender<()>,
) {
    loop {
        tokio::time::sleep(period).await;
        let mut lease = lease.lock().await;
        // A renewal that has not succeeded by the next period is given up: the lease must not
        // expire (and another instance take over) while this one still serves. One that finds
        // its connection closed (Redis's `timeout` closes one idle between renewals) is made
        // once more on a fresh connection: the renewal may be repeated.
        let renewed = tokio::time::timeout(period, async {
            match lease.script(&options, RENEW).await {
                Err(error)
                    if error.transport_kind() == Some(TransportErrorKind::ConnectionLost) =>
                {
                    tracing::debug!(%error, "renewing the responder lease once more on a fresh connection");
                    lease.commands = None;
                    lease.script(&options, RENEW).await
                }
                other => other,
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(RpcError::transport(
                TransportErrorKind::ConnectionLost,
                "Redis did not answer in time",
            ))
        });
        match renewed {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!("another instance holds the responder lease: standing by");
                break;
            }
            Err(error) => {
                tracing::warn!(%error, "could not renew the responder lease: standing by");
                lease.commands = None;
                break;
            }
        }
    }
    let _ = lost.send(());
}

/// Stops the renewals when serving stops, however it stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
