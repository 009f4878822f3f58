//! Errors on the Backend.AI paths, in upstream's body shape:
//! `{"type", "title", "error_code", "msg"?, "data"?}` as `application/json`,
//! with the CORS headers upstream adds to every error. Where upstream
//! answers the invalid HTTP status `-1` (invalid session parameters, a bad
//! `existing_url`, a missing frontend configuration), this answers 400 (409
//! for a circuit in the wrong state).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::domain::PlacementError;
use crate::store::StoreError;

const PROBS: &str = "https://api.backend.ai/probs/";

/// An error answer on a Backend.AI path.
#[derive(Debug, Clone, PartialEq)]
pub struct BaiError {
    pub status: StatusCode,
    /// Suffix of the `type` URI.
    pub kind: &'static str,
    pub title: String,
    pub error_code: &'static str,
    pub msg: Option<String>,
    pub data: Option<Value>,
    /// Seconds for `Retry-After` (429 answers); 16 bits keep the error small.
    pub retry_after: Option<u16>,
}

impl BaiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        title: impl Into<String>,
        error_code: &'static str,
    ) -> BaiError {
        BaiError {
            status,
            kind,
            title: title.into(),
            error_code,
            msg: None,
            data: None,
            retry_after: None,
        }
    }

    pub fn with_msg(mut self, msg: impl Into<String>) -> BaiError {
        self.msg = Some(msg.into());
        self
    }

    pub fn with_data(mut self, data: Value) -> BaiError {
        self.data = Some(data);
        self
    }

    /// 401 `auth-failed` ("Unauthorized access" unless `msg` says otherwise).
    pub fn auth_failed(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::UNAUTHORIZED,
            "auth-failed",
            "Credential/signature mismatch.",
            "agent_auth_unauthorized",
        )
        .with_msg(msg)
    }

    /// 429 `too-many-requests`: too many failed authentications from the
    /// caller's address (upstream has no such limit).
    pub fn too_many_attempts(wait: std::time::Duration) -> BaiError {
        let seconds = crate::api::limit::retry_after_seconds(wait);
        BaiError {
            retry_after: Some(u16::try_from(seconds).unwrap_or(u16::MAX)),
            ..BaiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-requests",
                "Too many failed authentication attempts.",
                "agent_auth_rate-limited",
            )
            .with_msg(format!("Retry in {seconds} s"))
        }
    }

    /// 401 `invalid-credentials`.
    pub fn invalid_credentials(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid-credentials",
            "Authentication credentials not valid.",
            "agent_auth_unauthorized",
        )
        .with_msg(msg)
    }

    /// 400 `invalid-api-params`.
    pub fn invalid_params(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::BAD_REQUEST,
            "invalid-api-params",
            "Missing or invalid API parameters.",
            "agent_request_invalid-parameters",
        )
        .with_msg(msg)
    }

    /// 400 `generic-bad-request`.
    pub fn bad_request(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::BAD_REQUEST,
            "generic-bad-request",
            "Bad request.",
            "agent_request_bad-request",
        )
        .with_msg(msg)
    }

    /// 403 `generic-forbidden`.
    pub fn forbidden(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::FORBIDDEN,
            "generic-forbidden",
            "Forbidden operation.",
            "agent_access_forbidden",
        )
        .with_msg(msg)
    }

    /// 404 `object-not-found`, titled `E00002: No such <object>.`
    pub fn not_found(object: &str) -> BaiError {
        BaiError::new(
            StatusCode::NOT_FOUND,
            "object-not-found",
            format!("E00002: No such {object}."),
            "agent_read_not-found",
        )
    }

    /// 404 `url-not-found` (`data` = the path).
    pub fn url_not_found(path: &str) -> BaiError {
        BaiError::new(
            StatusCode::NOT_FOUND,
            "url-not-found",
            "Unknown URL path.",
            "agent_request_not-found",
        )
        .with_data(json!(path))
    }

    /// 404 on every Backend.AI path while Backend.AI mode is off.
    pub fn mode_off(path: &str) -> BaiError {
        BaiError::url_not_found(path).with_msg(
            "Backend.AI mode is off: set APPPROXY_BACKENDAI_API_SECRET to serve this path",
        )
    }

    /// 409 `appproxy/port-not-available`.
    pub fn port_not_available(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::CONFLICT,
            "appproxy/port-not-available",
            "Designated port already occupied.",
            "agent_setup_already-exists",
        )
        .with_msg(msg)
    }

    /// 500 `internal-server-error`; the detail goes to the log, not the answer.
    pub fn internal() -> BaiError {
        BaiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal-server-error",
            "Internal server error.",
            "agent_generic_internal-error",
        )
    }

    /// 503 `appproxy/worker-not-available`.
    pub fn worker_not_available(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "appproxy/worker-not-available",
            "Worker not available.",
            "agent_access_not-found",
        )
        .with_msg(msg)
    }

    /// 503 `service-unavailable`.
    pub fn service_unavailable(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service-unavailable",
            "Service unavailable.",
            "agent_generic_unavailable",
        )
        .with_msg(msg)
    }

    /// 503 `E10001`: the worker did not acknowledge a circuit in time.
    pub fn worker_not_responding(authority: &str) -> BaiError {
        BaiError::service_unavailable("E10001: Proxy worker not responding")
            .with_data(json!({ "worker": authority }))
    }

    /// Upstream's `InvalidSessionParameterError` (status -1 there; 400 here).
    pub fn invalid_session_parameter(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::BAD_REQUEST,
            "appproxy/invalid-session-parameter",
            "Invalid session parameter.",
            "kernel_access_invalid-parameters",
        )
        .with_msg(msg)
    }

    /// Upstream's `InvalidURLError` (status -1 there; 400 here).
    pub fn invalid_url(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::BAD_REQUEST,
            "appproxy/invalid-url",
            "Invalid URL.",
            "kernel_parsing_invalid-parameters",
        )
        .with_msg(msg)
    }

    /// Upstream's `InvalidCircuitConfigError` (status -1 there; 400 here).
    pub fn invalid_circuit_config(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::BAD_REQUEST,
            "appproxy/invalid-circuit-config",
            "Invalid circuit configuration.",
            "kernel_access_invalid-parameters",
        )
        .with_msg(msg)
    }

    /// Upstream's `InvalidCircuitStateError` (status -1 there; 409 here).
    pub fn invalid_circuit_state(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::CONFLICT,
            "appproxy/invalid-circuit-state",
            "Invalid circuit state.",
            "kernel_access_mismatch",
        )
        .with_msg(msg)
    }

    /// Upstream's `MissingFrontendConfigError` (status -1 there; 400 here).
    pub fn missing_frontend_config(msg: impl Into<String>) -> BaiError {
        BaiError::new(
            StatusCode::BAD_REQUEST,
            "appproxy/missing-frontend-config",
            "Frontend configuration is missing.",
            "kernel_setup_not-found",
        )
        .with_msg(msg)
    }

    /// The body, as upstream writes it.
    pub fn body(&self) -> Value {
        let mut body = json!({
            "type": format!("{PROBS}{}", self.kind),
            "title": self.title,
            "error_code": self.error_code,
        });
        if let Some(msg) = &self.msg {
            body["msg"] = json!(msg);
        }
        if let Some(data) = &self.data {
            body["data"] = data.clone();
        }
        body
    }
}

