//! `/v2/endpoints`: the Manager's inference endpoints (their replicas:
//! [`super::replicas`]). What each call does is
//! [`crate::backendai::endpoints`]; an endpoint's circuit is an inference
//! route, created, placed and logged like any other route.
//!
//! Where this differs from upstream 26.9.6:
//! - `POST /v2/endpoints/{id}` works (upstream always answers 500).
//! - Bulk create commits each endpoint on its own (upstream: one
//!   transaction for the list). A failing item still fails the call, in
//!   upstream's body, but the items before it stay created; the Manager
//!   retries the whole list and an endpoint that exists is answered as it
//!   is (same URL, nothing changed), so the retry converges.
//! - The wait for the worker's acknowledgement also covers an endpoint that
//!   exists but was never acknowledged (upstream answers it at once and
//!   never sends it again); the bus re-publishes it until it is.
//! - `existing_url` only re-uses a Ready worker: a URL whose worker is gone
//!   is placed anew, and the Manager stores the new URL it is answered.
//!   Without one, a wildcard worker names the endpoint's subdomain
//!   `<service>-<8 hex of the deployment id>` (upstream: the service name).
//! - Bad input (a non-UUID id, a bad `existing_url`, a port outside
//!   1..65535) is a 400 with upstream's body, never a 500 or status -1; a
//!   `kernel_port` out of range fails its own item only.
//! - Bulk delete deletes each endpoint on its own; unknown ids succeed.

use aide::axum::ApiRouter;
use aide::axum::routing::{post_with, put_with};
use aide::transform::TransformOperation;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::auth::Authorized;
use super::{BaiError, BaiJson, BaiPath};
use crate::api::AppState;
use crate::api::openapi::backendai::{operation, raises};
use crate::api::openapi::{json_response, respond};
use crate::backendai::endpoints::{self as inference, NewEndpoint};
use crate::domain::app_filter;

type Op<'a> = TransformOperation<'a>;

/// Adds the inference endpoints' endpoints (but their replicas',
/// `super::replicas`) to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route(
            "/v2/endpoints/bulk",
            post_with(bulk_create, bulk_create_docs).delete_with(bulk_delete, bulk_delete_docs),
        )
        .api_route(
            "/v2/endpoints/{endpoint_id}",
            post_with(create, create_docs).delete_with(delete, delete_docs),
        )
        .api_route(
            "/v2/endpoints/{endpoint_id}/health-check",
            put_with(health_check, health_check_docs),
        )
        .api_route(
            "/v2/endpoints/{endpoint_id}/token",
            post_with(token, token_docs),
        )
}

/// `tags.session` of a bulk item (upstream keeps them as strings and fails
/// later on a non-UUID; here they are read as UUIDs: a 400).
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct SessionTags {
    pub user_uuid: Uuid,
    #[serde(alias = "group_id")]
    pub project_id: Uuid,
    pub domain_name: String,
}

/// `tags.endpoint` of a bulk item.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct EndpointTags {
    pub id: Uuid,
    pub runtime_variant: String,
    /// A URL the endpoint had: the same worker and frontend keep it.
    #[serde(default)]
    pub existing_url: Option<String>,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct BulkTags {
    pub session: SessionTags,
    pub endpoint: EndpointTags,
}

/// One endpoint of `POST /v2/endpoints/bulk`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct CreateEndpointItem {
    #[serde(alias = "endpoint_id")]
    pub deployment_id: Uuid,
    #[serde(default)]
    pub version: Option<String>,
    pub service_name: String,
    pub tags: BulkTags,
    #[serde(default)]
    pub open_to_public: bool,
    /// The model health check; stored as sent.
    #[serde(default)]
    pub health_check: Option<Map<String, Value>>,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct BulkCreateRequest {
    pub endpoints: Vec<CreateEndpointItem>,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct CreatedEndpoint {
    pub deployment_id: Uuid,
    /// Where users reach the endpoint (trailing `/`).
    pub url: String,
    pub health_check_enabled: bool,
}

/// In request order.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct BulkCreateResponse {
    pub endpoints: Vec<CreatedEndpoint>,
}

