use super::closing::GroupConsumer;
use super::value::{
    CORRELATION_ID, NEST_ERR, NEST_IS_DISPOSED, NULL_TYPE, Outgoing, REPLY_PARTITION, REPLY_TOPIC,
    TYPE_HEADER, err_header, received, reply_value,
};
use super::{KafkaOptions, Producer, Topics, kafka_error, topic_of};
use crate::rpc::error::NO_HANDLER_MESSAGE;
use crate::rpc::transport::{
    DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON, DEAD_LETTER_SUBJECT, ReplyPacket, ServerTransport,
    error_json,
};
use crate::rpc::wire::{CodecError, SharedCodec};
use crate::rpc::{
    Dispatcher, Headers, Kind, Pattern, RawJson, ReplySink, RpcError, RpcRequest, SendError,
    Server, ServerHandle,
};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers as _, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Header of a dead letter: the partition of the record that failed.
pub const DEAD_LETTER_PARTITION: &str = "palisade-original-partition";
/// Header of a dead letter: the offset of the record that failed.
pub const DEAD_LETTER_OFFSET: &str = "palisade-original-offset";
/// Header of a dead letter too large to carry the failed record's value and headers: present
/// (`"true"`) when they were left out. The record stays readable in its topic, at the partition
/// and offset the dead letter names, for as long as the topic keeps it.
pub const DEAD_LETTER_VALUE_OMITTED: &str = "palisade-value-omitted";

/// Records of one partition waiting for their worker; beyond this the consumer waits.
const PARTITION_QUEUE: usize = 256;

/// What happens to an event whose handler fails: retried in place (the partition waits, so
/// events stay in order), then published to a dead-letter topic
/// `<dead letter prefix>.<topic>` with the reason in its headers
/// ([`DEAD_LETTER_REASON`], [`DEAD_LETTER_DELIVERIES`], [`DEAD_LETTER_SUBJECT`] — the
/// original topic —, [`DEAD_LETTER_PARTITION`], [`DEAD_LETTER_OFFSET`]) and committed.
///
/// A dead letter the broker refuses for a while (unreachable, no leader) is tried again, the
/// partition waiting, until it is published. One too large is sent without the record's key,
/// value and headers, with the reason cut short ([`DEAD_LETTER_VALUE_OMITTED`]); one refused for
/// good even so is logged as an error and its record committed without it. An event still
/// failing when the server shuts down, or whose partition moves away meanwhile, is not committed:
/// it is delivered again (with a fresh count of deliveries) after the restart or to the
/// partition's next owner.
///
/// Defaults: 3 deliveries, retried after 200 ms and 1 s, dead letters on
/// `palisade.dead-letter.<topic>`.
///
/// ```
/// use palisade::rpc::transport::kafka::{KafkaEvents, KafkaOptions, KafkaServer};
/// use std::time::Duration;
///
/// let server = KafkaServer::new(KafkaOptions::new(["127.0.0.1:9092"])).events(
///     KafkaEvents::new()
///         .max_deliveries(5)
///         .backoff([Duration::from_millis(100), Duration::from_secs(1), Duration::from_secs(5)]),
/// );
/// # let _ = server;
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct KafkaEvents {
    max_deliveries: u32,
    backoff: Vec<Duration>,
    dead_letter_prefix: String,
}

impl Default for KafkaEvents {
    fn default() -> Self {
        KafkaEvents {
            max_deliveries: 3,
            backoff: vec![Duration::from_millis(200), Duration::from_secs(1)],
            dead_letter_prefix: "palisade.dead-letter".into(),
        }
    }
}

impl KafkaEvents {
    /// The defaults.
    pub fn new() -> Self {
        KafkaEvents::default()
    }

    /// Deliveries before an event is dead-lettered (at least 1).
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        self.max_deliveries = deliveries.max(1);
        self
    }

    /// Delays before the 1st, 2nd, ... redelivery (the last repeats).
    pub fn backoff(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.backoff = delays.into_iter().collect();
        self
    }

    /// Dead letters go to `<prefix>.<topic>`.
    pub fn dead_letter_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.dead_letter_prefix = prefix.into();
        self
    }

    fn delay_before(&self, redelivery: u32) -> Duration {
        let index = redelivery.saturating_sub(1) as usize;
        self.backoff
            .get(index)
            .or(self.backoff.last())
            .copied()
            .unwrap_or_default()
    }

    fn dead_letter_topic(&self, topic: &str) -> String {
        format!("{}.{topic}", self.dead_letter_prefix)
    }
}

/// A NestJS-compatible Kafka server: the consumer group `<group>-server` over the topics of the
/// server's routes, and a producer for replies and dead letters. See the [module
/// documentation](super) for what it does beyond NestJS.
#[derive(Debug)]
pub struct KafkaServer {
    options: KafkaOptions,
    events: KafkaEvents,
}

