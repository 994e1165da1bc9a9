//! Metrics through the `metrics` facade (feature `metrics`), named after OpenTelemetry's semantic
//! conventions for RPC:
//!
//! | metric | kind | unit |
//! |---|---|---|
//! | `rpc.server.call.duration` | histogram | seconds (handler start to last reply) |
//! | `rpc.server.requests` | counter | messages |
//! | `rpc.client.call.duration` | histogram | seconds (call to response, or to the error) |
//! | `rpc.client.requests` | counter | messages |
//!
//! Labels: `rpc.system` (`nestjs`), `rpc.method` (the pattern's route), `rpc.message.kind`
//! (`request` or `event`), `rpc.response.status_code` (`OK`, or the error's
//! [`Code`](crate::rpc::Code) name), and on the server `rpc.transport` (the dispatcher's
//! transport name).

use crate::rpc::{Kind, RpcError};
use std::sync::Arc;
use std::time::Duration;

/// Records one handled message.
pub(crate) fn record(
    route: &Arc<str>,
    transport: &'static str,
    kind: Kind,
    outcome: &Result<(), RpcError>,
    took: Duration,
) {
    let status = match outcome {
        Ok(()) => "OK",
        Err(error) => error.code().as_str(),
    };
    let kind = match kind {
        Kind::Event => "event",
        _ => "request",
    };
    let labels = [
        ("rpc.system", "nestjs".to_owned()),
        ("rpc.method", route.to_string()),
        ("rpc.transport", transport.to_owned()),
        ("rpc.message.kind", kind.to_owned()),
        ("rpc.response.status_code", status.to_owned()),
    ];
    metrics::histogram!("rpc.server.call.duration", &labels).record(took.as_secs_f64());
    metrics::counter!("rpc.server.requests", &labels).increment(1);
}

/// Records one call a client made.
pub(crate) fn record_client(
    route: &Arc<str>,
    kind: Kind,
    outcome: Result<(), &RpcError>,
    took: Duration,
) {
    let status = match outcome {
        Ok(()) => "OK",
        Err(error) => error.code().as_str(),
    };
    let kind = match kind {
        Kind::Event => "event",
        _ => "request",
    };
    let labels = [
        ("rpc.system", "nestjs".to_owned()),
        ("rpc.method", route.to_string()),
        ("rpc.message.kind", kind.to_owned()),
        ("rpc.response.status_code", status.to_owned()),
    ];
    metrics::histogram!("rpc.client.call.duration", &labels).record(took.as_secs_f64());
    metrics::counter!("rpc.client.requests", &labels).increment(1);
}
