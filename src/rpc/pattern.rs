//! Message patterns and NestJS's route strings.

use super::RawJson;
use serde_json::Value;
use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

/// Nesting deeper than this becomes `[MAX_DEPTH_REACHED]` (NestJS 11.2+).
const MAX_DEPTH: usize = 5;
/// An object with more keys becomes `[TOO_MANY_KEYS]` (NestJS 11.2+).
const MAX_KEYS: usize = 20;

/// What a message is addressed to: a string, a number or a JSON object, as in NestJS's
/// `@MessagePattern('get-user')`, `@MessagePattern(42)`, `@MessagePattern({ cmd: 'sum' })`.
///
/// Routing happens on NestJS's normalised [route string](Pattern::route): an object's keys sorted
/// the way JavaScript's `localeCompare` sorts them, no whitespace, `\` and `"` escaped, arrays as
/// objects keyed `"0"`, `"1"`, .... The raw pattern is what goes on the wire.
///
/// ```
/// use palisade::rpc::{Pattern, RawJson};
/// use serde_json::json;
///
/// assert_eq!(Pattern::from("get-user").route(), "get-user");
/// assert_eq!(Pattern::from(42).route(), "42");
/// let sum = Pattern::from(json!({ "role": "math", "cmd": "sum" }));
/// assert_eq!(sum.route(), r#"{"cmd":"sum","role":"math"}"#);
/// // A received pattern keeps its text, key order included, as NestJS's does.
/// let received = Pattern::received(RawJson::from_text(r#"{"role":"math","cmd":"sum"}"#).unwrap());
/// assert_eq!(received.raw().as_str(), r#"{"role":"math","cmd":"sum"}"#);
/// assert_eq!(received.route(), sum.route());
/// ```
///
/// Routes are computed from the pattern's text as JavaScript reads it (numbers exactly, keys in
/// the order they came), whatever features `serde_json` is built with. A pattern built from a
/// `serde_json::Value` has the key order of that `Value`: sorted, unless your application
/// enables `serde_json`'s `preserve_order` (which routing never needs; the raw pattern's order
/// shows only in RabbitMQ routing keys and in the packet's `pattern` field).
///
/// Key order: for ASCII keys palisade reproduces the ICU root collation that Node's
/// `localeCompare` uses (punctuation before digits before letters, letters case-insensitively
/// first and lowercase before uppercase on a tie, control characters ignored); non-ASCII
/// characters sort after all ASCII ones by code point, which differs from ICU — avoid non-ASCII
/// keys in object patterns.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    route: Arc<str>,
    raw: RawJson,
    /// False for a received pattern no NestJS handler could ever match (a boolean or `null`).
    routable: bool,
}

impl Pattern {
    /// A pattern from any JSON value (strings, numbers and objects are meaningful to NestJS).
    pub fn new(value: Value) -> Self {
        let route = route_of(&value).into();
        let raw = RawJson::to_json(&value).unwrap_or_else(|_| RawJson::null());
        Pattern {
            route,
            raw,
            routable: true,
        }
    }

    /// A pattern as a server received it in a packet's `pattern` field, routed the way a NestJS
    /// server routes it (see [`incoming_route`](Self::incoming_route)): `"42"` like `42`, the
    /// route string of an object like the object, and a boolean or `null` like nothing at all.
    /// For transport implementations.
    pub fn received(raw: RawJson) -> Self {
        match incoming_route(&raw) {
            Some(route) => Pattern {
                route: route.into(),
                raw,
                routable: true,
            },
            None => Pattern {
                route: raw.as_str().into(),
                raw,
                routable: false,
            },
        }
    }

    /// A received pattern routed by the channel it arrived on — NATS subjects, Redis channels,
    /// MQTT and Kafka topics route by the channel, whatever pattern the message body names. `raw`
    /// is the pattern the body names (what handlers see). For transport implementations.
    pub fn received_on(route: impl Into<Arc<str>>, raw: RawJson) -> Self {
        Pattern {
            route: route.into(),
            raw,
            routable: true,
        }
    }

    /// The route a NestJS server dispatches a received pattern on: a string pattern is first
    /// `JSON.parse`d if it parses (so `"42"` routes like `42`, and the route string of an object
    /// pattern routes like the object), then normalised. `None` for patterns no NestJS handler can
    /// match (a boolean or `null`, or a string that parses to one).
    pub fn incoming_route(raw: &RawJson) -> Option<String> {
        incoming_route(raw)
    }

