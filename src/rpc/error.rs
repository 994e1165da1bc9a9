use super::RawJson;
use crate::circuit_breaker::CircuitOpen;
use crate::classify::FailureKind;
use crate::fault::InjectedFault;
use crate::timeout::Elapsed;
use serde_json::{Map, Value, json};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// NestJS's reply to a request no handler matches.
pub const NO_HANDLER_MESSAGE: &str =
    "There is no matching message handler defined in the remote service.";
/// The message NestJS sends instead of an unexpected error's details.
pub const INTERNAL_SERVER_ERROR: &str = "Internal server error";

/// What kind of failure an [`RpcError`] is: a small, gRPC-like taxonomy.
///
/// Each code says whether another attempt may help ([`is_transient`](Code::is_transient)) and
/// whether the callee is at fault ([`is_fault`](Code::is_fault)) — what retry and the circuit
/// breaker ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    /// The caller gave up.
    Cancelled,
    /// The request was malformed (a payload that does not decode, a failed validation).
    InvalidArgument,
    /// What the request asked for does not exist.
    NotFound,
    /// What the request would create exists already.
    AlreadyExists,
    /// The caller may not do this.
    PermissionDenied,
    /// The caller is not authenticated.
    Unauthenticated,
    /// The system is not in a state that allows this.
    FailedPrecondition,
    /// A quota or capacity ran out (retryable after a while).
    ResourceExhausted,
    /// The deadline passed (or an attempt timed out) before an answer came.
    DeadlineExceeded,
    /// The service could not be reached or turned the request away: connection lost, no
    /// subscribers, circuit open, shutting down. Safe to retry.
    Unavailable,
    /// No handler for the pattern (NestJS's "no matching message handler").
    Unimplemented,
    /// The handler failed unexpectedly (NestJS's "Internal server error").
    Internal,
    /// A deliberate error from the remote handler that names no palisade code — what a NestJS
    /// `RpcException` becomes. The service is up and answered; see [`RpcError::err`] for details.
    Application,
    /// An error of unrecognisable shape.
    Unknown,
}

