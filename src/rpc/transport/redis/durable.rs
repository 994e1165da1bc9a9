//! Durable events on Redis Streams: a consumer group per service, at-least-once delivery, retries
//! with backoff, claiming the entries of dead consumers, a dead-letter stream.

use super::server::incoming;
use super::{RedisOptions, command_error};
use crate::rpc::transport::{DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON, DEAD_LETTER_SUBJECT};
use crate::rpc::{Dispatcher, Headers, RpcError, TransportErrorKind};
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The field of a stream entry that holds the event's NestJS envelope.
pub const BODY_FIELD: &str = "body";

/// Durable events through Redis Streams — beyond NestJS, for events that must not be lost:
///
/// - clients add events to a stream named after the event's route (`XADD <route> * body
///   <envelope>`, with [`RedisTransport::durable_events`](super::RedisTransport::durable_events));
///   Redis stores them whether or not a server runs;
/// - a server reads each event route's stream in the consumer group `group` (`XREADGROUP`; created
///   at the start of the stream if missing, so events stored before the first server started are
///   delivered too). Instances sharing the group share the events; services with different groups
///   each get every event;
/// - an event is acknowledged (`XACK`) only after all of its handlers succeeded, so it survives a
///   crash of the service: a restarted consumer of the same name reads its unacknowledged entries
///   again, and entries left by a consumer that stays away are claimed by the others
///   (`XAUTOCLAIM`) once idle for [`claim_idle`](Self::claim_idle);
/// - when a handler fails the event is delivered again after a delay from the backoff list;
/// - after `max_deliveries` deliveries it is added to the dead-letter stream
///   `<dead letter prefix><route>` with fields saying why
///   ([`DEAD_LETTER_REASON`], [`DEAD_LETTER_DELIVERIES`], [`DEAD_LETTER_SUBJECT`]) next to its
///   `body`, and acknowledged. That includes deliveries that ended without an outcome: an entry
///   taken up again (after a restart, or claimed) more than `max_deliveries` times is
///   dead-lettered without running the handlers, so an event that crashes its consumer does
///   not crash every consumer after it. Deliveries are counted as Redis counts them: an entry
///   whose handler a shutdown cut short, or one read in a batch but not yet handled when the
///   server stopped, was delivered too.
///
/// Events of one route are handled one at a time, in stream order (a failed one waits for its
/// retry while the next ones go ahead).
///
/// Redis keeps a stream whole, in memory, until something trims it: with
/// [`trim_acknowledged`](Self::trim_acknowledged) a server deletes the entries every consumer
/// group of the stream is done with; otherwise trim the streams yourself (`XTRIM`), and the
/// dead-letter streams too. A consumer that stops with nothing pending leaves its group
/// (`XGROUP DELCONSUMER`): a server under a random name each start would otherwise leave one
/// behind per start.
///
/// Durable event routes are read from streams only: events that NestJS clients (or palisade
/// clients without [`durable_events`](super::RedisTransport::durable_events)) `PUBLISH` on the
/// channel do not reach them. Request patterns are served over pub/sub as usual.
///
/// ```no_run
/// use palisade::rpc::transport::redis::{DurableEvents, RedisOptions, RedisServer};
/// use std::time::Duration;
///
/// let server = RedisServer::new(RedisOptions::new("redis://127.0.0.1")).durable_events(
///     DurableEvents::new("billing")
///         .max_deliveries(5)
///         .backoff([Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(60)]),
/// );
/// # let _ = server;
/// ```
#[derive(Clone, Debug)]
pub struct DurableEvents {
    group: String,
    consumer: Option<String>,
    max_deliveries: u32,
    backoff: Vec<Duration>,
    claim_idle: Duration,
    dead_letter_prefix: String,
    batch: usize,
    trim_acknowledged: bool,
}

