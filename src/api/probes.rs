//! Probes: `/livez`, `/readyz` and `/metrics`, open to anyone.

use aide::axum::ApiRouter;
use aide::axum::routing::get_with;
use aide::transform::TransformOperation;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::openapi::{raises, respond, text_response};
use super::{ApiError, AppState};

/// Adds the probes to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route("/livez", get_with(livez, livez_docs))
        .api_route("/readyz", get_with(readyz, readyz_docs))
        .api_route("/metrics", get_with(metrics, metrics_docs))
}

/// The process is up.
async fn livez() -> &'static str {
    "ok\n"
}

fn livez_docs(op: TransformOperation<'_>) -> TransformOperation<'_> {
    let op = op.id("livez").summary("The process is alive").tag("probes");
    respond(op, 200, text_response("text/plain", "`ok`"))
}

/// The process can serve: the database answers.
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state
        .store
        .ping()
        .await
        .map_err(|e| ApiError::unavailable(format!("database not reachable: {e}")))?;
    Ok("ok\n")
}

fn readyz_docs(op: TransformOperation<'_>) -> TransformOperation<'_> {
    let op = op
        .id("readyz")
        .summary("The process can serve: the database answers")
        .tag("probes");
    let op = respond(op, 200, text_response("text/plain", "`ok`"));
    raises(op, 503, "unavailable: the database does not answer")
}

async fn metrics(State(state): State<AppState>) -> Response {
    match state.store.counts().await {
        Ok(counts) => state.metrics.observe_counts(&counts),
        Err(e) => tracing::warn!(error = %e, "cannot count routes and workers for /metrics"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

fn metrics_docs(op: TransformOperation<'_>) -> TransformOperation<'_> {
    let op = op.id("metrics").summary("Prometheus metrics").tag("probes");
    respond(
        op,
        200,
        text_response("application/openmetrics-text", "OpenMetrics text"),
    )
}