/// A session as the Manager describes it (`/v2/conf` and the single
/// create).
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct SessionConfig {
    #[serde(default)]
    pub id: Option<Uuid>,
    pub user_uuid: Uuid,
    #[serde(alias = "group_id")]
    pub project_id: Uuid,
    #[serde(default)]
    pub access_key: Option<String>,
    pub domain_name: String,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct EndpointConfig {
    pub id: Uuid,
    #[serde(default)]
    pub runtime_variant: Option<String>,
    #[serde(default)]
    pub existing_url: Option<String>,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct EndpointConfigTags {
    pub session: SessionConfig,
    pub endpoint: EndpointConfig,
}

/// `POST /v2/endpoints/{endpoint_id}`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct CreateEndpointRequest {
    pub version: String,
    pub service_name: String,
    pub tags: EndpointConfigTags,
    #[serde(default)]
    pub open_to_public: bool,
    /// Accepted and ignored, as upstream does.
    #[serde(default)]
    pub port: Option<u16>,
    /// Accepted and ignored, as upstream does.
    #[serde(default)]
    pub subdomain: Option<String>,
    #[serde(default)]
    pub health_check: Option<Map<String, Value>>,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct CreateEndpointResponse {
    pub success: bool,
    /// Where users reach the endpoint (trailing `/`).
    pub endpoint: String,
    pub health_check_enabled: bool,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct EndpointPath {
    pub endpoint_id: Uuid,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct Success {
    pub success: bool,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct DeleteItem {
    #[serde(alias = "endpoint_id")]
    pub deployment_id: Uuid,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct BulkDeleteRequest {
    pub endpoints: Vec<DeleteItem>,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct ItemResult {
    pub deployment_id: Uuid,
    pub success: bool,
    pub error: Option<String>,
}

/// In request order.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct BulkResults {
    pub endpoints: Vec<ItemResult>,
}

/// `PUT /v2/endpoints/{endpoint_id}/health-check`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct HealthCheckRequest {
    /// `null` clears it.
    pub health_check: Option<Map<String, Value>>,
}

/// `POST /v2/endpoints/{endpoint_id}/token`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct TokenRequest {
    pub user_uuid: Uuid,
    /// Unix seconds or an ISO-8601 datetime.
    pub exp: Value,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct TokenResponse {
    pub token: String,
}

/// `POST /v2/endpoints/bulk`: creates (or finds) each endpoint's circuit,
/// waits for the workers to hold the new ones, answers their URLs.
async fn bulk_create(
    State(state): State<AppState>,
    Authorized(bai): Authorized,
    BaiJson(request): BaiJson<BulkCreateRequest>,
) -> Result<Json<BulkCreateResponse>, BaiError> {
    let mut answered = Vec::with_capacity(request.endpoints.len());
    let mut wanted = Vec::with_capacity(request.endpoints.len());
    for item in request.endpoints {
        answered.push((item.deployment_id, item.health_check.is_some()));
        let BulkTags { session, endpoint } = item.tags;
        wanted.push(NewEndpoint {
            deployment_id: item.deployment_id,
            service_name: item.service_name,
            user_id: session.user_uuid,
            runtime_variant: Some(endpoint.runtime_variant.clone()),
            existing_url: endpoint.existing_url,
            open_to_public: item.open_to_public,
            health_check: item.health_check,
            properties: app_filter::properties([
                ("session.user_uuid", Some(session.user_uuid.to_string())),
                ("session.project_id", Some(session.project_id.to_string())),
                ("session.domain_name", Some(session.domain_name)),
                ("endpoint.id", Some(endpoint.id.to_string())),
                ("endpoint.runtime_variant", Some(endpoint.runtime_variant)),
            ]),
        });
    }
    let urls = inference::create_many(&state.store, &state.clock, &bai, wanted).await?;
    let endpoints = answered
        .into_iter()
        .zip(urls)
        .map(
            |((deployment_id, health_check_enabled), url)| CreatedEndpoint {
                deployment_id,
                url,
                health_check_enabled,
            },
        )
        .collect();
    Ok(Json(BulkCreateResponse { endpoints }))
}

fn bulk_create_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiBulkCreateEndpoints",
        "Backend.AI: create (or find) inference endpoints, answering their URLs in request order",
    );
    let op = op.description(
        "An endpoint that already has a circuit is answered its URL and nothing changes \
         (the Manager's retries and re-syncs), but for one whose circuit sits on a `Lost` \
         worker (beyond upstream, which answers 503 until the worker returns): that circuit \
         moves at once to a `Ready` worker that serves the same URL where one can take it, \
         else to the worker a new circuit would get, and the answer is its URL there (a new \
         URL, which the Manager stores), once that worker holds it. Where no `Ready` worker \
         can take it, it stays and the answer is 503 `E10001`.",
    );
    let op = create_errors(op);
    respond(
        op,
        200,
        json_response::<BulkCreateResponse>(
            "The endpoints' URLs in request order; an existing endpoint keeps its URL unless \
             its worker is `Lost` and no other worker serves that URL",
        ),
    )
}

/// `POST /v2/endpoints/{endpoint_id}`: one endpoint, as in bulk.
async fn create(
    State(state): State<AppState>,
    Authorized(bai): Authorized,
    BaiPath(EndpointPath { endpoint_id }): BaiPath<EndpointPath>,
    BaiJson(request): BaiJson<CreateEndpointRequest>,
) -> Result<Json<CreateEndpointResponse>, BaiError> {
    let health_check_enabled = request.health_check.is_some();
    let EndpointConfigTags { session, endpoint } = request.tags;
    let wanted = NewEndpoint {
        deployment_id: endpoint_id,
        service_name: request.service_name,
        user_id: session.user_uuid,
        runtime_variant: endpoint.runtime_variant.clone(),
        existing_url: endpoint.existing_url,
        open_to_public: request.open_to_public,
        health_check: request.health_check,
        properties: app_filter::properties([
            ("session.id", session.id.map(|id| id.to_string())),
            ("session.user_uuid", Some(session.user_uuid.to_string())),
            ("session.project_id", Some(session.project_id.to_string())),
            ("session.access_key", session.access_key),
            ("session.domain_name", Some(session.domain_name)),
            ("endpoint.id", Some(endpoint.id.to_string())),
            ("endpoint.runtime_variant", endpoint.runtime_variant),
        ]),
    };
    let endpoint = inference::create_one(&state.store, &state.clock, &bai, wanted).await?;
    Ok(Json(CreateEndpointResponse {
        success: true,
        endpoint,
        health_check_enabled,
    }))
}

fn create_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiCreateEndpoint",
        "Backend.AI: create (or find) one inference endpoint",
    );
    let op = create_errors(op);
    respond(
        op,
        200,
        json_response::<CreateEndpointResponse>("The endpoint's URL"),
    )
}

/// The errors of a create that places a circuit and waits for its worker.
fn create_errors(op: Op<'_>) -> Op<'_> {
    let op = raises(
        op,
        400,
        "invalid-api-params (a bad field) or appproxy/invalid-url (a bad `existing_url`)",
    );
    let op = raises(
        op,
        409,
        "appproxy/port-not-available: the `existing_url`'s port is taken",
    );
    raises(
        op,
        503,
        "appproxy/worker-not-available (no worker can take the circuit) or \
         service-unavailable `E10001: Proxy worker not responding` (`data.worker`): \
         the worker did not acknowledge in time; the circuit stays and a retry answers it",
    )
}

/// `DELETE /v2/endpoints/{endpoint_id}`.
async fn delete(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(EndpointPath { endpoint_id }): BaiPath<EndpointPath>,
) -> Result<Json<Success>, BaiError> {
    inference::delete(&state.store, &state.clock, endpoint_id).await?;
    Ok(Json(Success { success: true }))
}

fn delete_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiDeleteEndpoint",
        "Backend.AI: delete one inference endpoint (an unknown one succeeds)",
    );
    respond(op, 200, json_response::<Success>("Deleted"))
}