impl DurableEvents {
    /// Events read in the consumer group `group`. Defaults: a consumer name of its own per server,
    /// 5 deliveries, retries after 1 s, 5 s, 30 s, entries of dead consumers claimed after 60 s
    /// idle, dead letters in `palisade:dead-letter:<route>`.
    pub fn new(group: impl Into<String>) -> Self {
        DurableEvents {
            group: group.into(),
            consumer: None,
            max_deliveries: 5,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            claim_idle: Duration::from_secs(60),
            dead_letter_prefix: "palisade:dead-letter:".into(),
            batch: 16,
            trim_acknowledged: false,
        }
    }

    /// Deletes, every half [`claim_idle`](Self::claim_idle), the entries of each event stream
    /// that every consumer group of the stream is done with: older than the oldest entry still
    /// pending in a group, and than the last one delivered to a group with none pending (off by
    /// default: Redis then keeps every event ever added, in memory). A service whose group does
    /// not exist yet gets only the events still in the stream when it starts.
    pub fn trim_acknowledged(mut self, trim: bool) -> Self {
        self.trim_acknowledged = trim;
        self
    }

    /// The consumer's name in the group. A server restarted under the same name takes up the
    /// entries it had not acknowledged at once; under a new name (the default: a random one) the
    /// other consumers claim them after [`claim_idle`](Self::claim_idle).
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// Deliveries before an event goes to the dead-letter stream.
    ///
    /// # Panics
    /// If `deliveries` is zero.
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        assert!(deliveries > 0, "max_deliveries must be at least 1");
        self.max_deliveries = deliveries;
        self
    }

    /// Delays before the 1st, 2nd, ... retry of a failed event (the last repeats). Keep them
    /// shorter than [`claim_idle`](Self::claim_idle), or another consumer may claim an event that
    /// waits for its retry.
    pub fn backoff(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.backoff = delays.into_iter().collect();
        self
    }

    /// How long an entry stays unacknowledged by its consumer before another consumer claims it
    /// (its consumer is presumed dead). Longer than your slowest handler.
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Dead letters go to the stream `<prefix><route>`.
    pub fn dead_letter_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.dead_letter_prefix = prefix.into();
        self
    }

    /// The dead-letter stream of an event route.
    pub fn dead_letter_stream(&self, route: &str) -> String {
        format!("{}{route}", self.dead_letter_prefix)
    }

    fn delay_before(&self, retry: u64) -> Duration {
        let index = usize::try_from(retry.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(index)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// Creates the groups and starts one reading task per event route.
pub(super) async fn start(
    options: &RedisOptions,
    dispatcher: &Dispatcher,
    routes: Vec<Arc<str>>,
    durable: DurableEvents,
) -> Result<(), RpcError> {
    let mut commands = options.commands().await?;
    for route in &routes {
        create_group(&mut commands, route, &durable.group).await?;
    }
    let consumer = durable.consumer.clone().unwrap_or_else(|| {
        format!(
            "palisade-{:016x}",
            crate::rng::mix(crate::rng::SharedRng::entropy())
        )
    });
    let durable = Arc::new(durable);
    for route in routes {
        let reader = Reader {
            options: options.clone(),
            durable: Arc::clone(&durable),
            consumer: consumer.clone(),
            route,
            dispatcher: dispatcher.clone(),
            retries: BTreeMap::new(),
        };
        dispatcher.spawn(reader.run());
    }
    Ok(())
}

async fn create_group(
    commands: &mut MultiplexedConnection,
    route: &str,
    group: &str,
) -> Result<(), RpcError> {
    let created = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(route)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<Value>(commands)
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
        Err(error) => Err(command_error(
            &error,
            &format!("cannot create the consumer group {group:?} on the stream {route:?}"),
        )),
    }
}

/// One stream entry: its id and body.
type Entry = (String, Option<Bytes>);

/// Reads the entries of `XREADGROUP`/`XCLAIM`/`XAUTOCLAIM` replies.
fn entries(value: &Value) -> Vec<Entry> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = String::from_redis_value_ref(pair.first()?).ok()?;
            let body = match pair.get(1) {
                Some(Value::Array(fields)) => fields.chunks(2).find_map(|kv| {
                    let name = String::from_redis_value_ref(kv.first()?).ok()?;
                    (name == BODY_FIELD)
                        .then(|| Vec::<u8>::from_redis_value_ref(kv.get(1)?).ok())
                        .flatten()
                        .map(Bytes::from)
                }),
                // A deleted entry claimed from the pending list has no fields.
                _ => None,
            };
            Some((id, body))
        })
        .collect()
}

