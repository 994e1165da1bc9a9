//! The publishing connection of a client or server, repaired by itself when it breaks.

use super::{RedisOptions, command_error};
use crate::rpc::{RpcError, TransportErrorKind};
use redis::aio::MultiplexedConnection;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The connection `PUBLISH` and `XADD` go through. It is replaced when the subscriber reconnects;
/// when a command finds it broken on its own (the subscriber connection still up), it is opened
/// again in the background, with backoff, so that publishing does not fail until the next loss
/// of the subscriber. It is PINGed at every health check, as the subscriber is: Redis's
/// `timeout` closes idle clients (subscribers are exempt), and a connection closed while idle
/// failed the next request and lost the next reply, after every quiet spell.
pub(super) struct Publisher {
    options: RedisOptions,
    slot: Mutex<Option<MultiplexedConnection>>,
    repairing: AtomicBool,
    /// A keep-alive PING is under way.
    pinging: AtomicBool,
    /// Counts the connections set: a PING that failed on one since replaced repairs nothing.
    generation: AtomicU64,
}

impl Publisher {
    pub(super) fn new(options: RedisOptions) -> Arc<Self> {
        Arc::new(Publisher {
            options,
            slot: Mutex::new(None),
            repairing: AtomicBool::new(false),
            pinging: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        })
    }

    /// PINGs the connection from a task of its own (one at a time), so that Redis's `timeout`
    /// does not close it while idle; one that does not answer in time is opened again.
    pub(super) fn keep_alive(self: &Arc<Self>) {
        // Read first: a connection set after it is newer, and its PING's failure repairs nothing.
        let pinged_generation = self.generation.load(Ordering::Acquire);
        let Ok(mut connection) = self.get() else {
            // Being opened again, or not connected.
            return;
        };
        if self.pinging.swap(true, Ordering::AcqRel) {
            return;
        }
        let publisher = Arc::clone(self);
        tokio::spawn(async move {
            let pinged = tokio::time::timeout(
                publisher.options.response_timeout,
                redis::cmd("PING").query_async::<redis::Value>(&mut connection),
            )
            .await;
            publisher.pinging.store(false, Ordering::Release);
            if !matches!(pinged, Ok(Ok(_)))
                && publisher.generation.load(Ordering::Acquire) == pinged_generation
            {
                tracing::debug!(
                    "the Redis publishing connection did not answer a PING; reopening it"
                );
                publisher.repair();
            }
        });
    }

    /// Makes `connection` the current one (`None`: not connected).
    pub(super) fn set(&self, connection: Option<MultiplexedConnection>) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        *slot = connection;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn get(&self) -> Result<MultiplexedConnection, RpcError> {
        self.slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                RpcError::transport(
                    TransportErrorKind::NotConnected,
                    format!(
                        "not connected to Redis at {} (reconnecting)",
                        self.options.url_text()
                    ),
                )
            })
    }

    /// `PUBLISH channel body`: how many subscribers received it.
    pub(super) async fn publish(
        self: &Arc<Self>,
        channel: &str,
        body: &[u8],
    ) -> Result<u64, RpcError> {
        let mut connection = self.get()?;
        let published = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(body)
            .query_async(&mut connection)
            .await
            .map_err(|error| command_error(&error, &format!("cannot publish to {channel:?}")));
        self.check(published)
    }

    /// `XADD stream * <field> <value>`: resolves once Redis stored the entry.
    pub(super) async fn add(
        self: &Arc<Self>,
        stream: &str,
        field: &str,
        value: &[u8],
    ) -> Result<(), RpcError> {
        let mut connection = self.get()?;
        let added = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(field)
            .arg(value)
            .query_async::<redis::Value>(&mut connection)
            .await
            .map(drop)
            .map_err(|error| command_error(&error, &format!("cannot add the event to {stream:?}")));
        self.check(added)
    }

    fn check<T>(self: &Arc<Self>, result: Result<T, RpcError>) -> Result<T, RpcError> {
        if let Err(error) = &result
            && error.transport_kind() == Some(TransportErrorKind::ConnectionLost)
        {
            self.repair();
        }
        result
    }

    /// Opens a new connection in the background (once at a time), until it succeeds or the
    /// publisher is dropped.
    fn repair(self: &Arc<Self>) {
        if self.repairing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.set(None);
        let publisher = Arc::downgrade(self);
        let options = self.options.clone();
        tokio::spawn(async move {
            let mut attempt = 0;
            loop {
                tokio::time::sleep(options.backoff(attempt)).await;
                if publisher.strong_count() == 0 {
                    return;
                }
                match options.commands().await {
                    Ok(connection) => {
                        if let Some(publisher) = publisher.upgrade() {
                            publisher.set(Some(connection));
                            publisher.repairing.store(false, Ordering::Release);
                        }
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(%error, attempt, "reopening the Redis publisher failed");
                        attempt = attempt.saturating_add(1);
                    }
                }
            }
        });
    }
}
