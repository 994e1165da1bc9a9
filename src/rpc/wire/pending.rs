//! One correlation map for every request/reply transport.

use super::ids::{PacketId, PacketIds};
use crate::rpc::key_hash::KeyMap;
use crate::rpc::transport::{ReplyPacket, ReplyReceiver, ReplySender, reply_channel};
use crate::rpc::{Pattern, RpcError, TransportErrorKind};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Shards of the map: callers register and forget requests on their threads while a transport's
/// reader delivers on another; one map behind one lock made them queue for it.
const SHARDS: usize = 16;

type Shard = KeyMap<u64, Waiting>;

struct Waiting {
    replies: ReplySender,
    /// The request's route, for errors that name it (no responders, ...).
    route: Arc<str>,
}

/// The requests of a client transport that wait for replies, keyed by request number.
///
/// Every request/reply transport needs the same bookkeeping, and each of its steps has a failure
/// mode that leaves a caller waiting forever when it is done by hand. Here it is done once:
///
/// - [`register`](Self::register) numbers a request, makes its [packet id](PacketIds) and returns
///   the caller's [`ReplyReceiver`]; dropping the receiver (the caller gave up, or timed out)
///   forgets the request, so the map holds only requests someone waits for;
/// - [`deliver`](Self::deliver) routes a reply packet to its request, and forgets the request after
///   its last packet; a reply for a request nobody waits for any more is dropped and counted
///   ([`late_replies`](Self::late_replies));
/// - [`fail_all`](Self::fail_all) answers every waiting request with an error when the transport
///   lost what the replies would come through (a connection, a subscription), and
///   [`close`](Self::close) does the same and refuses new registrations (a connection that is gone
///   for good).
///
/// ```
/// use palisade::rpc::transport::ReplyPacket;
/// use palisade::rpc::wire::{Delivery, PendingRequests};
/// use palisade::rpc::{Code, Pattern, RawJson, RpcError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), RpcError> {
/// let pending = PendingRequests::new();
/// let mut request = pending.register(&Pattern::from("get-user"))?;
/// // ...send a packet carrying `request.id()`; when its reply arrives:
/// let n = pending.ids().parse(request.id().as_str()).unwrap();
/// let reply = ReplyPacket::Value { response: RawJson::to_json(&42).unwrap(), last: true };
/// assert_eq!(pending.deliver(n, reply), Delivery::Delivered);
/// assert!(matches!(request.replies().recv().await, Some(ReplyPacket::Value { .. })));
/// // A second reply for the same request comes too late:
/// assert_eq!(pending.deliver(n, ReplyPacket::Complete), Delivery::Late);
/// assert_eq!(pending.late_replies(), 1);
/// # Ok(()) }
/// ```
pub struct PendingRequests {
    shards: [Mutex<Shard>; SHARDS],
    next: AtomicU64,
    ids: PacketIds,
    closed: AtomicBool,
    late: AtomicU64,
    /// Entries in the shards (kept beside them: counting under every shard's lock is slow).
    waiting: AtomicUsize,
}

/// What became of a delivered reply packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Handed to the waiting caller.
    Delivered,
    /// Nobody waits for this request (any more): dropped and counted.
    Late,
}

/// A request registered with [`PendingRequests::register`].
pub struct Registered {
    n: u64,
    id: PacketId,
    receiver: ReplyReceiver,
}

impl Registered {
    /// The request number (what a transport that carries it, such as a reply subject, uses).
    pub fn number(&self) -> u64 {
        self.n
    }

    /// The packet id to send with the request.
    pub fn id(&self) -> PacketId {
        self.id
    }

    /// The receiver of the request's replies, for the caller.
    pub fn replies(&mut self) -> &mut ReplyReceiver {
        &mut self.receiver
    }

    /// The receiver, for the caller; dropping it forgets the request.
    pub fn into_replies(self) -> ReplyReceiver {
        self.receiver
    }
}

