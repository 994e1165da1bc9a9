use super::closing::GroupConsumer;
use super::value::{
    CORRELATION_ID, NEST_ERR, NEST_IS_DISPOSED, NULL_TYPE, Outgoing, REPLY_PARTITION, REPLY_TOPIC,
    TYPE_HEADER, outgoing, received, received_err,
};
use super::{KafkaOptions, Producer, Topics, kafka_error, topic_of};
use crate::rpc::error::NO_HANDLER_MESSAGE;
use crate::rpc::transport::{ClientTransport, Connect, ReplyPacket, ReplyReceiver};
use crate::rpc::wire::{CodecError, PendingRequests, SharedCodec};
use crate::rpc::{Pattern, RpcError, RpcRequest, TransportErrorKind};
use futures_util::future::BoxFuture;
use rdkafka::Offset;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

/// The client side of the Kafka transport, before it is connected: NestJS's `ClientKafka`.
/// [`Client::builder().connect(..)`](crate::rpc::ClientBuilder::connect) connects it.
///
/// Requests need the client to read their pattern's reply topic (`<route>.reply`) in its group
/// `<group>-client`. Declare the patterns you will `send` to with [`reply_to`](Self::reply_to)
/// (NestJS's `subscribeToResponseOf`): connecting then waits until the group gave this client
/// partitions of each. A pattern not declared is subscribed to at its first request, which then
/// waits for that (a rebalance: a second or more).
#[derive(Clone, Debug)]
pub struct KafkaTransport {
    options: KafkaOptions,
    reply_to: Vec<Pattern>,
}

impl KafkaTransport {
    /// A transport connecting with `options`.
    pub fn new(options: KafkaOptions) -> Self {
        KafkaTransport {
            options,
            reply_to: Vec::new(),
        }
    }

    /// Reads the reply topics of these patterns from the start (NestJS's
    /// `subscribeToResponseOf`).
    pub fn reply_to<P: Into<Pattern>>(mut self, patterns: impl IntoIterator<Item = P>) -> Self {
        self.reply_to.extend(patterns.into_iter().map(Into::into));
        self
    }

    /// Connects: creates the producer and the reply consumer, and waits for the reply topics of
    /// [`reply_to`](Self::reply_to)'s patterns.
    pub async fn connect(self) -> Result<KafkaConnection, RpcError> {
        KafkaConnection::connect(self).await
    }
}

impl Connect for KafkaTransport {
    type Transport = KafkaConnection;

    async fn connect(self) -> Result<KafkaConnection, RpcError> {
        KafkaTransport::connect(self).await
    }
}

/// Which reply partitions this client has, and who waits on each.
struct Replies {
    /// Reply topic → the partitions assigned to this client (read from their end offset on).
    assigned: Mutex<HashMap<String, BTreeSet<i32>>>,
    changed: Notify,
    pending: Arc<PendingRequests>,
    /// (reply topic, partition) → requests whose replies come there, to fail when the partition
    /// moves to another client.
    waiting: Mutex<HashMap<(String, i32), HashSet<u64>>>,
    fetch_timeout: Duration,
    codec: SharedCodec,
}