impl KafkaServer {
    /// A server connecting with `options`.
    pub fn new(options: KafkaOptions) -> Self {
        KafkaServer {
            options,
            events: KafkaEvents::default(),
        }
    }

    /// What happens to events whose handlers fail; see [`KafkaEvents`].
    pub fn events(mut self, events: KafkaEvents) -> Self {
        self.events = events;
        self
    }

    async fn start(self, server: Server) -> Result<ServerHandle, RpcError> {
        let routes = server.routes().cloned().ok_or_else(|| {
            RpcError::invalid_argument(
                "a Kafka server subscribes per pattern: serve a Router, or declare the patterns \
                 of another service with Server::with_routes",
            )
        })?;
        let messages: HashSet<Arc<str>> = routes.messages().iter().cloned().collect();
        let topics: Vec<String> = routes
            .all()
            .iter()
            .map(|route| topic_of(route).map(str::to_owned))
            .collect::<Result<_, _>>()?;
        let mut created = topics.clone();
        created.extend(
            routes
                .events()
                .iter()
                .map(|route| self.events.dead_letter_topic(route)),
        );
        let admin = Topics::new(&self.options)?;
        admin.ensure(&created).await?;
        let revoked = Arc::new(Revocations::default());
        let joined = Arc::new(tokio::sync::Notify::new());
        let consumer: StreamConsumer<ServerContext> = self
            .options
            .consumer_config("server")
            .create_with_context(ServerContext {
                revoked: Arc::clone(&revoked),
                joined: Arc::clone(&joined),
                from_beginning: self.options.from_beginning,
                timeout: self.options.delivery_timeout,
            })
            .map_err(|error| kafka_error(&error, "cannot create the Kafka consumer"))?;
        let (consumer, closed) = GroupConsumer::new(consumer);
        if !topics.is_empty() {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer
                .subscribe(&names)
                .map_err(|error| kafka_error(&error, "cannot subscribe to the topics"))?;
        }
        let producer = Arc::new(Producer::new(&self.options, "server")?);
        let dispatcher = server.into_dispatcher("kafka");
        let shared = Arc::new(Shared {
            consumer: Arc::clone(&consumer),
            producer: Arc::clone(&producer),
            dispatcher: dispatcher.clone(),
            messages,
            events: self.events,
            options: self.options.clone(),
            topics,
            admin,
        });
        let joining = joined.notified();
        // Stops the consumer if this future is dropped while it waits for the group.
        let starting = dispatcher.start_guard();
        dispatcher.spawn(consume(Arc::clone(&shared), revoked));
        // Serving means taking records: wait for the group to assign partitions (maybe none, when
        // there are more servers than partitions).
        if !shared.topics.is_empty()
            && tokio::time::timeout(self.options.join_timeout, joining)
                .await
                .is_err()
        {
            tracing::warn!(timeout = ?self.options.join_timeout, "the Kafka server group assigned no partitions in time; serving anyway");
        }
        let delivery_timeout = self.options.delivery_timeout;
        let finish = async move {
            producer.flush(delivery_timeout).await;
            drop(shared);
            // Closing commits the offsets stored by now and leaves the group. It goes on if the
            // broker is slower than this, on its own thread.
            drop(consumer);
            if tokio::time::timeout(delivery_timeout, closed)
                .await
                .is_err()
            {
                tracing::warn!("the Kafka consumer did not close in time");
            }
        };
        Ok(starting.serving().on_shutdown(finish))
    }
}

impl ServerTransport for KafkaServer {
    /// Creates the topics (unless topic creation is off), joins the group and starts consuming.
    /// Fails with a clear error if a pattern is not a valid topic name or the broker refuses.
    fn serve(self, server: Server) -> impl Future<Output = Result<ServerHandle, RpcError>> + Send {
        self.start(server)
    }
}

/// Partitions taken away from this server, set by the consumer's rebalance callback and read by
/// their workers, which stop taking records.
#[derive(Default)]
struct Revocations {
    partitions: Mutex<Partitions>,
}

/// What the rebalance callbacks and the consumer loop share about this server's partitions.
#[derive(Default)]
struct Partitions {
    /// The revocation flag of each partition's current worker.
    flags: HashMap<PartitionKey, Arc<AtomicBool>>,
    /// Partitions the consumer loop paused (their worker behind). librdkafka keeps an
    /// application's pause across a revocation and a later assignment, so a paused partition
    /// that is revoked is resumed then.
    paused: HashSet<PartitionKey>,
}

