use super::handler::{Handler, Reply};
use super::{Kind, Pattern, RpcError, RpcRequest};
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_service::Service;

/// A handler behind a pointer: calling it needs only `&self`, so dispatch clones nothing but the
/// handler itself (a cheap clone: an async fn, or a closure over `Arc`s).
trait ErasedHandler: Send + Sync {
    fn call(&self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>>;
}

struct Erased<H, Args> {
    handler: H,
    _args: PhantomData<fn() -> Args>,
}

impl<H: Handler<Args>, Args> ErasedHandler for Erased<H, Args> {
    fn call(&self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
        self.handler.clone().call(request)
    }
}

type BoxHandler = Arc<dyn ErasedHandler>;

fn erase<H: Handler<Args>, Args: 'static>(handler: H) -> BoxHandler {
    Arc::new(Erased {
        handler,
        _args: PhantomData,
    })
}

#[derive(Clone, Default)]
struct Table {
    messages: HashMap<Arc<str>, BoxHandler>,
    events: HashMap<Arc<str>, Vec<BoxHandler>>,
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
/// A router is a `tower::Service<RpcRequest>`: wrap it in layers for the whole server, or give
/// single handlers their own layers with [`handler_service`](super::handler_service).
///
/// Semantics follow NestJS: a request for a pattern with no handler is answered with NestJS's
/// "There is no matching message handler defined in the remote service."; an event with no
/// handler is logged and dropped; registering a second message handler for a pattern replaces
/// the first; every event handler for a pattern runs, in registration order, and the failure of
/// one does not stop the others.
#[derive(Clone, Default)]
pub struct Router {
    routes: Arc<Table>,
}

impl Router {
    /// No routes yet.
    pub fn new() -> Self {
        Router::default()
    }

    /// Handles requests for `pattern` with `handler` (an async fn with extractors, or a service).
    pub fn message<H, Args>(mut self, pattern: impl Into<Pattern>, handler: H) -> Self
    where
        H: Handler<Args>,
        Args: 'static,
    {
        let pattern = pattern.into();
        let service = erase(handler);
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
        H: Handler<Args>,
        Args: 'static,
    {
        let pattern = pattern.into();
        let service = erase(handler);
        Arc::make_mut(&mut self.routes)
            .events
            .entry(pattern.route_arc().clone())
            .or_default()
            .push(service);
        self
    }

    /// Adds every route of `other` (its message handlers replace ours on the same pattern).
    pub fn merge(mut self, other: Router) -> Self {
        let other = Arc::unwrap_or_clone(other.routes);
        let routes = Arc::make_mut(&mut self.routes);
        routes.messages.extend(other.messages);
        for (route, handlers) in other.events {
            routes.events.entry(route).or_default().extend(handlers);
        }
        self
    }

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

    /// Dispatches one message (what [`Service::call`] does).
    pub fn dispatch(&self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
        let route = request.pattern().route();
        let routable = request.pattern().is_routable();
        match request.kind() {
            Kind::Request => match routable.then(|| self.routes.messages.get(route)).flatten() {
                Some(handler) => handler.call(request),
                None => {
                    tracing::debug!(pattern = %route, "no message handler for the pattern");
                    Box::pin(std::future::ready(Err(RpcError::no_handler())))
                }
            },
            Kind::Event => {
                let handlers: Vec<BoxHandler> = match routable.then_some(route) {
                    Some(route) => match self.routes.events.get(route) {
                        Some(handlers) => handlers.clone(),
                        // NestJS runs a message handler for an event on its pattern, too.
                        None => self
                            .routes
                            .messages
                            .get(route)
                            .cloned()
                            .into_iter()
                            .collect(),
                    },
                    None => Vec::new(),
                };
                if handlers.is_empty() {
                    tracing::error!(
                        pattern = %route,
                        "There is no matching event handler defined in the remote service. Event pattern: {route}"
                    );
                    return Box::pin(std::future::ready(Ok(Reply::Empty)));
                }
                Box::pin(async move {
                    let mut first_failure = None;
                    for handler in handlers {
                        if let Err(error) = handler.call(request.clone()).await {
                            tracing::error!(pattern = %request.pattern(), %error, "event handler failed");
                            first_failure.get_or_insert(error);
                        }
                    }
                    match first_failure {
                        Some(error) if request.reports_failures() => Err(error),
                        _ => Ok(Reply::Empty),
                    }
                })
            }
        }
    }
}

impl fmt::Debug for Router {
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