impl Replies {
    fn assigned(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeSet<i32>>> {
        self.assigned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), HashSet<u64>>> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The lowest partition of `topic` this client reads, if any.
    fn partition(&self, topic: &str) -> Option<i32> {
        self.assigned()
            .get(topic)
            .and_then(|set| set.first().copied())
    }

    /// Notes that request `n` waits for replies on `topic`/`partition`; forgets entries of
    /// requests that no longer wait, so the map stays as small as what is in flight.
    ///
    /// Returns whether the partition is still this client's. It may have been revoked since it
    /// was picked, before `n` was noted: then nobody would fail `n` when its replies went to
    /// another client, and `n` must pick again. (The revocation takes the partition from
    /// `assigned` before it fails what `waiting` holds, and this notes `n` in `waiting` before it
    /// looks at `assigned`: either the revocation fails `n`, or this sees the partition gone.)
    fn wait_on(&self, topic: &str, partition: i32, n: u64) -> bool {
        {
            let mut waiting = self.waiting();
            let total: usize = waiting.values().map(HashSet::len).sum();
            if total > 2 * self.pending.len() + 1024 {
                for requests in waiting.values_mut() {
                    requests.retain(|n| self.pending.route_of(*n).is_some());
                }
                waiting.retain(|_, requests| !requests.is_empty());
            }
            waiting
                .entry((topic.to_owned(), partition))
                .or_default()
                .insert(n);
        }
        let still_ours = self
            .assigned()
            .get(topic)
            .is_some_and(|set| set.contains(&partition));
        if !still_ours
            && let Some(requests) = self.waiting().get_mut(&(topic.to_owned(), partition))
        {
            requests.remove(&n);
        }
        still_ours
    }

    /// `topic`/`partition` moved to another client: the requests whose replies come there fail.
    fn revoke(&self, topic: &str, partition: i32) {
        if let Some(set) = self.assigned().get_mut(topic) {
            set.remove(&partition);
        }
        let moved = self
            .waiting()
            .remove(&(topic.to_owned(), partition))
            .unwrap_or_default();
        let error = RpcError::transport(
            TransportErrorKind::ConnectionLost,
            format!(
                "the reply partition {topic}/{partition} moved to another client before the reply came"
            ),
        );
        for n in moved {
            self.pending.fail(n, &error);
        }
    }
}

/// The reply consumer's context: it starts newly assigned partitions at their end offset and
/// fails the requests of partitions taken away.
struct ReplyContext {
    replies: Arc<Replies>,
}

impl ClientContext for ReplyContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        if matches!(error.rdkafka_error_code(), Some(Code::AllBrokersDown)) {
            // Replies cannot come now, and those produced before may be gone with the broker:
            // every request in flight fails at once rather than waiting out its deadline.
            tracing::warn!(
                reason,
                "lost every Kafka broker; failing requests in flight"
            );
            self.replies.pending.fail_all(&RpcError::transport(
                TransportErrorKind::ConnectionLost,
                format!("lost the connection to every Kafka broker: {reason}"),
            ));
        } else {
            tracing::debug!(%error, reason, "Kafka client error");
        }
    }
}

impl ConsumerContext for ReplyContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                for element in partitions.elements() {
                    let (topic, partition) = (element.topic(), element.partition());
                    // Read from the end as it is now, before any request names this partition:
                    // every reply to such a request comes after it. (Without the seek the
                    // consumer starts at the earliest offset: slower, but it misses nothing.)
                    match consumer.fetch_watermarks(topic, partition, self.replies.fetch_timeout) {
                        Ok((_, end)) => {
                            if let Err(error) = consumer.seek(
                                topic,
                                partition,
                                Offset::Offset(end),
                                self.replies.fetch_timeout,
                            ) {
                                tracing::debug!(topic, partition, %error, "cannot seek a reply partition to its end; reading it from the start");
                            }
                        }
                        Err(error) => {
                            tracing::debug!(topic, partition, %error, "cannot read a reply partition's end offset; reading it from the start")
                        }
                    }
                    self.replies
                        .assigned()
                        .entry(topic.to_owned())
                        .or_default()
                        .insert(partition);
                    tracing::debug!(topic, partition, "reply partition assigned");
                }
                self.replies.changed.notify_waiters();
            }
            Rebalance::Revoke(partitions) => {
                for element in partitions.elements() {
                    let (topic, partition) = (element.topic(), element.partition());
                    self.replies.revoke(topic, partition);
                    tracing::debug!(topic, partition, "reply partition revoked");
                }
                self.replies.changed.notify_waiters();
            }
            Rebalance::Error(error) => tracing::warn!(%error, "reply consumer rebalance failed"),
        }
    }
}

struct Inner {
    options: KafkaOptions,
    producer: Producer,
    topics: Topics,
    consumer: Arc<GroupConsumer<ReplyContext>>,
    replies: Arc<Replies>,
    /// The reply topics subscribed to (held while the subscription changes).
    subscribed: tokio::sync::Mutex<BTreeSet<String>>,
    /// When the reply topics were last created again.
    recreated: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    /// The request and event topics made sure of (created if missing), with topic creation on.
    destinations: Mutex<HashSet<String>>,
    /// Dropped with the connection: stops the reply reader.
    _stop: oneshot::Sender<()>,
}

/// A connected Kafka client transport. Clones share the producer and the reply consumer; dropping
/// the last one stops both (requests still waiting fail with `Unavailable`).
#[derive(Clone)]
pub struct KafkaConnection {
    inner: Arc<Inner>,
}

