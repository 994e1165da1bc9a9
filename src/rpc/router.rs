use super::handler::{Handler, Reply, Route};
use super::key_hash::KeyMap;
use super::{Kind, Pattern, RpcError, RpcRequest};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// A route as registered: ready to call, or waiting for the router's state.
enum Endpoint<S> {
    Ready(Route),
    /// Builds the route once [`Router::with_state`] gives the state (layers added meanwhile are
    /// folded into the function, so each is applied once, to the finished handler).
    NeedsState(Arc<dyn Fn(&S) -> Route + Send + Sync>),
}

impl<S> Clone for Endpoint<S> {
    fn clone(&self) -> Self {
        match self {
            Endpoint::Ready(route) => Endpoint::Ready(route.clone()),
            Endpoint::NeedsState(make) => Endpoint::NeedsState(Arc::clone(make)),
        }
    }
}

impl<S: Clone + Send + Sync + 'static> Endpoint<S> {
    fn new<H, Args>(handler: H) -> Self
    where
        H: Handler<Args, S>,
        Args: 'static,
    {
        // A router without state (`S = ()`) has its state already: build the route now, so a
        // stateless router never needs `with_state`.
        if let Some(unit) = (&() as &dyn Any).downcast_ref::<S>() {
            return Endpoint::Ready(handler.with_state(unit.clone()));
        }
        Endpoint::NeedsState(Arc::new(move |state: &S| {
            handler.clone().with_state(state.clone())
        }))
    }

    fn layer<L>(self, layer: L) -> Self
    where
        L: Layer<Route> + Clone + Send + Sync + 'static,
        L::Service:
            Service<RpcRequest, Response = Reply, Error = RpcError> + Clone + Send + Sync + 'static,
        <L::Service as Service<RpcRequest>>::Future: Send + 'static,
    {
        match self {
            Endpoint::Ready(route) => Endpoint::Ready(Route::new(layer.layer(route))),
            Endpoint::NeedsState(make) => Endpoint::NeedsState(Arc::new(move |state: &S| {
                Route::new(layer.layer(make(state)))
            })),
        }
    }

    fn with_state(self, state: &S) -> Route {
        match self {
            Endpoint::Ready(route) => route,
            Endpoint::NeedsState(make) => make(state),
        }
    }
}

struct Table<S> {
    messages: KeyMap<Arc<str>, Endpoint<S>>,
    events: KeyMap<Arc<str>, Vec<Endpoint<S>>>,
    /// What answers messages no handler matches, once [`Router::layer`] wrapped it; `None` is
    /// NestJS's behaviour, without a service to call.
    unmatched: Option<Route>,
}

impl<S> Clone for Table<S> {
    fn clone(&self) -> Self {
        Table {
            messages: self.messages.clone(),
            events: self.events.clone(),
            unmatched: self.unmatched.clone(),
        }
    }
}

impl<S> Default for Table<S> {
    fn default() -> Self {
        Table {
            messages: KeyMap::default(),
            events: KeyMap::default(),
            unmatched: None,
        }
    }
}

/// NestJS's answer to a message no handler matches: the "no matching message handler" error
/// for a request; for an event, a log line and nothing else.
fn unmatched(request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
    let route = request.pattern().route();
    match request.kind() {
        Kind::Request => {
            tracing::debug!(pattern = %route, "no message handler for the pattern");
            Box::pin(std::future::ready(Err(RpcError::no_handler())))
        }
        Kind::Event => {
            tracing::error!(
                pattern = %route,
                "There is no matching event handler defined in the remote service. Event pattern: {route}"
            );
            Box::pin(std::future::ready(Ok(Reply::Empty)))
        }
    }
}

/// [`unmatched`] as a service, for layers to wrap.
#[derive(Clone, Copy)]
struct Unmatched;

impl Service<RpcRequest> for Unmatched {
    type Response = Reply;
    type Error = RpcError;
    type Future = BoxFuture<'static, Result<Reply, RpcError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RpcRequest) -> Self::Future {
        unmatched(request)
    }
}