const CODES: [(Code, &str); 14] = [
    (Code::Cancelled, "CANCELLED"),
    (Code::InvalidArgument, "INVALID_ARGUMENT"),
    (Code::NotFound, "NOT_FOUND"),
    (Code::AlreadyExists, "ALREADY_EXISTS"),
    (Code::PermissionDenied, "PERMISSION_DENIED"),
    (Code::Unauthenticated, "UNAUTHENTICATED"),
    (Code::FailedPrecondition, "FAILED_PRECONDITION"),
    (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
    (Code::Unavailable, "UNAVAILABLE"),
    (Code::Unimplemented, "UNIMPLEMENTED"),
    (Code::Internal, "INTERNAL"),
    (Code::Application, "APPLICATION"),
    (Code::Unknown, "UNKNOWN"),
];

impl Code {
    /// The name used on the wire (`"UNAVAILABLE"`, ...).
    pub fn as_str(self) -> &'static str {
        CODES
            .iter()
            .find(|(code, _)| *code == self)
            .map(|(_, name)| *name)
            .unwrap_or("UNKNOWN")
    }

    /// The code with this wire name.
    pub fn from_name(name: &str) -> Option<Code> {
        CODES
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(code, _)| *code)
    }

    /// Whether another attempt may succeed (and is safe to make).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded
        )
    }

    /// Whether the callee, or the path to it, failed — what a circuit breaker should count. The
    /// caller's mistakes (`InvalidArgument`, `NotFound`, ...) and deliberate application errors are
    /// answers, not outages.
    pub fn is_fault(self) -> bool {
        matches!(
            self,
            Code::Unavailable
                | Code::ResourceExhausted
                | Code::DeadlineExceeded
                | Code::Internal
                | Code::Unknown
        )
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong in a transport, kept next to the [`Code`] it maps to (as async-nats keeps an
/// error's kind): the code decides what retry and the circuit breaker do, the kind says what
/// happened, for programs that want to react to it.
///
/// Each kind maps to its code on purpose ([`code`](Self::code)): a message too large for the
/// broker or a pattern that is not a valid subject is the caller's problem (`InvalidArgument`,
/// neither transient nor a fault, so it is never retried and never opens a breaker), while a lost
/// connection is `Unavailable` (transient: another attempt may find the service).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// Connecting failed: refused, unreachable, timed out, a name that does not resolve.
    Connect,
    /// The connection (or the subscription replies come through) was lost while the request was
    /// in flight, or is gone.
    ConnectionLost,
    /// Not connected right now; the transport is reconnecting.
    NotConnected,
    /// Nobody listens on the pattern (no subscriber, no consumer, no queue bound).
    NoResponders,
    /// The message is larger than the transport or the broker accepts.
    PayloadTooLarge,
    /// The pattern cannot be addressed on this transport (not a valid subject or topic name).
    InvalidRoute,
    /// The destination does not exist and is not created on demand (a topic or stream).
    UnknownDestination,
    /// The broker refused the credentials.
    Authentication,
    /// The broker refused the operation for these credentials.
    Authorization,
    /// The broker did not confirm that it stored a message (no acknowledgement, no leader).
    NotAcknowledged,
    /// The peer or broker sent something that is not the protocol.
    Protocol,
    /// Reading or writing failed.
    Io,
}

impl TransportErrorKind {
    /// The [`Code`] an error of this kind carries.
    pub fn code(self) -> Code {
        match self {
            TransportErrorKind::Connect
            | TransportErrorKind::ConnectionLost
            | TransportErrorKind::NotConnected
            | TransportErrorKind::NoResponders
            | TransportErrorKind::NotAcknowledged
            | TransportErrorKind::Protocol
            | TransportErrorKind::Io => Code::Unavailable,
            TransportErrorKind::PayloadTooLarge | TransportErrorKind::InvalidRoute => {
                Code::InvalidArgument
            }
            TransportErrorKind::UnknownDestination => Code::NotFound,
            TransportErrorKind::Authentication => Code::Unauthenticated,
            TransportErrorKind::Authorization => Code::PermissionDenied,
        }
    }
}

struct Inner {
    code: Code,
    message: String,
    /// What went wrong in a transport, for errors a transport made.
    kind: Option<TransportErrorKind>,
    /// The `err` value as it crossed (or will cross) the wire, when it has a fixed shape.
    err: Option<Value>,
    /// The exact text of `err` when known — as received, or built in NestJS's key order — sent
    /// as it is: `Value`'s key order is `serde_json`'s (sorted, unless an application enables
    /// `preserve_order`), and NestJS's peers see the bytes.
    err_text: Option<RawJson>,
    retry_after: Option<Duration>,
    /// Overrides the code's transience (a passed deadline is not worth another attempt).
    transient: Option<bool>,
    /// The handler's own error this one replaced (never sent), for exception filters.
    handler_error: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

/// The error of a message exchange: what crosses the wire as a reply's `err`.
///
/// It carries a [`Code`], a message, and the raw JSON `err` value, so NestJS's shapes survive a
/// round trip exactly (an `RpcException({code: 'USER_NOT_FOUND', ...})` from a NestJS service
/// comes back with that object intact). One pointer wide.
///
/// ```
/// use palisade::rpc::{Code, RpcError};
/// use serde_json::json;
///
/// // NestJS's two RpcException shapes:
/// let plain = RpcError::exception("boom");
/// assert_eq!(plain.err(), json!({"status": "error", "message": "boom"}));
/// let object = RpcError::exception_object(json!({"code": "USER_NOT_FOUND", "message": "no user 7"}));
/// assert_eq!(object.err(), json!({"code": "USER_NOT_FOUND", "message": "no user 7"}));
/// assert_eq!(object.message(), "no user 7");
///
/// // palisade's own codes ride along as `code`:
/// let missing = RpcError::not_found("user 7 does not exist");
/// assert_eq!(missing.err(), json!({"status": "error", "message": "user 7 does not exist", "code": "NOT_FOUND"}));
/// assert_eq!(RpcError::from_wire(&missing.err()).code(), Code::NotFound);
/// ```
pub struct RpcError(Box<Inner>);

impl RpcError {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError(Box::new(Inner {
            code,
            message: message.into(),
            kind: None,
            err: None,
            err_text: None,
            retry_after: None,
            transient: None,
            handler_error: None,
        }))
    }

    /// An error a transport met: its code follows from `kind` ([`TransportErrorKind::code`]).
    ///
    /// ```
    /// use palisade::rpc::{Code, RpcError, TransportErrorKind};
    ///
    /// let error = RpcError::transport(
    ///     TransportErrorKind::PayloadTooLarge,
    ///     "the request is 2 MiB, over the broker's limit of 1 MiB",
    /// );
    /// assert_eq!(error.code(), Code::InvalidArgument);
    /// assert_eq!(error.transport_kind(), Some(TransportErrorKind::PayloadTooLarge));
    /// ```
    pub fn transport(kind: TransportErrorKind, message: impl Into<String>) -> Self {
        let mut error = RpcError::new(kind.code(), message);
        error.0.kind = Some(kind);
        error
    }

    /// What went wrong in the transport, for an error a transport made on this side (kinds do
    /// not cross the wire).
    pub fn transport_kind(&self) -> Option<TransportErrorKind> {
        self.0.kind
    }

    /// NestJS's `new RpcException("message")`: `err` is `{"status":"error","message":...}`.
    pub fn exception(message: impl Into<String>) -> Self {
        let message = message.into();
        let mut error = RpcError::new(Code::Application, message);
        error.set_err(status_error(&error.0.message));
        error
    }

    /// NestJS's `new RpcException({...})`: `err` is the object, unchanged.
    pub fn exception_object(err: Value) -> Self {
        let mut error = RpcError::from_wire(&err);
        if error.code() == Code::Unknown {
            error.0.code = Code::Application;
        }
        error
    }

    /// What NestJS sends for an unexpected error: `{"status":"error","message":"Internal server error"}`.
    pub fn internal() -> Self {
        let mut error = RpcError::new(Code::Internal, INTERNAL_SERVER_ERROR);
        error.set_err(status_error(INTERNAL_SERVER_ERROR));
        error
    }

    /// [`internal`](Self::internal) for a failure you can describe: `message` is logged here (at
    /// `error` level, with the code's location) and the caller gets only NestJS's "Internal
    /// server error", so no internal detail crosses the wire.
    ///
    /// ```
    /// use palisade::rpc::{Code, RpcError, INTERNAL_SERVER_ERROR};
    ///
    /// let error = RpcError::internal_with("the users table is locked");
    /// assert_eq!(error.code(), Code::Internal);
    /// assert_eq!(error.message(), INTERNAL_SERVER_ERROR);
    /// assert_eq!(error.err(), serde_json::json!({"status": "error", "message": "Internal server error"}));
    /// ```
    #[track_caller]
    pub fn internal_with(message: impl fmt::Display) -> Self {
        let location = std::panic::Location::caller();
        tracing::error!(
            error = %message,
            at = %location,
            "internal error; replying \"Internal server error\""
        );
        RpcError::internal()
    }

    /// NestJS's reply for a pattern no handler matches.
    pub fn no_handler() -> Self {
        let mut error = RpcError::new(Code::Unimplemented, NO_HANDLER_MESSAGE);
        error.0.err = Some(Value::String(NO_HANDLER_MESSAGE.to_owned()));
        error
    }

    /// `InvalidArgument`.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        RpcError::new(Code::InvalidArgument, message)
    }

    /// `InvalidArgument` sent as the `err` object given (a NestJS `BadRequest` body, say).
    pub(crate) fn invalid_argument_with(message: impl Into<String>, err: RawJson) -> Self {
        let mut error = RpcError::new(Code::InvalidArgument, message);
        error.set_err(err);
        error
    }

    /// Sends `err` as this text.
    fn set_err(&mut self, err: RawJson) {
        self.0.err = Some(err.to_value());
        self.0.err_text = Some(err);
    }

    /// The `err` value as it goes on the wire, as JSON text: the text that arrived, or the one
    /// built in NestJS's key order, or [`err`](Self::err) written out.
    pub fn err_json(&self) -> RawJson {
        if let Some(text) = &self.0.err_text {
            return text.clone();
        }
        if self.0.err.is_some() {
            return RawJson::to_json(&self.err()).unwrap_or_else(|_| RawJson::null());
        }
        // The default shape, in its documented order.
        let mut text = format!(
            r#"{{"status":"error","message":{},"code":"{}""#,
            json_string(&self.0.message),
            self.0.code.as_str()
        );
        if let Some(after) = self.0.retry_after {
            text.push_str(&format!(r#","retryAfterMs":{}"#, wire_millis(after)));
        }
        text.push('}');
        RawJson::from_trusted(text.into())
    }

    /// `Unauthenticated`: the caller did not prove who it is (what a guard answers).
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        RpcError::new(Code::Unauthenticated, message)
    }

    /// `PermissionDenied`: the caller may not do this (what a guard answers).
    pub fn permission_denied(message: impl Into<String>) -> Self {
        RpcError::new(Code::PermissionDenied, message)
    }

    /// `NotFound`.
    pub fn not_found(message: impl Into<String>) -> Self {
        RpcError::new(Code::NotFound, message)
    }

    /// `Unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        RpcError::new(Code::Unavailable, message)
    }

    /// `DeadlineExceeded`.
    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        RpcError::new(Code::DeadlineExceeded, message)
    }

    /// Adds a retry-after hint (sent on the wire as `retryAfterMs`, in whole milliseconds; a hint
    /// longer than `u64::MAX` milliseconds is sent as that).
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.0.retry_after = Some(after);
        let millis = wire_millis(after);
        if let Some(Value::Object(map)) = &mut self.0.err {
            let had = map.insert("retryAfterMs".into(), json!(millis)).is_some();
            // Appended to the known text when new; otherwise the text is written out afresh.
            self.0.err_text = match self.0.err_text.take() {
                Some(text) if !had && text.as_str().ends_with('}') => {
                    let body = &text.as_str()[..text.as_str().len() - 1];
                    let comma = if body.trim_end().ends_with('{') {
                        ""
                    } else {
                        ","
                    };
                    let appended = format!(r#"{body}{comma}"retryAfterMs":{millis}}}"#);
                    Some(RawJson::from_trusted(appended.into()))
                }
                _ => None,
            };
        }
        self
    }

    /// The error a reply's `err` value stands for.
    ///
    /// - the string NestJS sends for an unknown pattern → `Unimplemented`;
    /// - `{"status":"error","message":"Internal server error"}` → `Internal`;
    /// - an object with a `code` naming a palisade [`Code`] → that code;
    /// - any other object (a NestJS `RpcException`) → `Application`, message from its `message`;
    /// - anything else → `Unknown`.
    pub fn from_wire(err: &Value) -> Self {
        let (code, message, retry_after) = match err {
            Value::String(text) if text == NO_HANDLER_MESSAGE => {
                (Code::Unimplemented, text.clone(), None)
            }
            Value::String(text) => (Code::Unknown, text.clone(), None),
            Value::Object(map) => {
                let message = match map.get("message") {
                    Some(Value::String(text)) => text.clone(),
                    Some(other) => other.to_string(),
                    None => err.to_string(),
                };
                let named = map
                    .get("code")
                    .and_then(Value::as_str)
                    .and_then(Code::from_name);
                let code = match named {
                    Some(code) => code,
                    None if message == INTERNAL_SERVER_ERROR
                        && map.get("status").and_then(Value::as_str) == Some("error") =>
                    {
                        Code::Internal
                    }
                    None => Code::Application,
                };
                let retry_after = map
                    .get("retryAfterMs")
                    .and_then(Value::as_u64)
                    .map(Duration::from_millis);
                (code, message, retry_after)
            }
            other => (Code::Unknown, other.to_string(), None),
        };
        RpcError(Box::new(Inner {
            code,
            message,
            kind: None,
            err: Some(err.clone()),
            err_text: None,
            retry_after,
            transient: None,
            handler_error: None,
        }))
    }

    /// [`from_wire`](Self::from_wire) for a raw JSON `err`.
    pub fn from_wire_json(err: &RawJson) -> Self {
        let mut error = RpcError::from_wire(&err.to_value());
        error.0.err_text = Some(err.clone());
        error
    }

    /// The code.
    pub fn code(&self) -> Code {
        self.0.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The `err` value as it goes on the wire: the value that arrived (or a NestJS shape this error
    /// was built as), else `{"status":"error","message":...,"code":...}` (plus `retryAfterMs`).
    pub fn err(&self) -> Value {
        if let Some(err) = &self.0.err {
            return err.clone();
        }
        let mut map = Map::new();
        map.insert("status".into(), json!("error"));
        map.insert("message".into(), json!(self.0.message));
        map.insert("code".into(), json!(self.0.code.as_str()));
        if let Some(after) = self.0.retry_after {
            map.insert("retryAfterMs".into(), json!(wire_millis(after)));
        }
        Value::Object(map)
    }

    /// A domain code inside the error object (`USER_NOT_FOUND` in NestJS's
    /// `RpcException({code: 'USER_NOT_FOUND'})`), if it is not one of palisade's codes.
    pub fn domain_code(&self) -> Option<&str> {
        let code = self.0.err.as_ref()?.get("code")?.as_str()?;
        Code::from_name(code).is_none().then_some(code)
    }

    /// The handler's own error of type `E`, when this error replaced one: a handler that fails
    /// with an error that is not an `RpcError` answers "Internal server error", keeping its error
    /// here for an [exception filter](super::ExceptionFilterLayer). Never sent over the wire.
    pub fn handler_error<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.0.handler_error.as_deref()?.downcast_ref::<E>()
    }

    pub(crate) fn with_handler_error(
        mut self,
        error: Arc<dyn std::error::Error + Send + Sync>,
    ) -> Self {
        self.0.handler_error = Some(error);
        self
    }

    fn with_transience(mut self, transient: bool) -> Self {
        self.0.transient = Some(transient);
        self
    }
}