impl Revocations {
    fn partitions(&self) -> std::sync::MutexGuard<'_, Partitions> {
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct ServerContext {
    revoked: Arc<Revocations>,
    /// Set at the first assignment (the group has been joined).
    joined: Arc<tokio::sync::Notify>,
    from_beginning: bool,
    timeout: Duration,
}

impl ServerContext {
    /// Starts partitions this group never committed an offset for at their end (or beginning) as
    /// it is now: a record produced once `serve` returned is never skipped, whatever the fetcher
    /// would have resolved `auto.offset.reset` to later.
    ///
    /// The start is committed for the group, too: a partition that moves to another server before
    /// this one finished a record of it would otherwise start there at *its* end, skipping every
    /// record this one had not finished.
    fn start_new_partitions(&self, consumer: &BaseConsumer<Self>, partitions: &TopicPartitionList) {
        let committed = match consumer.committed_offsets(partitions.clone(), self.timeout) {
            Ok(committed) => committed,
            Err(error) => {
                tracing::debug!(%error, "cannot read the group's committed offsets");
                return;
            }
        };
        let mut starts = TopicPartitionList::new();
        for element in committed.elements() {
            let (topic, partition) = (element.topic(), element.partition());
            if let Err(error) = element.error() {
                // Not known to be new: left to the fetcher, which reads the committed offset.
                tracing::debug!(topic, partition, %error, "cannot read a partition's committed offset");
                continue;
            }
            if element.offset() != Offset::Invalid {
                continue;
            }
            match consumer.fetch_watermarks(topic, partition, self.timeout) {
                Ok((low, high)) => {
                    let start = if self.from_beginning { low } else { high };
                    if let Err(error) =
                        consumer.seek(topic, partition, Offset::Offset(start), self.timeout)
                    {
                        // The fetcher resolves `auto.offset.reset` then, at or after `start`:
                        // committing `start` still keeps the next owner from skipping more.
                        tracing::debug!(topic, partition, %error, "cannot seek a new partition");
                    }
                    if let Err(error) =
                        starts.add_partition_offset(topic, partition, Offset::Offset(start))
                    {
                        tracing::debug!(topic, partition, %error, "cannot note a partition's start");
                    }
                }
                Err(error) => {
                    tracing::debug!(topic, partition, %error, "cannot read a partition's offsets")
                }
            }
        }
        if starts.count() == 0 {
            return;
        }
        // Stored as well as committed: if the commit fails (a rebalance under way, the
        // coordinator moving), the next auto-commit, or the one librdkafka makes when the
        // partition is revoked, carries the start.
        if let Err(error) = consumer.store_offsets(&starts) {
            tracing::debug!(%error, "cannot store the new partitions' starts");
        }
        if let Err(error) = consumer.commit(&starts, CommitMode::Sync) {
            tracing::warn!(%error, "cannot commit the new partitions' starts; stored for the next commit");
        }
    }
}

impl ClientContext for ServerContext {}

impl ConsumerContext for ServerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                let mut ours = self.revoked.partitions();
                let mut paused = TopicPartitionList::new();
                for element in partitions.elements() {
                    let key = (element.topic().to_owned(), element.partition());
                    if let Some(flag) = ours.flags.remove(&key) {
                        flag.store(true, Ordering::Release);
                    }
                    if ours.paused.remove(&key) {
                        paused.add_partition(&key.0, key.1);
                    }
                    tracing::debug!(topic = %key.0, partition = key.1, "partition revoked");
                }
                drop(ours);
                // Resumed while still assigned, before librdkafka stops its fetcher: assigned
                // again later (here or elsewhere in this process), it must not stay paused.
                if paused.count() > 0 {
                    resume(consumer, &paused);
                }
            }
            Rebalance::Assign(_) | Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                for element in partitions.elements() {
                    tracing::debug!(
                        topic = element.topic(),
                        partition = element.partition(),
                        "partition assigned"
                    );
                }
                self.start_new_partitions(consumer, partitions);
                self.joined.notify_waiters();
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "Kafka rebalance failed"),
        }
    }
}

/// What the consumer loop and the partition workers share.
struct Shared {
    consumer: Arc<GroupConsumer<ServerContext>>,
    producer: Arc<Producer>,
    dispatcher: Dispatcher,
    /// Routes with a message handler: a record there with correlation headers is a request.
    messages: HashSet<Arc<str>>,
    events: KafkaEvents,
    options: KafkaOptions,
    topics: Vec<String>,
    admin: Topics,
}

/// A partition's worker: where its records go, and whether it was revoked.
struct Worker {
    records: mpsc::Sender<OwnedMessage>,
    revoked: Arc<AtomicBool>,
    /// Records read while the worker's queue was full, in order. The partition is paused while
    /// any wait here, so that the consumer goes on reading the other partitions.
    held: VecDeque<OwnedMessage>,
}

