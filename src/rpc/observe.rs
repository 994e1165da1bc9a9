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
//!
//! On the server, a message to a route no handler is registered for is counted with
//! `rpc.method` `_OTHER`, as OpenTelemetry's conventions ask: callers naming ever new patterns
//! must not add a series each to a process that runs for months. A server whose service is not
//! a router counts every route as it is, unless the service
//! [declares its routes](crate::rpc::Server::with_routes).

use crate::rpc::{Kind, RpcError};
use metrics::{Key, Label, Level, Metadata, SharedString};
use std::sync::Arc;
use std::time::Duration;

/// Records one handled message; `method` is its route, `None` for one no handler is registered
/// for (`_OTHER`).
pub(crate) fn record(
    method: Option<&Arc<str>>,
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
    // Static strings and the route's shared bytes: no allocation but the key's label list.
    let method = method.map_or(SharedString::const_str("_OTHER"), |route| {
        SharedString::from(Arc::clone(route))
    });
    let labels = vec![
        Label::from_static_parts("rpc.system", "nestjs"),
        Label::new("rpc.method", method),
        Label::from_static_parts("rpc.transport", transport),
        Label::from_static_parts("rpc.message.kind", kind),
        Label::from_static_parts("rpc.response.status_code", status),
    ];
    emit(
        "rpc.server.call.duration",
        "rpc.server.requests",
        labels,
        took,
    );
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
    let labels = vec![
        Label::from_static_parts("rpc.system", "nestjs"),
        Label::new("rpc.method", SharedString::from(Arc::clone(route))),
        Label::from_static_parts("rpc.message.kind", kind),
        Label::from_static_parts("rpc.response.status_code", status),
    ];
    emit(
        "rpc.client.call.duration",
        "rpc.client.requests",
        labels,
        took,
    );
}

/// Records a call's duration and counts it, the two metrics sharing one label list.
fn emit(duration: &'static str, requests: &'static str, labels: Vec<Label>, took: Duration) {
    let counted = Key::from_parts(requests, labels.clone());
    let timed = Key::from_parts(duration, labels);
    metrics::with_recorder(|recorder| {
        recorder
            .register_histogram(&timed, &METADATA)
            .record(took.as_secs_f64());
        recorder.register_counter(&counted, &METADATA).increment(1);
    });
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));