/// `{"status":"error","message":..}`, NestJS's `RpcException("message")` body, in its key order.
fn status_error(message: &str) -> RawJson {
    RawJson::from_trusted(
        format!(r#"{{"status":"error","message":{}}}"#, json_string(message)).into(),
    )
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

impl Clone for RpcError {
    fn clone(&self) -> Self {
        RpcError(Box::new(Inner {
            code: self.0.code,
            message: self.0.message.clone(),
            kind: self.0.kind,
            err: self.0.err.clone(),
            err_text: self.0.err_text.clone(),
            retry_after: self.0.retry_after,
            transient: self.0.transient,
            handler_error: self.0.handler_error.clone(),
        }))
    }
}

impl PartialEq for RpcError {
    fn eq(&self, other: &Self) -> bool {
        self.code() == other.code()
            && self.message() == other.message()
            && self.err() == other.err()
    }
}

/// Shows what a reader needs — the code, the message, and only the details that are there: the
/// transport's kind, the retry-after hint, and the wire `err` as compact JSON when it says more
/// than the message.
impl fmt::Debug for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Writes a JSON value as its text rather than `serde_json`'s nested `Object {..}` form.
        struct JsonText<'a>(&'a Value);
        impl fmt::Debug for JsonText<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self.0, f)
            }
        }
        let mut debug = f.debug_struct("RpcError");
        debug
            .field("code", &self.0.code)
            .field("message", &self.0.message);
        if let Some(kind) = self.0.kind {
            debug.field("transport_kind", &kind);
        }
        if let Some(after) = self.0.retry_after {
            debug.field("retry_after", &after);
        }
        let says_more = match &self.0.err {
            None => false,
            Some(Value::String(text)) => *text != self.0.message,
            Some(Value::Object(map)) => map.keys().any(|key| key != "status" && key != "message"),
            Some(_) => true,
        };
        if let Some(err) = self.0.err.as_ref().filter(|_| says_more) {
            debug.field("err", &JsonText(err));
        }
        if let Some(error) = &self.0.handler_error {
            debug.field("handler_error", &format_args!("{error}"));
        }
        debug.finish()
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.0.code, self.0.message)?;
        if let Some(domain) = self.domain_code() {
            write!(f, " ({domain})")?;
        }
        Ok(())
    }
}

