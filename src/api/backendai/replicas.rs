//! `/v2/endpoints/bulk/routes`: the replicas of the Manager's inference
//! endpoints (replace, register, unregister), each endpoint an item of its
//! own: an unknown endpoint or a `kernel_port` outside 1..65535 fails its
//! item only. What each call does is [`crate::backendai::endpoints`].

use aide::axum::ApiRouter;
use aide::axum::routing::post_with;
use aide::transform::TransformOperation;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::BaiJson;
use super::auth::Authorized;
use super::endpoints::{BulkResults, ItemResult};
use crate::api::AppState;
use crate::api::openapi::backendai::operation;
use crate::api::openapi::{json_response, respond};
use crate::backendai::endpoints::{self as inference, Replica};

/// Adds the replicas' endpoints to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route(
            "/v2/endpoints/bulk/routes",
            post_with(replace_routes, replace_routes_docs),
        )
        .api_route(
            "/v2/endpoints/bulk/routes/register",
            post_with(register_routes, register_routes_docs),
        )
        .api_route(
            "/v2/endpoints/bulk/routes/unregister",
            post_with(unregister_routes, unregister_routes_docs),
        )
}

/// One replica of an endpoint.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct RouteEntry {
    pub session_id: Uuid,
    pub route_id: Uuid,
    pub kernel_host: String,
    /// 1..65535; another value fails its item.
    pub kernel_port: i64,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct RoutesItem {
    #[serde(alias = "endpoint_id")]
    pub deployment_id: Uuid,
    pub routes: Vec<RouteEntry>,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct RoutesRequest {
    pub endpoints: Vec<RoutesItem>,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct RegisterResult {
    pub deployment_id: Uuid,
    pub success: bool,
    pub registered_route_ids: Vec<Uuid>,
    pub already_registered_route_ids: Vec<Uuid>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct RegisterResults {
    pub endpoints: Vec<RegisterResult>,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct UnregisterItem {
    #[serde(alias = "endpoint_id")]
    pub deployment_id: Uuid,
    pub route_ids: Vec<Uuid>,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct UnregisterRequest {
    pub endpoints: Vec<UnregisterItem>,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct UnregisterResult {
    pub deployment_id: Uuid,
    pub success: bool,
    pub unregistered_route_ids: Vec<Uuid>,
    pub already_absent_route_ids: Vec<Uuid>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct UnregisterResults {
    pub endpoints: Vec<UnregisterResult>,
}

impl RouteEntry {
    fn replica(&self) -> Replica {
        Replica {
            session_id: self.session_id,
            route_id: self.route_id,
            kernel_host: self.kernel_host.clone(),
            kernel_port: self.kernel_port,
        }
    }
}

fn replicas(routes: &[RouteEntry]) -> Vec<Replica> {
    routes.iter().map(RouteEntry::replica).collect()
}

/// `POST /v2/endpoints/bulk/routes`: replaces each endpoint's replicas.
async fn replace_routes(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiJson(request): BaiJson<RoutesRequest>,
) -> Json<BulkResults> {
    let mut endpoints = Vec::with_capacity(request.endpoints.len());
    for item in request.endpoints {
        let replicas = replicas(&item.routes);
        let result =
            inference::replace_replicas(&state.store, &state.clock, item.deployment_id, &replicas)
                .await;
        endpoints.push(ItemResult {
            deployment_id: item.deployment_id,
            success: result.is_ok(),
            error: result.err(),
        });
    }
    Json(BulkResults { endpoints })
}

fn replace_routes_docs(op: TransformOperation<'_>) -> TransformOperation<'_> {
    let op = operation(
        op,
        "backendaiReplaceEndpointRoutes",
        "Backend.AI: replace each endpoint's replicas",
    );
    respond(
        op,
        200,
        json_response::<BulkResults>(
            "Per endpoint, in request order; `No circuit registered for this endpoint yet.` \
             for an unknown one",
        ),
    )
}

/// `POST /v2/endpoints/bulk/routes/register`: adds replicas; one whose
/// `route_id` is there already is left as it is.
async fn register_routes(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiJson(request): BaiJson<RoutesRequest>,
) -> Json<RegisterResults> {
    let mut endpoints = Vec::with_capacity(request.endpoints.len());
    for item in request.endpoints {
        let replicas = replicas(&item.routes);
        let result =
            inference::register_replicas(&state.store, &state.clock, item.deployment_id, &replicas)
                .await;
        let (registered, error) = match result {
            Ok(registered) => (registered, None),
            Err(error) => (Default::default(), Some(error)),
        };
        endpoints.push(RegisterResult {
            deployment_id: item.deployment_id,
            success: error.is_none(),
            registered_route_ids: registered.added,
            already_registered_route_ids: registered.already,
            error,
        });
    }
    Json(RegisterResults { endpoints })
}

fn register_routes_docs(op: TransformOperation<'_>) -> TransformOperation<'_> {
    let op = operation(
        op,
        "backendaiRegisterEndpointRoutes",
        "Backend.AI: add replicas to endpoints (ones already there are kept)",
    );
    respond(
        op,
        200,
        json_response::<RegisterResults>("Per endpoint, in request order"),
    )
}

/// `POST /v2/endpoints/bulk/routes/unregister`: removes replicas by id.
async fn unregister_routes(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiJson(request): BaiJson<UnregisterRequest>,
) -> Json<UnregisterResults> {
    let mut endpoints = Vec::with_capacity(request.endpoints.len());
    for item in request.endpoints {
        let result = inference::unregister_replicas(
            &state.store,
            &state.clock,
            item.deployment_id,
            &item.route_ids,
        )
        .await;
        let (unregistered, error) = match result {
            Ok(unregistered) => (unregistered, None),
            Err(error) => (Default::default(), Some(error)),
        };
        endpoints.push(UnregisterResult {
            deployment_id: item.deployment_id,
            success: error.is_none(),
            unregistered_route_ids: unregistered.removed,
            already_absent_route_ids: unregistered.absent,
            error,
        });
    }
    Json(UnregisterResults { endpoints })
}

fn unregister_routes_docs(op: TransformOperation<'_>) -> TransformOperation<'_> {
    let op = operation(
        op,
        "backendaiUnregisterEndpointRoutes",
        "Backend.AI: remove replicas from endpoints",
    );
    respond(
        op,
        200,
        json_response::<UnregisterResults>("Per endpoint, in request order"),
    )
}