impl KafkaConnection {
    async fn connect(transport: KafkaTransport) -> Result<Self, RpcError> {
        let options = transport.options;
        let pending = PendingRequests::new();
        let replies = Arc::new(Replies {
            assigned: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            pending: Arc::clone(&pending),
            waiting: Mutex::new(HashMap::new()),
            fetch_timeout: options.delivery_timeout,
            codec: options.shared_codec().clone(),
        });
        let producer = Producer::new(&options, "client")?;
        let mut config = options.consumer_config("client");
        // Replies are read from the end of each partition as it is assigned (or, failing that,
        // from the start); nothing is committed.
        config
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest");
        let consumer: StreamConsumer<ReplyContext> = config
            .create_with_context(ReplyContext {
                replies: Arc::clone(&replies),
            })
            .map_err(|error| kafka_error(&error, "cannot create the Kafka reply consumer"))?;
        // Nothing waits for this consumer's close: it commits nothing.
        let (consumer, _closed) = GroupConsumer::new(consumer);
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(read_replies(
            Arc::clone(&consumer),
            Arc::clone(&replies),
            stopped,
        ));
        let connection = KafkaConnection {
            inner: Arc::new(Inner {
                topics: Topics::new(&options)?,
                options,
                producer,
                consumer,
                replies,
                subscribed: tokio::sync::Mutex::new(BTreeSet::new()),
                recreated: tokio::sync::Mutex::new(None),
                destinations: Mutex::new(HashSet::new()),
                _stop: stop,
            }),
        };
        let topics: Vec<String> = transport
            .reply_to
            .iter()
            .map(|pattern| topic_of(pattern.route()).map(reply_topic))
            .collect::<Result<_, _>>()?;
        connection.subscribe(&topics).await?;
        for topic in &topics {
            connection.reply_partition(topic).await?;
        }
        Ok(connection)
    }

    /// Requests whose replies arrived after their callers stopped waiting.
    pub fn late_replies(&self) -> u64 {
        self.inner.replies.pending.late_replies()
    }

    /// Creates `topic`, a request or event topic, if it is missing, the first time it is sent to
    /// (with the options' partitions and replication, as the server's topics are). With topic
    /// creation off, or credentials that may not create topics, it is left to the broker, which
    /// may create it as it is first produced to.
    async fn ensure_destination(&self, topic: &str) -> Result<(), RpcError> {
        let inner = &*self.inner;
        if !inner.topics.creates() || lock(&inner.destinations).contains(topic) {
            return Ok(());
        }
        match inner.topics.ensure(&[topic.to_owned()]).await {
            Ok(()) => {}
            Err(error) if error.transport_kind() == Some(TransportErrorKind::Authorization) => {
                tracing::debug!(%error, topic, "may not create the topic; left to the broker");
            }
            Err(error) => return Err(error),
        }
        lock(&inner.destinations).insert(topic.to_owned());
        Ok(())
    }

    /// Subscribes to these reply topics (creating them if need be) in one change of the
    /// subscription.
    async fn subscribe(&self, topics: &[String]) -> Result<(), RpcError> {
        let inner = &*self.inner;
        let mut subscribed = inner.subscribed.lock().await;
        let new: Vec<String> = topics
            .iter()
            .filter(|topic| !subscribed.contains(*topic))
            .cloned()
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        inner.topics.ensure(&new).await?;
        let mut all = subscribed.clone();
        all.extend(new);
        let names: Vec<&str> = all.iter().map(String::as_str).collect();
        inner
            .consumer
            .subscribe(&names)
            .map_err(|error| kafka_error(&error, "cannot subscribe to the reply topics"))?;
        *subscribed = all;
        Ok(())
    }

    /// A partition of `topic` this client reads: subscribes to the topic if needed and waits for
    /// the group to assign one.
    async fn reply_partition(&self, topic: &str) -> Result<i32, RpcError> {
        let inner = &*self.inner;
        if let Some(partition) = inner.replies.partition(topic) {
            return Ok(partition);
        }
        self.subscribe(&[topic.to_owned()]).await?;
        // Subscribed, yet nothing assigned: the topic may be gone (deleted, or a broker that lost
        // its data) — make it again, at most once a second.
        {
            let mut recreated = inner.recreated.lock().await;
            if recreated.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
                *recreated = Some(tokio::time::Instant::now());
                let subscribed: Vec<String> =
                    inner.subscribed.lock().await.iter().cloned().collect();
                if let Err(error) = inner.topics.ensure(&subscribed).await {
                    tracing::debug!(%error, "cannot create the reply topics again");
                }
            }
        }
        let waited = tokio::time::timeout(inner.options.join_timeout, async {
            loop {
                let changed = inner.replies.changed.notified();
                if let Some(partition) = inner.replies.partition(topic) {
                    return partition;
                }
                changed.await;
            }
        })
        .await;
        waited.map_err(|_| {
            RpcError::transport(
                TransportErrorKind::NotConnected,
                format!(
                    "no partition of the reply topic {topic:?} was assigned to this client within {:?}: \
                     the broker is unreachable, or the topic has fewer partitions than there are \
                     clients in the group {:?}",
                    inner.options.join_timeout,
                    format!("{}-client", inner.options.group_id),
                ),
            )
        })
    }
}

