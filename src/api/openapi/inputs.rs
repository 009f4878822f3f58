//! What the extractors add to an operation: parameters, bodies, security
//! schemes, and the problems they answer before the handler runs.

use aide::generate::GenContext;
use aide::openapi::{
    Operation, Parameter, ParameterData, ParameterSchemaOrContent, QueryStyle, ReferenceOr,
    Response, SecurityRequirement, StatusCode,
};
use aide::operation::OperationInput;
use axum::Json;
use schemars::JsonSchema;
use serde_json::Value;

use super::{
    BOOTSTRAP, INVALID, MANAGER, TOO_MANY, UNAUTHORIZED, UNAVAILABLE, WORKER, problems,
    schema_object,
};
use crate::api::auth::{AnyCaller, ManagerOnly, Registrant, WorkerSelf, WorkerSelfOrManager};
use crate::api::{ApiJson, ApiPath, ApiQuery, WorkerPath};

impl<T: JsonSchema> OperationInput for ApiJson<T> {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        Json::<T>::operation_input(ctx, operation);
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        problems(
            ctx,
            &[
                (400, INVALID),
                (
                    413,
                    "payload-too-large: the body is larger than this coordinator accepts",
                ),
                (
                    415,
                    "unsupported-media-type: send the body as application/json",
                ),
            ],
        )
    }
}

impl<T: JsonSchema> OperationInput for ApiPath<T> {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        path_parameters::<T>(ctx, operation);
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        problems(ctx, &[(400, INVALID)])
    }
}

/// Query parameters, one per field; a query type whose fields depend on each
/// other (its schema has `oneOf`) is one exploded `form` object instead, so
/// the document can say how.
impl<T: JsonSchema> OperationInput for ApiQuery<T> {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        let schema = ctx.schema.subschema_for::<T>();
        let resolved = ctx.resolve_schema(&schema).clone();
        if resolved.get("oneOf").is_none() {
            axum::extract::Query::<T>::operation_input(ctx, operation);
            return;
        }
        let mut object = resolved;
        if let Some(Value::Object(properties)) = object.get_mut("properties") {
            for property in properties.values_mut() {
                strip_null(property);
            }
        }
        operation
            .parameters
            .push(ReferenceOr::Item(Parameter::Query {
                parameter_data: ParameterData {
                    name: "query".into(),
                    description: object
                        .get("description")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    required: true,
                    deprecated: None,
                    format: ParameterSchemaOrContent::Schema(schema_object(object)),
                    example: None,
                    examples: Default::default(),
                    explode: Some(true),
                    extensions: Default::default(),
                },
                allow_reserved: false,
                style: QueryStyle::Form,
                allow_empty_value: None,
            }));
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        problems(ctx, &[(400, INVALID)])
    }
}

/// The path parameters of `T`'s fields, each once: the auth extractors that
/// read the worker's `{id}` declare it too.
pub(in crate::api::openapi) fn path_parameters<T: JsonSchema>(
    ctx: &mut GenContext,
    operation: &mut Operation,
) {
    let mut own = Operation::default();
    axum::extract::Path::<T>::operation_input(ctx, &mut own);
    for parameter in own.parameters {
        let name = |p: &ReferenceOr<Parameter>| match p {
            ReferenceOr::Item(p) => Some(p.parameter_data_ref().name.clone()),
            ReferenceOr::Reference { .. } => None,
        };
        if !operation
            .parameters
            .iter()
            .any(|p| name(p) == name(&parameter))
        {
            operation.parameters.push(parameter);
        }
    }
}

/// A query string has no `null`: an absent parameter is the `None`.
fn strip_null(schema: &mut Value) {
    if let Some(Value::Array(types)) = schema.get_mut("type") {
        types.retain(|t| t != "null");
        if let [only] = types.as_slice() {
            let only = only.clone();
            schema["type"] = only;
        }
    }
}

/// Adds the security requirements (any one of `schemes`) and the answers of
/// an auth extractor.
fn secured(operation: &mut Operation, schemes: &[&str]) {
    for scheme in schemes {
        let mut requirement = SecurityRequirement::default();
        requirement.insert((*scheme).into(), Vec::new());
        operation.security.push(requirement);
    }
}

fn auth_problems(ctx: &mut GenContext, forbidden: &str) -> Vec<(Option<StatusCode>, Response)> {
    problems(
        ctx,
        &[
            (401, UNAUTHORIZED),
            (403, forbidden),
            (429, TOO_MANY),
            (503, UNAVAILABLE),
        ],
    )
}

impl OperationInput for ManagerOnly {
    fn operation_input(_: &mut GenContext, operation: &mut Operation) {
        secured(operation, &[MANAGER]);
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        auth_problems(ctx, "forbidden: this endpoint needs the manager token")
    }
}

impl OperationInput for Registrant {
    fn operation_input(_: &mut GenContext, operation: &mut Operation) {
        secured(operation, &[BOOTSTRAP, WORKER]);
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        auth_problems(
            ctx,
            "forbidden: the manager token, or another worker's token (which registers no \
             other name)",
        )
    }
}

impl OperationInput for WorkerSelf {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        secured(operation, &[WORKER]);
        path_parameters::<WorkerPath>(ctx, operation);
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        auth_problems(
            ctx,
            "forbidden: this endpoint needs the token of the worker it names",
        )
    }
}

impl OperationInput for WorkerSelfOrManager {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        secured(operation, &[MANAGER, WORKER]);
        path_parameters::<WorkerPath>(ctx, operation);
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        auth_problems(
            ctx,
            "forbidden: this endpoint needs the manager token or the token of the worker it names",
        )
    }
}

/// Only `GET /lookup` takes any caller and decides itself: the manager, or
/// the worker it names.
impl OperationInput for AnyCaller {
    fn operation_input(_: &mut GenContext, operation: &mut Operation) {
        secured(operation, &[MANAGER, WORKER]);
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        auth_problems(
            ctx,
            "forbidden: this endpoint needs the manager token or the token of the worker it names",
        )
    }
}
