//! Every error the API answers, as RFC 9457 `application/problem+json`.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::worker::RegistrationRefused;
use crate::domain::{PlacementError, Route};
use crate::store::StoreError;

/// Base of the stable `type` URIs.
pub const PROBLEM_BASE: &str = "https://appproxy.backend.ai/problems/";

/// A problem answer: status, a stable slug for `type`, and a detail.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub slug: &'static str,
    pub detail: String,
    pub field: Option<String>,
    pub existing: Option<Box<Route>>,
    /// Seconds for `Retry-After` (429 answers).
    pub retry_after: Option<u64>,
}

/// An RFC 9457 problem, as every error is answered.
#[derive(Serialize, schemars::JsonSchema)]
#[schemars(rename = "Problem")]
pub struct ProblemBody<'a> {
    /// `https://appproxy.backend.ai/problems/<slug>`; the slugs are stable.
    #[serde(rename = "type")]
    #[schemars(extend("format" = "uri"))]
    kind: String,
    title: &'static str,
    /// The HTTP status.
    status: u16,
    detail: &'a str,
    /// The offending input, for `invalid-request`.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    /// The route in the way, for `conflict`.
    #[serde(skip_serializing_if = "Option::is_none")]
    existing: Option<&'a Route>,
}

/// The schema of a problem answer.
pub type Problem = ProblemBody<'static>;

impl ApiError {
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            slug,
            detail: detail.into(),
            field: None,
            existing: None,
            retry_after: None,
        }
    }

    pub fn invalid(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid-request", detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", detail)
    }
    pub fn unavailable(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }
    /// 429: too many failed authentications from the caller's address.
    pub fn too_many_attempts(wait: std::time::Duration) -> ApiError {
        let seconds = super::limit::retry_after_seconds(wait);
        ApiError {
            retry_after: Some(seconds),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-requests",
                format!(
                    "too many failed authentication attempts from this address; retry in {seconds} s"
                ),
            )
        }
    }

    fn title(&self) -> &'static str {
        match self.slug {
            "invalid-request" => "Invalid request",
            "unauthorized" => "Missing or invalid credentials",
            "forbidden" => "Not allowed for this token",
            "not-found" => "Not found",
            "conflict" => "Conflict",
            "no-eligible-worker" => "No eligible worker",
            "payload-too-large" => "Payload too large",
            "unsupported-media-type" => "Unsupported media type",
            "method-not-allowed" => "Method not allowed",
            "too-many-requests" => "Too many failed authentication attempts",
            "unavailable" => "Service unavailable",
            _ => "Internal error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ProblemBody {
            kind: format!("{PROBLEM_BASE}{}", self.slug),
            title: self.title(),
            status: self.status.as_u16(),
            detail: &self.detail,
            field: self.field.as_deref(),
            existing: self.existing.as_deref(),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound => ApiError::not_found("no such resource"),
            StoreError::Conflict { message, existing } => ApiError {
                existing,
                ..ApiError::new(StatusCode::CONFLICT, "conflict", message)
            },
            StoreError::Placement(p @ PlacementError::PortTaken(_)) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", p.to_string())
            }
            // The id is well formed; the worker is not (or no longer) there.
            StoreError::Placement(p @ PlacementError::UnknownWorker(_)) => ApiError {
                field: Some("worker_id".into()),
                ..ApiError::not_found(format!("worker_id: {p}"))
            },
            StoreError::Placement(PlacementError::PinnedWorkerCannotServe(why)) => ApiError {
                field: Some("worker_id".into()),
                ..ApiError::invalid(format!("worker_id: {why}"))
            },
            StoreError::Placement(p @ PlacementError::NoEligibleWorker(_)) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-eligible-worker",
                p.to_string(),
            ),
            StoreError::Refused(r @ RegistrationRefused::OtherWorker(_)) => {
                ApiError::forbidden(r.to_string())
            }
            StoreError::Refused(
                r @ (RegistrationRefused::Live { .. } | RegistrationRefused::OtherKind { .. }),
            ) => ApiError::new(StatusCode::CONFLICT, "conflict", r.to_string()),
            // A well-formed revision that this coordinator has not issued
            // yet: the worker is ahead of the state, not malformed.
            StoreError::Invalid(v) if v.field == "acked_revision" => ApiError {
                field: Some(v.field.clone()),
                ..ApiError::new(StatusCode::CONFLICT, "conflict", v.to_string())
            },
            StoreError::Invalid(v) => ApiError {
                field: Some(v.field.clone()),
                ..ApiError::invalid(v.to_string())
            },
            e if e.is_unavailable() => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::unavailable("the database is unavailable; retry shortly")
            }
            e => {
                tracing::error!(error = %e, "store error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the coordinator log",
                )
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "the request body is larger than this coordinator accepts",
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send the body as Content-Type: application/json",
            ),
            _ => ApiError::invalid(r.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> ApiError {
        ApiError::invalid(r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::invalid(r.body_text())
    }
}