fn reply_topic(topic: &str) -> String {
    format!("{topic}.reply")
}

fn header<'m>(message: &'m BorrowedMessage<'_>, name: &str) -> Option<Option<&'m [u8]>> {
    message
        .headers()?
        .iter()
        .find(|header| header.key == name)
        .map(|header| header.value)
}

/// The reply reader: polls the consumer (which also serves rebalances) and routes replies by
/// correlation id, until the connection is dropped.
async fn read_replies(
    consumer: Arc<GroupConsumer<ReplyContext>>,
    replies: Arc<Replies>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        let message = tokio::select! {
            biased;
            _ = &mut stopped => break,
            message = consumer.recv() => message,
        };
        match message {
            Ok(message) => deliver(&replies.pending, &replies.codec, &message),
            Err(error) => {
                tracing::debug!(%error, "Kafka reply consumer");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    replies.pending.close(&RpcError::transport(
        TransportErrorKind::ConnectionLost,
        "the Kafka client was dropped before the reply came",
    ));
}

/// Routes one reply record to its request, read the way NestJS's `ClientKafka` reads it.
fn deliver(pending: &PendingRequests, codec: &SharedCodec, message: &BorrowedMessage<'_>) {
    let Some(Some(id)) = header(message, CORRELATION_ID) else {
        return;
    };
    let Some(n) = std::str::from_utf8(id)
        .ok()
        .and_then(|id| pending.ids().parse(id))
    else {
        // Another client's reply (clients of one service share reply topics' partitions only
        // when there are more clients than partitions).
        return;
    };
    let unreadable = |error: CodecError| {
        tracing::warn!(%error, "a reply could not be read");
        ReplyPacket::Failed(RpcError::transport(
            TransportErrorKind::Protocol,
            format!(
                "invalid reply (does the server use the client's codec, {}?): {error}",
                codec.name()
            ),
        ))
    };
    let packet = if let Some(err) = header(message, NEST_ERR) {
        match received_err(codec, err.unwrap_or(b"null")) {
            Ok(err) if err.as_str().trim_matches('"') == NO_HANDLER_MESSAGE => {
                ReplyPacket::NoHandler
            }
            Ok(err) => ReplyPacket::Error(err),
            Err(error) => unreadable(error),
        }
    } else {
        let value_type = header(message, TYPE_HEADER).flatten();
        let string = value_type == Some(b"string".as_slice());
        let disposed = header(message, NEST_IS_DISPOSED).is_some();
        match (message.payload(), disposed) {
            // NestJS's completion record: the end of the stream (a NestJS client turns it into one
            // more `null`; palisade does not invent a value), unless a palisade server says it is
            // a last value of `null`.
            (None, true) if value_type != Some(NULL_TYPE) => ReplyPacket::Complete,
            (value, last) => match received(codec, value, string) {
                Ok(response) => ReplyPacket::Value { response, last },
                Err(error) => unreadable(error),
            },
        }
    };
    pending.deliver(n, packet);
}

/// Locks `mutex`, whose data stays whole whatever panicked while it was held.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The record for a request or event, with the options' codec.
fn encode(options: &KafkaOptions, request: &RpcRequest) -> Result<Outgoing, RpcError> {
    outgoing(options.shared_codec(), request.payload()).map_err(|error| {
        RpcError::invalid_argument(format!(
            "cannot encode the message for '{}': {error}",
            request.pattern()
        ))
    })
}

impl ClientTransport for KafkaConnection {
    fn request(&self, request: RpcRequest) -> BoxFuture<'static, Result<ReplyReceiver, RpcError>> {
        let connection = self.clone();
        Box::pin(async move {
            let topic = topic_of(request.pattern().route())?.to_owned();
            let reply_topic = reply_topic(&topic);
            let inner = &*connection.inner;
            let (partition, registered) = loop {
                let partition = connection.reply_partition(&reply_topic).await?;
                let registered = inner.replies.pending.register(request.pattern())?;
                if inner
                    .replies
                    .wait_on(&reply_topic, partition, registered.number())
                {
                    break (partition, registered);
                }
                // Revoked meanwhile: dropping `registered` forgets it.
            };
            let id = registered.id();
            let partition_text = partition.to_string();
            let mut headers: Vec<(&str, &[u8])> = vec![
                (CORRELATION_ID, id.as_str().as_bytes()),
                (REPLY_TOPIC, reply_topic.as_bytes()),
                (REPLY_PARTITION, partition_text.as_bytes()),
            ];
            let wire_headers = request.wire_headers();
            headers.extend(wire_headers.iter().map(|(k, v)| (k, v.as_bytes())));
            let record = encode(&inner.options, &request)?;
            connection.ensure_destination(&topic).await?;
            inner.producer.send(&topic, &record, &headers).await?;
            Ok(registered.into_replies())
        })
    }

    fn emit(&self, event: RpcRequest) -> BoxFuture<'static, Result<(), RpcError>> {
        let connection = self.clone();
        Box::pin(async move {
            let topic = topic_of(event.pattern().route())?.to_owned();
            let wire_headers = event.wire_headers();
            let headers: Vec<(&str, &[u8])> = wire_headers
                .iter()
                .map(|(k, v)| (k, v.as_bytes()))
                .collect();
            let record = encode(&connection.inner.options, &event)?;
            connection.ensure_destination(&topic).await?;
            connection
                .inner
                .producer
                .send(&topic, &record, &headers)
                .await
        })
    }
}

