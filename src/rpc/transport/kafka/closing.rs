//! Group consumers closed off the async runtime, on a thread of their own.
//!
//! Dropping an rdkafka group consumer closes it: it commits the offsets stored by then and leaves
//! the group, and rdkafka's `Drop` waits for that with no bound. With the broker gone at the
//! wrong moment (an offset stored just before it went), librdkafka can wait forever. Where the
//! last handle went matters:
//! - on a runtime thread, the runtime stalls;
//! - in a task cancelled while the runtime shuts down, or in `spawn_blocking`, the runtime's
//!   shutdown waits for it, so a process whose broker is gone never exits.
//!
//! A [`GroupConsumer`] hands its consumer to a detached thread when the last handle goes, so no
//! caller and no runtime ever waits on the broker; [`Closed`] says when the close is done, for
//! those that want to wait a bounded time (a server's shutdown, for its last commit). If the broker
//! comes back, a close that was waiting completes and frees what the consumer held.

use rdkafka::consumer::{ConsumerContext, StreamConsumer};
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::oneshot;

/// Closes still waiting on a broker, across the process.
static CLOSING: AtomicUsize = AtomicUsize::new(0);

/// Consumers whose close has not finished: each holds a thread, the consumer's sockets and
/// librdkafka's threads until its broker answers.
pub(crate) fn closing() -> usize {
    CLOSING.load(Ordering::Acquire)
}

/// A group consumer that is closed on a thread of its own once dropped.
pub(crate) struct GroupConsumer<C: ConsumerContext + 'static> {
    consumer: Option<StreamConsumer<C>>,
    closed: Option<oneshot::Sender<()>>,
}

/// Resolves once the consumer of a dropped [`GroupConsumer`] is closed, or given up (its closing
/// thread could not start or failed).
pub(crate) type Closed = oneshot::Receiver<()>;

impl<C: ConsumerContext + 'static> GroupConsumer<C> {
    /// Takes `consumer`, to be closed off the runtime, and what tells when that is done.
    pub(crate) fn new(consumer: StreamConsumer<C>) -> (Arc<Self>, Closed) {
        let (closed, done) = oneshot::channel();
        let owned = GroupConsumer {
            consumer: Some(consumer),
            closed: Some(closed),
        };
        (Arc::new(owned), done)
    }
}

impl<C: ConsumerContext + 'static> Deref for GroupConsumer<C> {
    type Target = StreamConsumer<C>;

    fn deref(&self) -> &StreamConsumer<C> {
        self.consumer
            .as_ref()
            .expect("a GroupConsumer holds its consumer until it is dropped")
    }
}

impl<C: ConsumerContext + 'static> Drop for GroupConsumer<C> {
    fn drop(&mut self) {
        let (Some(consumer), Some(closed)) = (self.consumer.take(), self.closed.take()) else {
            return;
        };
        let closing = Closing::start(closed);
        // Handed over once the thread runs: a thread that cannot start must not drop (and so
        // close) the consumer here.
        let (hand_over, take) = std::sync::mpsc::sync_channel::<StreamConsumer<C>>(1);
        let started = std::thread::Builder::new()
            .name("palisade-kafka-close".into())
            .spawn(move || {
                drop(take.recv());
                drop(closing);
            });
        let unclosed = match started {
            Ok(_) => hand_over.send(consumer).err().map(|returned| returned.0),
            Err(error) => {
                tracing::error!(%error, "cannot start a thread to close a Kafka consumer");
                Some(consumer)
            }
        };
        if let Some(consumer) = unclosed {
            // Given up rather than closed here, where the close could wait forever. Its threads
            // go on (heartbeats included) without anyone polling it, so the group drops it once
            // `max.poll.interval.ms` passes.
            std::mem::forget(consumer);
        }
    }
}

/// One close under way, counted in [`closing`] until it is dropped — when the consumer is closed,
/// or when its thread unwinds or never starts — which also tells the [`Closed`] receiver.
struct Closing {
    closed: Option<oneshot::Sender<()>>,
}

impl Closing {
    fn start(closed: oneshot::Sender<()>) -> Self {
        CLOSING.fetch_add(1, Ordering::AcqRel);
        Closing {
            closed: Some(closed),
        }
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        CLOSING.fetch_sub(1, Ordering::AcqRel);
        if let Some(closed) = self.closed.take() {
            let _ = closed.send(());
        }
    }
}
