//! What Backend.AI App Proxy workers call about workers: `/api/worker`,
//! `/api/slots`, and the read-only `/v1` aliases. These see only Backend.AI
//! workers (registered through `PUT /api/worker`; a native worker is 404);
//! what each call does is [`crate::backendai::workers`], the shapes it
//! answers in [`crate::backendai::worker`].

use aide::axum::ApiRouter;
use aide::axum::routing::{get_with, put_with};
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::Authorized;
use super::{BaiError, BaiJson, BaiPath, BaiQuery, SUCCESS, SuccessModel};
use crate::api::AppState;
use crate::api::openapi::backendai::workers as ops;
use crate::backendai::circuit::Circuit;
use crate::backendai::worker::{
    SlotModel, SlotV1, WorkerRequest, WorkerResponseModel, WorkerV1, worker_response,
};
use crate::backendai::workers;

/// Adds the workers' endpoints to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route(
            "/api/worker",
            put_with(register, ops::register).get_with(list, ops::list),
        )
        .api_route(
            "/api/worker/{worker_id}",
            get_with(get, ops::get)
                .patch_with(heartbeat, ops::heartbeat)
                .delete_with(deregister, ops::deregister),
        )
        .api_route(
            "/api/worker/{worker_id}/circuits",
            get_with(circuits, ops::circuits),
        )
        .api_route("/api/slots", get_with(slots, ops::slots))
        .api_route("/v1/api/worker", get_with(list_v1, ops::list_v1))
        .api_route("/v1/api/slots", get_with(slots_v1, ops::slots_v1))
}

/// `{worker_id}` of a Backend.AI worker.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WorkerIdPath {
    /// The worker's id (`id` of the registration answer).
    pub worker_id: Uuid,
}

/// `GET /api/worker`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct WorkerListModel {
    pub workers: Vec<WorkerResponseModel>,
}

/// `GET /api/worker/{worker_id}/circuits`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct CircuitListModel {
    pub circuits: Vec<Circuit>,
}

/// `GET /api/slots`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct SlotListModel {
    pub slots: Vec<SlotModel>,
}

/// `GET /api/slots` query.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SlotsQuery {
    /// A worker's authority; every Backend.AI worker when absent.
    #[serde(default)]
    pub wsproxy_host: Option<String>,
    /// `true` (default): the slots in use only; `false`: free ports too.
    #[serde(default = "yes")]
    pub in_use: bool,
}

fn yes() -> bool {
    true
}

/// `PUT /api/worker`: registers a Backend.AI worker, or re-registers it by
/// authority (same id, routes kept, one node more).
async fn register(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiJson(request): BaiJson<WorkerRequest>,
) -> Result<Json<WorkerResponseModel>, BaiError> {
    let registered = workers::register(&state.store, state.clock.now(), &request).await?;
    Ok(Json(worker_response(
        &registered.worker,
        &registered.routes,
    )))
}

async fn list(
    State(state): State<AppState>,
    Authorized(_): Authorized,
) -> Result<Json<WorkerListModel>, BaiError> {
    let workers = workers::all(&state.store)
        .await?
        .iter()
        .map(|(w, routes)| worker_response(w, routes))
        .collect();
    Ok(Json(WorkerListModel { workers }))
}

async fn get(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(WorkerIdPath { worker_id }): BaiPath<WorkerIdPath>,
) -> Result<Json<WorkerResponseModel>, BaiError> {
    let (worker, routes) = workers::with_routes(&state.store, worker_id).await?;
    Ok(Json(worker_response(&worker, &routes)))
}

/// `PATCH /api/worker/{worker_id}`: a heartbeat. Whatever body the worker
/// sends (it sends an empty one) is not read.
async fn heartbeat(
    State(state): State<AppState>,
    Authorized(bai): Authorized,
    BaiPath(WorkerIdPath { worker_id }): BaiPath<WorkerIdPath>,
) -> Result<Json<WorkerResponseModel>, BaiError> {
    let now = state.clock.now();
    let (worker, routes) = workers::heartbeat(&state.store, &bai, worker_id, now).await?;
    Ok(Json(worker_response(&worker, &routes)))
}

/// `DELETE /api/worker/{worker_id}`: one node of the worker stopped.
async fn deregister(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(WorkerIdPath { worker_id }): BaiPath<WorkerIdPath>,
) -> Result<Json<SuccessModel>, BaiError> {
    workers::deregister(&state.store, worker_id, state.clock.now()).await?;
    Ok(Json(SUCCESS))
}

async fn circuits(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(WorkerIdPath { worker_id }): BaiPath<WorkerIdPath>,
) -> Result<Json<CircuitListModel>, BaiError> {
    let circuits = workers::circuits(&state.store, worker_id).await?;
    Ok(Json(CircuitListModel { circuits }))
}

async fn slots(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiQuery(query): BaiQuery<SlotsQuery>,
) -> Result<Json<SlotListModel>, BaiError> {
    let authority = query.wsproxy_host.as_deref();
    let slots = workers::slots(&state.store, authority, query.in_use).await?;
    Ok(Json(SlotListModel { slots }))
}

/// `GET /v1/api/worker`: a bare array in the v1 shape.
async fn list_v1(
    State(state): State<AppState>,
    Authorized(_): Authorized,
) -> Result<Json<Vec<WorkerV1>>, BaiError> {
    let workers = workers::all(&state.store)
        .await?
        .iter()
        .map(|(w, _)| WorkerV1::of(w))
        .collect();
    Ok(Json(workers))
}

/// `GET /v1/api/slots`: the slots in use, with their circuits, as a bare array.
async fn slots_v1(
    State(state): State<AppState>,
    Authorized(_): Authorized,
) -> Result<Json<Vec<SlotV1>>, BaiError> {
    let slots = workers::all(&state.store)
        .await?
        .iter()
        .flat_map(|(worker, routes)| routes.iter().map(|r| SlotV1::of(r, worker)))
        .collect();
    Ok(Json(slots))
}
