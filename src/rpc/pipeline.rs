//! NestJS's request pipeline as tower layers: guards ([`GuardLayer`]), interceptors
//! ([`InterceptorLayer`]), pipes ([`Valid`] and [`Validate`]) and exception filters
//! ([`ExceptionFilterLayer`]). Each goes on one handler ([`Handler::layer`](super::Handler::layer)),
//! on a router's matched routes ([`Router::route_layer`](super::Router::route_layer)) or on all of
//! them ([`Router::layer`](super::Router::layer)).

use super::handler::{FromRequest, Payload, Reply, Route};
use super::{RawJson, RpcError, RpcRequest};
use futures_util::future::BoxFuture;
use futures_util::stream::StreamExt;
use serde::de::DeserializeOwned;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

// ---- Guards ----

/// A guard, as NestJS's `@UseGuards`: decides, before the handler runs, whether the message may
/// go on. `check` sees the whole request — headers, pattern, payload — and may store what it
/// learnt (the authenticated principal) in the request's
/// [`extensions`](RpcRequest::extensions_mut) for the [`Extension`](super::Extension)
/// extractor. An `Err` is the answer, and the handler is not called: usually
/// [`RpcError::unauthenticated`] or [`RpcError::permission_denied`].
///
/// The check is synchronous, as most guards are (a header, a signature, a role). A guard that
/// must wait for something (a token introspection call) is an [`InterceptorLayer`] that answers
/// without calling [`Next`].
///
/// ```
/// use palisade::rpc::transport::memory::MemoryTransport;
/// use palisade::rpc::{Client, Code, GuardLayer, Handler, Router, RpcError, RpcRequest, Server};
///
/// fn admins_only(request: &mut RpcRequest) -> Result<(), RpcError> {
///     match request.headers().get("role") {
///         Some("admin") => Ok(()),
///         Some(_) => Err(RpcError::permission_denied("admins only")),
///         None => Err(RpcError::unauthenticated("who are you?")),
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), RpcError> {
/// let router = Router::new()
///     .message("drop-tables", (|| async { "done" }).layer(GuardLayer::new(admins_only)));
/// let transport = MemoryTransport::new();
/// let _server = Server::new(router).serve(&transport).await?;
/// let guest = Client::builder().header("role", "guest").connect(transport.clone()).await?;
/// let denied = guest.send::<String>("drop-tables", &()).await.unwrap_err();
/// assert_eq!(denied.code(), Code::PermissionDenied);
/// let admin = Client::builder().header("role", "admin").connect(transport).await?;
/// assert_eq!(admin.send::<String>("drop-tables", &()).await?, "done");
/// # Ok(()) }
/// ```
pub struct GuardLayer<F> {
    check: Arc<F>,
}

impl<F> Clone for GuardLayer<F> {
    fn clone(&self) -> Self {
        GuardLayer {
            check: Arc::clone(&self.check),
        }
    }
}

impl<F> GuardLayer<F>
where
    F: Fn(&mut RpcRequest) -> Result<(), RpcError> + Send + Sync + 'static,
{
    /// A guard that runs `check` on every message.
    pub fn new(check: F) -> Self {
        GuardLayer {
            check: Arc::new(check),
        }
    }
}

impl<F> fmt::Debug for GuardLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardLayer").finish_non_exhaustive()
    }
}

impl<F, Svc> Layer<Svc> for GuardLayer<F> {
    type Service = Guard<F, Svc>;

    fn layer(&self, inner: Svc) -> Self::Service {
        Guard {
            check: Arc::clone(&self.check),
            inner,
        }
    }
}

/// The service of a [`GuardLayer`].
pub struct Guard<F, Svc> {
    check: Arc<F>,
    inner: Svc,
}

impl<F, Svc: Clone> Clone for Guard<F, Svc> {
    fn clone(&self) -> Self {
        Guard {
            check: Arc::clone(&self.check),
            inner: self.inner.clone(),
        }
    }
}

impl<F, Svc> fmt::Debug for Guard<F, Svc> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard").finish_non_exhaustive()
    }
}

