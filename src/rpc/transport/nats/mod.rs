//! NestJS's `Transport.NATS` over the official `async-nats` client (feature `nats`).
//!
//! A server subscribes once per pattern, on the pattern's NestJS route string (`get-user`,
//! `{"cmd":"sum"}`), optionally in a queue group so several instances share the load, and replies
//! to each request's reply subject with NestJS's packets — a streamed reply as several messages.
//! A client publishes requests with a reply subject on its own multiplexed inbox and events by
//! plain publish. NestJS services on the same broker can call palisade services and be called by
//! them.
//!
//! ```no_run
//! use palisade::rpc::transport::nats::{NatsOptions, NatsServer};
//! use palisade::rpc::{Client, Router, Server};
//!
//! # #[tokio::main] async fn main() -> Result<(), palisade::rpc::RpcError> {
//! let options = NatsOptions::new(["nats://127.0.0.1:4222"]).name("user-service");
//! let server = Server::new(Router::new().message("ping", || async { "pong" }))
//!     .serve(NatsServer::new(options.clone()).queue("user-service")) // instances share requests
//!     .await?;
//!
//! let client = Client::builder().connect(options).await?;
//! let pong: String = client.send("ping", &()).await?;
//! server.shutdown().await;
//! # let _ = pong; Ok(()) }
//! ```
//!
//! # Beyond NestJS
//!
//! - Your headers and a W3C `traceparent` travel as NATS headers; handlers read them with the
//!   [`Headers`] extractor, NestJS handlers with `NatsContext.getHeaders()`.
//! - The deadline (`palisade-timeout-ms`) travels in the packet body's `headers` field, as on TCP,
//!   where a NestJS server ignores it: a message with NATS headers costs the client, the broker
//!   and the server more than one without (HPUB instead of PUB, a header map built and parsed on
//!   both ends). [`NatsOptions::deadline_header`] sends it as a NATS header instead. A palisade
//!   server reads it from either place.
//! - When the connection to the broker is lost, requests in flight fail at once with
//!   `Unavailable`, and new ones fail fast until the client has reconnected — it reconnects and
//!   re-subscribes by itself, as does a server.
//! - [Durable events](DurableEvents): an opt-in JetStream mode with at-least-once delivery,
//!   redelivery with backoff when a handler fails, and a dead-letter subject.

mod client;
mod durable;
mod server;

pub use self::client::{NatsConnection, NatsTransport};
pub use self::durable::{
    DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON, DEAD_LETTER_SUBJECT, DurableEvents, Retention,
    Storage,
};
pub use self::server::NatsServer;

use crate::rpc::wire::{Codec, SharedCodec};
use crate::rpc::{Code, Headers, RpcError};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone)]
enum Auth {
    None,
    Token(String),
    UserPassword(String, String),
    NKey(String),
    CredentialsFile(PathBuf),
}

/// How to reach and log into NATS: server URLs, credentials, TLS, a connection name. Shared by
/// [`NatsServer`] and [`NatsTransport`]; a client can connect with the options alone:
///
/// ```no_run
/// use palisade::rpc::Client;
/// use palisade::rpc::transport::nats::NatsOptions;
///
/// # #[tokio::main] async fn main() -> Result<(), palisade::rpc::RpcError> {
/// let client = Client::builder()
///     .connect(
///         NatsOptions::new(["nats://nats-1:4222", "nats://nats-2:4222"])
///             .name("billing")
///             .user_and_password("billing", "s3cret")
///             .tls_root_certificates("/etc/nats/ca.pem"),
///     )
///     .await?;
/// # let _ = client; Ok(()) }
/// ```
///
/// # Defaults
///
/// | setting | default | change with |
/// |---|---|---|
/// | connection name | none | [`name`](Self::name) |
/// | authentication | none | [`token`](Self::token), [`user_and_password`](Self::user_and_password), [`nkey`](Self::nkey), [`credentials_file`](Self::credentials_file) |
/// | TLS required | no (yes once certificates are given) | [`tls_root_certificates`](Self::tls_root_certificates), [`tls_client_certificate`](Self::tls_client_certificate), [`require_tls`](Self::require_tls) |
/// | connection timeout | 5 s | [`connection_timeout`](Self::connection_timeout) |
/// | reconnect attempts | unlimited | [`max_reconnects`](Self::max_reconnects) |
/// | longest wait between reconnects | 4 s | [`max_reconnect_delay`](Self::max_reconnect_delay) |
/// | ping interval | 60 s | [`ping_interval`](Self::ping_interval) |
/// | server order | shuffled | [`retain_servers_order`](Self::retain_servers_order) |
/// | servers the cluster advertises | used | [`ignore_discovered_servers`](Self::ignore_discovered_servers) |
/// | the deadline travels | in the packet body | [`deadline_header`](Self::deadline_header) |
#[derive(Clone)]
pub struct NatsOptions {
    servers: Vec<String>,
    name: Option<String>,
    auth: Auth,
    root_certificates: Option<PathBuf>,
    client_certificate: Option<(PathBuf, PathBuf)>,
    require_tls: bool,
    connection_timeout: Duration,
    max_reconnects: Option<usize>,
    max_reconnect_delay: Duration,
    ping_interval: Duration,
    retain_servers_order: bool,
    ignore_discovered_servers: bool,
    codec: SharedCodec,
    deadline_header: bool,
}