impl std::error::Error for RpcError {}

impl From<CircuitOpen> for RpcError {
    fn from(open: CircuitOpen) -> Self {
        let mut error = RpcError::new(Code::Unavailable, open.to_string());
        error.0.retry_after = open.retry_after();
        // Without a retry-after (forced open) there is no point in retrying.
        error.with_transience(open.retry_after().is_some())
    }
}

impl From<Elapsed> for RpcError {
    fn from(elapsed: Elapsed) -> Self {
        let transient = !elapsed.is_deadline();
        RpcError::new(Code::DeadlineExceeded, elapsed.to_string()).with_transience(transient)
    }
}

impl From<InjectedFault> for RpcError {
    fn from(fault: InjectedFault) -> Self {
        RpcError::unavailable(fault.to_string())
    }
}

impl FailureKind for RpcError {
    fn retry_after(&self) -> Option<Duration> {
        self.0.retry_after
    }

    fn is_transient(&self) -> bool {
        self.0
            .transient
            .unwrap_or_else(|| self.0.code.is_transient())
    }

    fn is_fault(&self) -> bool {
        self.0.code.is_fault()
    }

    fn is_rejection(&self) -> bool {
        // A local rejection (open circuit) carries its hint but never an `err` from the wire.
        self.0.code == Code::Unavailable && self.0.retry_after.is_some() && self.0.err.is_none()
    }
}

