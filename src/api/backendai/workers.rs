//! What Backend.AI App Proxy workers call: `/api/worker`, `/api/circuit`,
//! `/api/slots`, and the read-only `/v1` aliases.
//!
//! A Backend.AI worker is a worker registered through `PUT /api/worker`
//! (its name is its authority); the `/api/worker` paths see only those:
//! a worker registered through the native API has no Backend.AI
//! description (host, API port, TLS, nodes) and is 404 there. The
//! `/api/circuit` paths see only Backend.AI circuits (routes created through
//! Backend.AI's API): every worker holds the api_secret, and it must not
//! read or delete routes created through the native API (404, as if absent).
//! A worker's own list (`/api/worker/{id}/circuits`, the slots) is whatever
//! is placed on it, since it serves all of that.

use std::collections::HashMap;

use aide::axum::ApiRouter;
use aide::axum::routing::{delete_with, get_with, put_with};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::auth::Authorized;
use super::{BaiError, BaiPath, BaiQuery, validation_error};
use crate::api::AppState;
use crate::api::openapi::backendai::workers as ops;
use crate::backendai::circuit::{
    self, Circuit, RegistrationError, WorkerRequest, iso_time, worker_api_url,
};
use crate::backendai::live;
use crate::domain::health::Observation;
use crate::domain::{AppMode, Route, Worker, WorkerFrontend};
use crate::health;
use crate::store::StoreError;

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
        .api_route(
            "/api/circuit/{circuit_id}",
            get_with(get_circuit, ops::get_circuit)
                .delete_with(delete_circuit, ops::delete_circuit),
        )
        .api_route(
            "/api/circuit/{circuit_id}/statistics",
            get_with(statistics, ops::statistics),
        )
        .api_route(
            "/api/circuit/_/bulk",
            delete_with(delete_circuits, ops::delete_circuits),
        )
        .api_route("/api/slots", get_with(slots, ops::slots))
        .api_route("/v1/api/worker", get_with(list_v1, ops::list_v1))
        .api_route("/v1/api/slots", get_with(slots_v1, ops::slots_v1))
        .api_route(
            "/v1/api/circuit/{circuit_id}",
            delete_with(delete_circuit_v1, ops::delete_circuit_v1),
        )
}

/// `{worker_id}` of a Backend.AI worker.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WorkerIdPath {
    /// The worker's id (`id` of the registration answer).
    pub worker_id: Uuid,
}

/// `{circuit_id}` of a circuit.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CircuitIdPath {
    /// The circuit's id (a route id).
    pub circuit_id: Uuid,
}

/// One frontend slot of a worker (`SlotModel`).
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct SlotModel {
    /// `port` or `wildcard`.
    pub frontend_mode: &'static str,
    pub in_use: bool,
    pub port: Option<u16>,
    pub subdomain: Option<String>,
    /// The circuit on the slot, when in use.
    pub circuit_id: Option<Uuid>,
}

/// A Backend.AI worker as upstream answers it (`WorkerResponseModel`),
/// fields in upstream's order.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct WorkerResponseModel {
    pub authority: String,
    /// `port` or `wildcard`.
    pub frontend_mode: &'static str,
    /// `http`, `grpc`, `h2`, `tcp` or `preopen` (a worker registered as
    /// `vnc` or `rdp` serves, and reads back, `tcp`).
    pub protocol: &'static str,
    pub hostname: String,
    pub tls_listen: bool,
    pub tls_advertised: bool,
    pub api_port: u16,
    /// Port mode: `[low, high]`.
    pub port_range: Option<[u16; 2]>,
    /// Wildcard mode, with its leading dot.
    pub wildcard_domain: Option<String>,
    pub wildcard_traffic_port: Option<u16>,
    pub filtered_apps_only: bool,
    pub traefik_last_used_marker_path: Option<String>,
    pub accepted_traffics: Vec<AppMode>,
    pub id: Uuid,
    #[serde(with = "circuit::iso")]
    #[schemars(with = "DateTime<Utc>")]
    pub created_at: DateTime<Utc>,
    /// The last change of the worker or its last heartbeat, whichever is later.
    #[serde(with = "circuit::iso")]
    #[schemars(with = "DateTime<Utc>")]
    pub updated_at: DateTime<Utc>,
    /// The ports of the range; -1 in wildcard mode (no limit).
    pub available_slots: i64,
    /// The circuits on the worker.
    pub occupied_slots: u64,
    /// Registrations minus deregistrations.
    pub nodes: u32,
    /// Port mode: every port of the range; wildcard mode: the subdomains in use.
    pub slots: Vec<SlotModel>,
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

