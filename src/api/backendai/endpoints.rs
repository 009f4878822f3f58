//! `/v2/endpoints`: the Manager's inference endpoints. An endpoint's
//! circuit is an inference route (`endpoint_id` = the deployment id,
//! `service` = its service name, no targets until the Manager registers
//! its replicas), created, placed and logged like any other route.
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

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::auth::Authorized;
use super::{BaiError, BaiJson, BaiPath};
use crate::api::AppState;
use crate::backendai::circuit::{self, RouteInfo};
use crate::backendai::endpoint::{self as inference, UrlPlace};
use crate::backendai::{BackendAi, jwt};
use crate::domain::{
    Access, AppMode, CircuitInfo, FrontendRequest, Protocol, Route, RouteSpec, RouteStatus, Target,
    ValidationError, Worker, WorkerStatus,
};
use crate::store::StoreError;

/// Upstream's answer for a deployment without a circuit.
pub const NO_CIRCUIT: &str = "No circuit registered for this endpoint yet.";

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

/// What creating one endpoint takes, from either create.
struct NewEndpoint {
    deployment_id: Uuid,
    service_name: String,
    user_id: Uuid,
    runtime_variant: Option<String>,
    existing_url: Option<String>,
    open_to_public: bool,
    health_check: Option<Map<String, Value>>,
}

/// Whether `route`'s worker must acknowledge it before the answer: a
/// Backend.AI worker that has not acknowledged it yet. A Lost worker
/// cannot: that is 503 `E10001` at once rather than after the timeout.
pub(super) fn needs_ack(route: &Route, worker: &Worker) -> Result<bool, BaiError> {
    if worker.backendai.is_none() || route.status == RouteStatus::Active {
        return Ok(false);
    }
    if worker.status == WorkerStatus::Lost {
        return Err(BaiError::worker_not_responding(&worker.name));
    }
    Ok(true)
}

/// Waits (with `waiter`, subscribed before the routes were written) until
/// the workers acknowledged `pending` (route id, worker authority); 503
/// `E10001` naming the first worker that did not.
pub(super) async fn await_acks(
    state: &AppState,
    bai: &BackendAi,
    waiter: crate::backendai::acks::AckWaiter,
    pending: &[(Uuid, String)],
) -> Result<(), BaiError> {
    if pending.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = pending.iter().map(|(id, _)| *id).collect();
    let missing = waiter.wait(&ids, bai.settings.ack_timeout).await;
    for id in missing {
        // An acknowledgement this replica did not hear may have been
        // recorded by another one.
        if let Ok(route) = state.store.get_route(id).await
            && route.status == RouteStatus::Active
        {
            continue;
        }
        let authority = pending
            .iter()
            .find(|(p, _)| *p == id)
            .map_or("", |(_, a)| a.as_str());
        return Err(BaiError::worker_not_responding(authority));
    }
    Ok(())
}

/// The worker `route` sits on; 503 while it has none.
pub(super) async fn worker_of(state: &AppState, route: &Route) -> Result<Worker, BaiError> {
    let id = route.worker_id.ok_or_else(|| {
        BaiError::worker_not_available(format!("circuit {} has no worker", route.id))
    })?;
    Ok(state.store.get_worker(id).await?)
}

/// A create that lost: a taken port is upstream's 409, the rest as usual.
pub(super) fn create_error(e: StoreError) -> BaiError {
    match e {
        StoreError::Conflict { message, .. } => BaiError::port_not_available(message),
        e => e.into(),
    }
}

