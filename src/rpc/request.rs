use super::{Pattern, RawJson};
use crate::timeout::{Deadline, HasDeadline};
use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// Header carrying the time a request has left, in milliseconds (a relative timeout, like gRPC's,
/// so the two ends need not agree on the wall clock).
pub const TIMEOUT_HEADER: &str = "palisade-timeout-ms";
/// W3C trace context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Whether a message expects replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A request: the handler's replies go back to the caller (NestJS `send`).
    Request,
    /// An event: handlers run, nothing is sent back (NestJS `emit`).
    Event,
}

/// Message headers: small string key–value pairs (deadline, trace context, your own).
///
/// Keys compare case-insensitively, as in HTTP and NATS.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(Cow<'static, str>, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// The value for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// Sets `key` (replacing a value it had).
    pub fn insert(&mut self, key: impl Into<Cow<'static, str>>, value: impl Into<String>) {
        let key = key.into();
        let value = value.into();
        match self
            .0
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(&key))
        {
            Some(entry) => entry.1 = value,
            None => self.0.push((key, value)),
        }
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        let position = self
            .0
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(key))?;
        Some(self.0.remove(position).1)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// All of them, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, v.as_str()))
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Into<Cow<'static, str>>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut headers = Headers::new();
        for (k, v) in iter {
            headers.insert(k, v);
        }
        headers
    }
}

/// One message: what the client stack carries down to a transport, and what a router dispatches
/// to handlers on the server.
///
/// Cheap to clone (the payload and pattern are shared), as retry needs.
#[derive(Clone, Debug)]
pub struct RpcRequest {
    pattern: Pattern,
    payload: RawJson,
    kind: Kind,
    headers: Headers,
    deadline: Option<Deadline>,
    /// An event whose handler failures must be reported (durable events are redelivered on
    /// failure) rather than only logged.
    report_failures: bool,
}

impl RpcRequest {
    /// A request (`Kind::Request`) for `pattern` with a JSON `payload`.
    pub fn new(pattern: Pattern, payload: RawJson) -> Self {
        RpcRequest {
            pattern,
            payload,
            kind: Kind::Request,
            headers: Headers::new(),
            deadline: None,
            report_failures: false,
        }
    }

    /// An event (`Kind::Event`).
    pub fn event(pattern: Pattern, payload: RawJson) -> Self {
        RpcRequest {
            kind: Kind::Event,
            ..RpcRequest::new(pattern, payload)
        }
    }

    /// With these headers.
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// The pattern.
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }

    /// The payload (NestJS's `data`).
    pub fn payload(&self) -> &RawJson {
        &self.payload
    }

    /// Request or event.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The headers, mutably.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    /// The headers a transport sends: the request's own, plus the time left before its deadline
    /// as [`TIMEOUT_HEADER`] (milliseconds, rounded up), which [`received`](Self::received) turns
    /// back into a deadline on the other side.
    pub fn wire_headers(&self) -> Headers {
        let mut headers = self.headers.clone();
        if let Some(deadline) = self.deadline {
            // Round up: a remaining 0.4 ms must not read as "no time at all".
            let left = deadline.remaining();
            let millis = left.as_micros().div_ceil(1000);
            headers.insert(TIMEOUT_HEADER, millis.to_string());
        }
        headers
    }

    /// The request as a server receives it, handed over in memory: routed like a received pattern,
    /// deadline and headers as they are.
    pub(crate) fn into_received(mut self) -> Self {
        self.pattern = self.pattern.as_received();
        self
    }

    /// Rebuilds a message a server received: `kind` from whether it carries an id (or a reply
    /// address), the deadline from the [`TIMEOUT_HEADER`] among `headers` (removed from them).
    /// For transport implementations.
    pub fn received(pattern: Pattern, payload: RawJson, kind: Kind, mut headers: Headers) -> Self {
        let deadline = headers
            .remove(TIMEOUT_HEADER)
            .and_then(|millis| millis.trim().parse::<u64>().ok())
            .map(|millis| Deadline::after(Duration::from_millis(millis)));
        RpcRequest {
            pattern,
            payload,
            kind,
            headers,
            deadline,
            report_failures: false,
        }
    }

    /// Makes an event report its handlers' failures instead of only logging them.
    pub(crate) fn reporting_failures(mut self) -> Self {
        self.report_failures = true;
        self
    }

    pub(crate) fn reports_failures(&self) -> bool {
        self.report_failures
    }
}

impl HasDeadline for RpcRequest {
    fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    fn set_deadline(&mut self, deadline: Deadline) {
        self.deadline = Some(deadline);
    }
}