impl<F, Svc> Service<RpcRequest> for Guard<F, Svc>
where
    F: Fn(&mut RpcRequest) -> Result<(), RpcError>,
    Svc: Service<RpcRequest, Response = Reply, Error = RpcError>,
{
    type Response = Reply;
    type Error = RpcError;
    type Future = GuardFuture<Svc::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: RpcRequest) -> Self::Future {
        match (self.check)(&mut request) {
            Ok(()) => GuardFuture::admitted(self.inner.call(request)),
            Err(error) => GuardFuture::rejected(error),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`Guard`]: the handler's, or the guard's rejection.
    pub struct GuardFuture<Fut> {
        #[pin]
        state: GuardState<Fut>,
    }
}

pin_project_lite::pin_project! {
    #[project = GuardStateProjection]
    enum GuardState<Fut> {
        Admitted { #[pin] inner: Fut },
        Rejected { error: Option<RpcError> },
    }
}

impl<Fut> GuardFuture<Fut> {
    fn admitted(inner: Fut) -> Self {
        GuardFuture {
            state: GuardState::Admitted { inner },
        }
    }

    fn rejected(error: RpcError) -> Self {
        GuardFuture {
            state: GuardState::Rejected { error: Some(error) },
        }
    }
}

impl<Fut> Future for GuardFuture<Fut>
where
    Fut: Future<Output = Result<Reply, RpcError>>,
{
    type Output = Result<Reply, RpcError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            GuardStateProjection::Admitted { inner } => inner.poll(cx),
            GuardStateProjection::Rejected { error } => match error.take() {
                Some(error) => Poll::Ready(Err(error)),
                // Polled after it completed, which futures need not support: answer rather
                // than panic.
                None => Poll::Ready(Err(RpcError::internal_with(
                    "a guard's future was polled after it completed",
                ))),
            },
        }
    }
}

impl<Fut> fmt::Debug for GuardFuture<Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardFuture").finish_non_exhaustive()
    }
}

// ---- Interceptors ----

/// The rest of the pipeline, for an interceptor to call (NestJS's `CallHandler`).
#[derive(Clone, Debug)]
pub struct Next {
    inner: Route,
}

impl Next {
    /// Runs the layers below and the handler.
    pub fn run(self, request: RpcRequest) -> BoxFuture<'static, Result<Reply, RpcError>> {
        self.inner.handle(request)
    }
}

/// An interceptor, as NestJS's `@UseInterceptors`: an async function around the handler that
/// sees the request before it and the reply after it, and may change either — or answer
/// without calling the handler at all (a cache). A streamed reply is a
/// [`Reply::Stream`], whose values it can map one by one ([`Reply::map_values`]).
///
/// ```
/// use palisade::rpc::transport::memory::MemoryTransport;
/// use palisade::rpc::{Client, Handler, InterceptorLayer, Next, Payload, Reply, Router, RpcError, RpcRequest, Server};
/// use std::time::Instant;
///
/// /// Logs how long each message took, and wraps every value in `{"data": ..}`.
/// async fn timed(request: RpcRequest, next: Next) -> Result<Reply, RpcError> {
///     let started = Instant::now();
///     let pattern = request.pattern().to_string();
///     let reply = next.run(request).await;
///     tracing::info!(%pattern, elapsed = ?started.elapsed(), "handled");
///     Ok(reply?.map_values(|value| Ok(serde_json::json!({ "data": value }))))
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), RpcError> {
/// let router = Router::new()
///     .message("double", |Payload(n): Payload<i64>| async move { n * 2 })
///     .layer(InterceptorLayer::new(timed));
/// let transport = MemoryTransport::new();
/// let _server = Server::new(router).serve(&transport).await?;
/// let client = Client::builder().connect(transport).await?;
/// let reply: serde_json::Value = client.send("double", &21).await?;
/// assert_eq!(reply, serde_json::json!({"data": 42}));
/// # Ok(()) }
/// ```
pub struct InterceptorLayer<F> {
    intercept: Arc<F>,
}

impl<F, Fut> InterceptorLayer<F>
where
    F: Fn(RpcRequest, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Reply, RpcError>> + Send + 'static,
{
    /// An interceptor that runs `intercept` around every message.
    pub fn new(intercept: F) -> Self {
        InterceptorLayer {
            intercept: Arc::new(intercept),
        }
    }
}

impl<F> Clone for InterceptorLayer<F> {
    fn clone(&self) -> Self {
        InterceptorLayer {
            intercept: Arc::clone(&self.intercept),
        }
    }
}

impl<F> fmt::Debug for InterceptorLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterceptorLayer").finish_non_exhaustive()
    }
}

