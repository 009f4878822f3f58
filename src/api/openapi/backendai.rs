//! What the Backend.AI extractors and errors add to an operation: the two
//! ways to present the api_secret, upstream's error body (as
//! `application/json`, not problem+json), and the bodies read as upstream
//! reads them; and the helpers the operations' documentation (each
//! Backend.AI handler's `_docs`, in `crate::api::backendai`) is built with.

use aide::generate::GenContext;
use aide::openapi::{Operation, Response, StatusCode};
use aide::operation::{OperationInput, OperationOutput};
use aide::transform::TransformOperation;
use axum::Json;
use schemars::JsonSchema;

use super::respond;
use crate::api::backendai::auth::{Authorized, ConfCaller, Mode};
use crate::api::backendai::circuits::{BulkDelete, BulkDeleteRequest};
use crate::api::backendai::{BaiError, BaiJson, BaiPath, BaiQuery};

/// The api_secret as `X-BackendAI-Token` (raw, `Bearer …` or `BackendAI …`).
pub const TOKEN: &str = "backendaiToken";
/// `Authorization: Bearer <JWT signed with the api_secret>`.
pub const JWT: &str = "backendaiJwt";

/// Upstream's error body.
#[derive(serde::Serialize, JsonSchema)]
#[schemars(rename = "BackendAiError")]
pub struct ErrorBody {
    /// `https://api.backend.ai/probs/<kind>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    /// `<domain>_<operation>_<detail>`.
    pub error_code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// An error answer in upstream's shape.
pub fn error(ctx: &mut GenContext, description: &str) -> Response {
    super::json_answer(ctx.schema.subschema_for::<ErrorBody>(), description)
}

fn errors(ctx: &mut GenContext, list: &[(u16, &str)]) -> Vec<(Option<StatusCode>, Response)> {
    list.iter()
        .map(|&(status, d)| (Some(StatusCode::Code(status)), error(ctx, d)))
        .collect()
}

/// A Backend.AI operation: its id and summary, under the `backendai` tag.
pub(crate) fn operation<'a>(
    op: TransformOperation<'a>,
    id: &str,
    summary: &str,
) -> TransformOperation<'a> {
    op.id(id).tag("backendai").summary(summary)
}

/// Declares an error `status` a Backend.AI handler raises itself.
pub fn raises<'a>(
    op: TransformOperation<'a>,
    status: u16,
    description: &str,
) -> TransformOperation<'a> {
    let response = aide::generate::in_context(|ctx| error(ctx, description));
    respond(op, status, response)
}

const MODE_OFF: &str = "url-not-found: Backend.AI mode is off (no api_secret configured)";
const TOO_MANY: &str = "too-many-requests: too many refused credentials from this address; \
                        `Retry-After` says when to try again";
const INVALID: &str = "invalid-api-params: `Malformed body` or `Input validation error` \
                       (`data.errors[].loc` names the field)";

impl OperationOutput for BaiError {
    type Inner = Self;

    fn operation_response(ctx: &mut GenContext, _: &mut Operation) -> Option<Response> {
        Some(error(ctx, "An error"))
    }
}

impl OperationInput for Mode {
    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        errors(ctx, &[(404, MODE_OFF)])
    }
}

impl OperationInput for ConfCaller {
    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        errors(
            ctx,
            &[
                (
                    401,
                    "auth-failed: not from an allowed network, and no exact api_secret in \
                     X-BackendAI-Token",
                ),
                (404, MODE_OFF),
                (429, TOO_MANY),
            ],
        )
    }
}

impl OperationInput for Authorized {
    fn operation_input(_: &mut GenContext, operation: &mut Operation) {
        for scheme in [TOKEN, JWT] {
            let mut requirement = aide::openapi::SecurityRequirement::default();
            requirement.insert(scheme.into(), Vec::new());
            operation.security.push(requirement);
        }
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        errors(
            ctx,
            &[
                (
                    401,
                    "auth-failed: no api_secret, a wrong one, or an unsupported scheme",
                ),
                (404, MODE_OFF),
                (429, TOO_MANY),
            ],
        )
    }
}

impl<T: JsonSchema> OperationInput for BaiJson<T> {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        Json::<T>::operation_input(ctx, operation);
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        errors(ctx, &[(400, INVALID)])
    }
}

impl<T: JsonSchema> OperationInput for BaiQuery<T> {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        axum::extract::Query::<T>::operation_input(ctx, operation);
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        errors(ctx, &[(400, INVALID)])
    }
}

impl<T: JsonSchema> OperationInput for BaiPath<T> {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        crate::api::openapi::inputs::path_parameters::<T>(ctx, operation);
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        errors(ctx, &[(400, INVALID)])
    }
}

impl OperationInput for BulkDeleteRequest {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        Json::<BulkDelete>::operation_input(ctx, operation);
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        errors(ctx, &[(400, INVALID)])
    }
}