    /// This pattern as a NestJS server would route it after receiving it. A plain string pattern
    /// (the common case) routes as itself: no new route string is built.
    pub(crate) fn as_received(&self) -> Pattern {
        if plain_string_route(&self.raw).is_some() && self.routable {
            self.clone()
        } else {
            Pattern::received(self.raw.clone())
        }
    }

    /// Whether a handler could be registered for this pattern's route.
    pub(crate) fn is_routable(&self) -> bool {
        self.routable
    }

    /// The normalised route string (what handlers are registered under, and NATS subjects).
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The route as a shared string.
    pub(crate) fn route_arc(&self) -> &Arc<str> {
        &self.route
    }

    /// The pattern as JSON, as it goes on the wire.
    pub fn raw(&self) -> &RawJson {
        &self.raw
    }

    /// Whether this is a string pattern.
    pub fn is_string(&self) -> bool {
        self.raw.as_bytes().first() == Some(&b'"')
    }
}

/// How many patterns made from strings each thread keeps, and up to what length.
const RECENT_PATTERNS: usize = 4;
const RECENT_PATTERN_LEN: usize = 128;

thread_local! {
    /// The patterns made last on this thread from strings. A client names the same few patterns
    /// call after call, mostly by literals, and making one costs two allocations and a JSON
    /// escape (and freeing them, later); finding it here costs a comparison and two reference
    /// counts. Bounded: a few short patterns per thread.
    static RECENT: std::cell::RefCell<RecentPatterns> = const {
        std::cell::RefCell::new(RecentPatterns {
            patterns: [const { None }; RECENT_PATTERNS],
            next: 0,
        })
    };
}

/// A thread's [`RECENT`] patterns; the oldest is replaced first.
struct RecentPatterns {
    patterns: [Option<Pattern>; RECENT_PATTERNS],
    next: usize,
}

impl RecentPatterns {
    fn get_or_make(&mut self, route: &str) -> Pattern {
        if let Some(found) = self.patterns.iter().flatten().find(|p| &*p.route == route) {
            return found.clone();
        }
        let made = Pattern::from_route(route);
        self.patterns[self.next] = Some(made.clone());
        self.next = (self.next + 1) % RECENT_PATTERNS;
        made
    }
}

impl Pattern {
    /// The pattern NestJS routes by the string `route`.
    fn from_route(route: &str) -> Self {
        Pattern {
            route: route.into(),
            raw: RawJson::to_json(route).expect("a string always serialises"),
            routable: true,
        }
    }
}

impl From<&str> for Pattern {
    fn from(pattern: &str) -> Self {
        if pattern.len() > RECENT_PATTERN_LEN {
            return Pattern::from_route(pattern);
        }
        // Gone only while the thread's locals are destroyed.
        RECENT
            .try_with(|recent| recent.borrow_mut().get_or_make(pattern))
            .unwrap_or_else(|_| Pattern::from_route(pattern))
    }
}

impl From<String> for Pattern {
    fn from(pattern: String) -> Self {
        Pattern::from(pattern.as_str())
    }
}

impl From<Value> for Pattern {
    fn from(value: Value) -> Self {
        Pattern::new(value)
    }
}

macro_rules! pattern_from_number {
    ($($t:ty),*) => {$(
        impl From<$t> for Pattern {
            fn from(n: $t) -> Self {
                Pattern::new(Value::from(n))
            }
        }
    )*};
}
pattern_from_number!(i32, i64, u32, u64, f64);

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({})", self.route)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.route)
    }
}