/// Maps patterns to handlers: the server side of a message service, like a NestJS controller's
/// `@MessagePattern` and `@EventPattern` methods.
///
/// ```
/// use palisade::rpc::{Payload, Router, RpcError};
/// use serde::{Deserialize, Serialize};
/// use serde_json::json;
///
/// #[derive(Deserialize)]
/// struct GetUser { id: u64 }
/// #[derive(Serialize)]
/// struct User { id: u64, name: String }
///
/// async fn get_user(Payload(req): Payload<GetUser>) -> Result<User, RpcError> {
///     Ok(User { id: req.id, name: format!("user{}", req.id) })
/// }
/// async fn sum(Payload(numbers): Payload<Vec<i64>>) -> i64 {
///     numbers.iter().sum()
/// }
/// async fn send_welcome_mail(Payload(user): Payload<serde_json::Value>) { let _ = user; }
/// async fn update_stats() {}
///
/// let router = Router::new()
///     .message("get-user", get_user)
///     .message(json!({ "cmd": "sum" }), sum)       // object patterns, NestJS-normalised
///     .event("user-created", send_welcome_mail)    // several event handlers may share a pattern
///     .event("user-created", update_stats);
/// ```
///
/// Layers go where NestJS puts decorators: on one handler ([`Handler::layer`], like
/// `@UseGuards` or `@CircuitBreaker` on a method), on every route of the router
/// ([`layer`](Self::layer), like a controller's decorators), or on the matched routes only
/// ([`route_layer`](Self::route_layer)). Shared values reach handlers through
/// [`with_state`](Self::with_state) and the [`State`](super::State) extractor. A router is a
/// `tower::Service<RpcRequest>` too, so it can also be wrapped whole.
///
/// Semantics follow NestJS: a request for a pattern with no handler is answered with NestJS's
/// "There is no matching message handler defined in the remote service."; an event with no
/// handler is logged and dropped; registering a second message handler for a pattern replaces
/// the first; every event handler for a pattern runs — started in registration order and run
/// together, as NestJS forks them — and the failure of one (an error, a panic) does not stop the
/// others. A stream an event handler answers with is run to its end (its work happens as it is
/// polled); the event is done when every handler is, and its failure is the first handler's, in
/// registration order, that failed.
///
/// `S` is the state handlers still need: a router is built as a `Router<S>` when its handlers
/// take [`State`](super::State), and [`with_state`](Self::with_state) turns it into a `Router`
/// (`Router<()>`), which is what a [`Server`](super::Server) serves.
pub struct Router<S = ()> {
    routes: Arc<Table<S>>,
}

impl<S> Clone for Router<S> {
    fn clone(&self) -> Self {
        Router {
            routes: Arc::clone(&self.routes),
        }
    }
}

impl<S> Default for Router<S> {
    fn default() -> Self {
        Router {
            routes: Arc::new(Table::default()),
        }
    }
}

impl Router {
    /// No routes yet; handlers take no [`State`](super::State).
    pub fn new() -> Self {
        Router::default()
    }

    /// No routes yet; handlers may take [`State`](super::State) of `S`, given by
    /// [`with_state`](Router::with_state) (which also tells the compiler what `S` is).
    ///
    /// ```
    /// use palisade::rpc::{Router, State};
    ///
    /// async fn greet(State(greeting): State<String>) -> String { greeting }
    ///
    /// let router = Router::stateful().message("greet", greet).with_state("hello".to_owned());
    /// # let _ = router;
    /// ```
    pub fn stateful<S>() -> Router<S> {
        Router::default()
    }
}

