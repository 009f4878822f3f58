//! The Backend.AI coordinator API, served beside ours on the same listener:
//! what the unmodified Backend.AI Manager (`/status`, `/v2`, `/health`) and
//! App Proxy workers (`/api`, `/v1`) call. Each file serves some paths
//! (routing, extracting the request, shaping the answer, documenting the
//! operation); what a call does is in [`crate::backendai`], in the file of
//! the same name (the replicas' in its `endpoints`), and the shapes are in
//! [`crate::backendai::circuit`] and [`crate::backendai::worker`]:
//!
//! - the Manager's: [`status`] (`/status`), [`endpoints`](mod@endpoints)
//!   (`/v2/endpoints`), [`replicas`] (`/v2/endpoints/bulk/routes`),
//!   [`proxy`] (`/v2/conf`, `/v2/proxy`), [`health`] (`/health`),
//!   [`health_detail`] (`/health/summary`, `/health/endpoints`,
//!   `/health/circuits`);
//! - the workers': [`workers`] (`/api/worker`, `/api/slots`, `/v1/api/worker`,
//!   `/v1/api/slots`), [`circuits`] (`/api/circuit`, `/v1/api/circuit`).
//!
//! Authentication and error bodies follow upstream ([`auth`], [`error`]);
//! bodies are read as upstream reads them ([`BaiJson`]).

pub mod auth;
pub mod circuits;
pub mod endpoints;
pub mod error;
pub mod health;
pub mod health_detail;
pub mod proxy;
pub mod replicas;
pub mod status;
pub mod workers;

use aide::axum::ApiRouter;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use error::BaiError;

use super::AppState;

/// Adds every Backend.AI endpoint to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    let router = status::endpoints(router);
    let router = endpoints::endpoints(router);
    let router = replicas::endpoints(router);
    let router = proxy::endpoints(router);
    let router = health::endpoints(router);
    let router = health_detail::endpoints(router);
    let router = workers::endpoints(router);
    circuits::endpoints(router)
}

/// `{"success": true}`.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct SuccessModel {
    pub success: bool,
}

/// The answer of a call that succeeded with nothing more to say.
pub const SUCCESS: SuccessModel = SuccessModel { success: true };

/// A request body as upstream reads it: JSON whatever the Content-Type
/// (YAML for `text/yaml`), unknown fields ignored. Malformed input is 400
/// `Malformed body`; a body that does not fit is 400 `Input validation
/// error` with the offending field in `data.errors[].loc`.
pub struct BaiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for BaiJson<T> {
    type Rejection = BaiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, BaiError> {
        let yaml = is_yaml(request.headers());
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|e| BaiError::invalid_params(format!("Malformed body: {e}")))?;
        let value = parse_body(bytes, yaml).await?;
        from_value(value).map(BaiJson)
    }
}

/// Whether a request's body is YAML (`Content-Type: text/yaml`), as upstream
/// decides it.
pub fn is_yaml(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/yaml"))
}

/// YAML is read within a budget no request body needs more than: a few
/// dozen anchors and aliases, shallow nesting, one document. A body built
/// to expand (an alias bomb) is refused before it grows.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 1,
            max_depth: 32,
            max_events: 50_000,
            max_nodes: 20_000,
            max_aliases: 64,
            max_anchors: 64,
            max_recorded_anchor_events: 10_000,
            max_recorded_anchor_bytes: 1 << 20,
            max_merge_keys: 64,
            max_total_scalar_bytes: 4 << 20,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 10_000,
            max_replay_stack_depth: 16,
            max_alias_expansions_per_anchor: 64,
        },
    }
}

/// A body as upstream reads it: JSON, or YAML when `yaml`. YAML is parsed
/// on a blocking thread, within [`yaml_options`]' budget.
pub async fn parse_body(bytes: Bytes, yaml: bool) -> Result<Value, BaiError> {
    let malformed = || BaiError::invalid_params("Malformed body");
    if !yaml {
        return serde_json::from_slice(&bytes).map_err(|_| malformed());
    }
    tokio::task::spawn_blocking(move || {
        serde_saphyr::from_slice_with_options::<Value>(&bytes, yaml_options())
    })
    .await
    .map_err(|_| BaiError::internal())?
    .map_err(|_| malformed())
}

/// Reads `value` as `T`, failing as upstream's validation does.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, BaiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let loc: Vec<Value> = e
            .path()
            .iter()
            .filter_map(|segment| match segment {
                serde_path_to_error::Segment::Seq { index } => Some(json!(index)),
                serde_path_to_error::Segment::Map { key } => Some(json!(key)),
                serde_path_to_error::Segment::Enum { variant } => Some(json!(variant)),
                serde_path_to_error::Segment::Unknown => None,
            })
            .collect();
        validation_error(loc, e.inner().to_string())
    })
}

/// 400 `Input validation error`, one entry in `data.errors`.
pub fn validation_error(loc: Vec<Value>, msg: impl Into<String>) -> BaiError {
    BaiError::invalid_params("Input validation error").with_data(json!({
        "errors": [{"type": "value_error", "loc": loc, "msg": msg.into()}]
    }))
}

/// Query parameters, failing as upstream's validation does.
pub struct BaiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for BaiQuery<T> {
    type Rejection = BaiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, BaiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(t)| BaiQuery(t))
            .map_err(|e| validation_error(vec![json!("query")], e.body_text()))
    }
}

/// Path parameters; a malformed one (say a UUID) is 400, not upstream's 500.
pub struct BaiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for BaiPath<T> {
    type Rejection = BaiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, BaiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(t)| BaiPath(t))
            .map_err(|e| validation_error(vec![json!("path")], e.body_text()))
    }
}
