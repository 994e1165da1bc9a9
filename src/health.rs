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
use crate::rpc::RpcError;
use serde_json::{Map, Value, json};
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
    /// someone took it out); up when closed or half-open. Named after the breaker.
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
        let mut report = HealthReport {
            up: true,
            info: Map::new(),
            error: Map::new(),
            details: Map::new(),
        };
        for (name, check) in self.checks.iter() {
            let (up, detail) = check.run();
            report.up &= up;
            if up {
                report.info.insert(name.clone(), detail.clone());
            } else {
                report.error.insert(name.clone(), detail.clone());
            }
            report.details.insert(name.clone(), detail);
        }
        report
    }

    /// A message handler answering with the report, or — when a check is down — failing with
    /// `Unavailable` carrying the report as its `err` (as terminus answers HTTP 503 with it).
    ///
    /// The reply's `status` is `"ok"`; the error's `err` has `"status": "error"` and
    /// `"code": "UNAVAILABLE"` beside terminus's fields.
    pub fn handler(
        &self,
    ) -> impl Fn() -> Ready<Result<Value, RpcError>> + Clone + Send + Sync + 'static {
        let health = self.clone();
        move || ready(health.report().into_reply())
    }
}

impl Check {
    fn run(&self) -> (bool, Value) {
        match self {
            Check::Breaker(handle) => {
                let state = handle.state();
                let up = !matches!(state, CircuitState::Open | CircuitState::ForcedOpen);
                let detail = json!({
                    "status": if up { "up" } else { "down" },
                    "state": state.to_string(),
                });
                (up, detail)
            }
            Check::Custom(check) => match check() {
                Ok(()) => (true, json!({"status": "up"})),
                Err(reason) => (false, json!({"status": "down", "message": reason})),
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

/// The outcome of every check at one moment; see the [module docs](self) for its JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthReport {
    up: bool,
    info: Map<String, Value>,
    error: Map<String, Value>,
    details: Map<String, Value>,
}

impl HealthReport {
    /// Whether every check is up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The names of the checks that are down.
    pub fn down(&self) -> impl Iterator<Item = &str> {
        self.error.keys().map(String::as_str)
    }

    /// 200 when up, 503 when a check is down (terminus's codes).
    pub fn http_status(&self) -> u16 {
        if self.up { 200 } else { 503 }
    }

    /// Terminus's JSON: `status`, `info`, `error`, `details`.
    pub fn to_json(&self) -> Value {
        json!({
            "status": if self.up { "ok" } else { "error" },
            "info": self.info,
            "error": self.error,
            "details": self.details,
        })
    }

    fn into_reply(self) -> Result<Value, RpcError> {
        let mut body = self.to_json();
        if self.up {
            return Ok(body);
        }
        let down: Vec<&str> = self.down().collect();
        body["code"] = json!("UNAVAILABLE");
        body["message"] = json!(format!("health check failed: {}", down.join(", ")));
        Err(RpcError::exception_object(body))
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