impl<S> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// Handles requests for `pattern` with `handler` (an async fn with extractors, or a service).
    pub fn message<H, Args>(mut self, pattern: impl Into<Pattern>, handler: H) -> Self
    where
        H: Handler<Args, S>,
        Args: 'static,
    {
        let pattern = pattern.into();
        let service = Endpoint::new(handler);
        let routes = Arc::make_mut(&mut self.routes);
        if routes
            .messages
            .insert(pattern.route_arc().clone(), service)
            .is_some()
        {
            tracing::warn!(pattern = %pattern, "a second message handler replaces the first, as in NestJS");
        }
        self
    }

    /// Handles events for `pattern` with `handler` as well (all handlers of a pattern run).
    pub fn event<H, Args>(mut self, pattern: impl Into<Pattern>, handler: H) -> Self
    where
        H: Handler<Args, S>,
        Args: 'static,
    {
        let pattern = pattern.into();
        let service = Endpoint::new(handler);
        Arc::make_mut(&mut self.routes)
            .events
            .entry(pattern.route_arc().clone())
            .or_default()
            .push(service);
        self
    }

    /// Adds every route of `other` (its message handlers replace ours on the same pattern).
    ///
    /// Layers stay with the routes they were added to: `other`'s [`layer`](Self::layer)s do not
    /// wrap our routes, nor ours its routes. Messages no handler matches are answered by our
    /// [`layer`](Self::layer)s, or `other`'s when we have none.
    pub fn merge(mut self, other: Router<S>) -> Self {
        let other = Arc::unwrap_or_clone(other.routes);
        let routes = Arc::make_mut(&mut self.routes);
        routes.messages.extend(other.messages);
        for (route, handlers) in other.events {
            routes.events.entry(route).or_default().extend(handlers);
        }
        if routes.unmatched.is_none() {
            routes.unmatched = other.unmatched;
        }
        self
    }

    /// Gives the handlers their state, making the router one a [`Server`](super::Server) can
    /// serve: every [`State<T>`](super::State) argument is taken
    /// from `state` (a clone of it, or a part of it through [`FromRef`](super::FromRef)). Routes
    /// and layers added after this see no state of `S`'s type.
    ///
    /// ```
    /// use palisade::rpc::{Payload, Router, State};
    /// use std::collections::HashMap;
    /// use std::sync::Arc;
    ///
    /// #[derive(Clone)]
    /// struct AppState { users: Arc<HashMap<u64, String>> }
    ///
    /// async fn get_user(State(app): State<AppState>, Payload(id): Payload<u64>) -> Option<String> {
    ///     app.users.get(&id).cloned()
    /// }
    ///
    /// let users = Arc::new(HashMap::from([(7, "ann".to_owned())]));
    /// let router = Router::stateful()
    ///     .message("get-user", get_user)
    ///     .with_state(AppState { users });
    /// # let _ = router;
    /// ```
    pub fn with_state(self, state: S) -> Router {
        let table = Arc::unwrap_or_clone(self.routes);
        let ready = |endpoint: Endpoint<S>| Endpoint::Ready(endpoint.with_state(&state));
        let messages = table
            .messages
            .into_iter()
            .map(|(route, endpoint)| (route, ready(endpoint)))
            .collect();
        let events = table
            .events
            .into_iter()
            .map(|(route, handlers)| (route, handlers.into_iter().map(ready).collect()))
            .collect();
        Router {
            routes: Arc::new(Table {
                messages,
                events,
                unmatched: table.unmatched,
            }),
        }
    }

    /// Wraps every route added so far — and the answer to messages no handler matches — in
    /// `layer`, like decorators on a NestJS controller: a guard here also turns away callers of
    /// patterns that do not exist, instead of telling them so. Each route gets its own service
    /// from the layer (`layer.layer(route)`); a layer whose services share state (a
    /// `CircuitBreakerLayer`) makes the routes share it.
    ///
    /// ```
    /// use palisade::rpc::{GuardLayer, Router, RpcError};
    ///
    /// let router = Router::new()
    ///     .message("get-user", || async { "ann" })
    ///     .message("delete-user", || async {})
    ///     .layer(GuardLayer::new(|request: &mut palisade::rpc::RpcRequest| {
    ///         match request.headers().get("authorization") {
    ///             Some(_) => Ok(()),
    ///             None => Err(RpcError::unauthenticated("a token is required")),
    ///         }
    ///     }));
    /// # let _ = router;
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<Route> + Clone + Send + Sync + 'static,
        L::Service:
            Service<RpcRequest, Response = Reply, Error = RpcError> + Clone + Send + Sync + 'static,
        <L::Service as Service<RpcRequest>>::Future: Send + 'static,
    {
        self = self.route_layer(layer.clone());
        let routes = Arc::make_mut(&mut self.routes);
        let unmatched = routes
            .unmatched
            .take()
            .unwrap_or_else(|| Route::new(Unmatched));
        routes.unmatched = Some(Route::new(layer.layer(unmatched)));
        self
    }

    /// Wraps every route added so far in `layer`, but not the answer to messages no handler
    /// matches: those still get NestJS's "no matching message handler" (axum's `route_layer`).
    ///
    /// ```
    /// use palisade::rpc::{InterceptorLayer, Next, Reply, Router, RpcError, RpcRequest};
    ///
    /// async fn log(request: RpcRequest, next: Next) -> Result<Reply, RpcError> {
    ///     tracing::info!(pattern = %request.pattern(), "handling");
    ///     next.run(request).await
    /// }
    ///
    /// // Logs the messages "get-user" and "sum" get; an unknown pattern is answered as NestJS
    /// // answers it, without passing through `log`.
    /// let router = Router::new()
    ///     .message("get-user", || async { "ann" })
    ///     .message("sum", || async { 3 })
    ///     .route_layer(InterceptorLayer::new(log));
    /// # let _ = router;
    /// ```
    pub fn route_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<Route> + Clone + Send + Sync + 'static,
        L::Service:
            Service<RpcRequest, Response = Reply, Error = RpcError> + Clone + Send + Sync + 'static,
        <L::Service as Service<RpcRequest>>::Future: Send + 'static,
    {
        let table = Arc::unwrap_or_clone(std::mem::take(&mut self.routes));
        let messages = table
            .messages
            .into_iter()
            .map(|(route, endpoint)| (route, endpoint.layer(layer.clone())))
            .collect();
        let events = table
            .events
            .into_iter()
            .map(|(route, handlers)| {
                let handlers = handlers
                    .into_iter()
                    .map(|endpoint| endpoint.layer(layer.clone()))
                    .collect();
                (route, handlers)
            })
            .collect();
        self.routes = Arc::new(Table {
            messages,
            events,
            unmatched: table.unmatched,
        });
        self
    }
}