impl NatsOptions {
    /// Options for the given server URLs (`nats://host:port`, `tls://host:port`).
    pub fn new<S: Into<String>>(servers: impl IntoIterator<Item = S>) -> Self {
        NatsOptions {
            servers: servers.into_iter().map(Into::into).collect(),
            name: None,
            auth: Auth::None,
            root_certificates: None,
            client_certificate: None,
            require_tls: false,
            connection_timeout: Duration::from_secs(5),
            max_reconnects: None,
            max_reconnect_delay: Duration::from_secs(4),
            ping_interval: Duration::from_secs(60),
            retain_servers_order: false,
            ignore_discovered_servers: false,
            codec: SharedCodec::default(),
            deadline_header: false,
        }
    }

    /// The connection name the broker shows for this client.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Authenticates with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.auth = Auth::Token(token.into());
        self
    }

    /// Authenticates with a user name and password.
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.auth = Auth::UserPassword(user.into(), password.into());
        self
    }

    /// Authenticates with an NKey seed.
    pub fn nkey(mut self, seed: impl Into<String>) -> Self {
        self.auth = Auth::NKey(seed.into());
        self
    }

    /// Authenticates with a `.creds` file (JWT and NKey seed).
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.auth = Auth::CredentialsFile(path.into());
        self
    }

    /// Trusts the CA certificates in this PEM file (and uses TLS).
    pub fn tls_root_certificates(mut self, path: impl Into<PathBuf>) -> Self {
        self.root_certificates = Some(path.into());
        self.require_tls = true;
        self
    }

    /// Presents this client certificate and key (PEM files).
    pub fn tls_client_certificate(
        mut self,
        certificate: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.client_certificate = Some((certificate.into(), key.into()));
        self.require_tls = true;
        self
    }

    /// Refuses to connect without TLS.
    pub fn require_tls(mut self, required: bool) -> Self {
        self.require_tls = required;
        self
    }

    /// How long connecting may take before it fails (default 5 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Gives up reconnecting after this many failed attempts in a row (default: never gives up).
    /// Once given up, every call fails with `Unavailable`.
    pub fn max_reconnects(mut self, attempts: impl Into<Option<usize>>) -> Self {
        self.max_reconnects = attempts.into();
        self
    }

    /// The longest wait between two reconnect attempts (default 4 s): attempts back off
    /// exponentially from 0 ms up to this.
    pub fn max_reconnect_delay(mut self, delay: Duration) -> Self {
        self.max_reconnect_delay = delay;
        self
    }

    /// How often the client pings its server (default 60 s). Two pings without an answer mark the
    /// connection dead: on a cluster, a lower value notices a node that vanished without closing
    /// its sockets (a network partition) sooner. A killed node is noticed at once either way.
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// Tries the servers in the order given instead of shuffling them (default: shuffled, so that
    /// instances spread over the cluster's nodes).
    pub fn retain_servers_order(mut self, retain: bool) -> Self {
        self.retain_servers_order = retain;
        self
    }

    /// Uses only the servers given here, not the other cluster nodes the servers advertise
    /// (default: the advertised nodes are used too, so a client given one URL fails over to the
    /// rest of the cluster).
    pub fn ignore_discovered_servers(mut self, ignore: bool) -> Self {
        self.ignore_discovered_servers = ignore;
        self
    }

    /// How message bodies are written and read: NestJS's JSON packets
    /// ([`JsonCodec`](crate::rpc::wire::JsonCodec), the default), or another [`Codec`] such as
    /// [`MessagePackCodec`](crate::rpc::wire::MessagePackCodec) (feature `msgpack`) where every
    /// client and server of these patterns is palisade with the same codec.
    pub fn codec(mut self, codec: impl Codec) -> Self {
        self.codec = SharedCodec::new(codec);
        self
    }

    /// Sends a request's deadline as the NATS header
    /// [`palisade-timeout-ms`](crate::rpc::TIMEOUT_HEADER), where NestJS handlers see it in
    /// `NatsContext.getHeaders()`, instead of in the packet body's `headers` field (the default),
    /// which only palisade reads. Every request then goes as HPUB with a header map, even when it
    /// has no headers of its own: in the `nats_cpu` example of the benches that cost 2–3 µs of CPU
    /// per request in the client and server processes together, and 1–2 µs in the broker. A palisade
    /// server reads the deadline from either place, so the two ends need not agree. Only clients
    /// send deadlines; a server ignores this setting.
    pub fn deadline_header(mut self, as_header: bool) -> Self {
        self.deadline_header = as_header;
        self
    }

    pub(crate) fn shared_codec(&self) -> &SharedCodec {
        &self.codec
    }

    /// The configured servers, for messages.
    fn servers_text(&self) -> String {
        self.servers.join(", ")
    }

    /// Connects; `on_event` sees connection events (disconnected, reconnected, ...).
    pub(crate) async fn connect(
        &self,
        on_event: impl Fn(async_nats::Event) + Send + Sync + 'static,
    ) -> Result<async_nats::Client, RpcError> {
        if self.servers.is_empty() {
            return Err(RpcError::invalid_argument("no NATS server URL given"));
        }
        let mut options = match &self.auth {
            Auth::None => async_nats::ConnectOptions::new(),
            Auth::Token(token) => async_nats::ConnectOptions::with_token(token.clone()),
            Auth::UserPassword(user, password) => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            Auth::NKey(seed) => async_nats::ConnectOptions::with_nkey(seed.clone()),
            Auth::CredentialsFile(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|error| {
                    RpcError::invalid_argument(format!(
                        "cannot read NATS credentials file {}: {error}",
                        path.display()
                    ))
                })?,
        };
        let max_delay = self.max_reconnect_delay;
        options = options
            // palisade checks every subject it publishes to itself, once, before it is used: a
            // pattern's route (`check_subject`, stricter than async-nats's check), the dead-letter
            // subjects and consumer names of durable events (before the server connects), its own
            // inbox; and a reply subject comes from the broker, which cannot deliver one with a
            // space in it. async-nats would scan each subject again at every publish.
            .skip_subject_validation(true)
            .connection_timeout(self.connection_timeout)
            .require_tls(self.require_tls)
            .max_reconnects(self.max_reconnects)
            .ping_interval(self.ping_interval)
            .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, max_delay))
            .event_callback(move |event| {
                on_event(event);
                async {}
            });
        if let Some(name) = &self.name {
            options = options.name(name);
        }
        if self.retain_servers_order {
            options = options.retain_servers_order();
        }
        if self.ignore_discovered_servers {
            options = options.ignore_discovered_servers();
        }
        if let Some(path) = &self.root_certificates {
            options = options.add_root_certificates(path.clone());
        }
        if let Some((certificate, key)) = &self.client_certificate {
            options = options.add_client_certificate(certificate.clone(), key.clone());
        }
        let servers: Vec<async_nats::ServerAddr> = self
            .servers
            .iter()
            .map(|url| {
                url.parse().map_err(|error| {
                    RpcError::invalid_argument(format!("invalid NATS server URL {url:?}: {error}"))
                })
            })
            .collect::<Result<_, _>>()?;
        options.connect(servers).await.map_err(|error| {
            use async_nats::ConnectErrorKind as Kind;
            let code = match error.kind() {
                Kind::Authentication | Kind::AuthorizationViolation => Code::Unauthenticated,
                Kind::ServerParse => Code::InvalidArgument,
                _ => Code::Unavailable,
            };
            RpcError::new(
                code,
                format!("cannot connect to NATS at {}: {error}", self.servers_text()),
            )
        })
    }
}

