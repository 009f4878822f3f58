//! `/health`: upstream's health answers. `/health` and `/health/readyz`
//! check the database and Redis (each with a short timeout, Redis on the
//! coordinator's one shared connection, a result answered again for a
//! second so a flood of calls costs one check), `/health/livez`
//! only that the process answers. `/health/status` lists the workers that
//! can serve (`Ready`) as upstream's active workers and, beyond upstream,
//! the others with their status, and the Backend.AI circuits stranded on
//! Lost workers (failover keeps them there because a move would change the
//! URL the Manager holds; not served until the worker returns or the
//! Manager re-syncs the endpoint). Upstream's `/health/summary`,
//! `/health/endpoints` and `/health/circuits/{id}` always fail there; here
//! they are [`super::health_detail`].

use aide::axum::ApiRouter;
use aide::axum::routing::get_with;
use aide::transform::TransformOperation;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use uuid::Uuid;

use super::BaiError;
use super::auth::{Authorized, Mode};
use crate::api::AppState;
use crate::api::openapi::backendai::operation;
use crate::api::openapi::{json_response, respond};
use crate::backendai::BackendAi;
use crate::backendai::circuit::{endpoint_url, iso_time};
use crate::domain::{WorkerFrontend, WorkerStatus};

type Op<'a> = TransformOperation<'a>;

/// Adds `/health` and its sub-paths to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route("/health", get_with(overall, overall_docs))
        .api_route("/health/livez", get_with(livez, livez_docs))
        .api_route("/health/readyz", get_with(readyz, readyz_docs))
        .api_route("/health/status", get_with(status, status_docs))
}

/// One dependency's check.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct ConnectivityCheck {
    /// `database` or `redis`.
    pub service_group: String,
    pub component_id: String,
    pub is_healthy: bool,
    pub last_checked_at: String,
    pub error_message: Option<String>,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct Connectivity {
    pub overall_healthy: bool,
    pub connectivity_checks: Vec<ConnectivityCheck>,
    pub timestamp: String,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct HealthResponse {
    /// `ok`; `degraded` (`/health`) or `error` (`/health/readyz`) when a
    /// check failed.
    pub status: &'static str,
    pub version: &'static str,
    pub component: &'static str,
    pub connectivity: Connectivity,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct WorkerSlots {
    pub authority: String,
    /// Ports in its range; -1 for a wildcard worker.
    pub available_slots: i64,
    pub occupied_slots: u64,
    /// Registered more than once (upstream's `nodes` > 1).
    pub ha_setup: bool,
}

/// A worker that cannot serve now, and why.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct UnavailableWorker {
    pub authority: String,
    /// `NotReady` (alive, takes no new circuits), `Lost` (silent: its
    /// circuits are not served) or `Draining` (being removed).
    pub status: WorkerStatus,
    /// Circuits still on it.
    pub occupied_slots: u64,
    /// Its last heartbeat (ISO-8601).
    pub last_heartbeat: String,
}

/// A circuit kept on its Lost worker because a move would change its URL.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct StrandedCircuit {
    pub id: Uuid,
    pub endpoint_id: Option<Uuid>,
    pub session_id: Option<Uuid>,
    /// The Lost worker's authority.
    pub worker: String,
    /// The URL the Manager holds for it.
    pub url: Option<String>,
    /// Why it stays, in a sentence.
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct HealthStatusResponse {
    pub coordinator_version: &'static str,
    pub appproxy_api_version: &'static str,
    /// The workers that can serve (`Ready`): upstream's active workers.
    pub workers: Vec<WorkerSlots>,
    /// The other workers, with their status (beyond upstream).
    pub unavailable_workers: Vec<UnavailableWorker>,
    pub stranded_circuits: Vec<StrandedCircuit>,
}

/// The database and Redis, as [`BackendAi::probe`] last found them.
async fn connectivity(state: &AppState, bai: &BackendAi) -> Connectivity {
    let probe = bai.probe(state.store.ping()).await;
    let now = iso_time(state.clock.now());
    let check = |group: &str, component: &str, error: Option<String>| ConnectivityCheck {
        service_group: group.into(),
        component_id: component.into(),
        is_healthy: error.is_none(),
        last_checked_at: now.clone(),
        error_message: error,
    };
    let checks = vec![
        check("database", state.store.backend(), probe.database),
        check("redis", "redis", probe.redis),
    ];
    Connectivity {
        overall_healthy: checks.iter().all(|c| c.is_healthy),
        connectivity_checks: checks,
        timestamp: now,
    }
}

fn health(status: &'static str, connectivity: Connectivity) -> HealthResponse {
    HealthResponse {
        status,
        version: env!("CARGO_PKG_VERSION"),
        component: "appproxy-coordinator",
        connectivity,
    }
}

/// `GET /health`: always 200; `degraded` when a dependency fails.
async fn overall(State(state): State<AppState>, Mode(bai): Mode) -> Json<HealthResponse> {
    let connectivity = connectivity(&state, &bai).await;
    let status = if connectivity.overall_healthy {
        "ok"
    } else {
        "degraded"
    };
    Json(health(status, connectivity))
}

fn overall_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiHealth",
        "Backend.AI: health with the database and Redis checks (always 200)",
    );
    respond(
        op,
        200,
        json_response::<HealthResponse>("`ok` or `degraded`"),
    )
}