/// `{"success": true}`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct SuccessModel {
    pub success: bool,
}

const SUCCESS: SuccessModel = SuccessModel { success: true };

/// `GET /api/circuit/{circuit_id}/statistics`: the circuit and its traffic.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct CircuitStatistics {
    #[serde(flatten)]
    pub circuit: Circuit,
    /// Requests the worker counted (`circuit.<id>.requests` in Redis DB 2).
    pub requests: i64,
    /// Last request, unix milliseconds (`circuit.<id>.last_access`; the
    /// creation time before the first request).
    pub last_access: i64,
    /// Seconds until an unused interactive HTTP circuit is collected (0 when
    /// due); `null` for circuits that are never collected (inference, TCP).
    pub ttl: Option<i64>,
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

/// `GET /v1/api/worker`: one worker in the v1 shape.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct WorkerV1 {
    pub authority: String,
    /// The worker's API URL.
    pub endpoint: String,
    /// Ports of the range; -1 in wildcard mode.
    pub total_slots: i64,
    pub ports_in_use: u64,
    pub min_range: Option<u16>,
    pub max_range: Option<u16>,
    pub wildcard_domain: Option<String>,
    #[serde(with = "circuit::iso")]
    #[schemars(with = "DateTime<Utc>")]
    pub created: DateTime<Utc>,
    #[serde(with = "circuit::iso")]
    #[schemars(with = "DateTime<Utc>")]
    pub updated: DateTime<Utc>,
}

/// `GET /v1/api/slots`: one slot in use, in the v1 shape.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct SlotV1 {
    /// The circuit's id.
    pub rel: Uuid,
    pub port: Option<u16>,
    pub subdomain: Option<String>,
    /// Always `v2`.
    pub wsproxy_version: &'static str,
    #[serde(rename = "worker__authority")]
    pub worker_authority: String,
    #[serde(rename = "circuit__app")]
    pub circuit_app: String,
    #[serde(rename = "circuit__session_id")]
    pub circuit_session_id: Option<Uuid>,
    #[serde(rename = "circuit__open_to_public")]
    pub circuit_open_to_public: bool,
    #[serde(rename = "circuit__allowed_client_ips")]
    pub circuit_allowed_client_ips: Option<String>,
    /// The environment as a JSON string; `null` when empty.
    #[serde(rename = "circuit__envs")]
    pub circuit_envs: Option<String>,
    #[serde(rename = "circuit__arguments")]
    pub circuit_arguments: Option<String>,
    #[serde(rename = "circuit__created")]
    pub circuit_created: String,
    #[serde(rename = "circuit__modified")]
    pub circuit_modified: String,
}

/// A 404 `No such worker.` for a store's `NotFound`.
fn no_worker(e: StoreError) -> BaiError {
    match e {
        StoreError::NotFound => BaiError::not_found("worker"),
        e => e.into(),
    }
}

/// Backend.AI worker `id`; 404 for an unknown or native worker.
async fn backendai_worker(state: &AppState, id: Uuid) -> Result<Worker, BaiError> {
    let worker = state.store.get_worker(id).await.map_err(no_worker)?;
    if worker.backendai.is_none() {
        return Err(BaiError::not_found("worker"));
    }
    Ok(worker)
}