/// `DELETE /v2/endpoints/bulk`: per-item results in request order.
async fn bulk_delete(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiJson(request): BaiJson<BulkDeleteRequest>,
) -> Json<BulkResults> {
    let mut endpoints = Vec::with_capacity(request.endpoints.len());
    for item in request.endpoints {
        let result = inference::delete(&state.store, &state.clock, item.deployment_id).await;
        endpoints.push(ItemResult {
            deployment_id: item.deployment_id,
            success: result.is_ok(),
            error: result.err().map(|e| e.to_string()),
        });
    }
    Json(BulkResults { endpoints })
}

fn bulk_delete_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiBulkDeleteEndpoints",
        "Backend.AI: delete inference endpoints (unknown ones succeed)",
    );
    respond(
        op,
        200,
        json_response::<BulkResults>("Per endpoint, in request order"),
    )
}

/// `PUT /v2/endpoints/{endpoint_id}/health-check`: stores the model health
/// check (the worker does not run it).
async fn health_check(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(EndpointPath { endpoint_id }): BaiPath<EndpointPath>,
    BaiJson(request): BaiJson<HealthCheckRequest>,
) -> Result<Json<Success>, BaiError> {
    inference::set_health_check(
        &state.store,
        &state.clock,
        endpoint_id,
        request.health_check,
    )
    .await?;
    Ok(Json(Success { success: true }))
}

fn health_check_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiUpdateEndpointHealthCheck",
        "Backend.AI: store an endpoint's model health check",
    );
    let op = raises(op, 404, "object-not-found `E00002: No such circuit.`");
    respond(op, 200, json_response::<Success>("Stored"))
}

/// `POST /v2/endpoints/{endpoint_id}/token`: a token for the endpoint's
/// users, signed with the jwt_secret (the worker checks `id` and `exp`).
async fn token(
    State(state): State<AppState>,
    Authorized(bai): Authorized,
    BaiPath(EndpointPath { endpoint_id }): BaiPath<EndpointPath>,
    BaiJson(request): BaiJson<TokenRequest>,
) -> Result<Json<TokenResponse>, BaiError> {
    let token = inference::token(
        &state.store,
        &bai,
        endpoint_id,
        request.user_uuid,
        &request.exp,
    )
    .await?;
    Ok(Json(TokenResponse { token }))
}

fn token_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiEndpointToken",
        "Backend.AI: a token for an inference endpoint's users (HS256, jwt_secret)",
    );
    let op = raises(op, 404, "object-not-found `E00002: No such circuit.`");
    let op = raises(
        op,
        503,
        "appproxy/worker-not-available: the circuit has no worker",
    );
    respond(op, 200, json_response::<TokenResponse>("The token"))
}
