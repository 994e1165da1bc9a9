//! The server side of message services: a [`Server`] (a router and how to run it), the
//! [`Dispatcher`] a transport runs messages through, and the [`ServerHandle`] of a running server.

mod dispatcher;
mod handle;

pub use self::dispatcher::{Dispatcher, ReplySink, SendError, StartGuard};
pub use self::handle::{ServerHandle, ShutdownReport};

use super::handler::Reply;
use super::transport::ServerTransport;
use super::{Pattern, Router, RpcError, RpcRequest};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tower::util::BoxCloneSyncService;
use tower_service::Service;

/// A message server: a router (or any service) plus how to run it. Hand it to a transport to
/// serve: [`serve`](Self::serve), or the transport's
/// [`ServerTransport::serve`](super::transport::ServerTransport::serve).
///
/// ```
/// use palisade::rpc::transport::memory::MemoryTransport;
/// use palisade::rpc::{Router, Server};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let server = Server::new(Router::new().message("ping", || async { "pong" }))
///     .grace_period(Duration::from_secs(5)) // drain in-flight requests for up to 5 s on shutdown
///     .max_in_flight(256)                     // stop reading new requests beyond 256 at once
///     .serve(MemoryTransport::new())
///     .await?;
/// server.shutdown().await;
/// # Ok(()) }
/// ```
///
/// # Defaults
///
/// | setting | default | change with |
/// |---|---|---|
/// | time shutdown waits for messages in flight | 10 s (NestJS's `gracePeriod`) | [`grace_period`](Self::grace_period) |
/// | messages handled at once | no limit (the transport's own limits apply, e.g. TCP's per-connection one) | [`max_in_flight`](Self::max_in_flight) |
/// | a task per handler from its first step | off (a handler starts in the task that read it) | [`spawn_handlers`](Self::spawn_handlers) |
/// | patterns declared for per-pattern transports | a [`Router`]'s own; none for other services | [`with_routes`](Self::with_routes) |
///
/// Transport limits (frame sizes, connections, timeouts) are the transport options' defaults,
/// listed on each (`TcpOptions`, `NatsOptions`, ...).
pub struct Server {
    pub(crate) service: Target,
    routes: Option<Routes>,
    pub(crate) grace_period: Duration,
    pub(crate) max_in_flight: Option<usize>,
    pub(crate) spawn_handlers: bool,
}

impl Server {
    /// A server for `service` — usually a [`Router`], possibly wrapped in layers.
    ///
    /// A router's routes are known, so transports that subscribe per pattern (NATS, Redis, MQTT,
    /// Kafka) can serve it as is; any other service must [declare its routes](Self::with_routes)
    /// for them.
    pub fn new<S>(service: S) -> Self
    where
        S: Service<RpcRequest, Response = Reply, Error = RpcError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        // A bare router is called directly (no boxing of a cloned service per message), and its
        // routes are known.
        let mut slot = Some(service);
        let (service, routes) =
            match (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Router>>() {
                Some(router) => {
                    let router = router.take().expect("the slot holds the service");
                    let routes = router.routes();
                    (Target::Router(router), Some(routes))
                }
                None => (
                    Target::Service(BoxCloneSyncService::new(
                        slot.take().expect("the slot holds the service"),
                    )),
                    None,
                ),
            };
        Server {
            service,
            routes,
            grace_period: Duration::from_secs(10),
            max_in_flight: None,
            spawn_handlers: false,
        }
    }

    /// How long shutdown waits for in-flight requests (default 10 s, as NestJS's `gracePeriod`).
    /// Handlers still running after that are cancelled and their callers get `Unavailable`.
    pub fn grace_period(mut self, grace_period: Duration) -> Self {
        self.grace_period = grace_period;
        self
    }

    /// At most this many messages are handled at once; transports stop reading new ones until a
    /// slot frees (backpressure on the connection, not an error). Default: no limit.
    ///
    /// Events that are acknowledged after handling (durable events, RabbitMQ with
    /// acknowledgements, Kafka) count too. RabbitMQ keeps taking deliveries up to its
    /// `prefetch_count` while they wait for a slot. A broker's own timers run on meanwhile: an
    /// event fetched but waiting longer than its ack wait (NATS) or claim time (Redis) is delivered
    /// again, and counts a delivery. And a handler that calls its own server waits for a slot like
    /// any message: with every slot taken by such handlers, the calls wait out their timeouts.
    pub fn max_in_flight(mut self, limit: usize) -> Self {
        self.max_in_flight = Some(limit.max(1));
        self
    }