/// The routes on worker `id`.
async fn routes_of(state: &AppState, id: Uuid) -> Result<Vec<Route>, BaiError> {
    Ok(state.store.snapshot(Some(id)).await?.1)
}

/// Every Backend.AI worker with its routes, by authority.
async fn backendai_workers(state: &AppState) -> Result<Vec<(Worker, Vec<Route>)>, BaiError> {
    let workers = state.store.list_workers().await?;
    let (_, routes) = state.store.snapshot(None).await?;
    let mut by_worker: HashMap<Uuid, Vec<Route>> = HashMap::new();
    for route in routes {
        if let Some(w) = route.worker_id {
            by_worker.entry(w).or_default().push(route);
        }
    }
    Ok(workers
        .into_iter()
        .filter(|w| w.backendai.is_some())
        .map(|w| {
            let routes = by_worker.remove(&w.id).unwrap_or_default();
            (w, routes)
        })
        .collect())
}

fn frontend_mode(worker: &Worker) -> &'static str {
    match worker.frontend {
        WorkerFrontend::Port { .. } => "port",
        WorkerFrontend::Wildcard { .. } => "wildcard",
    }
}

/// The worker's slots: in port mode every port of its range, in wildcard
/// mode the subdomains its routes hold.
pub fn slots_of(worker: &Worker, routes: &[Route]) -> Vec<SlotModel> {
    match &worker.frontend {
        WorkerFrontend::Port { port_range, .. } => {
            let by_port: HashMap<u16, Uuid> = routes
                .iter()
                .filter_map(|r| r.frontend.port.map(|p| (p, r.id)))
                .collect();
            (port_range[0]..=port_range[1])
                .map(|port| {
                    let circuit_id = by_port.get(&port).copied();
                    SlotModel {
                        frontend_mode: "port",
                        in_use: circuit_id.is_some(),
                        port: Some(port),
                        subdomain: None,
                        circuit_id,
                    }
                })
                .collect()
        }
        WorkerFrontend::Wildcard { .. } => {
            let mut used: Vec<SlotModel> = routes
                .iter()
                .filter_map(|r| {
                    r.frontend.subdomain.as_ref().map(|s| SlotModel {
                        frontend_mode: "wildcard",
                        in_use: true,
                        port: None,
                        subdomain: Some(s.clone()),
                        circuit_id: Some(r.id),
                    })
                })
                .collect();
            used.sort_by(|a, b| a.subdomain.cmp(&b.subdomain));
            used
        }
    }
}

/// Backend.AI worker `worker` (with the routes on it) as upstream answers it.
pub fn worker_response(worker: &Worker, routes: &[Route]) -> WorkerResponseModel {
    let bai = worker.backendai.clone().unwrap_or_else(|| {
        // Only Backend.AI workers get here; a native one reads as a
        // single-node worker on its frontend's host.
        crate::domain::BackendAiWorker {
            hostname: String::new(),
            api_port: 0,
            tls_listen: false,
            tls_advertised: false,
            filtered_apps_only: false,
            app_filters: Vec::new(),
            traefik_last_used_marker_path: None,
            nodes: 1,
        }
    });
    let (port_range, wildcard_domain, wildcard_traffic_port, available_slots) =
        match &worker.frontend {
            WorkerFrontend::Port { port_range, .. } => (
                Some(*port_range),
                None,
                None,
                i64::from(port_range[1].saturating_sub(port_range[0])) + 1,
            ),
            WorkerFrontend::Wildcard { domain, port, .. } => {
                (None, Some(format!(".{domain}")), Some(*port), -1)
            }
        };
    WorkerResponseModel {
        authority: worker.name.clone(),
        frontend_mode: frontend_mode(worker),
        protocol: worker.protocols.first().map_or("http", |p| p.as_str()),
        hostname: bai.hostname,
        tls_listen: bai.tls_listen,
        tls_advertised: bai.tls_advertised,
        api_port: bai.api_port,
        port_range,
        wildcard_domain,
        wildcard_traffic_port,
        filtered_apps_only: bai.filtered_apps_only,
        traefik_last_used_marker_path: bai.traefik_last_used_marker_path,
        accepted_traffics: worker.app_modes.clone(),
        id: worker.id,
        created_at: worker.created_at,
        updated_at: worker.updated_at.max(worker.last_heartbeat),
        available_slots,
        occupied_slots: worker.route_count,
        nodes: bai.nodes,
        slots: slots_of(worker, routes),
    }
}