/// The route an incoming pattern is dispatched on, exactly as a NestJS server computes it: a
/// non-string pattern is stringified; the string is `JSON.parse`d if it parses, and normalised.
/// `None` when NestJS could never find a handler for it (a pattern that is, or parses to, a
/// boolean or `null`).
pub(crate) fn incoming_route(raw: &RawJson) -> Option<String> {
    // Fast path: a plain string that cannot parse as JSON routes as itself.
    let bytes = raw.as_bytes();
    if bytes.len() >= 2 && bytes[0] == b'"' && !bytes.contains(&b'\\') {
        let inner = &raw.as_str()[1..raw.as_str().len() - 1];
        let may_parse = inner.trim_start().starts_with(|c: char| {
            matches!(c, '{' | '[' | '"' | '-' | '0'..='9' | 't' | 'f' | 'n')
        });
        if !may_parse {
            return Some(inner.to_owned());
        }
    }
    let value = Js::parse(raw.as_str(), 0).unwrap_or(Js::Null);
    let parsed = match value {
        // A string pattern is parsed as it is: `"1e400"` routes as `Infinity`.
        Js::String(text) => match Js::parse(&text, 0) {
            Ok(parsed) => parsed,
            Err(_) => return Some(text),
        },
        // Any other pattern goes through `JSON.stringify` first, which writes a number too large
        // for a double (`1e400`) as `null`.
        other => other.stringified(),
    };
    match parsed {
        Js::String(text) => Some(text),
        Js::Number(_) | Js::Object(_) | Js::Array(_) | Js::TooDeep | Js::TooManyKeys => {
            let mut route = String::new();
            write_route(&parsed, 0, &mut route);
            Some(route)
        }
        Js::Bool(_) | Js::Null => None,
    }
}

/// A JSON value as JavaScript's `JSON.parse` holds it: numbers read exactly from their text (as
/// `Number("…")` does, whatever `serde_json`'s float parsing), and object keys in the order they
/// were read (a repeated key keeps its first place and its last value), whatever `serde_json`'s
/// map order.
///
/// Objects and arrays nested deeper than a route shows are not read: a pattern nested thousands
/// deep (which `JSON.parse` reads, and NestJS routes to `[MAX_DEPTH_REACHED]`) must cost neither
/// a stack frame per level nor a pass over the text per level.
#[derive(Debug, PartialEq)]
enum Js {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Js>),
    Object(Vec<(String, Js)>),
    /// An object or array deeper than [`MAX_DEPTH`], which routes as `[MAX_DEPTH_REACHED]`.
    TooDeep,
    /// An object with more than [`MAX_KEYS`] keys (an array with more items), which routes as
    /// `[TOO_MANY_KEYS]`.
    TooManyKeys,
}

impl Js {
    /// Reads `text`, a value found at `depth` (0 for the pattern itself). Deeper than a route
    /// shows, an object or array is not read: its text was checked as JSON with its parent's.
    fn parse(text: &str, depth: usize) -> Result<Js, serde_json::Error> {
        use serde_json::value::RawValue;
        let trimmed = text.trim();
        match trimmed.as_bytes().first() {
            Some(b'{' | b'[') if depth > MAX_DEPTH => Ok(Js::TooDeep),
            Some(b'{') => {
                let entries: RawEntries<'_> = serde_json::from_str(trimmed)?;
                // At most `MAX_KEYS` distinct keys are kept, each found by a short search: an
                // object with more routes as `[TOO_MANY_KEYS]`, whatever its values.
                let mut object: Vec<(String, Js)> =
                    Vec::with_capacity(entries.0.len().min(MAX_KEYS));
                for (key, raw) in entries.0 {
                    let value = Js::parse(raw.get(), depth + 1)?;
                    match object.iter().position(|(k, _)| *k == key) {
                        Some(found) => object[found].1 = value,
                        None if object.len() == MAX_KEYS => return Ok(Js::TooManyKeys),
                        None => object.push((key, value)),
                    }
                }
                Ok(Js::Object(object))
            }
            Some(b'[') => {
                let items: Vec<&RawValue> = serde_json::from_str(trimmed)?;
                if items.len() > MAX_KEYS {
                    return Ok(Js::TooManyKeys);
                }
                items
                    .into_iter()
                    .map(|raw| Js::parse(raw.get(), depth + 1))
                    .collect::<Result<_, _>>()
                    .map(Js::Array)
            }
            Some(b'-' | b'0'..=b'9') => {
                // Validated as JSON first; then read exactly, as JavaScript reads it.
                serde_json::from_str::<serde::de::IgnoredAny>(trimmed)?;
                Ok(Js::Number(trimmed.parse::<f64>().unwrap_or(f64::NAN)))
            }
            _ => Ok(match serde_json::from_str::<Value>(trimmed)? {
                Value::String(text) => Js::String(text),
                Value::Bool(b) => Js::Bool(b),
                _ => Js::Null,
            }),
        }
    }

    /// This value after a `JSON.stringify` and `JSON.parse` round trip: numbers that are not
    /// finite become `null`.
    fn stringified(self) -> Js {
        match self {
            Js::Number(n) if !n.is_finite() => Js::Null,
            Js::Array(items) => Js::Array(items.into_iter().map(Js::stringified).collect()),
            Js::Object(entries) => Js::Object(
                entries
                    .into_iter()
                    .map(|(key, value)| (key, value.stringified()))
                    .collect(),
            ),
            other => other,
        }
    }