/// Free places a paused partition's queue needs before the partition is resumed. Resuming at the
/// first free place would pause it again at once, fetching its records afresh each time.
const RESUME_WITH_ROOM: usize = PARTITION_QUEUE / 2;

type PartitionKey = (String, i32);

/// Resolves once a paused partition's queue has room for [`RESUME_WITH_ROOM`] records, or its
/// worker is gone; gives back the partition and the queue it waited on.
type Room = Pin<Box<dyn Future<Output = (PartitionKey, mpsc::Sender<OwnedMessage>)> + Send>>;

fn room_in(key: PartitionKey, records: mpsc::Sender<OwnedMessage>) -> Room {
    Box::pin(async move {
        // The permits are given back at once: only the consumer loop sends, so the room stays.
        let _ = records.reserve_many(RESUME_WITH_ROOM).await;
        (key, records)
    })
}

/// The consumer loop's workers, and the partitions it paused because their queue was full.
struct Workers {
    shared: Arc<Shared>,
    revocations: Arc<Revocations>,
    by_partition: HashMap<PartitionKey, Worker>,
    /// One wait per paused partition, for room in its queue.
    paused: FuturesUnordered<Room>,
}

impl Workers {
    /// Hands `message` to its partition's worker, starting one if the partition has none (or a
    /// revoked one). A full queue pauses the partition rather than the consumer: one slow
    /// partition must not hold up the others, nor keep the consumer from polling for so long
    /// (`max.poll.interval.ms`) that the group drops it.
    async fn deliver(&mut self, message: OwnedMessage) {
        let key = (message.topic().to_owned(), message.partition());
        let live = self
            .by_partition
            .get(&key)
            .is_some_and(|worker| !worker.revoked.load(Ordering::Acquire));
        if !live {
            let revoked = Arc::new(AtomicBool::new(false));
            self.revocations
                .partitions()
                .flags
                .insert(key.clone(), Arc::clone(&revoked));
            let (records, queue) = mpsc::channel(PARTITION_QUEUE);
            self.shared.dispatcher.spawn(work(
                Arc::clone(&self.shared),
                key.0.clone(),
                key.1,
                queue,
                Arc::clone(&revoked),
                Arc::clone(&self.revocations),
            ));
            self.by_partition.insert(
                key.clone(),
                Worker {
                    records,
                    revoked,
                    held: VecDeque::new(),
                },
            );
        }
        let worker = self
            .by_partition
            .get_mut(&key)
            .expect("a worker was just found or started");
        if !worker.held.is_empty() {
            // Read before the pause took effect: after the records it follows.
            worker.held.push_back(message);
            if worker.held.len() > PARTITION_QUEUE {
                // The pause did not take (librdkafka goes on delivering the partition): wait
                // for the worker, as a last resort, rather than hold records without bound.
                tracing::warn!(topic = %key.0, partition = key.1, "a paused partition's records keep coming; waiting for its worker");
                while let Some(record) = worker.held.pop_front() {
                    if worker.records.send(record).await.is_err() {
                        self.by_partition.remove(&key);
                        return;
                    }
                }
            }
            return;
        }
        match worker.records.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.by_partition.remove(&key);
            }
            Err(mpsc::error::TrySendError::Full(message)) => {
                // Noted for the revocation, which resumes it. (The rebalance callbacks run in
                // this loop's `recv`: none runs between the pause and the note.)
                let paused = pause(&**self.shared.consumer, &partition_list(&key));
                if paused.is_ok() {
                    self.revocations.partitions().paused.insert(key.clone());
                }
                if let Err(error) = paused {
                    // Backpressure on the whole consumer, as a last resort.
                    tracing::warn!(topic = %key.0, partition = key.1, %error, "cannot pause a partition; waiting for its worker");
                    if worker.records.send(message).await.is_err() {
                        self.by_partition.remove(&key);
                    }
                    return;
                }
                tracing::debug!(topic = %key.0, partition = key.1, "partition paused: its worker is behind");
                worker.held.push_back(message);
                self.paused.push(room_in(key, worker.records.clone()));
            }
        }
    }

    /// Hands a paused partition's held records to its worker, which made room, and resumes the
    /// partition; fetching goes on after the last record held.
    fn room_made(&mut self, key: PartitionKey, records: &mpsc::Sender<OwnedMessage>) {
        let Some(worker) = self.by_partition.get_mut(&key) else {
            return;
        };
        if !worker.records.same_channel(records) || worker.revoked.load(Ordering::Acquire) {
            // A worker since replaced, or revoked (the revocation resumed the partition).
            return;
        }
        while let Some(record) = worker.held.pop_front() {
            match worker.records.try_send(record) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(record)) => {
                    worker.held.push_front(record);
                    self.paused.push(room_in(key, worker.records.clone()));
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // The worker ended on its own: a new one takes the partition's next record.
                    self.by_partition.remove(&key);
                    break;
                }
            }
        }
        let was_paused = self.revocations.partitions().paused.remove(&key);
        if was_paused {
            resume(&**self.shared.consumer, &partition_list(&key));
        }
    }

    /// Forgets revoked workers, with the records they held: those go to the partition's next
    /// owner, from the last committed offset.
    fn drop_revoked(&mut self) {
        self.by_partition
            .retain(|_, worker| !worker.revoked.load(Ordering::Acquire));
    }
}