fn registration_error(e: RegistrationError) -> BaiError {
    match e {
        RegistrationError::MissingFrontend(msg) => BaiError::missing_frontend_config(msg),
        RegistrationError::Invalid(msg) => {
            let field = if msg.starts_with("frontend_mode") {
                "frontend_mode"
            } else {
                "protocol"
            };
            validation_error(vec![json!(field)], msg)
        }
    }
}

/// `PUT /api/worker`: registers a Backend.AI worker, or re-registers it by
/// authority (same id, routes kept, one node more). The api_secret is
/// trusted like the worker itself, so a worker restarted before its old
/// registration went silent gets its registration back at once.
async fn register(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    super::BaiJson(request): super::BaiJson<WorkerRequest>,
) -> Result<Json<WorkerResponseModel>, BaiError> {
    let now = state.clock.now();
    // A native worker's name is refused by the store (`may_register`).
    let existing = state.store.worker_by_name(&request.authority).await?;
    let nodes = existing
        .as_ref()
        .and_then(|w| w.backendai.as_ref())
        .map_or(1, |b| b.nodes.saturating_add(1));
    let registration = request.to_registration(nodes).map_err(registration_error)?;
    // The worker never presents a token of ours: the hash is of one nobody has.
    let registered = state
        .store
        .register_worker(registration, existing.map(|w| w.id), now, |_| {
            rand::random()
        })
        .await?;
    let worker = &registered.worker;
    tracing::info!(worker = %worker.id, authority = %worker.name, nodes, created = registered.created, "Backend.AI worker registered");
    Ok(Json(worker_response(worker, &registered.routes)))
}

async fn list(
    State(state): State<AppState>,
    Authorized(_): Authorized,
) -> Result<Json<WorkerListModel>, BaiError> {
    let workers = backendai_workers(&state)
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
    let worker = backendai_worker(&state, worker_id).await?;
    let routes = routes_of(&state, worker_id).await?;
    Ok(Json(worker_response(&worker, &routes)))
}

/// `PATCH /api/worker/{worker_id}`: a heartbeat, by the same rules as a
/// native worker's (a `Lost` worker comes back). Whatever body the worker
/// sends (it sends an empty one) is not read. Also writes
/// `proxy-worker.last_seen` in Redis DB 2, as upstream does.
async fn heartbeat(
    State(state): State<AppState>,
    Authorized(bai): Authorized,
    BaiPath(WorkerIdPath { worker_id }): BaiPath<WorkerIdPath>,
) -> Result<Json<WorkerResponseModel>, BaiError> {
    let worker = backendai_worker(&state, worker_id).await?;
    let now = state.clock.now();
    // Revision 0 acknowledges nothing new: what the worker applied is the
    // event bus's business.
    health::heartbeat(&state.store, worker_id, 0, now)
        .await
        .map_err(no_worker)?;
    let authority = worker.name.clone();
    let seen = now.timestamp_micros() as f64 / 1e6;
    tokio::spawn(async move { live::record_last_seen(&bai.redis, &authority, seen).await });
    let worker = state.store.get_worker(worker_id).await.map_err(no_worker)?;
    let routes = routes_of(&state, worker_id).await?;
    Ok(Json(worker_response(&worker, &routes)))
}

