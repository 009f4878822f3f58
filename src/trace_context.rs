//! W3C trace context (`traceparent`) across the system: what a request or a
//! bus message arrived with, the parent of the spans that handle it, and
//! what the changes it made carry on to the events published for them.
//!
//! A leaf: it knows nothing of HTTP, the store or Backend.AI. Parsing and
//! formatting are OpenTelemetry's own propagator's.
//!
//! - An incoming `traceparent` (a request header, a bus message's metadata)
//!   becomes the parent of the span handling it ([`adopt`]) and, for
//!   requests, is kept with the task ([`scope`]).
//! - [`current`] answers the trace context to hand on from the calling task:
//!   its span's, when spans are exported (OTLP), so the next hop is our
//!   span's child; else the one the request arrived with, passed on as it
//!   came, so a Manager's trace still reaches the workers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header and metadata key.
pub const TRACEPARENT: &str = "traceparent";

tokio::task_local! {
    static INCOMING: Option<Arc<str>>;
}

/// One `traceparent` value, as a propagator reads it.
struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// The context a `traceparent` names, if it is a valid one (W3C version 00
/// form, non-zero ids).
pub fn parse(traceparent: &str) -> Option<Context> {
    if traceparent.len() > 128 {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&One(traceparent));
    cx.span().span_context().is_valid().then_some(cx)
}

/// The `traceparent` of `cx`'s span, if it has a valid one.
pub fn format(cx: &Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut out);
    out.remove(TRACEPARENT)
}

/// Makes the trace `traceparent` names the parent of `span`, which must not
/// have been entered yet. Answers the value when it was a valid one (a
/// malformed one is ignored: `span` starts a trace of its own).
pub fn adopt(span: &tracing::Span, traceparent: Option<&str>) -> Option<String> {
    let value = traceparent?;
    let cx = parse(value)?;
    // Without a span exporter there is no OpenTelemetry layer to tell; the
    // value is still passed on (see `current`).
    let _ = span.set_parent(cx);
    Some(value.to_owned())
}

/// Runs `f` in `span`, as the work of a message that arrived with
/// `traceparent`: the message's trace is the span's parent, and is handed on
/// by what `f` does ([`current`]).
pub async fn within<F: Future>(span: tracing::Span, traceparent: Option<&str>, f: F) -> F::Output {
    use tracing::Instrument;
    let incoming = adopt(&span, traceparent).map(Arc::from);
    scope(incoming, f).instrument(span).await
}

/// Runs `f` as the work of a request that arrived with `incoming` (a valid
/// `traceparent`, or none).
pub async fn scope<F: Future>(incoming: Option<Arc<str>>, f: F) -> F::Output {
    INCOMING.scope(incoming, f).await
}

/// The `traceparent` to hand on from here: the current span's when spans
/// are exported, else the one the request arrived with, else none.
pub fn current() -> Option<String> {
    format(&tracing::Span::current().context()).or_else(|| {
        INCOMING
            .try_with(|i| i.as_deref().map(str::to_owned))
            .ok()
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_w3c_traceparent_round_trips() {
        let cx = parse(VALID).expect("valid");
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(format(&cx).as_deref(), Some(VALID));
    }

    #[test]
    fn malformed_or_zero_ids_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01x",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?} was taken");
        }
        assert!(parse(&format!("{VALID}{}", "-x".repeat(80))).is_none());
    }

    #[tokio::test]
    async fn without_an_exporter_the_incoming_value_is_handed_on() {
        assert_eq!(current(), None);
        let handed = scope(Some(VALID.into()), async { current() }).await;
        assert_eq!(handed.as_deref(), Some(VALID));
        assert_eq!(scope(None, async { current() }).await, None);
    }
}