impl<S> Router<S> {
    /// The routes of the message handlers, sorted.
    pub fn message_patterns(&self) -> Vec<&str> {
        let mut patterns: Vec<_> = self.routes.messages.keys().map(|k| &**k).collect();
        patterns.sort_unstable();
        patterns
    }

    /// The routes of the event handlers, sorted.
    pub fn event_patterns(&self) -> Vec<&str> {
        let mut patterns: Vec<_> = self.routes.events.keys().map(|k| &**k).collect();
        patterns.sort_unstable();
        patterns
    }

    /// The routes of message handlers and of event handlers: what a transport that subscribes per
    /// pattern subscribes to.
    pub fn routes(&self) -> super::Routes {
        super::Routes::from_routes(
            self.routes.messages.keys().cloned().collect(),
            self.routes.events.keys().cloned().collect(),
        )
    }
}

impl Router {
    /// Dispatches one message (what [`Service::call`] does).
    pub fn dispatch(&self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
        let route = request.pattern().route();
        let routable = request.pattern().is_routable();
        match request.kind() {
            Kind::Request => match routable.then(|| self.routes.messages.get(route)).flatten() {
                Some(Endpoint::Ready(route)) => route.handle(request),
                Some(Endpoint::NeedsState(make)) => make(&()).handle(request),
                None => self.unmatched(request),
            },
            Kind::Event => {
                let endpoints: &[Endpoint<()>] = match routable.then_some(route) {
                    Some(route) => match self.routes.events.get(route) {
                        Some(handlers) => handlers,
                        // NestJS runs a message handler for an event on its pattern, too.
                        None => self
                            .routes
                            .messages
                            .get(route)
                            .map_or(&[], std::slice::from_ref),
                    },
                    None => &[],
                };
                let handlers: Vec<Route> = match endpoints {
                    [] => return self.unmatched(request),
                    [only] => return one_event_handler(only, request),
                    several => several.iter().map(ready).collect(),
                };
                Box::pin(async move {
                    let reports_failures = request.reports_failures();
                    // Started in registration order and run together, as NestJS forks them: one
                    // that waits long (a stream that goes on) holds up none of the others.
                    let outcomes = futures_util::future::join_all(
                        handlers
                            .into_iter()
                            .map(|handler| run_event_handler(handler, request.clone())),
                    )
                    .await;
                    let mut first_failure = None;
                    for error in outcomes.into_iter().filter_map(Result::err) {
                        // The one reported is logged by whoever it is reported to.
                        if first_failure.is_some() || !reports_failures {
                            tracing::error!(pattern = %request.pattern(), %error, "event handler failed");
                        }
                        first_failure.get_or_insert(error);
                    }
                    event_outcome(first_failure, reports_failures)
                })
            }
        }
    }