/// Pauses `partitions`; librdkafka reports a failure per partition, in the list.
fn pause<C: Consumer<ServerContext>>(
    consumer: &C,
    partitions: &TopicPartitionList,
) -> Result<(), String> {
    consumer
        .pause(partitions)
        .map_err(|error| error.to_string())?;
    per_partition(partitions)
}

/// Resumes `partitions`, logging a failure.
fn resume<C: Consumer<ServerContext>>(consumer: &C, partitions: &TopicPartitionList) {
    let resumed = consumer
        .resume(partitions)
        .map_err(|error| error.to_string())
        .and_then(|()| per_partition(partitions));
    match resumed {
        Ok(()) => tracing::debug!(?partitions, "partitions resumed"),
        Err(error) => tracing::warn!(%error, ?partitions, "cannot resume partitions"),
    }
}

/// The first failure librdkafka noted on a partition of `partitions`.
fn per_partition(partitions: &TopicPartitionList) -> Result<(), String> {
    for element in partitions.elements() {
        if let Err(error) = element.error() {
            return Err(format!(
                "{}/{}: {error}",
                element.topic(),
                element.partition()
            ));
        }
    }
    Ok(())
}

/// `key`'s partition, for pausing or resuming it.
fn partition_list(key: &PartitionKey) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    list.add_partition(&key.0, key.1);
    list
}