/// Claims an entry (`ARGV[3]`) for a consumer (`ARGV[2]`) of a group (`ARGV[1]`) only if it is
/// pending for that consumer; `ARGV[4]` is `JUSTID` or empty. Nil when it is not; with `JUSTID`,
/// 1 when it is (whatever `XCLAIM` says: an entry deleted from the stream meanwhile claims
/// nothing, and its body is already in hand); without, the entries claimed.
const CLAIM_OWN: &str = "local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1) \
    if #p == 0 or p[1][2] ~= ARGV[2] then return false end \
    if ARGV[4] == 'JUSTID' then \
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID') \
        return 1 \
    end \
    return redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3])";

/// Deletes the entries of `KEYS[1]` every consumer group is done with: those older than the
/// oldest entry still pending in a group, and than the last one delivered to a group with none
/// pending. Ids are compared as the decimal numbers they are (shorter is smaller, then by
/// text), never as Lua's doubles, which round past 2^53.
const TRIM_DONE: &str = "local function below(a, b) \
        for i = 1, 2 do \
            if #a[i] ~= #b[i] then return #a[i] < #b[i] end \
            if a[i] ~= b[i] then return a[i] < b[i] end \
        end \
        return false \
    end \
    local groups = redis.call('XINFO', 'GROUPS', KEYS[1]) \
    local low, low_id = nil, nil \
    for _, group in ipairs(groups) do \
        local name, pending, last \
        for i = 1, #group, 2 do \
            if group[i] == 'name' then name = group[i + 1] \
            elseif group[i] == 'pending' then pending = group[i + 1] \
            elseif group[i] == 'last-delivered-id' then last = group[i + 1] end \
        end \
        local bound = last \
        if pending > 0 then bound = redis.call('XPENDING', KEYS[1], name)[2] end \
        local ms, seq = string.match(bound, '^(%d+)-(%d+)$') \
        if ms == nil then return 0 end \
        if low == nil or below({ms, seq}, low) then low, low_id = {ms, seq}, bound end \
    end \
    if low == nil then return 0 end \
    return redis.call('XTRIM', KEYS[1], 'MINID', low_id)";

/// Deletes consumer `ARGV[2]` of group `ARGV[1]` if nothing is pending for it; -1 if something is.
const LEAVE_IF_DONE: &str = "if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then \
    return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end return -1";

/// `work`, unless shutdown starts first (`None`).
async fn unless_draining<T>(
    dispatcher: &Dispatcher,
    work: impl Future<Output = Result<T, RpcError>>,
) -> Result<Option<T>, RpcError> {
    tokio::select! {
        biased;
        _ = dispatcher.draining() => Ok(None),
        result = work => result.map(Some),
    }
}

struct Reader {
    options: RedisOptions,
    durable: Arc<DurableEvents>,
    consumer: String,
    route: Arc<str>,
    dispatcher: Dispatcher,
    /// Failed entries and when to deliver them again.
    retries: BTreeMap<String, Instant>,
}

