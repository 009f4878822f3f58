//! What Backend.AI App Proxy workers call about workers: `/api/worker`,
//! `/api/slots`, and the read-only `/v1` aliases. These see only Backend.AI
//! workers (registered through `PUT /api/worker`; a native worker is 404);
//! what each call does is [`crate::backendai::workers`], the shapes it
//! answers in [`crate::backendai::worker`].

use aide::axum::ApiRouter;
use aide::axum::routing::{get_with, put_with};
use aide::transform::TransformOperation;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::Authorized;
use super::{BaiError, BaiJson, BaiPath, BaiQuery, SUCCESS, SuccessModel};
use crate::api::AppState;
use crate::api::openapi::backendai::{operation, raises};
use crate::api::openapi::{json_response, respond};
use crate::backendai::circuit::CircuitBody;
use crate::backendai::worker::{
    SlotModel, SlotV1, WorkerRequest, WorkerResponseModel, WorkerV1, worker_response,
};
use crate::backendai::workers;

type Op<'a> = TransformOperation<'a>;

const NO_WORKER: &str = "object-not-found: `E00002: No such worker.` (also for a worker \
                         registered through the native API)";

/// Adds the workers' endpoints to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route(
            "/api/worker",
            put_with(register, register_docs).get_with(list, list_docs),
        )
        .api_route(
            "/api/worker/{worker_id}",
            get_with(get, get_docs)
                .patch_with(heartbeat, heartbeat_docs)
                .delete_with(deregister, deregister_docs),
        )
        .api_route(
            "/api/worker/{worker_id}/circuits",
            get_with(circuits, circuits_docs),
        )
        .api_route("/api/slots", get_with(slots, slots_docs))
        .api_route("/v1/api/worker", get_with(list_v1, list_v1_docs))
        .api_route("/v1/api/slots", get_with(slots_v1, slots_v1_docs))
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
    pub circuits: Vec<CircuitBody>,
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

fn register_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiRegisterWorker",
        "Backend.AI: register a worker; idempotent by authority",
    )
    .description(
        "Creates the worker, or re-registers it by `authority` (same id, its circuits kept, \
         `nodes` + 1, `Ready`). The answer's `id` is what the worker calls itself from then on; \
         `slots` lists its frontend.",
    );
    let op = respond(
        op,
        200,
        json_response::<WorkerResponseModel>("The worker (`WorkerResponseModel`)"),
    );
    let op = raises(
        op,
        400,
        "missing-frontend-config: port mode without `port_range`, wildcard mode without \
         `wildcard_domain` (upstream answers status -1); invalid-api-params otherwise",
    );
    raises(
        op,
        403,
        "generic-forbidden: the authority is a worker registered through the native API",
    )
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

fn list_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiListWorkers",
        "Backend.AI: the Backend.AI workers (native workers are not listed)",
    );
    respond(
        op,
        200,
        json_response::<WorkerListModel>("`{\"workers\": [...]}`"),
    )
}

async fn get(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(WorkerIdPath { worker_id }): BaiPath<WorkerIdPath>,
) -> Result<Json<WorkerResponseModel>, BaiError> {
    let (worker, routes) = workers::with_routes(&state.store, worker_id).await?;
    Ok(Json(worker_response(&worker, &routes)))
}

fn get_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(op, "backendaiGetWorker", "Backend.AI: one worker");
    let op = respond(op, 200, json_response::<WorkerResponseModel>("The worker"));
    raises(op, 404, NO_WORKER)
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

fn heartbeat_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiHeartbeat",
        "Backend.AI: a worker's heartbeat (no body)",
    )
    .description(
        "By the same health rules as a native worker's heartbeat: a `Lost` worker comes back. \
         Also writes `proxy-worker.last_seen` in Redis DB 2 (a Redis failure is logged, \
         not answered).",
    );
    let op = respond(op, 200, json_response::<WorkerResponseModel>("The worker"));
    raises(op, 404, NO_WORKER)
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

fn deregister_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiDeregisterWorker",
        "Backend.AI: one node of a worker stops",
    )
    .description(
        "`nodes` − 1; at 0 the worker is `Lost` (its circuits fail over by the usual rules). \
         The worker stays registered.",
    );
    let op = respond(
        op,
        200,
        json_response::<SuccessModel>("`{\"success\": true}`"),
    );
    raises(op, 404, NO_WORKER)
}

async fn circuits(
    State(state): State<AppState>,
    Authorized(bai): Authorized,
    BaiPath(WorkerIdPath { worker_id }): BaiPath<WorkerIdPath>,
) -> Result<Json<CircuitListModel>, BaiError> {
    let circuits = workers::circuits(&state.store, &bai, worker_id).await?;
    Ok(Json(CircuitListModel { circuits }))
}

fn circuits_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiWorkerCircuits",
        "Backend.AI: every circuit on a worker",
    );
    let op = respond(
        op,
        200,
        json_response::<CircuitListModel>(
            "`{\"circuits\": [SerializableCircuit, ...]}`; each circuit also has `status` \
             (beyond upstream; the worker ignores it): `active`, `propagating`, \
             `worker_not_ready`, `worker_lost` or `worker_draining`, the same for every \
             circuit of the worker but `active`/`propagating`",
        ),
    );
    raises(op, 404, NO_WORKER)
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

fn slots_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiSlots",
        "Backend.AI: the workers' frontend slots",
    );
    let op = respond(
        op,
        200,
        json_response::<SlotListModel>("`{\"slots\": [...]}`"),
    );
    raises(
        op,
        404,
        "object-not-found: `E00002: No such worker.` for `wsproxy_host`",
    )
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

fn list_v1_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiListWorkersV1",
        "Backend.AI v1: the workers, as a bare array",
    );
    respond(op, 200, json_response::<Vec<WorkerV1>>("The workers"))
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

fn slots_v1_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiSlotsV1",
        "Backend.AI v1: the slots in use, as a bare array",
    );
    respond(op, 200, json_response::<Vec<SlotV1>>("The slots in use"))
}