    /// A `Value` made in this process (as deep as `serde_json` lets it be read, 128).
    fn from_value(value: &Value) -> Js {
        match value {
            Value::Null => Js::Null,
            Value::Bool(b) => Js::Bool(*b),
            Value::Number(n) => Js::Number(n.as_f64().unwrap_or(0.0)),
            Value::String(text) => Js::String(text.clone()),
            Value::Array(items) => Js::Array(items.iter().map(Js::from_value).collect()),
            Value::Object(map) => Js::Object(
                map.iter()
                    .map(|(key, value)| (key.clone(), Js::from_value(value)))
                    .collect(),
            ),
        }
    }
}

/// An object's entries as read, raw.
struct RawEntries<'a>(Vec<(String, &'a serde_json::value::RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for RawEntries<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Entries<'a> {
            type Value = RawEntries<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<RawEntries<'a>, M::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    entries.push((key, map.next_value()?));
                }
                Ok(RawEntries(entries))
            }
        }
        deserializer.deserialize_map(Entries(std::marker::PhantomData))
    }
}

/// The route of a string pattern that cannot parse as JSON (the common case: `"get-user"`), which
/// routes as itself; `None` when the full algorithm is needed.
fn plain_string_route(raw: &RawJson) -> Option<&str> {
    let bytes = raw.as_bytes();
    if bytes.len() < 2 || bytes[0] != b'"' || bytes.contains(&b'\\') {
        return None;
    }
    let inner = &raw.as_str()[1..raw.as_str().len() - 1];
    let may_parse = inner
        .trim_start()
        .starts_with(|c: char| matches!(c, '{' | '[' | '"' | '-' | '0'..='9' | 't' | 'f' | 'n'));
    (!may_parse).then_some(inner)
}

/// NestJS's `transformPatternToRoute`.
pub(crate) fn route_of(value: &Value) -> String {
    let mut route = String::new();
    write_route(&Js::from_value(value), 0, &mut route);
    route
}

fn write_route(value: &Js, depth: usize, out: &mut String) {
    match value {
        Js::String(text) => out.push_str(text),
        Js::Number(n) => out.push_str(&js_number(*n)),
        Js::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Js::Null => out.push_str("null"),
        // Made only deeper than `MAX_DEPTH`.
        Js::TooDeep => out.push_str("[MAX_DEPTH_REACHED]"),
        Js::TooManyKeys => out.push_str("[TOO_MANY_KEYS]"),
        Js::Object(_) | Js::Array(_) if depth > MAX_DEPTH => out.push_str("[MAX_DEPTH_REACHED]"),
        Js::Object(entries) => write_entries(js_key_order(entries), depth, out),
        Js::Array(items) => write_entries(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
            depth,
            out,
        ),
    }
}

/// An object's entries in JavaScript's `Object.keys` order: integer-like keys first, ascending,
/// then the others in the order they were read. It matters only for keys the collation ranks equal
/// (keys differing just by ignorable control characters), which keep this order when sorted.
fn js_key_order(map: &[(String, Js)]) -> Vec<(String, &Js)> {
    let array_index = |key: &str| -> Option<u32> {
        let index: u32 = key.parse().ok()?;
        (index != u32::MAX && index.to_string() == key).then_some(index)
    };
    let mut entries: Vec<(String, &Js)> = map.iter().map(|(k, v)| (k.clone(), v)).collect();
    entries.sort_by_key(|(key, _)| array_index(key).map_or((1, 0), |i| (0, i)));
    entries
}

fn write_entries(mut entries: Vec<(String, &Js)>, depth: usize, out: &mut String) {
    if entries.len() > MAX_KEYS {
        out.push_str("[TOO_MANY_KEYS]");
        return;
    }
    // `sort_by` is stable, like JavaScript's `Array.prototype.sort`.
    entries.sort_by(|(a, _), (b, _)| locale_compare(a, b));
    out.push('{');
    for (i, (key, value)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        escape_into(key, out);
        out.push_str("\":");
        match value {
            Js::String(text) => {
                out.push('"');
                escape_into(text, out);
                out.push('"');
            }
            other => write_route(other, depth + 1, out),
        }
    }
    out.push('}');
}