impl<F, Svc> Layer<Svc> for InterceptorLayer<F>
where
    Svc: Service<RpcRequest, Response = Reply, Error = RpcError> + Clone + Send + Sync + 'static,
    Svc::Future: Send + 'static,
{
    type Service = Interceptor<F>;

    fn layer(&self, inner: Svc) -> Self::Service {
        Interceptor {
            intercept: Arc::clone(&self.intercept),
            // Boxed once per route, so that `Next` has one type whatever is below.
            next: Next {
                inner: Route::new(inner),
            },
        }
    }
}

/// The service of an [`InterceptorLayer`].
pub struct Interceptor<F> {
    intercept: Arc<F>,
    next: Next,
}

impl<F> Clone for Interceptor<F> {
    fn clone(&self) -> Self {
        Interceptor {
            intercept: Arc::clone(&self.intercept),
            next: self.next.clone(),
        }
    }
}

impl<F> fmt::Debug for Interceptor<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interceptor").finish_non_exhaustive()
    }
}

impl<F, Fut> Service<RpcRequest> for Interceptor<F>
where
    F: Fn(RpcRequest, Next) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Reply, RpcError>> + Send + 'static,
{
    type Response = Reply;
    type Error = RpcError;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RpcRequest) -> Self::Future {
        (self.intercept)(request, self.next.clone())
    }
}

// ---- Exception filters ----

/// An exception filter, as NestJS's `@UseFilters`: maps every error of the routes it wraps —
/// a handler's `Err`, a rejected extractor, an error that ends a stream — once, instead of in
/// each handler. A handler error that is not an [`RpcError`] arrives as "Internal server
/// error" with the original still inside: [`RpcError::handler_error`] finds it by type.
///
/// ```
/// use palisade::rpc::transport::memory::MemoryTransport;
/// use palisade::rpc::{Client, Code, ExceptionFilterLayer, Router, RpcError, Server};
///
/// #[derive(Debug)]
/// enum StoreError { Missing(u64), Down }
/// impl std::fmt::Display for StoreError {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { write!(f, "{self:?}") }
/// }
/// impl std::error::Error for StoreError {}
///
/// fn store_errors(error: RpcError) -> RpcError {
///     match error.handler_error::<StoreError>() {
///         Some(StoreError::Missing(id)) => RpcError::not_found(format!("no record {id}")),
///         Some(StoreError::Down) => RpcError::unavailable("the store is down"),
///         None => error,
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), RpcError> {
/// let router = Router::new()
///     .message("get", || async { Err::<String, _>(StoreError::Missing(7)) })
///     .route_layer(ExceptionFilterLayer::new(store_errors));
/// let transport = MemoryTransport::new();
/// let _server = Server::new(router).serve(&transport).await?;
/// let client = Client::builder().connect(transport).await?;
/// let error = client.send::<String>("get", &()).await.unwrap_err();
/// assert_eq!((error.code(), error.message()), (Code::NotFound, "no record 7"));
/// # Ok(()) }
/// ```
pub struct ExceptionFilterLayer<F> {
    filter: Arc<F>,
}

impl<F> ExceptionFilterLayer<F>
where
    F: Fn(RpcError) -> RpcError + Send + Sync + 'static,
{
    /// A filter that passes every error through `filter`.
    pub fn new(filter: F) -> Self {
        ExceptionFilterLayer {
            filter: Arc::new(filter),
        }
    }
}

impl<F> Clone for ExceptionFilterLayer<F> {
    fn clone(&self) -> Self {
        ExceptionFilterLayer {
            filter: Arc::clone(&self.filter),
        }
    }
}

impl<F> fmt::Debug for ExceptionFilterLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExceptionFilterLayer")
            .finish_non_exhaustive()
    }
}

