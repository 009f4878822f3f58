//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the router
//! and the types its handlers take and answer.
//!
//! It is built with aide (0.16, the release line on schemars 1) rather than
//! utoipa: the domain and wire types already derive schemars' `JsonSchema`,
//! and aide documents an axum router from those same derives and from the
//! handlers' extractor types, while utoipa would need a second schema derive
//! (`ToSchema`) on every domain type, with every constraint written twice, and
//! a route list kept beside the router. With aide there is one schema per
//! type and one list of routes.
//!
//! What comes from where:
//! - paths and methods: each handler file's `endpoints`, which adds its
//!   routes with `api_route` (assembled in `api::endpoints`); a test holds
//!   the router and the document to the same operations;
//! - parameters and request bodies: the types of `ApiPath`, `ApiQuery` and
//!   `ApiJson`, whose schemas carry the limits validation enforces
//!   (`domain::limits`, `domain::schemas`);
//! - security, 401, 403 and 503: the auth extractor a handler takes
//!   (`ManagerOnly`, `Registrant`, `WorkerSelf`, `WorkerSelfOrManager`,
//!   `AnyCaller`);
//! - 400, 413 and 415: the path, query and body extractors;
//! - the operation's id, summary, success answers and the errors a handler
//!   raises itself (404, 409, 503 for placement): a `<handler>_docs`
//!   function right below each handler, naming the type it answers with,
//!   built with the helpers here (`respond`, `json_response`,
//!   `raises`, ...; Backend.AI's in [`backendai`]).
//!
//! Every error is RFC 9457 `application/problem+json` ([`Problem`]).

use std::sync::Arc;

use aide::axum::ApiRouter;
use aide::axum::routing::get_with;
use aide::generate::{GenContext, in_context};
use aide::openapi::{
    Header, HeaderStyle, MediaType, OpenApi, Operation, Parameter, ParameterData,
    ParameterSchemaOrContent, ReferenceOr, Response, SchemaObject, SecurityScheme, StatusCode,
};
use aide::operation::OperationOutput;
use aide::transform::{TransformOpenApi, TransformOperation};
use axum::response::IntoResponse;
use axum::{Extension, Json, Router};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema};
use serde_json::{Value, json};

use super::error::Problem;
use super::{ApiError, AppState};

pub mod backendai;
mod inputs;
#[cfg(test)]
mod tests;

/// Builds the router from `endpoints` and the document from what it recorded.
pub fn finish(endpoints: fn() -> ApiRouter<AppState>) -> (Router<AppState>, OpenApi) {
    // The operations are documented as the routes are added, with the
    // generator of the current thread's context: set it up first.
    in_context(|ctx| {
        ctx.schema = SchemaSettings::draft2020_12()
            .with(|s| {
                s.definitions_path = "#/components/schemas/".into();
                s.meta_schema = None;
            })
            .into_generator();
    });
    let mut api = OpenApi {
        openapi: "3.1.0".into(),
        ..OpenApi::default()
    };
    let router = endpoints().finish_api_with(&mut api, describe);
    prune(&mut api);
    (router, api)
}

/// Drops the schemas nothing refers to: the generator also records the
/// types that became parameters.
fn prune(api: &mut OpenApi) {
    let Some(components) = api.components.as_mut() else {
        return;
    };
    loop {
        let mut components_only = components.clone();
        components_only.schemas.clear();
        let mut text = serde_json::to_string(&api.paths).expect("paths serialise");
        text.push_str(&serde_json::to_string(&components_only).expect("components serialise"));
        text.push_str(&serde_json::to_string(&components.schemas).expect("schemas serialise"));
        let before = components.schemas.len();
        let schemas = std::mem::take(&mut components.schemas);
        components.schemas = schemas
            .into_iter()
            .filter(|(name, _)| text.contains(&format!("\"#/components/schemas/{name}\"")))
            .collect();
        if components.schemas.len() == before {
            return;
        }
    }
}

