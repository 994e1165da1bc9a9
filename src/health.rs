//! Health checks, the way NestJS's `@nestjs/terminus` reports them: one [`Health`] built from
//! circuit breakers and checks of your own, answered as a message pattern, or as a tower service
//! behind an HTTP endpoint.
//!
//! A report has terminus's shape: `status` (`"ok"` or `"error"`), `info` (the checks that are
//! up), `error` (those that are down) and `details` (all of them):
//!
//! ```json
//! {"status":"error",
//!  "info":{"inventory":{"status":"up"}},
//!  "error":{"payments":{"status":"down","state":"open"}},
//!  "details":{"inventory":{"status":"up"},"payments":{"status":"down","state":"open"}}}
//! ```
//!
//! ```
//! use palisade::circuit_breaker::CircuitBreakerLayer;
//! use palisade::circuit_breaker::CircuitBreakerConfig;
//! use palisade::health::Health;
//! use palisade::rpc::Router;
//!
//! let payments = CircuitBreakerLayer::new(CircuitBreakerConfig::new("payments"));
//! let connected = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
//! let flag = connected.clone();
//! let health = Health::new()
//!     .breaker(payments.handle())
//!     .check("broker", move || {
//!         if flag.load(std::sync::atomic::Ordering::Relaxed) {
//!             Ok(())
//!         } else {
//!             Err("disconnected".to_owned())
//!         }
//!     });
//! assert!(health.report().is_up());
//!
//! // As a message pattern (a NestJS health-check client calls `health`)...
//! let router = Router::new().message("health", health.handler());
//! // ...or behind HTTP: `health.report()` gives the status code and the body.
//! let report = health.report();
//! assert_eq!(report.http_status(), 200);
//! # let _ = (router, report.to_json(), connected);
//! ```

use crate::circuit_breaker::{CircuitBreakerHandle, CircuitState};
use crate::rpc::{RawJson, RpcError};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;
use std::convert::Infallible;
use std::fmt;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

type CheckFn = dyn Fn() -> Result<(), String> + Send + Sync;

enum Check {
    Breaker(CircuitBreakerHandle),
    Custom(Arc<CheckFn>),
}

/// A set of health checks; clones share them. See the [module docs](self).
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<Vec<(String, Check)>>,
}

impl Health {
    /// No checks yet: up.
    pub fn new() -> Self {
        Health::default()
    }

    /// Down while the breaker is open or forced open (the dependency it guards is failing, or
    /// someone took it out); up when closed or half-open, and when open with its open period
    /// over (its next call is a trial; its state stays `"open"` until that call, and a readiness
    /// probe that keeps traffic away while it is down would otherwise keep it down for good).
    /// Named after the breaker.
    pub fn breaker(self, handle: CircuitBreakerHandle) -> Self {
        let name = handle.name().to_owned();
        self.with(name, Check::Breaker(handle))
    }

    /// A check of your own, run on every report: `Err` with the reason when down (a transport's
    /// connection state, a database ping you keep current, a queue backlog).
    pub fn check(
        self,
        name: impl Into<String>,
        check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.with(name.into(), Check::Custom(Arc::new(check)))
    }

    fn with(self, name: String, check: Check) -> Self {
        let mut checks: Vec<(String, Check)> = match Arc::try_unwrap(self.checks) {
            Ok(checks) => checks,
            Err(shared) => shared
                .iter()
                .map(|(name, check)| (name.clone(), check.clone_check()))
                .collect(),
        };
        checks.push((name, check));
        Health {
            checks: Arc::new(checks),
        }
    }

    /// Runs every check.
    pub fn report(&self) -> HealthReport {
        let checks: Vec<CheckResult> = self
            .checks
            .iter()
            .map(|(name, check)| {
                let (up, detail) = check.run();
                CheckResult {
                    name: name.clone(),
                    up,
                    detail,
                }
            })
            .collect();
        HealthReport {
            up: checks.iter().all(|check| check.up),
            checks,
        }
    }

    /// A message handler answering with the report, or — when a check is down — failing with
    /// `Unavailable` carrying the report as its `err` (as terminus answers HTTP 503 with it).
    ///
    /// The reply's `status` is `"ok"`; the error's `err` has `"status": "error"` and
    /// `"code": "UNAVAILABLE"` beside terminus's fields.
    pub fn handler(
        &self,
    ) -> impl Fn() -> Ready<Result<HealthReport, RpcError>> + Clone + Send + Sync + 'static {
        let health = self.clone();
        move || ready(health.report().into_reply())
    }
}