impl<F, Svc> Layer<Svc> for ExceptionFilterLayer<F> {
    type Service = ExceptionFilter<F, Svc>;

    fn layer(&self, inner: Svc) -> Self::Service {
        ExceptionFilter {
            filter: Arc::clone(&self.filter),
            inner,
        }
    }
}

/// The service of an [`ExceptionFilterLayer`].
pub struct ExceptionFilter<F, Svc> {
    filter: Arc<F>,
    inner: Svc,
}

impl<F, Svc: Clone> Clone for ExceptionFilter<F, Svc> {
    fn clone(&self) -> Self {
        ExceptionFilter {
            filter: Arc::clone(&self.filter),
            inner: self.inner.clone(),
        }
    }
}

impl<F, Svc> fmt::Debug for ExceptionFilter<F, Svc> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExceptionFilter").finish_non_exhaustive()
    }
}

impl<F, Svc> Service<RpcRequest> for ExceptionFilter<F, Svc>
where
    F: Fn(RpcError) -> RpcError + Send + Sync + 'static,
    Svc: Service<RpcRequest, Response = Reply, Error = RpcError>,
    Svc::Future: Send + 'static,
{
    type Response = Reply;
    type Error = RpcError;
    type Future = BoxFuture<'static, Result<Reply, RpcError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: RpcRequest) -> Self::Future {
        let filter = Arc::clone(&self.filter);
        let reply = self.inner.call(request);
        Box::pin(async move {
            match reply.await {
                Ok(Reply::Stream(values)) => {
                    // An error that ends a stream is a handler's error too.
                    let values = values.map(move |value| value.map_err(|error| filter(error)));
                    Ok(Reply::Stream(values.boxed()))
                }
                Ok(reply) => Ok(reply),
                Err(error) => Err(filter(error)),
            }
        })
    }
}

// ---- Pipes: validation ----

/// One field that failed validation: where (`"address.zip"`, `"items[2].qty"`) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path in the payload.
    pub path: String,
    /// What is wrong with it, phrased to follow the path (`"must not be empty"`).
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.path, self.message)
    }
}

/// Every field of a payload that failed validation; see [`Validate`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidationErrors(Vec<FieldError>);

impl ValidationErrors {
    /// None yet.
    pub fn new() -> Self {
        ValidationErrors::default()
    }

    /// Adds a failure of the field at `path`.
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Adds a failure of the field at `path` unless `valid`: `errors.check(!name.is_empty(),
    /// "name", "must not be empty")`.
    pub fn check(&mut self, valid: bool, path: &str, message: &str) {
        if !valid {
            self.add(path, message);
        }
    }

    /// Whether every field passed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The failures, in the order they were found.
    pub fn fields(&self) -> &[FieldError] {
        &self.0
    }

    /// `Ok(())` when every field passed, else these errors.
    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, field) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{field}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// The answer to a payload that fails validation: `InvalidArgument`, sent as NestJS's
/// `BadRequestException` body from its `ValidationPipe` — `{"statusCode":400,"message":[..],
/// "error":"Bad Request"}`, one message per failing field — plus palisade's `code`, so a
/// palisade client reads `Code::InvalidArgument`.
impl From<ValidationErrors> for RpcError {
    fn from(errors: ValidationErrors) -> Self {
        /// NestJS's BadRequest body, in its key order.
        #[derive(serde::Serialize)]
        struct BadRequest<'a> {
            #[serde(rename = "statusCode")]
            status_code: u16,
            message: Vec<String>,
            error: &'a str,
            code: &'a str,
        }
        let body = BadRequest {
            status_code: 400,
            message: errors.0.iter().map(ToString::to_string).collect(),
            error: "Bad Request",
            code: "INVALID_ARGUMENT",
        };
        let err = RawJson::to_json(&body).unwrap_or_else(|_| RawJson::null());
        RpcError::invalid_argument_with(errors.to_string(), err)
    }
}