impl fmt::Debug for Registered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registered")
            .field("n", &self.n)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl PendingRequests {
    /// An empty map with random packet ids, shared by the transport and its registrations.
    pub fn new() -> Arc<Self> {
        PendingRequests::with_ids(PacketIds::new())
    }

    /// An empty map making ids with `ids`.
    pub fn with_ids(ids: PacketIds) -> Arc<Self> {
        Arc::new(PendingRequests {
            shards: std::array::from_fn(|_| Mutex::new(Shard::default())),
            next: AtomicU64::new(0),
            ids,
            closed: AtomicBool::new(false),
            late: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
        })
    }

    /// The packet ids this map makes and reads.
    pub fn ids(&self) -> &PacketIds {
        &self.ids
    }

    fn shard(&self, n: u64) -> MutexGuard<'_, Shard> {
        self.shards[(n % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a request for `pattern`. Fails with `Unavailable` once the map is
    /// [closed](Self::close).
    pub fn register(self: &Arc<Self>, pattern: &Pattern) -> Result<Registered, RpcError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // Unbounded: a transport's reader serves many requests and must never wait on one slow
        // caller.
        let (replies, receiver) = reply_channel(None);
        {
            let mut shard = self.shard(n);
            // Checked under the shard's lock: `close` sets the flag before it drains the shards,
            // so a registration either sees the flag or is drained.
            if self.closed.load(Ordering::Acquire) {
                return Err(RpcError::transport(
                    TransportErrorKind::ConnectionLost,
                    "the connection closed",
                ));
            }
            shard.insert(
                n,
                Waiting {
                    replies,
                    route: Arc::clone(pattern.route_arc()),
                },
            );
            self.waiting.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Registered {
            n,
            id: self.ids.format(n),
            receiver: receiver.forgetting(Arc::clone(self), n),
        })
    }

    /// Routes `packet` to request `n`; forgets the request after its last packet.
    pub fn deliver(&self, n: u64, packet: ReplyPacket) -> Delivery {
        let last = packet.is_last();
        let mut shard = self.shard(n);
        let Some(waiting) = shard.get_mut(&n) else {
            drop(shard);
            self.late.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(request = n, "late reply dropped: nobody waits for it");
            return Delivery::Late;
        };
        let delivered = waiting.replies.try_send(packet);
        if (last || !delivered) && shard.remove(&n).is_some() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        Delivery::Delivered
    }

    /// Answers request `n` with `error` and forgets it (a reply that could not be read, no
    /// responders, ...). `Late` when nobody waits for it.
    pub fn fail(&self, n: u64, error: &RpcError) -> Delivery {
        self.deliver(n, ReplyPacket::Failed(error.clone()))
    }

    /// The route of request `n`, while it waits.
    pub fn route_of(&self, n: u64) -> Option<Arc<str>> {
        self.shard(n)
            .get(&n)
            .map(|waiting| Arc::clone(&waiting.route))
    }

    /// The routes of the requests waiting for replies (one pass over the map: for occasional
    /// housekeeping, such as dropping the reply subscriptions of routes nobody waits on).
    pub fn waiting_routes(&self) -> std::collections::HashSet<Arc<str>> {
        let mut routes = std::collections::HashSet::new();
        for shard in &self.shards {
            let shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            routes.extend(shard.values().map(|waiting| Arc::clone(&waiting.route)));
        }
        routes
    }

    /// Answers every waiting request with `error` (keeps taking new ones).
    pub fn fail_all(&self, error: &RpcError) -> usize {
        let mut failed = 0;
        let packet = ReplyPacket::Failed(error.clone());
        for shard in &self.shards {
            let waiting: Vec<Waiting> = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .drain()
                .map(|(_, waiting)| waiting)
                .collect();
            self.waiting.fetch_sub(waiting.len(), Ordering::Relaxed);
            for mut waiting in waiting {
                waiting.replies.try_send(packet.clone());
                failed += 1;
            }
        }
        if failed > 0 {
            tracing::debug!(failed, %error, "answered every pending request with an error");
        }
        failed
    }

    /// [`fail_all`](Self::fail_all), and refuses every later registration.
    pub fn close(&self, error: &RpcError) -> usize {
        self.closed.store(true, Ordering::Release);
        self.fail_all(error)
    }

    /// Whether the map was closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Requests waiting for replies.
    pub fn len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Whether no request waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replies dropped because nobody waited for them any more.
    pub fn late_replies(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }

    /// Forgets request `n` (its caller dropped the receiver).
    pub(crate) fn forget(&self, n: u64) {
        if self.shard(n).remove(&n).is_some() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl fmt::Debug for PendingRequests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingRequests")
            .field("waiting", &self.len())
            .field("closed", &self.is_closed())
            .field("late_replies", &self.late_replies())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{Code, RawJson};

    fn value(text: &str, last: bool) -> ReplyPacket {
        ReplyPacket::Value {
            response: RawJson::from_text(text.to_owned()).unwrap(),
            last,
        }
    }

    #[test]
    fn emptiness_closing_and_debug_say_what_they_should() {
        let pending = PendingRequests::new();
        assert!(pending.is_empty() && !pending.is_closed());
        let registered = pending.register(&Pattern::from("get-user")).unwrap();
        assert!(!pending.is_empty());
        let debug = format!("{registered:?}");
        assert!(debug.starts_with("Registered {"), "{debug}");
        assert!(
            debug.contains(&format!("n: {}", registered.number())),
            "{debug}"
        );
        assert!(debug.contains(registered.id().as_str()), "{debug}");
        assert_eq!(
            format!("{pending:?}"),
            "PendingRequests { waiting: 1, closed: false, late_replies: 0 }"
        );
        assert_eq!(pending.close(&RpcError::unavailable("gone")), 1);
        assert!(pending.is_closed() && pending.is_empty());
    }

    #[tokio::test]
    async fn streams_reach_their_caller_in_order_and_end_the_registration() {
        let pending = PendingRequests::new();
        let mut a = pending.register(&Pattern::from("count")).unwrap();
        let mut b = pending.register(&Pattern::from("count")).unwrap();
        assert_ne!(a.id(), b.id());
        assert_eq!(pending.len(), 2);
        for i in 1..=3 {
            assert_eq!(
                pending.deliver(a.number(), value(&i.to_string(), false)),
                Delivery::Delivered
            );
        }
        assert_eq!(
            pending.deliver(a.number(), ReplyPacket::Complete),
            Delivery::Delivered
        );
        assert_eq!(pending.len(), 1, "the last packet forgets the request");
        for i in 1..=3 {
            assert_eq!(a.replies().recv().await, Some(value(&i.to_string(), false)));
        }
        assert_eq!(a.replies().recv().await, Some(ReplyPacket::Complete));
        assert_eq!(a.replies().recv().await, None);
        assert_eq!(
            pending.deliver(b.number(), value("7", true)),
            Delivery::Delivered
        );
        assert_eq!(b.replies().recv().await, Some(value("7", true)));
        assert!(pending.is_empty());
        assert_eq!(pending.late_replies(), 0);
    }

    #[tokio::test]
    async fn a_dropped_receiver_forgets_its_request_and_its_replies_count_as_late() {
        let pending = PendingRequests::new();
        let request = pending.register(&Pattern::from("slow")).unwrap();
        let n = request.number();
        drop(request);
        assert!(pending.is_empty());
        assert_eq!(pending.deliver(n, value("1", true)), Delivery::Late);
        assert_eq!(pending.deliver(n + 100, value("1", true)), Delivery::Late);
        assert_eq!(pending.late_replies(), 2);
    }

    #[tokio::test]
    async fn fail_all_answers_everyone_and_close_refuses_new_requests() {
        let pending = PendingRequests::new();
        let mut requests: Vec<_> = (0..40)
            .map(|_| pending.register(&Pattern::from("p")).unwrap())
            .collect();
        // One is mid-stream.
        pending.deliver(requests[3].number(), value("1", false));
        let lost = RpcError::transport(TransportErrorKind::ConnectionLost, "connection reset");
        assert_eq!(pending.fail_all(&lost), 40);
        for request in &mut requests {
            let mut last = None;
            while let Some(packet) = request.replies().recv().await {
                last = Some(packet);
            }
            match last {
                Some(ReplyPacket::Failed(error)) => {
                    assert_eq!(error.code(), Code::Unavailable);
                    assert_eq!(
                        error.transport_kind(),
                        Some(TransportErrorKind::ConnectionLost)
                    );
                }
                other => panic!("expected an error packet, got {other:?}"),
            }
        }
        assert!(
            pending.register(&Pattern::from("p")).is_ok(),
            "fail_all keeps the map open"
        );
        pending.close(&lost);
        let refused = pending.register(&Pattern::from("p")).unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable);
        assert_eq!(
            refused.transport_kind(),
            Some(TransportErrorKind::ConnectionLost)
        );
        assert!(pending.is_empty());
    }

    #[tokio::test]
    async fn failing_one_request_names_its_route() {
        let pending = PendingRequests::new();
        let mut request = pending.register(&Pattern::from("get-user")).unwrap();
        assert_eq!(
            pending.route_of(request.number()).as_deref(),
            Some("get-user")
        );
        let error = RpcError::unavailable("no responders");
        assert_eq!(pending.fail(request.number(), &error), Delivery::Delivered);
        assert!(matches!(
            request.replies().recv().await,
            Some(ReplyPacket::Failed(_))
        ));
        assert_eq!(pending.route_of(request.number()), None);
        assert_eq!(pending.fail(request.number(), &error), Delivery::Late);
    }

    /// Registrations racing with `close` on other threads: each either fails or is answered.
    #[test]
    fn registrations_racing_close_are_never_left_waiting() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            for _ in 0..50 {
                let pending = PendingRequests::new();
                let registering = {
                    let pending = Arc::clone(&pending);
                    tokio::spawn(async move {
                        let mut answered = 0;
                        for _ in 0..200 {
                            match pending.register(&Pattern::from("p")) {
                                Ok(mut request) => {
                                    let packet = tokio::time::timeout(
                                        std::time::Duration::from_secs(5),
                                        request.replies().recv(),
                                    )
                                    .await
                                    .expect("a registered request is answered");
                                    assert!(matches!(packet, Some(ReplyPacket::Failed(_))));
                                    answered += 1;
                                }
                                Err(_) => break,
                            }
                        }
                        answered
                    })
                };
                tokio::task::yield_now().await;
                let lost = RpcError::unavailable("gone");
                pending.close(&lost);
                // Anything registered after the close raced in before the flag: answer it too.
                let _ = registering.await.unwrap();
                assert!(pending.is_empty());
            }
        });
    }
}