/// The wait before reconnect attempt `attempts` (1-based): none for the first, then 2, 4, 8 ms ...
/// up to `max`.
fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exponent = u32::try_from(attempts - 1).unwrap_or(u32::MAX).min(63);
    Duration::from_millis(1u64 << exponent).min(max)
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Credentials stay out of logs.
        f.debug_struct("NatsOptions")
            .field("servers", &self.servers)
            .field("name", &self.name)
            .field("require_tls", &self.require_tls)
            .field("max_reconnects", &self.max_reconnects)
            .field("max_reconnect_delay", &self.max_reconnect_delay)
            .field("ping_interval", &self.ping_interval)
            .field("deadline_header", &self.deadline_header)
            .finish_non_exhaustive()
    }
}

/// Whether `subject` can be published to: non-empty dot-separated tokens, no whitespace, no
/// wildcards.
pub(crate) fn check_subject(subject: &str, wildcards: bool) -> Result<(), RpcError> {
    let valid = match plain_subject(subject.as_bytes()) {
        Some(valid) if !wildcards => valid,
        _ => subject_is_valid(subject, wildcards),
    };
    if valid {
        Ok(())
    } else {
        Err(RpcError::invalid_argument(format!(
            "the pattern route {subject:?} is not a valid NATS subject (NATS subjects are dot-separated tokens without spaces{})",
            if wildcards { "" } else { " or wildcards" }
        )))
    }
}

