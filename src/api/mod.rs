//! The REST API: routers, extractors, probes and metrics. Handlers are thin:
//! they authenticate, parse, call the store and shape the answer.

pub mod auth;
pub mod error;
pub mod openapi;
mod routes;
mod watch;
mod workers;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::clock::Clock;
use crate::hub::Hub;
use crate::secret::Tokens;
use crate::store::Store;
use crate::telemetry::{HttpLabels, HttpLatencyLabels, Metrics};
pub use error::ApiError;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub hub: Hub,
    pub tokens: Arc<Tokens>,
    pub metrics: Arc<Metrics>,
    /// Interval of keep-alive comments on idle streams.
    pub keep_alive: std::time::Duration,
    /// Routes moved per transaction when a worker is removed.
    pub batch_size: u32,
    /// The time handlers stamp on what they write.
    pub clock: Clock,
}

/// JSON body; malformed or unknown input becomes a problem answer.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Path parameters; a bad UUID becomes a problem answer.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// Query parameters; bad values become a problem answer.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// The whole API on one router.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .route("/workers/register", post(workers::register))
        .route("/workers", get(workers::list))
        .route("/workers/{id}", get(workers::get).delete(workers::delete))
        .route("/workers/{id}/heartbeat", post(workers::heartbeat))
        .route("/workers/{id}/watch", get(watch::worker))
        .route("/routes", get(routes::list).post(routes::create))
        .route("/routes/watch", get(watch::routes))
        .route(
            "/routes/{id}",
            get(routes::get)
                .put(routes::upsert)
                .patch(routes::patch)
                .delete(routes::delete),
        )
        .route(
            "/sessions/{session_id}",
            axum::routing::delete(routes::delete_session),
        )
        .route("/sessions/{session_id}/routes", get(routes::session_routes))
        .route("/lookup", get(routes::lookup))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see /openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this endpoint does not accept that method; see /openapi.json",
    )
}

/// Counts and times every request by route template.
async fn record(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method: method.clone(),
            path: path.clone(),
            status,
        })
        .inc();
    state
        .metrics
        .http_latency
        .get_or_create(&HttpLatencyLabels { method, path })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The process is up.
async fn livez() -> &'static str {
    "ok\n"
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

/// Serialises `value` as JSON with `status`.
fn json<T: serde::Serialize>(status: StatusCode, value: T) -> Response {
    (status, Json(value)).into_response()
}
