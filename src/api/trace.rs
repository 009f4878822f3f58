//! Request ids and the span of every request.
//!
//! A request keeps the id its client sent in `X-Request-Id` (or, from
//! Backend.AI clients, `X-BackendAI-RequestID`) when that is a sane value: 1
//! to 128 visible ASCII characters. Otherwise it gets a new UUID. Either way
//! the answer carries it back in `X-Request-Id`, and the request runs in a
//! `request` span with `method`, `route` (the template, `/routes/{id}`),
//! `request_id`, then `status` and `latency_ms` once answered. Work it hands
//! to another task finds the id with [`crate::request_id::current`]. A W3C
//! `traceparent` header makes the request span a child of the caller's
//! trace ([`crate::trace_context`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;
use tracing::field::Empty;

/// The request id, asked for and answered.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// What Backend.AI clients send their request id as; taken as `X-Request-Id`
/// when that is absent.
pub const X_BACKENDAI_REQUEST_ID: HeaderName = HeaderName::from_static("x-backendai-requestid");

/// The W3C trace context a request may arrive with.
pub const TRACEPARENT: HeaderName = HeaderName::from_static(crate::trace_context::TRACEPARENT);

/// Longest request id taken from a client.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// `router` with request ids and a span per request (outside every layer
/// already on it).
pub fn traced<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router.layer(
        ServiceBuilder::new()
            .map_request(adopt_request_id)
            .layer(SetRequestIdLayer::new(X_REQUEST_ID, MakeRequestUuid))
            .layer(PropagateRequestIdLayer::new(X_REQUEST_ID))
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(request_span)
                    .on_request(())
                    .on_response(on_response)
                    // Failures are logged where they happen (`ApiError`).
                    .on_failure(()),
            )
            .layer(middleware::from_fn(in_request_scope)),
    )
}

/// Whether a client's request id can be used as it is: 1 to
/// [`MAX_REQUEST_ID_LEN`] visible ASCII characters (no spaces, no control
/// characters), so it is safe in a header, a log line and a span.
pub fn is_sane(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len()) && id.iter().all(|b| b.is_ascii_graphic())
}

/// Keeps a sane client id in `X-Request-Id` (taking `X-BackendAI-RequestID`
/// when that is the one sent) and drops any other, so a new one is made.
fn adopt_request_id(mut request: Request) -> Request {
    let headers = request.headers_mut();
    let adopted: Option<HeaderValue> = [X_REQUEST_ID, X_BACKENDAI_REQUEST_ID]
        .iter()
        .find_map(|name| headers.get(name).filter(|v| is_sane(v.as_bytes())).cloned());
    headers.remove(X_REQUEST_ID);
    if let Some(id) = adopted {
        headers.insert(X_REQUEST_ID, id);
    }
    request
}

fn request_span(request: &Request) -> Span {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let id = request
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let method = request.method().as_str();
    let span = tracing::info_span!(
        "request",
        method,
        route,
        request_id = id,
        status = Empty,
        latency_ms = Empty,
        "otel.name" = format!("{method} {route}"),
        "otel.kind" = "server",
    );
    // A trace the caller is part of (the Manager's, a worker's) is this
    // span's parent.
    crate::trace_context::adopt(&span, incoming_traceparent(request));
    span
}

fn incoming_traceparent(request: &Request) -> Option<&str> {
    request.headers().get(TRACEPARENT)?.to_str().ok()
}

fn on_response(response: &Response, latency: Duration, span: &Span) {
    span.record("status", response.status().as_u16());
    span.record("latency_ms", latency.as_micros() as f64 / 1000.0);
    tracing::debug!("request answered");
}

/// Runs the rest of the request where [`crate::request_id::current`]
/// answers its id and [`crate::trace_context::current`] its trace context.
async fn in_request_scope(request: Request, next: Next) -> Response {
    let id: Arc<str> = request
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .into();
    let incoming: Option<Arc<str>> = incoming_traceparent(&request)
        .filter(|t| crate::trace_context::parse(t).is_some())
        .map(Into::into);
    crate::request_id::scope(id, crate::trace_context::scope(incoming, next.run(request))).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_visible_ascii_ids_are_taken() {
        assert!(is_sane(b"abc-123"));
        assert!(is_sane(b"0197a3c2-6f1e-7d55-9a52-3c1e0f9b2d41"));
        assert!(is_sane(&[b'x'; MAX_REQUEST_ID_LEN]));
        assert!(!is_sane(&[b'x'; MAX_REQUEST_ID_LEN + 1]));
        assert!(!is_sane(b""));
        assert!(!is_sane(b"with space"));
        assert!(!is_sane(b"tab\there"));
        assert!(!is_sane("caf\u{e9}".as_bytes()));
    }

    #[test]
    fn a_sane_alias_is_taken_and_an_insane_id_dropped() {
        let request = |headers: &[(&HeaderName, &[u8])]| {
            let mut r = Request::new(axum::body::Body::empty());
            for (name, value) in headers {
                r.headers_mut()
                    .append(*name, HeaderValue::from_bytes(value).unwrap());
            }
            adopt_request_id(r)
        };
        let id = |r: &Request| r.headers().get(X_REQUEST_ID).cloned();
        let r = request(&[(&X_BACKENDAI_REQUEST_ID, b"bai-1")]);
        assert_eq!(id(&r).unwrap(), "bai-1");
        let r = request(&[(&X_REQUEST_ID, b"own"), (&X_BACKENDAI_REQUEST_ID, b"bai")]);
        assert_eq!(id(&r).unwrap(), "own");
        let r = request(&[
            (&X_REQUEST_ID, b"bad id"),
            (&X_BACKENDAI_REQUEST_ID, b"bai"),
        ]);
        assert_eq!(id(&r).unwrap(), "bai");
        let r = request(&[(&X_REQUEST_ID, b"bad id")]);
        assert_eq!(id(&r), None, "dropped, so a new one is made");
    }
}