impl fmt::Debug for KafkaConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConnection")
            .field("options", &self.inner.options)
            .field("pending", &self.inner.replies.pending.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::Pattern;
    use crate::rpc::transport::ReplyPacket;

    fn replies(assigned: &[(&str, i32)]) -> Replies {
        let mut map: HashMap<String, BTreeSet<i32>> = HashMap::new();
        for (topic, partition) in assigned {
            map.entry((*topic).to_owned())
                .or_default()
                .insert(*partition);
        }
        Replies {
            assigned: Mutex::new(map),
            changed: Notify::new(),
            pending: PendingRequests::new(),
            waiting: Mutex::new(HashMap::new()),
            fetch_timeout: Duration::from_secs(1),
            codec: SharedCodec::default(),
        }
    }

    #[test]
    fn a_request_noted_on_its_partition_fails_when_the_partition_is_revoked() {
        let replies = replies(&[("tag.reply", 0)]);
        let registered = replies.pending.register(&Pattern::from("tag")).unwrap();
        assert!(replies.wait_on("tag.reply", 0, registered.number()));
        let mut receiver = registered.into_replies();
        replies.revoke("tag.reply", 0);
        let failed = futures_util::FutureExt::now_or_never(receiver.recv());
        assert!(
            matches!(failed, Some(Some(ReplyPacket::Failed(_)))),
            "the request was not failed: {failed:?}"
        );
    }

    #[test]
    fn requests_no_longer_waiting_are_forgotten_once_they_outnumber_those_waiting_enough() {
        let replies = replies(&[("tag.reply", 0)]);
        let register = || replies.pending.register(&Pattern::from("tag")).unwrap();
        let live: Vec<_> = (0..3).map(|_| register()).collect();
        for request in &live {
            assert!(replies.wait_on("tag.reply", 0, request.number()));
        }
        for _ in 0..1100 {
            let gone = register();
            assert!(replies.wait_on("tag.reply", 0, gone.number()));
        }
        // Forgotten once more than 2 × 4 + 1024 are noted (4 waiting: the 3, and the one being
        // noted): at the 1031st request gone, which leaves the 3 and that one; then 69 more.
        let noted: Vec<u64> = replies.waiting().values().flatten().copied().collect();
        assert_eq!(noted.len(), 3 + 1 + 69, "{} noted", noted.len());
        for request in &live {
            assert!(noted.contains(&request.number()));
        }
    }

    #[test]
    fn a_partition_revoked_between_its_pick_and_the_note_is_not_kept() {
        let replies = replies(&[("tag.reply", 0), ("tag.reply", 1)]);
        let picked = replies.partition("tag.reply").unwrap();
        replies.revoke("tag.reply", picked);
        let registered = replies.pending.register(&Pattern::from("tag")).unwrap();
        assert!(
            !replies.wait_on("tag.reply", picked, registered.number()),
            "a request noted on a partition revoked before it would wait out its deadline"
        );
        assert!(
            replies.waiting().values().all(HashSet::is_empty),
            "the request stays noted"
        );
        assert_eq!(replies.partition("tag.reply"), Some(1));
    }
}