/// The document's own description and its security schemes.
fn describe(api: TransformOpenApi<'_>) -> TransformOpenApi<'_> {
    let bearer = |description: &str| SecurityScheme::Http {
        scheme: "bearer".into(),
        bearer_format: None,
        description: Some(description.into()),
        extensions: Default::default(),
    };
    api.title("appproxy-coordinator")
        .version(env!("CARGO_PKG_VERSION"))
        .description(
            "Control plane of the application proxy: workers register and stream their \
             routes; managers create, look up and remove routes. Every error is RFC 9457 \
             application/problem+json with a stable `type` \
             (https://appproxy.backend.ai/problems/<slug>).",
        )
        .security_scheme(
            MANAGER,
            bearer("The manager token: routes, sessions, workers"),
        )
        .security_scheme(
            BOOTSTRAP,
            bearer("The worker bootstrap token: registration only"),
        )
        .security_scheme(
            WORKER,
            bearer("A per-worker token from registration: that worker's own endpoints"),
        )
        .security_scheme(
            backendai::TOKEN,
            SecurityScheme::ApiKey {
                location: aide::openapi::ApiKeyLocation::Header,
                name: "X-BackendAI-Token".into(),
                description: Some(
                    "Backend.AI mode: the api_secret, raw or as `Bearer <secret>` or \
                     `BackendAI <secret>` (the Manager's and the workers' credential)"
                        .into(),
                ),
                extensions: Default::default(),
            },
        )
        .security_scheme(
            backendai::JWT,
            SecurityScheme::Http {
                scheme: "bearer".into(),
                bearer_format: Some("JWT".into()),
                description: Some(
                    "Backend.AI mode: an HS256 JWT signed with the api_secret \
                     (`exp` enforced when present)"
                        .into(),
                ),
                extensions: Default::default(),
            },
        )
}

/// The security schemes, one per kind of token.
const MANAGER: &str = "manager";
const BOOTSTRAP: &str = "workerBootstrap";
const WORKER: &str = "worker";

/// Adds `/openapi.json` to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router.api_route("/openapi.json", get_with(document, document_docs))
}

/// `GET /openapi.json`.
async fn document(Extension(doc): Extension<Arc<OpenApi>>) -> axum::response::Response {
    Json(doc).into_response()
}

fn document_docs(op: TransformOperation<'_>) -> TransformOperation<'_> {
    let op = op.id("openapi").summary("This document").tag("probes");
    respond(
        op,
        200,
        json_response::<serde_json::Value>("The OpenAPI 3.1 document"),
    )
}

// ---------------------------------------------------------------------------
// Problems

/// A problem answer with `description`.
fn problem(ctx: &mut GenContext, status: u16, description: &str) -> Response {
    let schema = ctx.schema.subschema_for::<Problem>();
    let mut response = Response {
        description: description.into(),
        ..Response::default()
    };
    response.content.insert(
        "application/problem+json".into(),
        MediaType {
            schema: Some(schema_object(schema)),
            ..MediaType::default()
        },
    );
    if status == 401 {
        response.headers.insert(
            "WWW-Authenticate".into(),
            ReferenceOr::Item(header(
                json!({"type": "string", "const": "Bearer"}),
                "The scheme to authenticate with",
            )),
        );
    }
    if status == 429 {
        response.headers.insert(
            "Retry-After".into(),
            ReferenceOr::Item(header(
                json!({"type": "integer", "minimum": 1}),
                "Seconds until this address may present credentials again",
            )),
        );
    }
    response
}

fn problems(ctx: &mut GenContext, list: &[(u16, &str)]) -> Vec<(Option<StatusCode>, Response)> {
    list.iter()
        .map(|&(status, description)| {
            (
                Some(StatusCode::Code(status)),
                problem(ctx, status, description),
            )
        })
        .collect()
}

const INVALID: &str = "invalid-request: a malformed path, query or body, or a value validation \
                       refuses; `field` names it";
const UNAUTHORIZED: &str = "unauthorized: no bearer token, or not a valid one";
const UNAVAILABLE: &str = "unavailable: the database does not answer; retry shortly";
const TOO_MANY: &str = "too-many-requests: too many refused credentials from this address; \
                        `Retry-After` says when to try again";

impl OperationOutput for ApiError {
    type Inner = Self;

    fn operation_response(ctx: &mut GenContext, _: &mut Operation) -> Option<Response> {
        Some(problem(ctx, 0, "A problem"))
    }
}

// ---------------------------------------------------------------------------
// Helpers for the operations' documentation (the handlers' `_docs`)

fn schema_object(schema: impl Into<Value>) -> SchemaObject {
    SchemaObject {
        json_schema: Schema::try_from(schema.into()).expect("a JSON Schema is an object"),
        example: None,
        external_docs: None,
    }
}

fn header(schema: Value, description: &str) -> Header {
    Header {
        description: Some(description.into()),
        style: HeaderStyle::Simple,
        required: true,
        deprecated: None,
        format: ParameterSchemaOrContent::Schema(schema_object(schema)),
        example: None,
        examples: Default::default(),
        extensions: Default::default(),
    }
}

/// Sets the answer for `status`, replacing any the extractors inferred.
pub(crate) fn respond(
    mut op: TransformOperation<'_>,
    status: u16,
    response: Response,
) -> TransformOperation<'_> {
    op.inner_mut()
        .responses
        .get_or_insert_with(Default::default)
        .responses
        .insert(StatusCode::Code(status), ReferenceOr::Item(response));
    op
}