/// Validation of a decoded payload, as the `class-validator` decorators a NestJS
/// `ValidationPipe` runs. Implement it and take [`Valid<Payload<T>>`](Valid) in the handler.
///
/// ```
/// use palisade::rpc::{Validate, ValidationErrors};
///
/// #[derive(serde::Deserialize)]
/// struct CreateUser { name: String, age: u32 }
///
/// impl Validate for CreateUser {
///     fn validate(&self) -> Result<(), ValidationErrors> {
///         let mut errors = ValidationErrors::new();
///         errors.check(!self.name.is_empty(), "name", "should not be empty");
///         errors.check(self.age >= 18, "age", "must not be less than 18");
///         errors.into_result()
///     }
/// }
/// ```
pub trait Validate {
    /// `Ok(())`, or every field that failed.
    fn validate(&self) -> Result<(), ValidationErrors>;
}

impl<T: Validate> Validate for Vec<T> {
    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut all = ValidationErrors::new();
        for (i, item) in self.iter().enumerate() {
            if let Err(errors) = item.validate() {
                for field in errors.0 {
                    all.add(format!("[{i}].{}", field.path), field.message);
                }
            }
        }
        all.into_result()
    }
}

/// A validated extractor, as a NestJS pipe: `Valid<Payload<T>>` decodes the payload and runs
/// `T`'s [`Validate`]; a payload that fails is answered with `InvalidArgument` naming the
/// failing fields (in NestJS's `BadRequest` shape, see [`ValidationErrors`]) and the handler is
/// not called.
///
/// ```
/// use palisade::rpc::transport::memory::MemoryTransport;
/// use palisade::rpc::{Client, Code, Payload, Router, RpcError, Server, Valid, Validate, ValidationErrors};
/// use serde_json::json;
///
/// #[derive(serde::Deserialize)]
/// struct CreateUser { name: String, age: u32 }
///
/// impl Validate for CreateUser {
///     fn validate(&self) -> Result<(), ValidationErrors> {
///         let mut errors = ValidationErrors::new();
///         errors.check(!self.name.is_empty(), "name", "should not be empty");
///         errors.check(self.age >= 18, "age", "must not be less than 18");
///         errors.into_result()
///     }
/// }
///
/// async fn create_user(Valid(Payload(user)): Valid<Payload<CreateUser>>) -> String {
///     user.name
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), RpcError> {
/// let transport = MemoryTransport::new();
/// let _server = Server::new(Router::new().message("create-user", create_user)).serve(&transport).await?;
/// let client = Client::builder().connect(transport).await?;
/// let error = client.send::<String>("create-user", &json!({"name": "", "age": 7})).await.unwrap_err();
/// assert_eq!(error.code(), Code::InvalidArgument);
/// assert_eq!(error.err()["message"], json!(["name should not be empty", "age must not be less than 18"]));
/// assert_eq!(error.err()["statusCode"], 400);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Valid<T>(pub T);

impl<S, T> FromRequest<S> for Valid<Payload<T>>
where
    T: DeserializeOwned + Validate,
{
    fn from_request(request: &RpcRequest, state: &S) -> Result<Self, RpcError> {
        let Payload(value) = Payload::<T>::from_request(request, state)?;
        value.validate()?;
        Ok(Valid(Payload(value)))
    }
}

/// A payload validated by the [`validator`](https://docs.rs/validator) crate: take
/// `Validated<Payload<T>>` in a handler, with `T: validator::Validate` (usually
/// `#[derive(validator::Validate)]`). A payload that fails is answered with `InvalidArgument`
/// naming every failing field, nested ones included (`address.city`, `items[1].sku`), in NestJS's
/// `BadRequest` shape, exactly as [`Valid`] does for palisade's own [`Validate`]; the handler is not
/// called. A field's message is the one given in the attribute (`message = ".."`), else the rule
/// and its parameters (`must pass length (min 1)`).
///
/// ```
/// use palisade::rpc::transport::memory::MemoryTransport;
/// use palisade::rpc::{Client, Code, Payload, Router, RpcError, Server, Validated};
/// use serde_json::json;
///
/// #[derive(serde::Deserialize, validator::Validate)]
/// struct CreateUser {
///     #[validate(length(min = 1, message = "should not be empty"))]
///     name: String,
///     #[validate(range(min = 18))]
///     age: u32,
/// }
///
/// async fn create_user(Validated(Payload(user)): Validated<Payload<CreateUser>>) -> String {
///     user.name
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), RpcError> {
/// let transport = MemoryTransport::new();
/// let _server = Server::new(Router::new().message("create-user", create_user)).serve(&transport).await?;
/// let client = Client::builder().connect(transport).await?;
/// let error = client.send::<String>("create-user", &json!({"name": "", "age": 7})).await.unwrap_err();
/// assert_eq!(error.code(), Code::InvalidArgument);
/// assert_eq!(error.err()["message"], json!(["age must pass range (min 18)", "name should not be empty"]));
/// # Ok(()) }
/// ```
#[cfg(feature = "validator")]
#[cfg_attr(docsrs, doc(cfg(feature = "validator")))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Validated<T>(pub T);

#[cfg(feature = "validator")]
impl<S, T> FromRequest<S> for Validated<Payload<T>>
where
    T: DeserializeOwned + validator::Validate,
{
    fn from_request(request: &RpcRequest, state: &S) -> Result<Self, RpcError> {
        let Payload(value) = Payload::<T>::from_request(request, state)?;
        value.validate().map_err(ValidationErrors::from)?;
        Ok(Validated(Payload(value)))
    }
}

/// The `validator` crate's errors, flattened to one entry per failing field with its full path,
/// sorted by path (the crate keeps them in a hash map, whose order would change from run to run).
#[cfg(feature = "validator")]
#[cfg_attr(docsrs, doc(cfg(feature = "validator")))]
impl From<validator::ValidationErrors> for ValidationErrors {
    fn from(errors: validator::ValidationErrors) -> Self {
        let mut flat = Vec::new();
        flatten_validator_errors(&errors, "", &mut flat);
        flat.sort_by(|a, b| a.path.cmp(&b.path));
        ValidationErrors(flat)
    }
}

#[cfg(feature = "validator")]
fn flatten_validator_errors(
    errors: &validator::ValidationErrors,
    prefix: &str,
    out: &mut Vec<FieldError>,
) {
    use validator::ValidationErrorsKind;
    for (field, kind) in errors.errors() {
        // `__all__` holds the struct-level (schema) checks: they belong to the struct itself.
        let path = match (prefix, field.as_ref()) {
            ("", "__all__") => "payload".to_owned(),
            (prefix, "__all__") => prefix.to_owned(),
            ("", field) => field.to_owned(),
            (prefix, field) => format!("{prefix}.{field}"),
        };
        match kind {
            ValidationErrorsKind::Field(failures) => {
                out.extend(failures.iter().map(|failure| FieldError {
                    path: path.clone(),
                    message: validator_message(failure),
                }))
            }
            ValidationErrorsKind::Struct(nested) => flatten_validator_errors(nested, &path, out),
            ValidationErrorsKind::List(items) => {
                for (index, nested) in items {
                    flatten_validator_errors(nested, &format!("{path}[{index}]"), out);
                }
            }
        }
    }
}

/// The attribute's message, else `must pass <rule> (<parameters>)`, leaving out the offending
/// value (it may be a secret, and the caller sent it anyway).
#[cfg(feature = "validator")]
fn validator_message(failure: &validator::ValidationError) -> String {
    if let Some(message) = &failure.message {
        return message.to_string();
    }
    let mut parameters: Vec<String> = failure
        .params
        .iter()
        .filter(|(name, _)| name.as_ref() != "value")
        .map(|(name, value)| match value {
            serde_json::Value::String(text) => format!("{name} {text}"),
            value => format!("{name} {value}"),
        })
        .collect();
    parameters.sort();
    if parameters.is_empty() {
        format!("must pass {}", failure.code)
    } else {
        format!("must pass {} ({})", failure.code, parameters.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{Code, Pattern, RawJson};
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_guard_future_answers_its_rejection_once() {
        let guard = GuardLayer::new(|_: &mut RpcRequest| Err(RpcError::unauthenticated("no")))
            .layer(tower::service_fn(|_: RpcRequest| async {
                Ok::<_, RpcError>(Reply::Empty)
            }));
        let request = RpcRequest::new(Pattern::from("p"), RawJson::null());
        let error = guard.oneshot(request).await.unwrap_err();
        assert_eq!(error.code(), Code::Unauthenticated);
    }
}