/// Whether a subject is valid, with wildcard tokens (`*`, `>`) allowed or not.
fn subject_is_valid(subject: &str, wildcards: bool) -> bool {
    !subject.is_empty()
        && !subject.chars().any(char::is_whitespace)
        && subject.split('.').all(|token| {
            !token.is_empty()
                && (wildcards && (token == "*" || token == ">") || !token.contains(['*', '>']))
        })
}

/// [`subject_is_valid`] without wildcards, in one pass over the bytes, for the subject of every
/// message a client sends; `None` at a byte that is not ASCII (Unicode's spaces are left to the
/// general check).
fn plain_subject(subject: &[u8]) -> Option<bool> {
    let mut token = 0usize;
    for &byte in subject {
        match byte {
            b'.' if token == 0 => return Some(false),
            b'.' => token = 0,
            // ASCII's whitespace as `char::is_whitespace` has it, and the wildcards.
            b' ' | b'\t'..=b'\r' | b'*' | b'>' => return Some(false),
            0x80.. => return None,
            _ => token += 1,
        }
    }
    Some(token > 0)
}

/// The name of [`TIMEOUT_HEADER`](crate::rpc::TIMEOUT_HEADER) on NATS, built without an allocation.
const TIMEOUT_NAME: async_nats::HeaderName =
    async_nats::HeaderName::from_static(crate::rpc::TIMEOUT_HEADER);