/// `DELETE /api/worker/{worker_id}`: one node of the worker stopped. When
/// none is left the worker is `Lost`, as if it had gone silent: its
/// circuits wait for it (or fail over) by the usual rules; the row stays.
async fn deregister(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(WorkerIdPath { worker_id }): BaiPath<WorkerIdPath>,
) -> Result<Json<SuccessModel>, BaiError> {
    let now = state.clock.now();
    let worker = state
        .store
        .backendai_node_left(worker_id, now)
        .await
        .map_err(no_worker)?;
    let nodes = worker.backendai.as_ref().map_or(0, |b| b.nodes);
    tracing::info!(worker = %worker_id, authority = %worker.name, nodes, "Backend.AI worker deregistered");
    if nodes == 0 {
        health::observe(&state.store, worker_id, Observation::HeartbeatTimeout, now)
            .await
            .map_err(no_worker)?;
    }
    Ok(Json(SUCCESS))
}

async fn circuits(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(WorkerIdPath { worker_id }): BaiPath<WorkerIdPath>,
) -> Result<Json<CircuitListModel>, BaiError> {
    let worker = backendai_worker(&state, worker_id).await?;
    let circuits = routes_of(&state, worker_id)
        .await?
        .iter()
        .map(|r| Circuit::of(r, &worker))
        .collect();
    Ok(Json(CircuitListModel { circuits }))
}

/// Backend.AI circuit `id`: a route created through Backend.AI's API (it
/// has circuit fields). Routes created through the native API are not the
/// api_secret's to read or delete: 404 `No such circuit.`, as if absent.
async fn backendai_circuit(state: &AppState, id: Uuid) -> Result<Route, BaiError> {
    let route = state.store.get_route(id).await?;
    if route.circuit.is_none() {
        return Err(BaiError::not_found("circuit"));
    }
    Ok(route)
}

/// Backend.AI circuit `id` and its worker; 404 `No such circuit.` for an
/// unknown or native route and for one no worker holds (it is `Pending`).
async fn placed_circuit(state: &AppState, id: Uuid) -> Result<(Route, Worker), BaiError> {
    let route = backendai_circuit(state, id).await?;
    let Some(worker_id) = route.worker_id else {
        return Err(BaiError::not_found("circuit")
            .with_msg(format!("circuit {id} is on no worker yet (Pending)")));
    };
    let worker = state
        .store
        .get_worker(worker_id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound => BaiError::not_found("circuit"),
            e => e.into(),
        })?;
    Ok((route, worker))
}

async fn get_circuit(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(CircuitIdPath { circuit_id }): BaiPath<CircuitIdPath>,
) -> Result<Json<Circuit>, BaiError> {
    let (route, worker) = placed_circuit(&state, circuit_id).await?;
    Ok(Json(Circuit::of(&route, &worker)))
}

/// Deletes Backend.AI circuit `id` (a route; its worker hears of it from
/// the event bus); answers whether it was there to delete. A native route is
/// left alone, as if absent. The route is deleted only as it was read, so it
/// cannot become another route between the check and the delete.
async fn delete_backendai_circuit(state: &AppState, id: Uuid) -> Result<bool, BaiError> {
    loop {
        let route = match backendai_circuit(state, id).await {
            Ok(route) => route,
            Err(e) if e.status == axum::http::StatusCode::NOT_FOUND => return Ok(false),
            Err(e) => return Err(e),
        };
        if state
            .store
            .delete_route_at(id, route.revision, state.clock.now())
            .await?
        {
            return Ok(true);
        }
    }
}

/// `DELETE /api/circuit/{id}`: 404 `No such circuit.` when there is none.
async fn delete_one(state: &AppState, id: Uuid) -> Result<Json<SuccessModel>, BaiError> {
    if !delete_backendai_circuit(state, id).await? {
        return Err(BaiError::not_found("circuit"));
    }
    tracing::info!(circuit = %id, "circuit deleted through the worker API");
    Ok(Json(SUCCESS))
}

async fn delete_circuit(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(CircuitIdPath { circuit_id }): BaiPath<CircuitIdPath>,
) -> Result<Json<SuccessModel>, BaiError> {
    delete_one(&state, circuit_id).await
}

