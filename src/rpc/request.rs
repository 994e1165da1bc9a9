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

    /// Sets `key` (replacing a value it had). Linear in the number of headers: to set many at
    /// once, [`extend`](Extend::extend) or [`collect`](FromIterator) them.
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

/// Up to this many headers, keys are found by a linear search; beyond it, by an index.
pub(crate) const LINEAR_HEADERS: usize = 16;

impl Headers {
    /// Sets (`Some`) or removes (`None`) each key in turn, as [`insert`](Self::insert) and
    /// [`remove`](Self::remove) would, in time linear in their number: beyond a few headers an
    /// index of the keys replaces the searches, so that a message carrying thousands of headers
    /// is not read in quadratic time.
    pub(crate) fn apply<I>(&mut self, changes: I)
    where
        I: IntoIterator<Item = (Cow<'static, str>, Option<String>)>,
    {
        let mut changes = changes.into_iter().peekable();
        while self.0.len() < LINEAR_HEADERS {
            match changes.next() {
                Some((key, Some(value))) => self.insert(key, value),
                Some((key, None)) => {
                    self.remove(&key);
                }
                None => return,
            }
        }
        if changes.peek().is_none() {
            return;
        }
        // Removed entries leave a hole, so that the index's positions stay true.
        let mut slots: Vec<_> = std::mem::take(&mut self.0).into_iter().map(Some).collect();
        let mut index: HashMap<String, usize> = slots
            .iter()
            .enumerate()
            .filter_map(|(position, slot)| Some((slot.as_ref()?.0.to_ascii_lowercase(), position)))
            .collect();
        for (key, value) in changes {
            let folded = key.to_ascii_lowercase();
            match (index.get(&folded).copied(), value) {
                (Some(position), Some(value)) => {
                    if let Some(entry) = &mut slots[position] {
                        entry.1 = value;
                    }
                }
                (Some(position), None) => {
                    index.remove(&folded);
                    slots[position] = None;
                }
                (None, Some(value)) => {
                    index.insert(folded, slots.len());
                    slots.push(Some((key, value)));
                }
                (None, None) => {}
            }
        }
        self.0 = slots.into_iter().flatten().collect();
    }
}

impl<K: Into<Cow<'static, str>>, V: Into<String>> Extend<(K, V)> for Headers {
    /// Sets each key in turn, as [`insert`](Self::insert) would, in time linear in their number.
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        self.apply(
            iter.into_iter()
                .map(|(key, value)| (key.into(), Some(value.into()))),
        );
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
        headers.extend(iter);
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What `insert` and `remove` leave, one change at a time.
    fn one_at_a_time(changes: &[(String, Option<String>)]) -> Headers {
        let mut headers = Headers::new();
        for (key, value) in changes {
            match value {
                Some(value) => headers.insert(key.clone(), value.clone()),
                None => {
                    headers.remove(key);
                }
            }
        }
        headers
    }

    proptest! {
        /// Applied together (linear searches, then an index past `LINEAR_HEADERS`), changes
        /// leave what they leave one at a time: same keys, first spelling, last value, order.
        #[test]
        fn applying_changes_together_agrees_with_one_at_a_time(
            changes in prop::collection::vec(
                ("[a-cA-C]{1,3}", prop::option::weighted(0.8, "[0-9]")),
                0..120,
            ),
            start in 0usize..30,
        ) {
            let start = start.min(changes.len());
            let mut together = one_at_a_time(&changes[..start]);
            together.apply(
                changes[start..]
                    .iter()
                    .map(|(key, value)| (Cow::Owned(key.clone()), value.clone())),
            );
            prop_assert_eq!(together, one_at_a_time(&changes));
            let sets: Vec<_> = changes.iter().filter_map(|(k, v)| Some((k.clone(), v.clone()?))).collect();
            let collected: Headers = sets.iter().cloned().collect();
            let expected = one_at_a_time(
                &sets.into_iter().map(|(k, v)| (k, Some(v))).collect::<Vec<_>>(),
            );
            prop_assert_eq!(collected, expected);
        }
    }

    /// 200 000 distinct headers (a frame of 2.6 MB, well under the TCP transport's default
    /// limit) are read in linear time; one search of the earlier ones per header took minutes.
    #[test]
    fn a_packet_with_many_headers_is_read_in_linear_time() {
        let count = 200_000;
        let mut json = String::from(r#"{"pattern":"p","data":1,"id":"a","headers":{"#);
        for i in 0..count {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&format!(r#""h{i}":"v""#));
        }
        json.push_str(r#","H7":"last"}}"#);
        let started = std::time::Instant::now();
        let packet = crate::rpc::wire::decode_incoming(&bytes::Bytes::from(json)).unwrap();
        assert_eq!(packet.headers.len(), count);
        assert_eq!(packet.headers.get("h7"), Some("last"));
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{count} headers took {:?}",
            started.elapsed()
        );
    }

    /// A channel transport's own headers (NATS's) merged into those a packet carries: linear too.
    #[test]
    fn a_transports_many_headers_merge_into_a_packets_in_linear_time() {
        let count = 200_000;
        let frame =
            bytes::Bytes::from_static(br#"{"pattern":"p","data":1,"headers":{"h7":"body"}}"#);
        let packet = crate::rpc::wire::decode_incoming(&frame).unwrap();
        let transport: Headers = (0..count).map(|i| (format!("h{i}"), "v")).collect();
        let started = std::time::Instant::now();
        let route: std::sync::Arc<str> = "p".into();
        let (request, _) = packet.into_request_on(&route, &frame, transport);
        assert_eq!(request.headers().len(), count);
        assert_eq!(
            request.headers().get("h7"),
            Some("v"),
            "the transport's win"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{count} headers took {:?}",
            started.elapsed()
        );
    }
}