fn escape_into(text: &str, out: &mut String) {
    for c in text.chars() {
        if c == '\\' || c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Punctuation, symbols and digits in ICU root (CLDR) order, as Node's `localeCompare` sorts
/// them; letters follow, compared case-insensitively.
const ASCII_ORDER: &str = "\t\n\u{b}\u{c}\r _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$0123456789";

/// The primary collation weight of `c`, or `None` for characters ICU ignores (most ASCII control
/// characters).
fn primary_weight(c: char) -> Option<u32> {
    if c.is_ascii_control() && !matches!(c, '\t' | '\n' | '\u{b}' | '\u{c}' | '\r') {
        return None;
    }
    if let Some(position) = ASCII_ORDER.find(c) {
        return Some(position as u32);
    }
    if c.is_ascii_alphabetic() {
        return Some(100 + (c.to_ascii_lowercase() as u32 - 'a' as u32));
    }
    Some(1000 + c as u32)
}

/// JavaScript's `a.localeCompare(b)` for the ICU root collation, exact for ASCII: compare primary
/// weights first, then case (lowercase first).
pub(crate) fn locale_compare(a: &str, b: &str) -> Ordering {
    let primary = |s: &str| s.chars().filter_map(primary_weight).collect::<Vec<_>>();
    primary(a).cmp(&primary(b)).then_with(|| {
        let case = |s: &str| {
            s.chars()
                .filter(|c| primary_weight(*c).is_some())
                .map(|c| c.is_ascii_uppercase())
                .collect::<Vec<_>>()
        };
        case(a).cmp(&case(b))
    })
}

/// JavaScript's `Number.prototype.toString()` for a finite double.
pub(crate) fn js_number(x: f64) -> String {
    if x == 0.0 {
        return "0".to_owned();
    }
    if !x.is_finite() {
        return if x.is_nan() {
            "NaN".to_owned()
        } else if x > 0.0 {
            "Infinity".to_owned()
        } else {
            "-Infinity".to_owned()
        };
    }
    // Rust's `{:e}` gives the shortest digits that round-trip, as ECMAScript requires.
    let formatted = format!("{:e}", x.abs());
    let (mantissa, exponent) = formatted
        .split_once('e')
        .expect("`{:e}` always has an exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exponent: i32 = exponent.parse().expect("`{:e}` writes a decimal exponent");
    let k = digits.len() as i32;
    let n = exponent + 1;
    let sign = if x < 0.0 { "-" } else { "" };
    let body = if k <= n && n <= 21 {
        format!("{digits}{}", "0".repeat((n - k) as usize))
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..n as usize], &digits[n as usize..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", "0".repeat((-n) as usize))
    } else {
        let exponent_sign = if n - 1 < 0 { '-' } else { '+' };
        let magnitude = (n - 1).abs();
        if k == 1 {
            format!("{digits}e{exponent_sign}{magnitude}")
        } else {
            format!(
                "{}.{}e{exponent_sign}{magnitude}",
                &digits[..1],
                &digits[1..]
            )
        }
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `[[[…1…]]]` nested `depth` deep.
    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    /// As NestJS routes it: six levels of objects, then `[MAX_DEPTH_REACHED]`. On a thread with
    /// a tokio worker's stack (2 MiB); a parse that recursed once per level overflowed it.
    #[test]
    fn a_pattern_nested_thousands_deep_routes_as_nestjs_routes_it() {
        let six_levels = r#"{"0":{"0":{"0":{"0":{"0":{"0":[MAX_DEPTH_REACHED]}}}}}}"#;
        let routes = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(|| {
                let deep = RawJson::from_text(nested(100_000)).unwrap();
                // The same pattern sent as a string, which NestJS parses first.
                let as_string = RawJson::to_json(&nested(100_000)).unwrap();
                let just_over = RawJson::from_text(nested(7)).unwrap();
                let objects = RawJson::from_text(format!(
                    "{}1{}",
                    r#"{"a":"#.repeat(100_000),
                    "}".repeat(100_000)
                ))
                .unwrap();
                [deep, as_string, just_over, objects].map(|raw| incoming_route(&raw))
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(routes[0].as_deref(), Some(six_levels));
        assert_eq!(routes[1].as_deref(), Some(six_levels));
        assert_eq!(routes[2].as_deref(), Some(six_levels));
        assert_eq!(
            routes[3].as_deref(),
            Some(r#"{"a":{"a":{"a":{"a":{"a":{"a":[MAX_DEPTH_REACHED]}}}}}}"#)
        );
        // Six levels fit.
        let six = RawJson::from_text(nested(6)).unwrap();
        assert_eq!(
            incoming_route(&six).as_deref(),
            Some(r#"{"0":{"0":{"0":{"0":{"0":{"0":1}}}}}}"#)
        );
        // A pattern built from a deep value routes the same way as one received.
        let value: Value = serde_json::from_str(&nested(100)).unwrap();
        assert_eq!(route_of(&value), six_levels);
        // A string pattern whose text is malformed deep inside is no JSON: it routes as itself,
        // as `JSON.parse` throwing leaves it.
        let broken = format!("{}1}}{}", "[".repeat(50), "]".repeat(49));
        let as_string = RawJson::to_json(&broken).unwrap();
        assert_eq!(incoming_route(&as_string), Some(broken));
    }

    /// An object pattern with 200 000 keys (a 2.6 MB frame) routes as `[TOO_MANY_KEYS]`, as
    /// NestJS routes any object with more than 20, in linear time: looking for each key among
    /// those before it took 14 s for 40 000. An array with more than 20 items, the same.
    #[test]
    fn a_pattern_with_many_keys_routes_in_linear_time() {
        let count = 200_000;
        let keys: Vec<String> = (0..count).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let wide = RawJson::from_text(format!("{{{}}}", keys.join(","))).unwrap();
        let long = RawJson::from_text(format!(
            "[{}]",
            (0..count)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ))
        .unwrap();
        let started = std::time::Instant::now();
        assert_eq!(incoming_route(&wide).as_deref(), Some("[TOO_MANY_KEYS]"));
        assert_eq!(incoming_route(&long).as_deref(), Some("[TOO_MANY_KEYS]"));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        // Twenty keys, each repeated: twenty keys, the last values.
        let repeated: Vec<String> = (0..count)
            .map(|i| format!(r#""k{}":{i}"#, i % 20))
            .collect();
        let twenty = RawJson::from_text(format!("{{{}}}", repeated.join(","))).unwrap();
        let route = incoming_route(&twenty).unwrap();
        assert!(
            route.starts_with(r#"{"k0":199980,"k1":199981,"k10":199990"#),
            "{route}"
        );
        // Twenty items are not too many; twenty-one are.
        let items = |n: usize| {
            let items: Vec<String> = (0..n).map(|i| i.to_string()).collect();
            incoming_route(&RawJson::from_text(format!("[{}]", items.join(","))).unwrap())
        };
        assert!(items(20).unwrap().starts_with(r#"{"0":0,"1":1,"10":10"#));
        assert_eq!(items(21).as_deref(), Some("[TOO_MANY_KEYS]"));
        // Twenty-one keys are too many, inside another object as well.
        let keys: Vec<String> = (0..21).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let inner = RawJson::from_text(format!(r#"{{"a":{{{}}}}}"#, keys.join(","))).unwrap();
        assert_eq!(
            incoming_route(&inner).as_deref(),
            Some(r#"{"a":[TOO_MANY_KEYS]}"#)
        );
    }

    #[test]
    fn a_thread_reuses_the_patterns_it_made_last_from_strings() {
        let first = Pattern::from("orders.get");
        let again = Pattern::from("orders.get");
        assert_eq!(first, again);
        assert!(Arc::ptr_eq(&first.route, &again.route), "made twice");
        assert_eq!(again.raw().as_str(), r#""orders.get""#);
        // Another case is another pattern.
        assert!(!Arc::ptr_eq(
            &first.route,
            &Pattern::from("Orders.get").route
        ));
        // Strings up to RECENT_PATTERN_LEN bytes are kept, longer ones not.
        let longest = "x".repeat(RECENT_PATTERN_LEN);
        assert!(Arc::ptr_eq(
            &Pattern::from(longest.as_str()).route,
            &Pattern::from(longest.as_str()).route
        ));
        let long = "x".repeat(RECENT_PATTERN_LEN + 1);
        assert!(!Arc::ptr_eq(
            &Pattern::from(long.as_str()).route,
            &Pattern::from(long.as_str()).route
        ));
        // As many as RECENT_PATTERNS at once.
        let kept: Vec<Pattern> = (0..RECENT_PATTERNS)
            .map(|n| Pattern::from(format!("kept-{n}").as_str()))
            .collect();
        for (n, pattern) in kept.iter().enumerate() {
            let again = Pattern::from(format!("kept-{n}").as_str());
            assert!(
                Arc::ptr_eq(&pattern.route, &again.route),
                "kept-{n} made twice"
            );
        }
        // Only the last few are: after as many others, the first is made anew, equal.
        for n in 0..RECENT_PATTERNS {
            let _ = Pattern::from(format!("other-{n}").as_str());
        }
        let made_anew = Pattern::from("orders.get");
        assert_eq!(made_anew, first);
        assert!(
            !Arc::ptr_eq(&first.route, &made_anew.route),
            "kept beyond the last few"
        );
        // A pattern from another thread is made there.
        let elsewhere = std::thread::spawn(|| Pattern::from("orders.get"))
            .join()
            .unwrap();
        assert!(!Arc::ptr_eq(&made_anew.route, &elsewhere.route));
        assert_eq!(elsewhere, made_anew);
    }

    #[test]
    fn routes_match_the_verified_nestjs_examples() {
        let cases = [
            (json!({"cmd": "sum"}), r#"{"cmd":"sum"}"#),
            (
                json!({"role": "math", "cmd": "sum"}),
                r#"{"cmd":"sum","role":"math"}"#,
            ),
            (
                json!({"b": 1, "a": true, "c": null}),
                r#"{"a":true,"b":1,"c":null}"#,
            ),
            (
                json!({"cmd": "x", "nested": {"z": 1, "y": "w"}}),
                r#"{"cmd":"x","nested":{"y":"w","z":1}}"#,
            ),
            (json!({"arr": ["a", 2]}), r#"{"arr":{"0":"a","1":2}}"#),
            (json!({"q": "say \"hi\""}), r#"{"q":"say \"hi\""}"#),
        ];
        for (pattern, route) in cases {
            assert_eq!(route_of(&pattern), route, "{pattern}");
        }
    }

    #[test]
    fn keys_sort_like_node() {
        // Verified with Node 20's localeCompare.
        let mut keys = vec![
            "x_", "role", "f", "é", "e", "Cmd", "cmd", "B", "b", "ab", "a-b", "a_b", "A", "a", "2",
            "10", "1", "_x",
        ];
        keys.sort_by(|a, b| locale_compare(a, b));
        assert_eq!(
            keys,
            [
                "_x", "1", "10", "2", "a", "A", "a_b", "a-b", "ab", "b", "B", "cmd", "Cmd", "e",
                "f", "role", "x_", "é"
            ]
        );
        // é is the one non-ASCII key: ICU puts it between e and f; palisade after all ASCII.
        let mut keys = vec![
            "ab", "aB", "Ab", "AB", "a1", "a10", "a2", "cMd", "CMD", "Cmd", "cmd",
        ];
        keys.sort_by(|a, b| locale_compare(a, b));
        assert_eq!(
            keys,
            [
                "a1", "a10", "a2", "ab", "aB", "Ab", "AB", "cmd", "cMd", "Cmd", "CMD"
            ]
        );
    }

    #[test]
    fn keys_beyond_ascii_sort_without_panicking_and_stably() {
        // Greek, Cyrillic, CJK and an emoji (code points far above U+03E8): ordered after every
        // ASCII key, among themselves by code point, and the same way every time.
        let mut keys = vec!["日本", "ж", "a", "😀", "Ω", "z", "é"];
        keys.sort_by(|a, b| locale_compare(a, b));
        assert_eq!(keys, ["a", "z", "é", "Ω", "ж", "日本", "😀"]);
        let route = route_of(&json!({"日本": 1, "ж": 2, "a": 3}));
        assert_eq!(route, r#"{"a":3,"ж":2,"日本":1}"#);
    }

    #[test]
    fn string_patterns_say_so() {
        assert!(Pattern::from("get-user").is_string());
        assert!(Pattern::from("42").is_string());
        assert!(!Pattern::from(json!({"cmd": "sum"})).is_string());
        assert!(!Pattern::from(json!(42)).is_string());
        assert!(!Pattern::from(json!(true)).is_string());
    }

    #[test]
    fn limits() {
        let deep = json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}});
        assert_eq!(
            route_of(&deep),
            r#"{"a":{"b":{"c":{"d":{"e":{"f":[MAX_DEPTH_REACHED]}}}}}}"#
        );
        let wide: serde_json::Map<String, Value> =
            (0..21).map(|i| (format!("k{i:02}"), json!(i))).collect();
        assert_eq!(route_of(&Value::Object(wide)), "[TOO_MANY_KEYS]");
    }

    /// Numbers too large for a double, as a NestJS server routes them (the expected routes are
    /// what `@nestjs/microservices` computed): inside a string pattern they are `Infinity`; a
    /// pattern that is not a string goes through `JSON.stringify` first, which makes them `null`.
    #[test]
    fn numbers_beyond_a_double_route_like_a_nest_server() {
        let route = |raw: &str| incoming_route(&RawJson::from_text(raw.to_owned()).unwrap());
        assert_eq!(route(r#""1e400""#).as_deref(), Some("Infinity"));
        assert_eq!(route(r#""-1e400""#).as_deref(), Some("-Infinity"));
        assert_eq!(
            route(r#""{\"a\":1e400}""#).as_deref(),
            Some(r#"{"a":Infinity}"#)
        );
        assert_eq!(route("1e400"), None);
        assert_eq!(route("-1e400"), None);
        assert_eq!(
            route(r#"{"a":[1e400,-1e400],"b":"1e400"}"#).as_deref(),
            Some(r#"{"a":{"0":null,"1":null},"b":"1e400"}"#)
        );
    }

    /// Keys the collation ranks equal (they differ by an ignorable control character) keep
    /// JavaScript's `Object.keys` order: array indices (up to 2^32 - 2) first, then the rest as
    /// read. The expected routes are what `@nestjs/microservices` computed for these patterns.
    #[test]
    fn keys_ranked_equal_keep_javascripts_key_order() {
        let route = |raw: &str| incoming_route(&RawJson::from_text(raw.to_owned()).unwrap());
        let cases = [
            (r#"{"\u00011":1,"1":2}"#, "{\"1\":2,\"\u{1}1\":1}"),
            (r#"{"\u000101":1,"01":2}"#, "{\"\u{1}01\":1,\"01\":2}"),
            (
                r#"{"\u00014294967295":1,"4294967295":2}"#,
                "{\"\u{1}4294967295\":1,\"4294967295\":2}",
            ),
            (
                r#"{"\u00014294967294":1,"4294967294":2}"#,
                "{\"4294967294\":2,\"\u{1}4294967294\":1}",
            ),
        ];
        for (raw, expected) in cases {
            assert_eq!(route(raw).as_deref(), Some(expected), "{raw}");
        }
    }

    #[test]
    fn debug_and_display_show_the_route() {
        let object = Pattern::from(json!({"role": "math", "cmd": "sum"}));
        assert_eq!(
            format!("{object:?}"),
            r#"Pattern({"cmd":"sum","role":"math"})"#
        );
        assert_eq!(object.to_string(), r#"{"cmd":"sum","role":"math"}"#);
        assert_eq!(
            format!("{:?}", Pattern::from("get-user")),
            "Pattern(get-user)"
        );
    }

    #[test]
    fn incoming_patterns_route_like_a_nest_server() {
        let route = |raw: &str| incoming_route(&RawJson::from_text(raw.to_owned()).unwrap());
        assert_eq!(route(r#""get-user""#).as_deref(), Some("get-user"));
        assert_eq!(
            route(r#"{"role":"math","cmd":"sum"}"#).as_deref(),
            Some(r#"{"cmd":"sum","role":"math"}"#)
        );
        assert_eq!(
            route(r#""{\"role\":\"math\",\"cmd\":\"sum\"}""#).as_deref(),
            Some(r#"{"cmd":"sum","role":"math"}"#)
        );
        assert_eq!(route("42").as_deref(), Some("42"));
        assert_eq!(route(r#""42""#).as_deref(), Some("42"));
        assert_eq!(route("true"), None);
        assert_eq!(route(r#""null""#), None);
    }

    #[test]
    fn numbers_print_like_javascript() {
        let cases = [
            (0.0, "0"),
            (-0.0, "0"),
            (1.0, "1"),
            (42.0, "42"),
            (-7.0, "-7"),
            (1.5, "1.5"),
            (0.1, "0.1"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (123456789012.0, "123456789012"),
            (0.000001, "0.000001"),
            (0.0000001, "1e-7"),
            (1.5e-7, "1.5e-7"),
            (2.5e25, "2.5e+25"),
            (12345678901234567890.0, "12345678901234567000"),
        ];
        for (x, expected) in cases {
            assert_eq!(js_number(x), expected, "{x:e}");
        }
    }
}