    fn unmatched(&self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
        match &self.routes.unmatched {
            Some(route) => route.handle(request),
            None => unmatched(request),
        }
    }
}

/// An event with one handler, the usual case: the handler gets the event itself rather than a
/// copy, and no list of handlers is made. Failures are reported as with several handlers.
fn one_event_handler(
    endpoint: &Endpoint<()>,
    event: RpcRequest,
) -> BoxFuture<'static, Result<Reply, RpcError>> {
    let reports_failures = event.reports_failures();
    let pattern = event.pattern().clone();
    let handling = match endpoint {
        Endpoint::Ready(route) => route.handle(event),
        Endpoint::NeedsState(make) => make(&()).handle(event),
    };
    Box::pin(async move {
        let failure = match handling.await {
            Ok(reply) => reply.run_to_end().await.err(),
            Err(error) => Some(error),
        };
        // A failure reported is logged by whoever it is reported to.
        if let Some(error) = &failure
            && !reports_failures
        {
            tracing::error!(%pattern, %error, "event handler failed");
        }
        event_outcome(failure, reports_failures)
    })
}

/// Runs one of an event's several handlers to its end (a stream it returns, too): its failure is
/// its error, the first error of its stream, or its panic, which must not stop the handlers
/// after it.
async fn run_event_handler(handler: Route, event: RpcRequest) -> Result<(), RpcError> {
    // Made inside the guarded future, so that a panic while it is made is caught as well.
    let run = async move { handler.handle(event).await?.run_to_end().await };
    std::panic::AssertUnwindSafe(run)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(super::handler::handler_panicked(&*panic)))
}

/// What an event's handling answers once its handlers ran: nothing, or its first failure when the
/// event reports failures (a transport that acknowledges events redelivers it then).
fn event_outcome(
    first_failure: Option<RpcError>,
    reports_failures: bool,
) -> Result<Reply, RpcError> {
    match first_failure {
        Some(error) if reports_failures => Err(error),
        _ => Ok(Reply::Empty),
    }
}

/// The route of an endpoint of a stateless router: always ready (`Endpoint::new` and
/// `with_state` build them so), and built with the unit state if it were not.
fn ready(endpoint: &Endpoint<()>) -> Route {
    match endpoint {
        Endpoint::Ready(route) => route.clone(),
        Endpoint::NeedsState(make) => make(&()),
    }
}

impl<S> fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("messages", &self.message_patterns())
            .field("events", &self.event_patterns())
            .finish()
    }
}

impl Service<RpcRequest> for Router {
    type Response = Reply;
    type Error = RpcError;
    type Future = BoxFuture<'static, Result<Reply, RpcError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RpcRequest) -> Self::Future {
        self.dispatch(request)
    }
}