/// `GET /health/livez`: the process answers.
async fn livez(State(state): State<AppState>, Mode(_): Mode) -> Json<HealthResponse> {
    Json(health(
        "ok",
        Connectivity {
            overall_healthy: true,
            connectivity_checks: Vec::new(),
            timestamp: iso_time(state.clock.now()),
        },
    ))
}

fn livez_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(op, "backendaiLivez", "Backend.AI: the process answers");
    respond(op, 200, json_response::<HealthResponse>("`ok`"))
}

/// `GET /health/readyz`: 200 when the database and Redis answer, else 503.
async fn readyz(State(state): State<AppState>, Mode(bai): Mode) -> Response {
    let connectivity = connectivity(&state, &bai).await;
    if connectivity.overall_healthy {
        Json(health("ok", connectivity)).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(health("error", connectivity)),
        )
            .into_response()
    }
}

fn readyz_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiReadyz",
        "Backend.AI: the database and Redis answer",
    );
    let op = respond(op, 200, json_response::<HealthResponse>("`ok`"));
    respond(
        op,
        503,
        json_response::<HealthResponse>("A check failed: `status` `error`"),
    )
}

/// `GET /health/status`: the slots of the workers that can serve, the
/// others with their status, and the stranded circuits.
async fn status(
    State(state): State<AppState>,
    Authorized(_): Authorized,
) -> Result<Json<HealthStatusResponse>, BaiError> {
    let (ready, unavailable): (Vec<_>, Vec<_>) = state
        .store
        .list_workers()
        .await?
        .into_iter()
        .partition(|w| w.status == WorkerStatus::Ready);
    let unavailable_workers = unavailable
        .into_iter()
        .map(|w| UnavailableWorker {
            status: w.status,
            occupied_slots: w.route_count,
            last_heartbeat: iso_time(w.last_heartbeat),
            authority: w.name,
        })
        .collect();
    let workers = ready
        .into_iter()
        .map(|w| WorkerSlots {
            available_slots: match &w.frontend {
                WorkerFrontend::Port { .. } => {
                    i64::try_from(w.frontend.slots()).unwrap_or(i64::MAX)
                }
                WorkerFrontend::Wildcard { .. } => -1,
            },
            occupied_slots: w.route_count,
            ha_setup: w.backendai.as_ref().is_some_and(|b| b.nodes > 1),
            authority: w.name,
        })
        .collect();
    let stranded_circuits = state
        .store
        .stranded_routes()
        .await?
        .into_iter()
        .map(|s| StrandedCircuit {
            url: endpoint_url(&s.route, &s.worker),
            id: s.route.id,
            endpoint_id: s.route.endpoint_id,
            session_id: s.route.session_id,
            worker: s.worker.name,
            reason: s.reason,
        })
        .collect();
    Ok(Json(HealthStatusResponse {
        coordinator_version: env!("CARGO_PKG_VERSION"),
        appproxy_api_version: "v2",
        workers,
        unavailable_workers,
        stranded_circuits,
    }))
}

fn status_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiHealthStatus",
        "Backend.AI: the slots of the workers that can serve, the others, and the circuits \
         stranded on Lost workers",
    );
    let op = op.description(
        "`workers` lists only the workers that can serve (`Ready`), as upstream documents the \
         list (its active workers; upstream 26.9.6 lists every worker whatever its state). \
         Beyond upstream: `unavailable_workers` lists the others (`NotReady`, `Lost`, \
         `Draining`) with their status, the circuits still on them and their last heartbeat; \
         `stranded_circuits` the circuits kept on a `Lost` worker because a failover would \
         change their URL (they are served again when the worker returns, and move to a \
         `Ready` worker when the Manager re-syncs their endpoint with `POST \
         /v2/endpoints/bulk`). Needs the api_secret, as upstream.",
    );
    respond(op, 200, json_response::<HealthStatusResponse>("The status"))
}