async fn delete_circuit_v1(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(CircuitIdPath { circuit_id }): BaiPath<CircuitIdPath>,
) -> Result<Json<SuccessModel>, BaiError> {
    delete_one(&state, circuit_id).await
}

/// `DELETE /api/circuit/_/bulk` body (or query, when there is no body).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct BulkDelete {
    /// Circuit ids: a list, or one string of comma-separated ids.
    pub circuit_ids: CircuitIds,
}

/// A list of circuit ids, or a comma-separated string of them.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum CircuitIds {
    List(Vec<Uuid>),
    Text(String),
}

impl CircuitIds {
    fn ids(self) -> Result<Vec<Uuid>, BaiError> {
        match self {
            CircuitIds::List(ids) => Ok(ids),
            CircuitIds::Text(text) => text
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<Uuid>().map_err(|e| {
                        validation_error(
                            vec![json!("circuit_ids")],
                            format!("{s:?} is not a UUID: {e}"),
                        )
                    })
                })
                .collect(),
        }
    }
}

/// The bulk delete's ids, from the body as upstream reads bodies, or from
/// the query string when the body is empty.
pub struct BulkDeleteRequest(pub Vec<Uuid>);

impl<S: Send + Sync> FromRequest<S> for BulkDeleteRequest {
    type Rejection = BaiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, BaiError> {
        let uri = request.uri().clone();
        let yaml = super::is_yaml(request.headers());
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|e| BaiError::invalid_params(format!("Malformed body: {e}")))?;
        let value: serde_json::Value = if bytes.iter().all(u8::is_ascii_whitespace) {
            let axum::extract::Query(pairs) =
                axum::extract::Query::<HashMap<String, String>>::try_from_uri(&uri)
                    .map_err(|e| validation_error(vec![json!("query")], e.body_text()))?;
            json!(pairs)
        } else {
            super::parse_body(bytes, yaml).await?
        };
        let request: BulkDelete = super::from_value(value)?;
        request.circuit_ids.ids().map(BulkDeleteRequest)
    }
}

/// `DELETE /api/circuit/_/bulk`: deletes every listed Backend.AI circuit;
/// unknown ids and native routes are skipped (as upstream, the answer is
/// `success` either way).
async fn delete_circuits(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BulkDeleteRequest(ids): BulkDeleteRequest,
) -> Result<Json<SuccessModel>, BaiError> {
    let mut deleted = 0;
    for id in ids {
        if delete_backendai_circuit(&state, id).await? {
            deleted += 1;
        }
    }
    tracing::info!(deleted, "circuits deleted in bulk through the worker API");
    Ok(Json(SUCCESS))
}

/// `GET /api/circuit/{circuit_id}/statistics`: the circuit, with the
/// traffic its worker counted in Redis DB 2 (503 when Redis does not answer).
async fn statistics(
    State(state): State<AppState>,
    Authorized(bai): Authorized,
    BaiPath(CircuitIdPath { circuit_id }): BaiPath<CircuitIdPath>,
) -> Result<Json<CircuitStatistics>, BaiError> {
    let (route, worker) = placed_circuit(&state, circuit_id).await?;
    let traffic = live::circuit_traffic(&bai.redis, circuit_id)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, circuit = %circuit_id, "cannot read circuit statistics from Redis");
            BaiError::service_unavailable("Redis does not answer")
        })?;
    let circuit = Circuit::of(&route, &worker);
    let last_access = traffic
        .last_access
        .unwrap_or(route.created_at.timestamp_micros() as f64 / 1e6);
    let now = state.clock.now().timestamp_micros() as f64 / 1e6;
    let collected = circuit.app_mode == AppMode::Interactive && circuit.protocol == "http";
    let ttl = collected.then(|| {
        let idle = (now - last_access).max(0.0);
        (bai.settings.idle_timeout.as_secs_f64() - idle)
            .max(0.0)
            .round() as i64
    });
    Ok(Json(CircuitStatistics {
        circuit,
        requests: traffic.requests,
        last_access: (last_access * 1000.0).round() as i64,
        ttl,
    }))
}

