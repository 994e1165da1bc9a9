use super::{Pattern, RawJson};
use crate::timeout::{Deadline, HasDeadline};
use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
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

/// Values that travel with a request inside one process, one per type: what a layer hands to
/// the handlers below it (an authenticated principal, a tenant, a database transaction). Read
/// them with the [`Extension`](super::Extension) extractor.
///
/// Extensions never cross the wire: transports send the pattern, the payload and the
/// [`Headers`], and a server's request starts with none (the in-memory transport drops them
/// too, so that it behaves as the wire does).
///
/// ```
/// use palisade::rpc::Extensions;
///
/// #[derive(Clone, Debug, PartialEq)]
/// struct Principal(String);
///
/// let mut extensions = Extensions::new();
/// assert!(extensions.insert(Principal("ann".into())).is_none());
/// assert_eq!(extensions.get::<Principal>(), Some(&Principal("ann".into())));
/// assert_eq!(extensions.get::<u32>(), None);
/// ```
#[derive(Clone, Default)]
pub struct Extensions {
    // `None` until the first insert, so requests without extensions allocate nothing; values are
    // shared so that cloning a request (retries, every handler of an event) copies pointers.
    // Boxed so that every request, with extensions or not, grows by one word rather than by a
    // whole `HashMap`.
    #[allow(clippy::box_collection)]
    map: Option<Box<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>>,
}

impl Extensions {
    /// None yet.
    pub fn new() -> Self {
        Extensions::default()
    }

    /// Stores `value`, returning the value of its type stored before, if any.
    pub fn insert<T: Clone + Send + Sync + 'static>(&mut self, value: T) -> Option<T> {
        let previous = self
            .map
            .get_or_insert_with(Default::default)
            .insert(TypeId::of::<T>(), Arc::new(value))?;
        previous.downcast_ref::<T>().cloned()
    }

    /// The value of type `T`, if one was stored.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.map
            .as_ref()?
            .get(&TypeId::of::<T>())?
            .downcast_ref::<T>()
    }

    /// Removes the value of type `T` and returns it.
    pub fn remove<T: Clone + Send + Sync + 'static>(&mut self) -> Option<T> {
        let value = self.map.as_mut()?.remove(&TypeId::of::<T>())?;
        value.downcast_ref::<T>().cloned()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.as_ref().is_none_or(|map| map.is_empty())
    }

    /// How many values are stored.
    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |map| map.len())
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The values need not be `Debug`; their number says whether any are there.
        f.debug_struct("Extensions")
            .field("len", &self.len())
            .finish()
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
    /// In-process values for the handlers; never sent.
    extensions: Extensions,
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
            extensions: Extensions::new(),
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

    /// The request's [`Extensions`]: values layers hand to handlers, never sent.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The request's [`Extensions`], mutably (where a guard or an interceptor stores what it
    /// found out, for the [`Extension`](super::Extension) extractor).
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }

    /// The headers a transport sends: the request's own, plus the time left before its deadline
    /// as [`TIMEOUT_HEADER`] (milliseconds, rounded up), which [`received`](Self::received) turns
    /// back into a deadline on the other side.
    pub fn wire_headers(&self) -> Headers {
        let mut headers = self.headers.clone();
        if let Some(millis) = self.wire_timeout_millis() {
            headers.insert(TIMEOUT_HEADER, millis.to_string());
        }
        headers
    }

    /// The value of [`TIMEOUT_HEADER`] that [`wire_headers`](Self::wire_headers) sends, if the
    /// request has a deadline: the milliseconds left, rounded up. For a transport that writes
    /// the header itself ([`encode_request_within`](crate::rpc::wire::encode_request_within)).
    pub fn wire_timeout_millis(&self) -> Option<u64> {
        let deadline = self.deadline?;
        // Round up: a remaining 0.4 ms must not read as "no time at all".
        let millis = deadline.remaining().as_micros().div_ceil(1000);
        Some(u64::try_from(millis).unwrap_or(u64::MAX))
    }

    /// The request as a server receives it, handed over in memory: routed like a received pattern,
    /// deadline and headers as they are.
    pub(crate) fn into_received(mut self) -> Self {
        self.pattern = self.pattern.as_received();
        // The caller's extensions belong to the caller's process, as on the wire.
        self.extensions = Extensions::new();
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
            extensions: Extensions::new(),
        }
    }

    /// The deadline `millis` from now, unless the request has one already (from a
    /// [`TIMEOUT_HEADER`] among the headers it was [`received`](Self::received) with, which wins).
    /// For a transport that builds a request from the parts of an
    /// [`IncomingPacket`](crate::rpc::wire::IncomingPacket): the packet's `timeout_ms`, which the
    /// JSON codec reads apart from its headers. `None` changes nothing.
    pub fn with_timeout_ms(mut self, millis: Option<u64>) -> Self {
        if self.deadline.is_none()
            && let Some(millis) = millis
        {
            self.deadline = Some(Deadline::after(Duration::from_millis(millis)));
        }
        self
    }

    /// The request without its deadline (what a client sends with an event).
    pub(crate) fn without_deadline(mut self) -> Self {
        self.deadline = None;
        self
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
