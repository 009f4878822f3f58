//! The Backend.AI coordinator API, served beside ours on the same listener:
//! what the unmodified Backend.AI Manager (`/status`, `/v2`, `/health`) and
//! App Proxy workers (`/api`, `/v1`) call. Handlers are thin translations
//! onto the store; the shapes are in [`crate::backendai::circuit`].
//! Authentication and error bodies follow upstream ([`auth`], [`error`]);
//! bodies are read as upstream reads them ([`BaiJson`]).

pub mod auth;
pub mod endpoints;
pub mod error;
pub mod health;
pub mod manager;
pub mod proxy;
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
    workers::endpoints(manager::endpoints(router))
}

/// A request body as upstream reads it: JSON whatever the Content-Type
/// (YAML for `text/yaml`), unknown fields ignored. Malformed input is 400
/// `Malformed body`; a body that does not fit is 400 `Input validation
/// error` with the offending field in `data.errors[].loc`.
pub struct BaiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for BaiJson<T> {
    type Rejection = BaiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, BaiError> {
        let yaml = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/yaml"));
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|e| BaiError::invalid_params(format!("Malformed body: {e}")))?;
        let value: Value = if yaml {
            serde_saphyr::from_slice(&bytes)
                .map_err(|_| BaiError::invalid_params("Malformed body"))?
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|_| BaiError::invalid_params("Malformed body"))?
        };
        from_value(value).map(BaiJson)
    }
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