impl IntoResponse for BaiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("*"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<StoreError> for BaiError {
    fn from(e: StoreError) -> BaiError {
        match e {
            StoreError::NotFound => BaiError::not_found("circuit"),
            StoreError::Invalid(v) => BaiError::invalid_params("Input validation error").with_data(
                json!({"errors": [{"type": "value_error", "loc": [v.field], "msg": v.message}]}),
            ),
            StoreError::Conflict { message, .. } => BaiError::invalid_circuit_state(message),
            StoreError::Placement(p @ PlacementError::PortTaken(_)) => {
                BaiError::port_not_available(p.to_string())
            }
            StoreError::Placement(PlacementError::PinnedWorkerCannotServe(why)) => {
                BaiError::bad_request(why)
            }
            StoreError::Placement(p) => BaiError::worker_not_available(p.to_string()),
            StoreError::Refused(r) => BaiError::forbidden(r.to_string()),
            e if e.is_unavailable() => {
                tracing::warn!(error = %e, "database unavailable");
                BaiError::service_unavailable("database unavailable")
            }
            e => {
                tracing::error!(error = %e, "internal error on a Backend.AI path");
                BaiError::internal()
            }
        }
    }
}

impl From<crate::backendai::Error> for BaiError {
    /// A use case's error as upstream answers it.
    fn from(e: crate::backendai::Error) -> BaiError {
        use crate::backendai::Error as E;
        match e {
            E::Store(e) => e.into(),
            E::NotFound { object, detail } => {
                let error = BaiError::not_found(object);
                match detail {
                    Some(detail) => error.with_msg(detail),
                    None => error,
                }
            }
            E::Invalid { loc, msg } => {
                super::validation_error(loc.into_iter().map(Value::from).collect(), msg)
            }
            E::InvalidUrl(msg) => BaiError::invalid_url(msg),
            E::InvalidSessionParameter(msg) => BaiError::invalid_session_parameter(msg),
            E::InvalidCredentials(msg) => BaiError::invalid_credentials(msg),
            E::Forbidden(msg) => BaiError::forbidden(msg),
            E::PortNotAvailable(msg) => BaiError::port_not_available(msg),
            E::WorkerNotAvailable(msg) => BaiError::worker_not_available(msg),
            E::WorkerNotResponding { authority } => BaiError::worker_not_responding(&authority),
            E::MissingFrontendConfig(msg) => BaiError::missing_frontend_config(msg),
            E::Unavailable(msg) => BaiError::service_unavailable(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_upstreams_body_and_a_real_status() {
        let e = BaiError::worker_not_responding("worker-1");
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            e.body(),
            json!({
                "type": "https://api.backend.ai/probs/service-unavailable",
                "title": "Service unavailable.",
                "error_code": "agent_generic_unavailable",
                "msg": "E10001: Proxy worker not responding",
                "data": {"worker": "worker-1"}
            })
        );
        let e = BaiError::not_found("token");
        assert_eq!(e.body()["title"], "E00002: No such token.");
        assert!(e.body().get("msg").is_none());
        // Upstream answers these with the invalid status -1.
        assert_eq!(
            BaiError::invalid_session_parameter("Not meant for inference apps").status,
            StatusCode::BAD_REQUEST
        );
    }
}