/// Reads records and hands each to its partition's worker, until shutdown.
async fn consume(shared: Arc<Shared>, revocations: Arc<Revocations>) {
    let mut workers = Workers {
        shared: Arc::clone(&shared),
        revocations,
        by_partition: HashMap::new(),
        paused: FuturesUnordered::new(),
    };
    let mut draining = std::pin::pin!(shared.dispatcher.draining());
    let mut topics_checked: Option<tokio::time::Instant> = None;
    loop {
        if shared.dispatcher.is_draining() {
            break;
        }
        let received = tokio::select! {
            biased;
            _ = &mut draining => break,
            Some((key, records)) = workers.paused.next(), if !workers.paused.is_empty() => {
                workers.room_made(key, &records);
                continue;
            }
            received = shared.consumer.recv() => received,
        };
        let message = match received {
            Ok(message) => message.detach(),
            Err(error) => {
                tracing::debug!(%error, "Kafka consumer");
                let checked_lately =
                    topics_checked.is_some_and(|at| at.elapsed() < Duration::from_secs(1));
                if matches!(
                    error.rdkafka_error_code(),
                    Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)
                ) && !checked_lately
                {
                    // The topics are gone (deleted, or a broker that lost its data): make them
                    // again, so that the group can resume.
                    topics_checked = Some(tokio::time::Instant::now());
                    if let Err(error) = shared.admin.ensure(&shared.topics).await {
                        tracing::warn!(%error, "cannot create the server's topics again");
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        workers.deliver(message).await;
        workers.drop_revoked();
    }
    // Workers finish what they took, and store its offsets for the commit the consumer makes as
    // it closes, after the drain: what was handled during the grace period is not handled again
    // by the next server. Records not yet taken (or held) are left to the next owner.
}

/// The progress of a partition: which records are done, so that only offsets below every record
/// still being handled are committed.
struct Progress {
    topic: String,
    partition: i32,
    state: Mutex<ProgressState>,
    /// The worker's revocation flag: once set, its offsets are the next owner's business.
    revoked: Arc<AtomicBool>,
    revocations: Arc<Revocations>,
}

#[derive(Default)]
struct ProgressState {
    in_flight: BTreeSet<i64>,
    /// One past the highest offset taken.
    next: i64,
    /// One past the highest offset stored for commit.
    stored: i64,
}

impl Progress {
    fn start(&self, offset: i64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.in_flight.insert(offset);
        state.next = state.next.max(offset + 1);
    }

    /// Marks `offset` done and stores, for the next commit, every offset below the first record
    /// still in flight.
    fn finish(&self, offset: i64, consumer: &StreamConsumer<ServerContext>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.in_flight.remove(&offset);
        let done_below = state.in_flight.first().copied().unwrap_or(state.next);
        if done_below > state.stored {
            state.stored = done_below;
            // Checked under the lock the revocation sets the flag under. A revoked worker's
            // store would succeed if the partition came back to this server meanwhile, and set
            // its commit back behind what the new worker did: those records would come again.
            let _ours = self.revocations.partitions();
            if self.revoked.load(Ordering::Acquire) {
                return;
            }
            // `store_offset` stores "offset + 1": the record before `done_below`.
            if let Err(error) = consumer.store_offset(&self.topic, self.partition, done_below - 1) {
                tracing::debug!(topic = %self.topic, partition = self.partition, %error, "offset not stored");
            }
        }
    }
}

/// Handles the records of one partition in order.
async fn work(
    shared: Arc<Shared>,
    topic: String,
    partition: i32,
    mut records: mpsc::Receiver<OwnedMessage>,
    revoked: Arc<AtomicBool>,
    revocations: Arc<Revocations>,
) {
    let route: Arc<str> = Arc::from(topic.as_str());
    let progress = Arc::new(Progress {
        topic,
        partition,
        state: Mutex::new(ProgressState::default()),
        revoked: Arc::clone(&revoked),
        revocations,
    });
    while let Some(record) = records.recv().await {
        if revoked.load(Ordering::Acquire) || shared.dispatcher.is_draining() {
            // Not ours any more (or shutting down): left for the partition's next owner.
            break;
        }
        let offset = record.offset();
        progress.start(offset);
        let incoming = Incoming::of(&record, shared.options.shared_codec());
        match incoming
            .reply_to
            .filter(|_| shared.messages.contains(&route))
        {
            Some((reply_topic, reply_partition, correlation)) => {
                let mut sink = KafkaSink {
                    producer: Arc::clone(&shared.producer),
                    topic: reply_topic,
                    partition: reply_partition,
                    correlation,
                    max_message_bytes: shared.options.max_message_bytes,
                    codec: shared.options.shared_codec().clone(),
                    done: Some(Done {
                        progress: Arc::clone(&progress),
                        offset,
                        shared: Arc::clone(&shared),
                    }),
                };
                let data = match incoming.data {
                    Ok(data) => data,
                    Err(error) => {
                        // The caller learns why at once, instead of at its timeout.
                        tracing::warn!(topic = record.topic(), offset, %error, "a request could not be read");
                        let refusal = RpcError::invalid_argument(format!(
                            "the server could not read the request (does the client use the \
                             server's codec, {}?): {error}",
                            shared.options.shared_codec().name()
                        ));
                        let _ = sink.send(ReplyPacket::Failed(refusal)).await;
                        continue;
                    }
                };
                let request = RpcRequest::received(
                    Pattern::received_on(
                        Arc::clone(&route),
                        RawJson::to_json(&*route).expect("a string serialises"),
                    ),
                    data,
                    Kind::Request,
                    incoming.headers,
                );
                shared.dispatcher.dispatch(request, Some(sink)).await;
            }
            None => {
                let data = match incoming.data {
                    Ok(data) => data,
                    Err(error) => {
                        // Retrying would not make it readable.
                        let error = RpcError::invalid_argument(format!(
                            "the event could not be read with the server's codec: {error}"
                        ));
                        tracing::error!(topic = record.topic(), offset, %error, "unreadable event dead-lettered");
                        if dead_letter(&shared, &record, 1, &error, &revoked).await {
                            progress.finish(offset, &shared.consumer);
                        }
                        continue;
                    }
                };
                let event = RpcRequest::received(
                    Pattern::received_on(
                        Arc::clone(&route),
                        RawJson::to_json(&*route).expect("a string serialises"),
                    ),
                    data,
                    Kind::Event,
                    incoming.headers,
                );
                // An event that is not settled stays in flight: nothing from its offset on is
                // committed, and it is delivered again after a restart or a rebalance.
                if handle_event(&shared, event, &record, &revoked).await {
                    progress.finish(offset, &shared.consumer);
                }
            }
        }
    }
}

/// An event handled at least once: retried in place, then dead-lettered. Returns whether it is
/// settled (handled, or dead-lettered); an event left unsettled must not be committed.
async fn handle_event(
    shared: &Shared,
    event: RpcRequest,
    record: &OwnedMessage,
    revoked: &AtomicBool,
) -> bool {
    let events = &shared.events;
    let mut delivery = 1;
    let error = loop {
        match shared.dispatcher.handle_event(event.clone()).await {
            Ok(()) => return true,
            Err(error) if delivery < events.max_deliveries && !shared.dispatcher.is_draining() => {
                let delay = events.delay_before(delivery);
                tracing::warn!(topic = record.topic(), offset = record.offset(), delivery, %error, retry_in = ?delay, "event handler failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.dispatcher.draining() => {}
                }
                delivery += 1;
            }
            Err(error) => break error,
        }
    };
    if shared.dispatcher.is_draining() || revoked.load(Ordering::Acquire) {
        // Shutting down (the failure may be the shutdown's own: a handler cancelled at the end
        // of the grace period), or the partition moved: not committed, so it is delivered again
        // after the restart, or to the partition's next owner.
        tracing::info!(topic = record.topic(), offset = record.offset(), deliveries = delivery, %error, "event left for redelivery: the server is shutting down");
        return false;
    }
    tracing::error!(topic = record.topic(), offset = record.offset(), deliveries = delivery, %error, "event failed for good; dead-lettered");
    dead_letter(shared, record, delivery, &error, revoked).await
}

/// Longest wait between two tries of a dead letter's publish.
const DEAD_LETTER_RETRY_CAP: Duration = Duration::from_secs(30);

/// Longest reason a dead letter that was too large carries.
const SHORT_REASON: usize = 1024;

/// Publishes `record` to its topic's dead-letter topic, with why and after how many deliveries.
/// A refusal that may pass (the broker unreachable) is tried again, holding up the partition,
/// until the dead letter is published, the server shuts down or the partition moves. Returns
/// whether the record may be committed: `false` leaves it to be delivered again.
async fn dead_letter(
    shared: &Shared,
    record: &OwnedMessage,
    delivery: u32,
    error: &RpcError,
    revoked: &AtomicBool,
) -> bool {
    let dead_letters = shared.events.dead_letter_topic(record.topic());
    let mut reason = error.to_string();
    let deliveries = delivery.to_string();
    let partition = record.partition().to_string();
    let offset = record.offset().to_string();
    let mut outgoing = Outgoing {
        key: record.key().map(<[u8]>::to_vec),
        value: record.payload().map(<[u8]>::to_vec),
        headers: Vec::new(),
        partition: None,
    };
    if let Some(headers) = record.headers() {
        for header in headers.iter() {
            if let Some(value) = header.value {
                outgoing
                    .headers
                    .push((header.key.to_owned(), value.to_vec()));
            }
        }
    }
    let mut wait = Duration::from_millis(100);
    loop {
        if shared.dispatcher.is_draining() || revoked.load(Ordering::Acquire) {
            tracing::warn!(
                topic = record.topic(),
                offset = record.offset(),
                "dead letter not published before shutdown or the partition moved; the event is left for redelivery"
            );
            return false;
        }
        let headers: [(&str, &[u8]); 5] = [
            (DEAD_LETTER_REASON, reason.as_bytes()),
            (DEAD_LETTER_DELIVERIES, deliveries.as_bytes()),
            (DEAD_LETTER_SUBJECT, record.topic().as_bytes()),
            (DEAD_LETTER_PARTITION, partition.as_bytes()),
            (DEAD_LETTER_OFFSET, offset.as_bytes()),
        ];
        let error = match shared
            .producer
            .send(&dead_letters, &outgoing, &headers)
            .await
        {
            Ok(_) => return true,
            Err(error) => error,
        };
        let too_large =
            error.transport_kind() == Some(crate::rpc::TransportErrorKind::PayloadTooLarge);
        let trimmed = outgoing.value.is_none()
            && outgoing.key.is_none()
            && outgoing.headers.len() <= 1
            && reason.len() <= SHORT_REASON;
        if too_large && !trimmed {
            // The failed record fitted its topic, but not with the dead letter's headers: say
            // where the record is instead of carrying it.
            tracing::warn!(%error, topic = record.topic(), offset = record.offset(), "dead letter too large; sent without the record's key, value and headers");
            outgoing.value = None;
            outgoing.key = None;
            outgoing.headers = vec![(DEAD_LETTER_VALUE_OMITTED.to_owned(), b"true".to_vec())];
            if reason.len() > SHORT_REASON {
                let mut end = SHORT_REASON;
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason.truncate(end);
            }
            continue;
        }
        if !crate::classify::FailureKind::is_transient(&error) {
            tracing::error!(%error, topic = record.topic(), offset = record.offset(), %dead_letters, "the dead letter is refused for good; the event is committed without one");
            return true;
        }
        tracing::error!(%error, topic = record.topic(), offset = record.offset(), retry_in = ?wait, "cannot publish a dead letter; trying again");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.dispatcher.draining() => {}
        }
        wait = (wait * 2).min(DEAD_LETTER_RETRY_CAP);
    }
}

/// What a record carries, read as a NestJS server reads it.
struct Incoming {
    /// The payload, unless the server's codec cannot read it.
    data: Result<RawJson, CodecError>,
    headers: Headers,
    /// Reply topic, partition and correlation id: a request's (when it names them).
    reply_to: Option<(String, Option<i32>, String)>,
}

impl Incoming {
    fn of(record: &OwnedMessage, codec: &SharedCodec) -> Incoming {
        let mut headers = Headers::new();
        let (mut correlation, mut reply_topic, mut reply_partition, mut string) =
            (None, None, None, false);
        if let Some(record_headers) = record.headers() {
            // NestJS's own headers are taken out; the others are the request's.
            headers.extend(record_headers.iter().filter_map(|header| {
                let text = header
                    .value
                    .map(|value| String::from_utf8_lossy(value).into_owned());
                match (header.key, text) {
                    (CORRELATION_ID, Some(text)) => correlation = Some(text),
                    (REPLY_TOPIC, Some(text)) => reply_topic = Some(text),
                    (REPLY_PARTITION, Some(text)) => reply_partition = text.trim().parse().ok(),
                    (TYPE_HEADER, Some(text)) => string = text == "string",
                    (key, Some(text)) => return Some((key.to_owned(), text)),
                    (_, None) => {}
                }
                None
            }));
        }
        Incoming {
            data: received(codec, record.payload(), string),
            headers,
            reply_to: correlation
                .zip(reply_topic)
                .map(|(correlation, topic)| (topic, reply_partition, correlation)),
        }
    }
}

/// Counts a request's record as done when its reply is sent (or given up on).
struct Done {
    progress: Arc<Progress>,
    offset: i64,
    shared: Arc<Shared>,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.progress.finish(self.offset, &self.shared.consumer);
    }
}

/// Sends a request's replies as NestJS reply records.
struct KafkaSink {
    producer: Arc<Producer>,
    topic: String,
    partition: Option<i32>,
    correlation: String,
    max_message_bytes: usize,
    codec: SharedCodec,
    /// Dropped when the request is answered.
    done: Option<Done>,
}

impl ReplySink for KafkaSink {
    fn ends_streams_on_their_last_value(&self) -> bool {
        // A NestJS Kafka client emits one more `null` for a completion record of its own.
        true
    }

    async fn send(&mut self, packet: ReplyPacket) -> Result<(), SendError> {
        let last = packet.is_last();
        let error_text;
        let codec = &self.codec;
        let encoded = match &packet {
            ReplyPacket::Value { response, .. } => {
                reply_value(codec, response).map(|outgoing| (outgoing, None))
            }
            ReplyPacket::Complete => Ok((Outgoing::default(), None)),
            ReplyPacket::Error(err) => {
                err_header(codec, err).map(|err| (Outgoing::default(), Some(err)))
            }
            ReplyPacket::Failed(error) => {
                err_header(codec, &error_json(error)).map(|err| (Outgoing::default(), Some(err)))
            }
            ReplyPacket::NoHandler if codec.is_json() => Ok((
                Outgoing::default(),
                Some(NO_HANDLER_MESSAGE.as_bytes().to_vec()),
            )),
            ReplyPacket::NoHandler => {
                let message = RawJson::to_json(NO_HANDLER_MESSAGE).expect("a string serialises");
                err_header(codec, &message).map(|err| (Outgoing::default(), Some(err)))
            }
        };
        let (mut outgoing, err) = encoded.map_err(|error| {
            SendError::Failed(RpcError::internal_with(format!(
                "cannot encode the reply: {error}"
            )))
        })?;
        outgoing.partition = self.partition;
        let size = outgoing.value.as_ref().map_or(0, Vec::len);
        if size > self.max_message_bytes {
            return Err(SendError::TooLarge {
                size,
                limit: self.max_message_bytes,
            });
        }
        let mut headers: Vec<(&str, &[u8])> = vec![(CORRELATION_ID, self.correlation.as_bytes())];
        if let Some(err) = &err {
            error_text = err.clone();
            headers.push((NEST_ERR, &error_text));
        }
        if last {
            headers.push((NEST_IS_DISPOSED, &[0]));
            // A last value of `null` is a record without a value, which is also what the
            // completion record is: palisade's clients are told it is a value (NestJS's ignore
            // the header, and read a completion record as one more `null` anyway).
            if matches!(packet, ReplyPacket::Value { .. }) && outgoing.value.is_none() {
                headers.push((TYPE_HEADER, NULL_TYPE));
            }
        }
        let sent = if last {
            self.producer
                .send_last_reply(&self.topic, &outgoing, &headers)
                .await
        } else {
            self.producer.send(&self.topic, &outgoing, &headers).await
        };
        if last {
            self.done.take();
        }
        sent.map_err(|error| match error.transport_kind() {
            Some(crate::rpc::TransportErrorKind::PayloadTooLarge) => SendError::TooLarge {
                size,
                limit: self.max_message_bytes,
            },
            _ => SendError::Failed(error),
        })
    }
}

impl fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}