impl Check {
    fn run(&self) -> (bool, Detail) {
        match self {
            Check::Breaker(handle) => {
                let (state, trial_due) = handle.state_and_trial_due();
                // An open breaker whose open period is over lets the next call through as a
                // trial; it turns half-open only then. Reported down, it would stay down for good
                // behind a readiness probe that keeps traffic away while it is down.
                let up = match state {
                    CircuitState::ForcedOpen => false,
                    CircuitState::Open => trial_due,
                    _ => true,
                };
                (up, Detail::State(state.to_string()))
            }
            Check::Custom(check) => match check() {
                Ok(()) => (true, Detail::Plain),
                Err(reason) => (false, Detail::Message(reason)),
            },
        }
    }

    fn clone_check(&self) -> Check {
        match self {
            Check::Breaker(handle) => Check::Breaker(handle.clone()),
            Check::Custom(check) => Check::Custom(Arc::clone(check)),
        }
    }
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field(
                "checks",
                &self.checks.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The outcome of every check at one moment, in the order the checks were added; see the
/// [module docs](self) for its JSON. It serializes as terminus's body, keys in terminus's order
/// whatever `serde_json`'s map order (`Json(report)` in an axum handler).
#[derive(Clone, Debug, PartialEq)]
pub struct HealthReport {
    up: bool,
    checks: Vec<CheckResult>,
}

#[derive(Clone, Debug, PartialEq)]
struct CheckResult {
    name: String,
    up: bool,
    detail: Detail,
}

/// What a check reports beside its status.
#[derive(Clone, Debug, PartialEq)]
enum Detail {
    Plain,
    /// A breaker's state.
    State(String),
    /// Why a check of your own is down.
    Message(String),
}

/// `{"status":"up"|"down", "state"|"message": ..}`.
struct DetailJson<'a>(&'a CheckResult);

impl Serialize for DetailJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let check = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("status", if check.up { "up" } else { "down" })?;
        match &check.detail {
            Detail::Plain => {}
            Detail::State(state) => map.serialize_entry("state", state)?,
            Detail::Message(message) => map.serialize_entry("message", message)?,
        }
        map.end()
    }
}

/// The checks whose status is `up` (`Some(true)`), `down` (`Some(false)`), or all (`None`), by
/// name, in the order they were added.
struct Section<'a>(&'a [CheckResult], Option<bool>);

impl Serialize for Section<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for check in self
            .0
            .iter()
            .filter(|check| self.1.is_none_or(|up| check.up == up))
        {
            map.serialize_entry(&check.name, &DetailJson(check))?;
        }
        map.end()
    }
}

impl Serialize for HealthReport {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.serialize_with(serializer, None)
    }
}

impl HealthReport {
    /// Whether every check is up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The names of the checks that are down, in the order they were added.
    pub fn down(&self) -> impl Iterator<Item = &str> {
        self.checks
            .iter()
            .filter(|check| !check.up)
            .map(|check| check.name.as_str())
    }

    /// 200 when up, 503 when a check is down (terminus's codes).
    pub fn http_status(&self) -> u16 {
        if self.up { 200 } else { 503 }
    }

    /// Terminus's JSON: `status`, `info`, `error`, `details` (as a `Value`, its keys in
    /// `serde_json`'s map order; serialize the report itself for terminus's order).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Terminus's body, then `extra` entries (the error reply's `code` and `message`).
    fn serialize_with<S: Serializer>(
        &self,
        serializer: S,
        extra: Option<(&str, &str)>,
    ) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("status", if self.up { "ok" } else { "error" })?;
        map.serialize_entry("info", &Section(&self.checks, Some(true)))?;
        map.serialize_entry("error", &Section(&self.checks, Some(false)))?;
        map.serialize_entry("details", &Section(&self.checks, None))?;
        if let Some((code, message)) = extra {
            map.serialize_entry("code", code)?;
            map.serialize_entry("message", message)?;
        }
        map.end()
    }

    fn into_reply(self) -> Result<HealthReport, RpcError> {
        if self.up {
            return Ok(self);
        }
        let message = format!(
            "health check failed: {}",
            self.down().collect::<Vec<_>>().join(", ")
        );
        struct Failed<'a>(&'a HealthReport, &'a str);
        impl Serialize for Failed<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                self.0
                    .serialize_with(serializer, Some(("UNAVAILABLE", self.1)))
            }
        }
        let body = RawJson::to_json(&Failed(&self, &message)).unwrap_or_else(|_| RawJson::null());
        Err(RpcError::from_wire_json(&body))
    }
}

/// Health behind any tower stack (an HTTP route, say): every request gets the current report.
impl<R> tower_service::Service<R> for Health {
    type Response = HealthReport;
    type Error = Infallible;
    type Future = Ready<Result<HealthReport, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: R) -> Self::Future {
        ready(Ok(self.report()))
    }
}
