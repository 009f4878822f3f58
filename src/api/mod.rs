//! The REST API: routers, extractors, probes and metrics. Handlers are thin:
//! they authenticate, parse, call the store and shape the answer; each
//! handler file adds its routes (`endpoints`), each handler documented by a
//! `_docs` function next to it.

pub mod auth;
pub mod backendai;
mod body;
pub mod error;
pub mod limit;
pub mod openapi;
mod peers;
mod probes;
mod routes;
pub mod trace;
pub mod ui;
mod watch;
mod workers;

use std::sync::Arc;
use std::time::Instant;

use aide::axum::ApiRouter;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};

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
    /// Backend.AI mode, when on (`crate::backendai`).
    pub backendai: Option<Arc<crate::backendai::BackendAi>>,
    /// Failed authentications per client address ([`limit`]).
    pub auth_limit: Arc<limit::AuthLimiter>,
    /// The status page, when on ([`ui`]); its paths answer 404 otherwise.
    pub ui: Option<Arc<ui::Ui>>,
}

impl AppState {
    /// Counts a refused credential from `peer`; answers `refused`, or 429
    /// when the address has now failed too often.
    pub(crate) fn refused<E>(
        &self,
        api: &'static str,
        peer: Option<std::net::IpAddr>,
        refused: E,
        limited: impl FnOnce(std::time::Duration) -> E,
    ) -> E {
        let outcome = self.auth_limit.failed(peer);
        self.count_auth_failure(api, outcome.is_err());
        match outcome {
            Ok(()) => refused,
            Err(wait) => limited(wait),
        }
    }

    /// Whether a request from `peer` may have its credentials checked;
    /// `limited` makes the 429 answer for an address serving a penalty.
    pub(crate) fn admit<E>(
        &self,
        api: &'static str,
        peer: Option<std::net::IpAddr>,
        limited: impl FnOnce(std::time::Duration) -> E,
    ) -> Result<(), E> {
        self.auth_limit.admit(peer).map_err(|wait| {
            self.count_auth_failure(api, true);
            limited(wait)
        })
    }

    fn count_auth_failure(&self, api: &'static str, limited: bool) {
        self.metrics
            .auth_failures
            .get_or_create(&crate::telemetry::AuthFailureLabels {
                api,
                outcome: if limited { "limited" } else { "refused" },
            })
            .inc();
    }
}

/// The address a request came from (the TCP peer), when the server serves
/// with connect info.
pub fn peer(parts: &axum::http::request::Parts) -> Option<std::net::IpAddr> {
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip().to_canonical())
}

/// JSON body; malformed or unknown input becomes a problem answer. It is
/// read as its schema reads it (see `body`): `12.0` is the integer 12, and a
/// struct comes from an object only.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let Json(mut value) = Json::<serde_json::Value>::from_request(request, state).await?;
        body::integral_numbers(&mut value);
        serde_path_to_error::deserialize(body::Strict(value))
            .map(ApiJson)
            .map_err(|e| {
                ApiError::invalid(format!(
                    "Failed to deserialize the JSON body into the target type: {e}"
                ))
            })
    }
}

/// Path parameters; a bad UUID becomes a problem answer.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// Query parameters; bad values become a problem answer.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// `{id}` of a route.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct RoutePath {
    /// The route's id.
    pub id: uuid::Uuid,
}

/// `{id}` of a worker.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct WorkerPath {
    /// The worker's id.
    pub id: uuid::Uuid,
}

/// `{session_id}` of a session.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct SessionPath {
    /// The session's id.
    pub session_id: uuid::Uuid,
}

/// The whole API on one router, serving the document generated from it.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let (router, document) = openapi::finish(endpoints);
    let router = router
        .layer(Extension(Arc::new(document)))
        .merge(ui::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), record));
    trace::traced(router).with_state(state)
}

/// Every endpoint: each handler file adds its own routes, each route with
/// its handler and the documentation the handler's types do not carry (a
/// `_docs` function next to the handler). Only `api_route` may add one: a
/// test holds the router and the document to the same operations.
fn endpoints() -> ApiRouter<AppState> {
    let router = probes::endpoints(ApiRouter::new());
    let router = openapi::endpoints(router);
    let router = workers::endpoints(router);
    let router = watch::endpoints(router);
    let router = routes::endpoints(router);
    let router = peers::endpoints(router);
    backendai::endpoints(router)
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
    let method = method_label(request.method()).to_owned();
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

/// A request method as a metric label: the standard methods by name, any
/// other one as `other`, so a client inventing methods cannot add series.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Serialises `value` as JSON with `status`.
fn json<T: serde::Serialize>(status: StatusCode, value: T) -> Response {
    (status, Json(value)).into_response()
}