impl Reader {
    async fn run(mut self) {
        let mut draining = std::pin::pin!(self.dispatcher.draining());
        let mut attempt = 0u32;
        loop {
            // Not cancelled at shutdown: a handler that is running finishes (within the grace
            // period) and its event is acknowledged; the session stops before the next entry.
            let started = Instant::now();
            let result = self.session().await;
            if self.dispatcher.is_draining() {
                self.leave().await;
                return;
            }
            if started.elapsed() > Duration::from_secs(10) {
                // It worked for a while: this is a new failure, not the same one again.
                attempt = 0;
            }
            if let Err(error) = result {
                tracing::warn!(route = %self.route, %error, "durable events: Redis failed; reconnecting");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.options.backoff(attempt)) => {}
                _ = &mut draining => {
                    self.leave().await;
                    return;
                }
            }
            attempt = attempt.saturating_add(1);
        }
    }

    /// Leaves the group if nothing is pending for this consumer (a restart under its name would
    /// take up what is); bounded, since Redis may be gone.
    async fn leave(&self) {
        let left = tokio::time::timeout(Duration::from_secs(1), async {
            let mut commands = self.options.commands().await?;
            redis::cmd("EVAL")
                .arg(LEAVE_IF_DONE)
                .arg(1)
                .arg(&*self.route)
                .arg(&self.durable.group)
                .arg(&self.consumer)
                .query_async::<Value>(&mut commands)
                .await
                .map_err(|error| command_error(&error, "cannot leave the consumer group"))
        })
        .await;
        if !matches!(left, Ok(Ok(_))) {
            tracing::debug!(route = %self.route, consumer = %self.consumer, "did not leave the consumer group");
        }
    }

    /// Reads and handles entries until Redis fails, or shutdown starts. The steps that only wait
    /// on Redis (connecting, reading, claiming) give way to shutdown: a Redis gone silent would
    /// hold it up for their timeouts. A handler that runs, and its acknowledgement, do not.
    async fn session(&mut self) -> Result<(), RpcError> {
        let dispatcher = self.dispatcher.clone();
        let Some(mut commands) = unless_draining(&dispatcher, self.options.commands()).await?
        else {
            return Ok(());
        };
        // Blocking reads have a connection of their own: Redis answers a connection's commands in
        // order, so an acknowledgement would wait behind the block.
        let Some(mut reader) =
            unless_draining(&dispatcher, self.options.commands_with_timeout(None)).await?
        else {
            return Ok(());
        };
        let created = create_group(&mut commands, &self.route, &self.durable.group);
        if unless_draining(&dispatcher, created).await?.is_none() {
            return Ok(());
        }
        // First what this consumer was given and never acknowledged (a restart under its name),
        // page by page.
        let mut after = "0".to_owned();
        loop {
            let read_at = Instant::now();
            let read = self.read_within(&mut reader, &after, None);
            let Some(own) = unless_draining(&dispatcher, read).await? else {
                return Ok(());
            };
            let Some((last, _)) = own.last() else { break };
            after = last.clone();
            // An event waiting out its retry delay when the last session failed keeps its delay:
            // the retry takes it up when due.
            let own = own
                .into_iter()
                .filter(|(id, _)| !self.retries.contains_key(id))
                .collect();
            self.handle_all(&mut commands, own, true, read_at).await?;
        }
        let mut next_claim = Instant::now();
        loop {
            if self.dispatcher.is_draining() {
                return Ok(());
            }
            let now = Instant::now();
            let due: Vec<String> = self
                .retries
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in due {
                self.retries.remove(&id);
                // Taken again only if it is still this consumer's: another may have claimed it
                // while it waited (a delay longer than `claim_idle`), and be handling it.
                let read_at = Instant::now();
                let claim = self.claim_own(&mut commands, &id, false);
                let Some(claimed) = unless_draining(&dispatcher, claim).await? else {
                    return Ok(());
                };
                // Its count was checked when it failed.
                self.handle_all(&mut commands, entries(&claimed), false, read_at)
                    .await?;
            }
            if now >= next_claim {
                next_claim = crate::timeout::later(
                    now,
                    (self.durable.claim_idle / 2).max(Duration::from_millis(10)),
                );
                if self.durable.trim_acknowledged {
                    let trim = async {
                        redis::cmd("EVAL")
                            .arg(TRIM_DONE)
                            .arg(1)
                            .arg(&*self.route)
                            .query_async::<Value>(&mut commands)
                            .await
                            .map_err(|error| command_error(&error, "cannot trim the stream"))
                    };
                    match unless_draining(&dispatcher, trim).await {
                        Ok(Some(_)) => {}
                        Ok(None) => return Ok(()),
                        // An old Redis (XTRIM MINID came in 6.2), say: the events go on.
                        Err(error) => {
                            tracing::debug!(route = %self.route, %error, "could not trim the stream")
                        }
                    }
                }
                let read_at = Instant::now();
                let mut autoclaim = redis::cmd("XAUTOCLAIM");
                autoclaim
                    .arg(&*self.route)
                    .arg(&self.durable.group)
                    .arg(&self.consumer)
                    // Redis reads the idle time as a signed 64-bit count.
                    .arg(i64::try_from(self.durable.claim_idle.as_millis()).unwrap_or(i64::MAX))
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(self.durable.batch);
                let claim = async {
                    autoclaim
                        .query_async::<Value>(&mut commands)
                        .await
                        .map_err(|error| command_error(&error, "cannot claim idle events"))
                };
                let Some(claimed) = unless_draining(&dispatcher, claim).await? else {
                    return Ok(());
                };
                if let Value::Array(parts) = &claimed
                    && let Some(list) = parts.get(1)
                {
                    let list = entries(list);
                    for (id, _) in &list {
                        // Claimed now (maybe its own, idle too long): no separate retry.
                        self.retries.remove(id);
                    }
                    self.handle_all(&mut commands, list, true, read_at).await?;
                }
            }
            // Block until an entry arrives or the next retry or claim is due.
            let wake = self
                .retries
                .values()
                .min()
                .copied()
                .unwrap_or(next_claim)
                .min(next_claim);
            let block = wake
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), Duration::from_secs(1));
            // Entries a read cancelled here may already have been given to this consumer: they
            // stay pending, read again by a restart under this name or claimed by others.
            let read = self.read_within(&mut reader, ">", Some(block));
            let Some(fresh) = unless_draining(&dispatcher, read).await? else {
                return Ok(());
            };
            // A blocking read returns as its entries are delivered: their idle time starts now.
            let read_at = Instant::now();
            self.handle_all(&mut commands, fresh, false, read_at)
                .await?;
        }
    }

    /// [`read`](Self::read), given up after the block and the response timeout: the reading
    /// connection has no timeout of its own (a blocking read would trip it), and a connection
    /// that went silent (a broker host gone without a word, a failover behind an address) would
    /// otherwise hold this route's reader for good.
    async fn read_within(
        &self,
        reader: &mut MultiplexedConnection,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Vec<Entry>, RpcError> {
        let within = block
            .unwrap_or_default()
            .saturating_add(self.options.response_timeout);
        match tokio::time::timeout(within, self.read(reader, from, block)).await {
            Ok(read) => read,
            Err(_) => Err(RpcError::transport(
                TransportErrorKind::ConnectionLost,
                format!(
                    "Redis did not answer a read of {:?} within {within:?}; the connection is \
                     taken for lost",
                    self.route
                ),
            )),
        }
    }

    async fn read(
        &self,
        reader: &mut MultiplexedConnection,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Vec<Entry>, RpcError> {
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(&self.durable.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.durable.batch);
        if let Some(block) = block {
            command
                .arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(1).max(1));
        }
        let value: Value = command
            .arg("STREAMS")
            .arg(&*self.route)
            .arg(from)
            .query_async(reader)
            .await
            .map_err(|error| command_error(&error, "cannot read events"))?;
        // [[stream, [entries]]] (RESP2) or {stream: [entries]} (RESP3); nil when the block ran out.
        let list = match &value {
            Value::Array(streams) => streams.first().and_then(|stream| match stream {
                Value::Array(pair) => pair.get(1).cloned(),
                _ => None,
            }),
            Value::Map(streams) => streams.first().map(|(_, list)| list.clone()),
            _ => None,
        };
        Ok(list.map(|list| entries(&list)).unwrap_or_default())
    }

    /// Handles `entries` in order. `delivered_before`: they may have been delivered before (read
    /// from this consumer's history, or claimed from another), so their count of deliveries is
    /// checked first. `read_at`: when the command that gave them was sent.
    ///
    /// Redis counts an entry's idle time from its delivery, and entries waiting their turn here
    /// grow idle too: once half of `claim_idle` has passed since the read, each is taken up only
    /// if it is still this consumer's, and its idle time is reset then. Otherwise another
    /// consumer's `XAUTOCLAIM` took the last ones of a batch while they waited, and both handled
    /// them.
    async fn handle_all(
        &mut self,
        commands: &mut MultiplexedConnection,
        entries: Vec<Entry>,
        delivered_before: bool,
        read_at: Instant,
    ) -> Result<(), RpcError> {
        for (id, body) in entries {
            if self.dispatcher.is_draining() {
                // Left unacknowledged: delivered again after a restart, or claimed.
                return Ok(());
            }
            if read_at.elapsed() >= self.durable.claim_idle / 2
                && self.claim_own(commands, &id, true).await? == Value::Nil
            {
                tracing::debug!(route = %self.route, %id, "claimed by another consumer while it waited");
                continue;
            }
            if delivered_before && self.spent(commands, &id, body.as_ref()).await? {
                continue;
            }
            self.handle(commands, id, body).await?;
        }
        Ok(())
    }

    /// Claims `id` for this consumer, resetting its idle time, only if it is still this
    /// consumer's: its entry (or with `just_id`, its id, and its count of deliveries left
    /// alone), or nothing.
    async fn claim_own(
        &self,
        commands: &mut MultiplexedConnection,
        id: &str,
        just_id: bool,
    ) -> Result<Value, RpcError> {
        redis::cmd("EVAL")
            .arg(CLAIM_OWN)
            .arg(1)
            .arg(&*self.route)
            .arg(&self.durable.group)
            .arg(&self.consumer)
            .arg(id)
            .arg(if just_id { "JUSTID" } else { "" })
            .query_async(commands)
            .await
            .map_err(|error| command_error(&error, "cannot claim an event of this consumer"))
    }

    /// Dead-letters an entry delivered more than `max_deliveries` times, without handling it
    /// again: its earlier deliveries ended without an outcome (the consumer that had it stopped,
    /// crashed or lost Redis while handling it), and an entry that crashes its consumer would
    /// otherwise be taken up, and crash the next one, for good.
    async fn spent(
        &self,
        commands: &mut MultiplexedConnection,
        id: &str,
        body: Option<&Bytes>,
    ) -> Result<bool, RpcError> {
        let Some(body) = body else { return Ok(false) };
        let deliveries = self.deliveries(commands, id).await?;
        if deliveries <= u64::from(self.durable.max_deliveries) {
            return Ok(false);
        }
        let error = RpcError::new(
            crate::rpc::Code::ResourceExhausted,
            format!(
                "delivered {deliveries} times without an outcome (max_deliveries is {}): the \
             consumers that had it stopped, crashed or lost Redis while handling it",
                self.durable.max_deliveries
            ),
        );
        self.dead_letter(commands, id, body, &error, deliveries)
            .await?;
        Ok(true)
    }

    async fn handle(
        &mut self,
        commands: &mut MultiplexedConnection,
        id: String,
        body: Option<Bytes>,
    ) -> Result<(), RpcError> {
        let Some(body) = body else {
            // Deleted from the stream while pending, or not a palisade entry: nothing to run.
            tracing::warn!(route = %self.route, %id, "stream entry without a body field acknowledged");
            return self.ack(commands, &id).await;
        };
        let outcome = match incoming(self.options.shared_codec(), body.clone()) {
            Some((payload, packet)) => {
                let (request, _) = packet.into_request_on(&self.route, &payload, Headers::new());
                self.dispatcher.handle_event(request).await
            }
            None => Err(RpcError::invalid_argument(format!(
                "the event cannot be read with the server's codec ({:?})",
                self.options.shared_codec()
            ))),
        };
        match outcome {
            Ok(()) => self.ack_surely(commands, &id).await,
            // Shutdown, not the event: left pending for the next delivery.
            Err(_) if self.dispatcher.is_draining() => Ok(()),
            Err(error) => {
                let deliveries = self.deliveries(commands, &id).await?;
                if deliveries >= u64::from(self.durable.max_deliveries) {
                    self.dead_letter(commands, &id, &body, &error, deliveries)
                        .await
                } else {
                    let delay = self.durable.delay_before(deliveries);
                    tracing::debug!(route = %self.route, %id, deliveries, ?delay, %error, "event failed; retrying");
                    self.retries
                        .insert(id, crate::timeout::later(Instant::now(), delay));
                    Ok(())
                }
            }
        }
    }

    /// Acknowledges a handled event, once more on a fresh connection if the first attempt finds
    /// the connection closed (Redis's `timeout` closes one left idle through a quiet spell):
    /// `XACK` may be repeated, and an event handled but not acknowledged is handled again.
    async fn ack_surely(
        &self,
        commands: &mut MultiplexedConnection,
        id: &str,
    ) -> Result<(), RpcError> {
        match self.ack(commands, id).await {
            Err(error) if error.transport_kind() == Some(TransportErrorKind::ConnectionLost) => {
                tracing::debug!(route = %self.route, %error, "acknowledging once more on a fresh connection");
                *commands = self.options.commands().await?;
                self.ack(commands, id).await
            }
            other => other,
        }
    }

    async fn ack(&self, commands: &mut MultiplexedConnection, id: &str) -> Result<(), RpcError> {
        redis::cmd("XACK")
            .arg(&*self.route)
            .arg(&self.durable.group)
            .arg(id)
            .query_async::<Value>(commands)
            .await
            .map(drop)
            .map_err(|error| command_error(&error, "cannot acknowledge an event"))
    }

    /// How many times the entry was delivered (`XPENDING`).
    async fn deliveries(
        &self,
        commands: &mut MultiplexedConnection,
        id: &str,
    ) -> Result<u64, RpcError> {
        let pending: Value = redis::cmd("XPENDING")
            .arg(&*self.route)
            .arg(&self.durable.group)
            .arg(id)
            .arg(id)
            .arg(1)
            .query_async(commands)
            .await
            .map_err(|error| command_error(&error, "cannot read an event's deliveries"))?;
        // [[id, consumer, idle, deliveries]]
        let count = match &pending {
            Value::Array(rows) => match rows.first() {
                Some(Value::Array(row)) => {
                    row.get(3).and_then(|v| u64::from_redis_value_ref(v).ok())
                }
                _ => None,
            },
            _ => None,
        };
        Ok(count.unwrap_or(1))
    }

    async fn dead_letter(
        &self,
        commands: &mut MultiplexedConnection,
        id: &str,
        body: &Bytes,
        error: &RpcError,
        deliveries: u64,
    ) -> Result<(), RpcError> {
        let stream = self.durable.dead_letter_stream(&self.route);
        tracing::warn!(route = %self.route, %id, deliveries, %error, dead_letters = %stream, "event dead-lettered");
        redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(BODY_FIELD)
            .arg(&body[..])
            .arg(DEAD_LETTER_REASON)
            .arg(error.to_string())
            .arg(DEAD_LETTER_DELIVERIES)
            .arg(deliveries)
            .arg(DEAD_LETTER_SUBJECT)
            .arg(&*self.route)
            .query_async::<Value>(commands)
            .await
            .map_err(|error| command_error(&error, "cannot add a dead letter"))?;
        self.ack(commands, id).await
    }
}