/// The endpoint's circuit: the existing one unchanged, or a new one.
async fn ensure_endpoint(state: &AppState, e: NewEndpoint) -> Result<(Route, Worker), BaiError> {
    if let Some((route, worker)) = state.store.route_by_endpoint(e.deployment_id).await? {
        let worker = match worker {
            Some(w) => w,
            None => worker_of(state, &route).await?,
        };
        return Ok((route, worker));
    }
    let (mut worker_id, mut frontend) = (None, FrontendRequest::default());
    if let Some(url) = &e.existing_url {
        let workers = state.store.list_workers().await?;
        match inference::place_of(url, &workers).map_err(BaiError::invalid_url)? {
            UrlPlace::Subdomain { worker, subdomain } => {
                worker_id = Some(worker);
                frontend.subdomain = Some(subdomain);
            }
            UrlPlace::Port { worker, port } => {
                worker_id = Some(worker);
                frontend.port = Some(port);
            }
            UrlPlace::Anywhere => {}
        }
    }
    let spec = RouteSpec {
        app_mode: AppMode::Inference,
        session_id: None,
        endpoint_id: Some(e.deployment_id),
        service: e.service_name,
        protocol: Protocol::Http,
        targets: Vec::new(),
        frontend,
        worker_id,
        access: Access {
            open_to_public: e.open_to_public,
            allowed_client_ips: Vec::new(),
        },
        labels: Default::default(),
        envs: Default::default(),
        args: None,
        health_check: None,
        expires_at: None,
        circuit: Some(CircuitInfo {
            user_id: Some(e.user_id),
            runtime_variant: e.runtime_variant,
            session_ids: Vec::new(),
            app_protocol: None,
            health_check: e.health_check.map(Value::Object),
        }),
    };
    let route = match state
        .store
        .create_route(Uuid::now_v7(), spec, state.clock.now())
        .await
    {
        Ok(route) => route,
        // Created concurrently: it is the endpoint's circuit all the same.
        Err(StoreError::Conflict {
            existing: Some(route),
            ..
        }) if route.endpoint_id == Some(e.deployment_id) => *route,
        Err(e) => return Err(create_error(e)),
    };
    let worker = worker_of(state, &route).await?;
    Ok((route, worker))
}

fn url_of(route: &Route, worker: &Worker) -> Result<String, BaiError> {
    circuit::endpoint_url(route, worker).ok_or_else(|| {
        BaiError::worker_not_available(format!("circuit {} has no frontend", route.id))
    })
}

/// `POST /v2/endpoints/bulk`: creates (or finds) each endpoint's circuit,
/// waits for the workers to hold the new ones, answers their URLs.
pub async fn bulk_create(
    State(state): State<AppState>,
    Authorized(bai): Authorized,
    BaiJson(request): BaiJson<BulkCreateRequest>,
) -> Result<Json<BulkCreateResponse>, BaiError> {
    let waiter = bai.acks.subscribe();
    let mut endpoints = Vec::with_capacity(request.endpoints.len());
    let mut pending = Vec::new();
    for item in request.endpoints {
        let health_check_enabled = item.health_check.is_some();
        let (route, worker) = ensure_endpoint(
            &state,
            NewEndpoint {
                deployment_id: item.deployment_id,
                service_name: item.service_name,
                user_id: item.tags.session.user_uuid,
                runtime_variant: Some(item.tags.endpoint.runtime_variant),
                existing_url: item.tags.endpoint.existing_url,
                open_to_public: item.open_to_public,
                health_check: item.health_check,
            },
        )
        .await?;
        if needs_ack(&route, &worker)? {
            pending.push((route.id, worker.name.clone()));
        }
        endpoints.push(CreatedEndpoint {
            deployment_id: item.deployment_id,
            url: url_of(&route, &worker)?,
            health_check_enabled,
        });
    }
    await_acks(&state, &bai, waiter, &pending).await?;
    Ok(Json(BulkCreateResponse { endpoints }))
}

/// `POST /v2/endpoints/{endpoint_id}`: one endpoint, as in bulk.
pub async fn create(
    State(state): State<AppState>,
    Authorized(bai): Authorized,
    BaiPath(EndpointPath { endpoint_id }): BaiPath<EndpointPath>,
    BaiJson(request): BaiJson<CreateEndpointRequest>,
) -> Result<Json<CreateEndpointResponse>, BaiError> {
    let waiter = bai.acks.subscribe();
    let health_check_enabled = request.health_check.is_some();
    let (route, worker) = ensure_endpoint(
        &state,
        NewEndpoint {
            deployment_id: endpoint_id,
            service_name: request.service_name,
            user_id: request.tags.session.user_uuid,
            runtime_variant: request.tags.endpoint.runtime_variant,
            existing_url: request.tags.endpoint.existing_url,
            open_to_public: request.open_to_public,
            health_check: request.health_check,
        },
    )
    .await?;
    if needs_ack(&route, &worker)? {
        await_acks(&state, &bai, waiter, &[(route.id, worker.name.clone())]).await?;
    }
    Ok(Json(CreateEndpointResponse {
        success: true,
        endpoint: url_of(&route, &worker)?,
        health_check_enabled,
    }))
}