/// A retry-after hint as the wire's `retryAfterMs`: whole milliseconds, saturating (a hint of
/// centuries must not wrap round to "at once").
fn wire_millis(after: Duration) -> u64 {
    u64::try_from(after.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes_decode_to_codes() {
        assert_eq!(
            RpcError::from_wire(&json!(NO_HANDLER_MESSAGE)).code(),
            Code::Unimplemented
        );
        assert_eq!(
            RpcError::from_wire(&json!({"status": "error", "message": "Internal server error"}))
                .code(),
            Code::Internal
        );
        let app = RpcError::from_wire(
            &json!({"code": "USER_NOT_FOUND", "message": "user missing not found"}),
        );
        assert_eq!(app.code(), Code::Application);
        assert_eq!(app.domain_code(), Some("USER_NOT_FOUND"));
        assert_eq!(
            app.to_string(),
            "APPLICATION: user missing not found (USER_NOT_FOUND)"
        );
        assert_eq!(RpcError::from_wire(&json!(42)).code(), Code::Unknown);
        let busy = RpcError::unavailable("busy").with_retry_after(Duration::from_millis(1500));
        let back = RpcError::from_wire(&busy.err());
        assert_eq!(
            (back.code(), back.retry_after()),
            (Code::Unavailable, Some(Duration::from_millis(1500)))
        );
        assert!(back.is_transient());
    }

    /// A hint of 2^62 s is more milliseconds than a `u64` holds: it is sent as the longest wait
    /// the wire can say, in each of the three places that write it, not wrapped round to 0.
    #[test]
    fn a_retry_after_longer_than_the_wire_holds_saturates() {
        let hint = Duration::from_secs(1 << 62);
        let busy = RpcError::unavailable("busy").with_retry_after(hint);
        assert_eq!(busy.err()["retryAfterMs"], json!(u64::MAX));
        assert!(
            busy.err_json()
                .as_str()
                .contains(&format!(r#""retryAfterMs":{}"#, u64::MAX)),
            "{}",
            busy.err_json()
        );
        let with_err = RpcError::exception_object(json!({"message": "m"})).with_retry_after(hint);
        assert_eq!(with_err.err()["retryAfterMs"], json!(u64::MAX));
        assert_eq!(
            RpcError::from_wire(&busy.err()).retry_after(),
            Some(Duration::from_millis(u64::MAX))
        );
    }

    #[test]
    fn debug_output_is_readable() {
        assert_eq!(
            format!("{:?}", RpcError::not_found("no user 7")),
            r#"RpcError { code: NotFound, message: "no user 7" }"#
        );
        assert_eq!(
            format!("{:?}", RpcError::internal()),
            r#"RpcError { code: Internal, message: "Internal server error" }"#
        );
        let domain = RpcError::exception_object(json!({"code": "USER_NOT_FOUND", "message": "m"}));
        assert_eq!(
            format!("{domain:?}"),
            r#"RpcError { code: Application, message: "m", err: {"code":"USER_NOT_FOUND","message":"m"} }"#
        );
        let busy = RpcError::transport(TransportErrorKind::NotConnected, "reconnecting")
            .with_retry_after(Duration::from_millis(1500));
        assert_eq!(
            format!("{busy:?}"),
            r#"RpcError { code: Unavailable, message: "reconnecting", transport_kind: NotConnected, retry_after: 1.5s }"#
        );
    }

    #[test]
    fn the_err_text_keeps_nests_key_order_whatever_serde_jsons_map_order() {
        // Relayed as it came, key order and spacing included.
        let came =
            RawJson::from_text(r#"{"zeta":1, "alpha":{"b":2,"a":1},"message":"m"}"#).unwrap();
        let relayed = RpcError::from_wire_json(&came);
        assert_eq!(relayed.err_json(), came);
        assert_eq!(relayed.message(), "m");
        // NestJS's shapes, in NestJS's order.
        assert_eq!(
            RpcError::exception("boom \"x\"").err_json().as_str(),
            r#"{"status":"error","message":"boom \"x\""}"#
        );
        assert_eq!(
            RpcError::internal().err_json().as_str(),
            r#"{"status":"error","message":"Internal server error"}"#
        );
        assert_eq!(
            RpcError::not_found("gone").err_json().as_str(),
            r#"{"status":"error","message":"gone","code":"NOT_FOUND"}"#
        );
        let busy = RpcError::unavailable("busy").with_retry_after(Duration::from_millis(1500));
        assert_eq!(
            busy.err_json().as_str(),
            r#"{"status":"error","message":"busy","code":"UNAVAILABLE","retryAfterMs":1500}"#
        );
        // A hint added to a known text is appended once; a second one rewrites the value.
        let hinted = RpcError::exception("slow").with_retry_after(Duration::from_millis(10));
        assert_eq!(
            hinted.err_json().as_str(),
            r#"{"status":"error","message":"slow","retryAfterMs":10}"#
        );
        let again = hinted.with_retry_after(Duration::from_millis(20));
        assert_eq!(again.err()["retryAfterMs"], 20);
        assert_eq!(
            serde_json::from_str::<Value>(again.err_json().as_str()).unwrap()["retryAfterMs"],
            20
        );
        let empty = RpcError::from_wire_json(&RawJson::from_text("{}").unwrap())
            .with_retry_after(Duration::from_millis(5));
        assert_eq!(empty.err_json().as_str(), r#"{"retryAfterMs":5}"#);
    }

    #[test]
    fn internal_with_sends_only_the_generic_message() {
        let error = RpcError::internal_with("disk full on /var/db");
        assert_eq!(error, RpcError::internal());
        assert!(!format!("{error:?}{error}").contains("disk"));
    }

    #[test]
    fn resilience_errors_convert_with_their_semantics() {
        let deadline = RpcError::from(Elapsed::deadline());
        assert_eq!(deadline.code(), Code::DeadlineExceeded);
        assert!(!deadline.is_transient());
        let attempt = RpcError::from(Elapsed::attempt(Duration::from_secs(1)));
        assert!(attempt.is_transient());
        assert!(attempt.is_fault());
        assert_eq!(
            std::mem::size_of::<RpcError>(),
            std::mem::size_of::<usize>()
        );
    }
}