    /// Runs each request's handler in a task of its own from its very first step (default: off).
    ///
    /// By default a handler takes its first step — everything up to its first `.await` — in the
    /// task that read the request (a connection's, a subscription's), and continues in a task of
    /// its own only if it has to wait. Most handlers answer in that first step, so this saves a
    /// task per request: measured on loopback TCP with 64 requests in flight, spawning every
    /// handler doubled the time per request. The price: a handler that computes for a long time
    /// before its first `.await` holds up the messages read after it on the same connection (other
    /// connections are not affected). Such work belongs in `tokio::task::spawn_blocking`, which
    /// frees the connection at once; when it cannot be moved, turn this on.
    pub fn spawn_handlers(mut self, spawn: bool) -> Self {
        self.spawn_handlers = spawn;
        self
    }

    /// Declares the patterns a service that is not a bare [`Router`] answers, for transports that
    /// subscribe per pattern. A router's own routes are known without this.
    pub fn with_routes(mut self, routes: Routes) -> Self {
        self.routes = Some(routes);
        self
    }

    /// The patterns the server answers, when known (see [`with_routes`](Self::with_routes)).
    pub fn routes(&self) -> Option<&Routes> {
        self.routes.as_ref()
    }

    /// Serves on `transport`: the same as `transport.serve(self)`.
    pub fn serve<T: ServerTransport>(
        self,
        transport: T,
    ) -> impl Future<Output = Result<ServerHandle, RpcError>> + Send {
        transport.serve(self)
    }

    /// What a transport runs messages through; `transport` names it in logs and spans. For
    /// transport implementations (see [`ServerTransport`]).
    pub fn into_dispatcher(self, transport: &'static str) -> Dispatcher {
        Dispatcher::new(self, transport)
    }

    pub(crate) fn take_routes(&mut self) -> Option<Routes> {
        self.routes.take()
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("routes", &self.routes)
            .field("grace_period", &self.grace_period)
            .field("max_in_flight", &self.max_in_flight)
            .field("spawn_handlers", &self.spawn_handlers)
            .finish_non_exhaustive()
    }
}

/// What a server runs messages through.
pub(crate) enum Target {
    Router(Router),
    Service(BoxCloneSyncService<RpcRequest, Reply, RpcError>),
}

/// The patterns a server answers, as route strings: what transports that subscribe per pattern
/// subscribe to (NATS subjects, Redis channels, MQTT topics, Kafka topics).
///
/// ```
/// use palisade::rpc::{Router, Routes};
/// use serde_json::json;
///
/// let router = Router::new()
///     .message("get-user", || async { "ada" })
///     .message(json!({"role": "math", "cmd": "sum"}), || async { 0 })
///     .event("user-created", || async {});
/// let routes = router.routes();
/// let text = |routes: &[std::sync::Arc<str>]| routes.iter().map(|r| r.to_string()).collect::<Vec<_>>();
/// assert_eq!(text(routes.messages()), ["get-user", r#"{"cmd":"sum","role":"math"}"#]);
/// assert_eq!(text(routes.events()), ["user-created"]);
/// assert_eq!(routes, Routes::new([json!({"cmd": "sum", "role": "math"}).into(), "get-user".into()], ["user-created".into()]));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    messages: Vec<Arc<str>>,
    events: Vec<Arc<str>>,
}

impl Routes {
    /// The routes of these message and event patterns (each list sorted, without duplicates).
    pub fn new(
        messages: impl IntoIterator<Item = Pattern>,
        events: impl IntoIterator<Item = Pattern>,
    ) -> Self {
        let sorted = |patterns: &mut dyn Iterator<Item = Pattern>| {
            let mut routes: Vec<Arc<str>> = patterns
                .map(|pattern| Arc::clone(pattern.route_arc()))
                .collect();
            routes.sort_unstable();
            routes.dedup();
            routes
        };
        Routes {
            messages: sorted(&mut messages.into_iter()),
            events: sorted(&mut events.into_iter()),
        }
    }

    pub(crate) fn from_routes(mut messages: Vec<Arc<str>>, mut events: Vec<Arc<str>>) -> Self {
        messages.sort_unstable();
        messages.dedup();
        events.sort_unstable();
        events.dedup();
        Routes { messages, events }
    }

    /// The routes of message (request) handlers, sorted.
    pub fn messages(&self) -> &[Arc<str>] {
        &self.messages
    }

    /// The routes of event handlers, sorted.
    pub fn events(&self) -> &[Arc<str>] {
        &self.events
    }

    /// Every route, message or event, sorted, each once.
    pub fn all(&self) -> Vec<Arc<str>> {
        let mut all: Vec<Arc<str>> = self.messages.iter().chain(&self.events).cloned().collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}