/// The Backend.AI workers `GET /api/slots` is about: the one named
/// `authority` (404 when there is none), else all.
async fn slot_workers(
    state: &AppState,
    authority: Option<&str>,
) -> Result<Vec<(Worker, Vec<Route>)>, BaiError> {
    match authority {
        Some(name) => {
            let worker = state
                .store
                .worker_by_name(name)
                .await?
                .filter(|w| w.backendai.is_some())
                .ok_or_else(|| BaiError::not_found("worker"))?;
            let routes = routes_of(state, worker.id).await?;
            Ok(vec![(worker, routes)])
        }
        None => backendai_workers(state).await,
    }
}

async fn slots(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiQuery(query): BaiQuery<SlotsQuery>,
) -> Result<Json<SlotListModel>, BaiError> {
    let slots = slot_workers(&state, query.wsproxy_host.as_deref())
        .await?
        .iter()
        .flat_map(|(w, routes)| slots_of(w, routes))
        .filter(|s| s.in_use || !query.in_use)
        .collect();
    Ok(Json(SlotListModel { slots }))
}

/// `GET /v1/api/worker`: a bare array in the v1 shape.
async fn list_v1(
    State(state): State<AppState>,
    Authorized(_): Authorized,
) -> Result<Json<Vec<WorkerV1>>, BaiError> {
    let workers = backendai_workers(&state)
        .await?
        .into_iter()
        .map(|(w, _)| {
            let model = worker_response(&w, &[]);
            let range = model.port_range;
            WorkerV1 {
                authority: w.name.clone(),
                endpoint: worker_api_url(&w),
                total_slots: model.available_slots,
                ports_in_use: w.route_count,
                min_range: range.map(|r| r[0]),
                max_range: range.map(|r| r[1]),
                wildcard_domain: model.wildcard_domain,
                created: model.created_at,
                updated: model.updated_at,
            }
        })
        .collect();
    Ok(Json(workers))
}

/// `GET /v1/api/slots`: the slots in use, with their circuits, as a bare array.
async fn slots_v1(
    State(state): State<AppState>,
    Authorized(_): Authorized,
) -> Result<Json<Vec<SlotV1>>, BaiError> {
    let mut slots = Vec::new();
    for (worker, routes) in backendai_workers(&state).await? {
        for route in &routes {
            let c = Circuit::of(route, &worker);
            slots.push(SlotV1 {
                rel: c.id,
                port: c.port,
                subdomain: c.subdomain.clone(),
                wsproxy_version: "v2",
                worker_authority: worker.name.clone(),
                circuit_app: c.app.clone(),
                circuit_session_id: c.session_ids.first().copied(),
                circuit_open_to_public: c.open_to_public,
                circuit_allowed_client_ips: c.allowed_client_ips.clone(),
                circuit_envs: (!c.envs.is_empty())
                    .then(|| serde_json::to_string(&c.envs).unwrap_or_default()),
                circuit_arguments: c.arguments.clone(),
                circuit_created: iso_time(c.created_at),
                circuit_modified: iso_time(c.updated_at),
            });
        }
    }
    Ok(Json(slots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_ids_come_as_a_list_or_a_comma_separated_string() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        let list: BulkDelete = serde_json::from_value(json!({"circuit_ids": [a, b]})).unwrap();
        assert_eq!(list.circuit_ids.ids().unwrap(), vec![a, b]);
        let text: BulkDelete =
            serde_json::from_value(json!({"circuit_ids": format!("{a}, {b},")})).unwrap();
        assert_eq!(text.circuit_ids.ids().unwrap(), vec![a, b]);
        let bad: BulkDelete = serde_json::from_value(json!({"circuit_ids": "nope"})).unwrap();
        assert_eq!(bad.circuit_ids.ids().unwrap_err().status, 400);
    }
}