/// Deletes the endpoint's circuit; an unknown endpoint is already gone.
async fn delete_endpoint(state: &AppState, endpoint_id: Uuid) -> Result<(), StoreError> {
    let Some((route, _)) = state.store.route_by_endpoint(endpoint_id).await? else {
        return Ok(());
    };
    match state.store.delete_route(route.id, state.clock.now()).await {
        Ok(()) | Err(StoreError::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `DELETE /v2/endpoints/{endpoint_id}`.
pub async fn delete(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(EndpointPath { endpoint_id }): BaiPath<EndpointPath>,
) -> Result<Json<Success>, BaiError> {
    delete_endpoint(&state, endpoint_id).await?;
    Ok(Json(Success { success: true }))
}

/// `DELETE /v2/endpoints/bulk`: per-item results in request order.
pub async fn bulk_delete(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiJson(request): BaiJson<BulkDeleteRequest>,
) -> Json<BulkResults> {
    let mut endpoints = Vec::with_capacity(request.endpoints.len());
    for item in request.endpoints {
        let result = delete_endpoint(&state, item.deployment_id).await;
        endpoints.push(ItemResult {
            deployment_id: item.deployment_id,
            success: result.is_ok(),
            error: result.err().map(|e| e.to_string()),
        });
    }
    Json(BulkResults { endpoints })
}

/// The target of one replica; `Err` for a port outside 1..65535.
fn target(entry: &RouteEntry) -> Result<Target, StoreError> {
    let port = u16::try_from(entry.kernel_port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            StoreError::Invalid(ValidationError {
                field: "kernel_port".into(),
                message: format!("{} is not between 1 and 65535", entry.kernel_port),
            })
        })?;
    Ok(RouteInfo {
        route_id: Some(entry.route_id),
        session_id: entry.session_id,
        session_name: None,
        kernel_host: Some(entry.kernel_host.clone()),
        kernel_port: port,
        protocol: "http".into(),
        traffic_ratio: 1.0,
    }
    .to_target())
}

/// Edits the targets of `endpoint_id`'s circuit; `Err` is the item's error.
async fn edit_targets(
    state: &AppState,
    endpoint_id: Uuid,
    edit: impl FnOnce(&mut Vec<Target>) -> Result<(), StoreError>,
) -> Result<(), String> {
    let Some((route, _)) = state
        .store
        .route_by_endpoint(endpoint_id)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Err(NO_CIRCUIT.to_owned());
    };
    state
        .store
        .edit_route(route.id, state.clock.now(), |spec| edit(&mut spec.targets))
        .await
        .map(|_| ())
        .map_err(|e: StoreError| match e {
            StoreError::NotFound => NO_CIRCUIT.to_owned(),
            e => e.to_string(),
        })
}

/// `POST /v2/endpoints/bulk/routes`: replaces each endpoint's replicas.
pub async fn replace_routes(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiJson(request): BaiJson<RoutesRequest>,
) -> Json<BulkResults> {
    let mut endpoints = Vec::with_capacity(request.endpoints.len());
    for item in request.endpoints {
        let result = edit_targets(&state, item.deployment_id, |targets| {
            *targets = item.routes.iter().map(target).collect::<Result<_, _>>()?;
            Ok(())
        })
        .await;
        endpoints.push(ItemResult {
            deployment_id: item.deployment_id,
            success: result.is_ok(),
            error: result.err(),
        });
    }
    Json(BulkResults { endpoints })
}

/// `POST /v2/endpoints/bulk/routes/register`: adds replicas; one whose
/// `route_id` is there already is left as it is.
pub async fn register_routes(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiJson(request): BaiJson<RoutesRequest>,
) -> Json<RegisterResults> {
    let mut endpoints = Vec::with_capacity(request.endpoints.len());
    for item in request.endpoints {
        let (mut registered, mut already) = (Vec::new(), Vec::new());
        let result = edit_targets(&state, item.deployment_id, |targets| {
            for entry in &item.routes {
                if targets.iter().any(|t| t.id == Some(entry.route_id)) {
                    already.push(entry.route_id);
                } else {
                    targets.push(target(entry)?);
                    registered.push(entry.route_id);
                }
            }
            Ok(())
        })
        .await;
        if result.is_err() {
            (registered, already) = (Vec::new(), Vec::new());
        }
        endpoints.push(RegisterResult {
            deployment_id: item.deployment_id,
            success: result.is_ok(),
            registered_route_ids: registered,
            already_registered_route_ids: already,
            error: result.err(),
        });
    }
    Json(RegisterResults { endpoints })
}

/// `POST /v2/endpoints/bulk/routes/unregister`: removes replicas by id.
pub async fn unregister_routes(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiJson(request): BaiJson<UnregisterRequest>,
) -> Json<UnregisterResults> {
    let mut endpoints = Vec::with_capacity(request.endpoints.len());
    for item in request.endpoints {
        let (mut removed, mut absent) = (Vec::new(), Vec::new());
        let result = edit_targets(&state, item.deployment_id, |targets| {
            for id in &item.route_ids {
                let before = targets.len();
                targets.retain(|t| t.id != Some(*id));
                if targets.len() < before {
                    removed.push(*id);
                } else {
                    absent.push(*id);
                }
            }
            Ok(())
        })
        .await;
        if result.is_err() {
            (removed, absent) = (Vec::new(), Vec::new());
        }
        endpoints.push(UnregisterResult {
            deployment_id: item.deployment_id,
            success: result.is_ok(),
            unregistered_route_ids: removed,
            already_absent_route_ids: absent,
            error: result.err(),
        });
    }
    Json(UnregisterResults { endpoints })
}

/// `PUT /v2/endpoints/{endpoint_id}/health-check`: stores the model health
/// check (the worker does not run it).
pub async fn health_check(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(EndpointPath { endpoint_id }): BaiPath<EndpointPath>,
    BaiJson(request): BaiJson<HealthCheckRequest>,
) -> Result<Json<Success>, BaiError> {
    let (route, _) = state
        .store
        .route_by_endpoint(endpoint_id)
        .await?
        .ok_or_else(|| BaiError::not_found("circuit"))?;
    state
        .store
        .edit_route(route.id, state.clock.now(), |spec| {
            spec.circuit.get_or_insert_default().health_check =
                request.health_check.map(Value::Object);
            Ok::<_, StoreError>(())
        })
        .await?;
    Ok(Json(Success { success: true }))
}

/// `POST /v2/endpoints/{endpoint_id}/token`: a token for the endpoint's
/// users, signed with the jwt_secret (the worker checks `id` and `exp`).
pub async fn token(
    State(state): State<AppState>,
    Authorized(bai): Authorized,
    BaiPath(EndpointPath { endpoint_id }): BaiPath<EndpointPath>,
    BaiJson(request): BaiJson<TokenRequest>,
) -> Result<Json<TokenResponse>, BaiError> {
    let exp = inference::parse_exp(&request.exp)
        .map_err(|msg| super::validation_error(vec!["exp".into()], msg))?;
    let (route, worker) = state
        .store
        .route_by_endpoint(endpoint_id)
        .await?
        .ok_or_else(|| BaiError::not_found("circuit"))?;
    let worker = match worker {
        Some(w) => w,
        None => worker_of(&state, &route).await?,
    };
    let claims = inference::token_claims(&route, &worker, request.user_uuid, exp);
    Ok(Json(TokenResponse {
        token: jwt::encode(&claims, bai.settings.secrets.jwt_secret.expose()),
    }))
}