/// A JSON answer of type `T`.
pub(crate) fn json_response<T: JsonSchema>(description: &str) -> Response {
    let schema = in_context(|ctx| ctx.schema.subschema_for::<T>());
    json_answer(schema, description)
}

/// An `application/json` answer with `schema`.
pub(crate) fn json_answer(schema: impl Into<Value>, description: &str) -> Response {
    let mut response = Response {
        description: description.into(),
        ..Response::default()
    };
    response.content.insert(
        "application/json".into(),
        MediaType {
            schema: Some(schema_object(schema)),
            ..MediaType::default()
        },
    );
    response
}

/// A JSON answer of type `T` with a `Location` header.
pub(crate) fn created<T: JsonSchema>(description: &str) -> Response {
    let mut response = json_response::<T>(description);
    response.headers.insert(
        "Location".into(),
        ReferenceOr::Item(header(
            json!({"type": "string"}),
            "The path of the created resource",
        )),
    );
    response
}

/// A plain or otherwise non-JSON answer.
pub(crate) fn text_response(media_type: &str, description: &str) -> Response {
    let mut response = Response {
        description: description.into(),
        ..Response::default()
    };
    response.content.insert(
        media_type.into(),
        MediaType {
            schema: Some(schema_object(json!({"type": "string"}))),
            ..MediaType::default()
        },
    );
    response
}

/// A problem answer the handler raises itself.
pub(crate) fn raises<'a>(
    op: TransformOperation<'a>,
    status: u16,
    description: &str,
) -> TransformOperation<'a> {
    let response = in_context(|ctx| problem(ctx, status, description));
    respond(op, status, response)
}

/// The answer of a watch: an event stream. The schema is that of one event
/// (the reading OpenAPI 3.1 tools give `text/event-stream`): its `event:`
/// name, its `id:` (the revision) and its `data:`, a JSON object of the
/// type that goes with the name.
pub(crate) fn event_stream(op: TransformOperation<'_>) -> TransformOperation<'_> {
    use crate::domain::events::{Bookmark, Delete, Snapshot, Upsert};
    let event = |name: &str, data: Schema| {
        json!({
            "type": "object",
            "properties": {
                "event": { "const": name },
                "id": { "type": "string", "pattern": "^[0-9]+$" },
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": data,
                },
            },
            "required": ["event", "id", "data"],
        })
    };
    let events = in_context(|ctx| {
        json!({
            "description": "One Server-Sent Event; idle streams also get keep-alive comments",
            "oneOf": [
                event("snapshot", ctx.schema.subschema_for::<Snapshot>()),
                event("upsert", ctx.schema.subschema_for::<Upsert>()),
                event("delete", ctx.schema.subschema_for::<Delete>()),
                event("bookmark", ctx.schema.subschema_for::<Bookmark>()),
            ],
        })
    });
    let mut response = Response {
        description: "The stream: a snapshot first when `since` is absent or no longer \
                      retained, then every change after it, with bookmarks"
            .into(),
        ..Response::default()
    };
    response.content.insert(
        "text/event-stream".into(),
        MediaType {
            schema: Some(schema_object(events)),
            ..MediaType::default()
        },
    );
    let mut op = respond(op, 200, response);
    op.inner_mut()
        .parameters
        .push(ReferenceOr::Item(Parameter::Header {
            parameter_data: ParameterData {
                name: "Last-Event-ID".into(),
                description: Some(
                    "Resume after this revision, as SSE clients resend it; `since` wins".into(),
                ),
                required: false,
                deprecated: None,
                format: ParameterSchemaOrContent::Schema(schema_object(
                    json!({"type": "integer", "format": "int64"}),
                )),
                example: None,
                examples: Default::default(),
                explode: None,
                extensions: Default::default(),
            },
            style: HeaderStyle::Simple,
        }));
    op
}

/// The document, as a router built from `endpoints` answers it.
#[cfg(test)]
pub(super) fn spec() -> Value {
    let (_, api) = finish(super::endpoints);
    serde_json::to_value(api).expect("the document serialises")
}