/// The NATS headers of an outgoing message: its own headers, and with `deadline_header` the time
/// left before its deadline ([`RpcRequest::wire_headers`](crate::rpc::RpcRequest::wire_headers),
/// built straight into NATS's map). A deadline header the caller set by hand never travels when
/// the request has a deadline: the deadline's own value wins, wherever it goes. A header NATS
/// cannot carry — a name that is empty or holds a space, a control
/// or non-ASCII character or `:`, a value with a line break — is an `InvalidArgument` error that
/// names it, where async-nats would panic.
pub(crate) fn outgoing_headers(
    message: &crate::rpc::RpcRequest,
    deadline_header: bool,
) -> Result<Option<async_nats::HeaderMap>, RpcError> {
    let timeout = message.wire_timeout_millis();
    let own = message.headers();
    let replaced =
        |key: &str| timeout.is_some() && key.eq_ignore_ascii_case(crate::rpc::TIMEOUT_HEADER);
    let sent_timeout = timeout.filter(|_| deadline_header);
    if sent_timeout.is_none() && own.iter().all(|(key, _)| replaced(key)) {
        return Ok(None);
    }
    let mut map = async_nats::HeaderMap::new();
    for (key, value) in own.iter() {
        if replaced(key) {
            // The deadline's own value replaces it, as in `wire_headers`.
            continue;
        }
        let name = key
            .parse::<async_nats::HeaderName>()
            .ok()
            .filter(|_| !key.is_empty())
            .ok_or_else(|| {
                RpcError::invalid_argument(format!(
                    "the header name {key:?} cannot travel over NATS: it must be printable ASCII \
                     without spaces or ':'"
                ))
            })?;
        let value = value.parse::<async_nats::HeaderValue>().map_err(|_| {
            RpcError::invalid_argument(format!(
                "the value of header {key:?} cannot travel over NATS: it holds a line break"
            ))
        })?;
        map.insert(name, value);
    }
    if let Some(millis) = sent_timeout {
        map.insert(TIMEOUT_NAME, async_nats::HeaderValue::from(millis));
    }
    Ok(Some(map))
}

/// `text` as a NATS header value, which is one line: line breaks (a multi-line error message)
/// become spaces.
pub(crate) fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains(['\r', '\n']) {
        std::borrow::Cow::Owned(text.replace(['\r', '\n'], " "))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// NATS headers as palisade headers (the first value of each).
pub(crate) fn from_nats_headers(headers: Option<&async_nats::HeaderMap>) -> Headers {
    let Some(headers) = headers else {
        return Headers::new();
    };
    headers
        .iter()
        .filter_map(|(name, values)| {
            values.first().map(|value| {
                (
                    AsRef::<str>::as_ref(name).to_owned(),
                    value.as_str().to_owned(),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        for ok in [
            "get-user",
            "users.get",
            r#"{"cmd":"sum"}"#,
            r#"{"cmd":"sum","role":"math"}"#,
        ] {
            assert!(check_subject(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "users..get",
            ".users",
            "users.*",
            r#"{"q":"two words"}"#,
        ] {
            assert!(check_subject(bad, false).is_err(), "{bad}");
        }
        assert!(check_subject("users.*", true).is_ok());
        assert!(check_subject("users.>", true).is_ok());
        assert!(check_subject("caf\u{e9}.get", false).is_ok());
        assert!(check_subject("caf\u{e9}\u{a0}get", false).is_err());
    }

    proptest::proptest! {
        #[test]
        fn the_one_pass_check_agrees_with_the_general_one(subject in "[a.*> \t\u{b}\u{c}\r\n\u{1c}\u{e9}\u{a0}\u{2003}]{0,8}") {
            let general = subject_is_valid(&subject, false);
            match plain_subject(subject.as_bytes()) {
                Some(plain) => proptest::prop_assert_eq!(plain, general),
                None => proptest::prop_assert!(!subject.is_ascii()),
            }
            proptest::prop_assert_eq!(check_subject(&subject, false).is_ok(), general);
        }
    }

    #[test]
    fn debug_shows_the_settings_and_keeps_credentials_out() {
        let options = NatsOptions::new(["nats://127.0.0.1:4222"])
            .name("billing")
            .user_and_password("billing", "s3cret")
            .token("t0ken")
            .deadline_header(true);
        let text = format!("{options:?}");
        for shown in [
            "nats://127.0.0.1:4222",
            "billing",
            "deadline_header: true",
            "ping_interval: 60s",
        ] {
            assert!(text.contains(shown), "{shown} missing from {text}");
        }
        for hidden in ["s3cret", "t0ken"] {
            assert!(!text.contains(hidden), "{hidden} in {text}");
        }
    }

    #[test]
    fn reconnect_delays_double_up_to_the_maximum() {
        let max = Duration::from_millis(100);
        let delays: Vec<u64> = (1..=9)
            .map(|attempt| reconnect_delay(attempt, max).as_millis() as u64)
            .collect();
        assert_eq!(delays, [0, 2, 4, 8, 16, 32, 64, 100, 100]);
        assert_eq!(reconnect_delay(usize::MAX, max), max);
        assert_eq!(
            reconnect_delay(70, Duration::MAX),
            Duration::from_millis(1 << 63)
        );
    }
}
