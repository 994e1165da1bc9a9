//! W3C trace context from and to OpenTelemetry (feature `opentelemetry`): the client's request
//! carries the current span's context, and the server's span continues the caller's trace.
//!
//! Written against the W3C format directly rather than through a global propagator, so that it
//! works whatever propagator the application installed (or none).

use super::Headers;
use super::request::TRACEPARENT_HEADER;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C `tracestate` header.
pub(crate) const TRACESTATE_HEADER: &str = "tracestate";

/// Puts `span`'s OpenTelemetry context into `headers`; false when the span has none (no
/// `tracing-opentelemetry` layer collects it), so that the caller can fall back.
pub(crate) fn inject(span: &tracing::Span, headers: &mut Headers) -> bool {
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    if !span_context.is_valid() {
        return false;
    }
    headers.insert(
        TRACEPARENT_HEADER,
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        ),
    );
    let state = span_context.trace_state().header();
    if !state.is_empty() {
        headers.insert(TRACESTATE_HEADER, state);
    }
    true
}

/// Makes the caller's context, from `headers`, the parent of `span`.
pub(crate) fn continue_trace(span: &tracing::Span, headers: &Headers) {
    let Some(remote) = headers.get(TRACEPARENT_HEADER).and_then(|value| {
        parse_traceparent(value, headers.get(TRACESTATE_HEADER).unwrap_or_default())
    }) else {
        return;
    };
    let parent = opentelemetry::Context::new().with_remote_span_context(remote);
    let _ = span.set_parent(parent);
}

/// A `traceparent` (version 00) as a remote span context; `None` when malformed.
fn parse_traceparent(value: &str, state: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Lowercase hex only (W3C's HEXDIGLC): a header that is not valid starts a new trace.
    let lower_hex = |field: &str| {
        field
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if version.len() != 2
        || version == "ff"
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
        || ![version, trace, span, flags].into_iter().all(lower_hex)
    {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags),
        true,
        state.parse::<TraceState>().unwrap_or_default(),
    );
    context.is_valid().then_some(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_as_w3c_says() {
        let context = parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "vendor=value",
        )
        .unwrap();
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled() && context.is_remote());
        assert_eq!(context.trace_state().header(), "vendor=value");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Uppercase hex, or a version that is not hex, is not a traceparent.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad, "").is_none(), "{bad:?}");
        }
    }
}
