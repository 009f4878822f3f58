//! `/health`: upstream's health answers. `/health` and `/health/readyz`
//! check the database and Redis (each with a short timeout), `/health/livez`
//! only that the process answers. `/health/status` lists the workers as
//! upstream does and, beyond upstream, the Backend.AI circuits stranded on
//! Lost workers (failover keeps them there because a move would change the
//! URL the Manager holds; not served until the worker returns). Upstream's `/health/summary`, `/health/endpoints` and
//! `/health/circuits/{id}` always fail there and are not served here.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use uuid::Uuid;

use super::BaiError;
use super::auth::{Authorized, Mode};
use crate::api::AppState;
use crate::backendai::BackendAi;
use crate::backendai::circuit::{endpoint_url, iso_time};
use crate::domain::WorkerFrontend;

/// How long a dependency may take to answer a health check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

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
    pub workers: Vec<WorkerSlots>,
    pub stranded_circuits: Vec<StrandedCircuit>,
}

async fn timed<F, E>(check: F) -> Option<String>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {CHECK_TIMEOUT:?}")),
    }
}

/// `PING` on a new connection; a failed TLS handshake says so.
async fn ping_redis(client: &redis::Client) -> Result<(), String> {
    let ping = async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map(|_| ())
    };
    ping.await.map_err(|e| crate::backendai::redis_error(&e))
}

/// The database and Redis, checked concurrently.
async fn connectivity(state: &AppState, bai: &BackendAi) -> Connectivity {
    let (database, redis) = tokio::join!(timed(state.store.ping()), timed(ping_redis(&bai.redis)));
    let now = iso_time(state.clock.now());
    let check = |group: &str, component: &str, error: Option<String>| ConnectivityCheck {
        service_group: group.into(),
        component_id: component.into(),
        is_healthy: error.is_none(),
        last_checked_at: now.clone(),
        error_message: error,
    };
    let checks = vec![
        check("database", state.store.backend(), database),
        check("redis", "redis", redis),
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
pub async fn overall(State(state): State<AppState>, Mode(bai): Mode) -> Json<HealthResponse> {
    let connectivity = connectivity(&state, &bai).await;
    let status = if connectivity.overall_healthy {
        "ok"
    } else {
        "degraded"
    };
    Json(health(status, connectivity))
}

/// `GET /health/livez`: the process answers.
pub async fn livez(State(state): State<AppState>, Mode(_): Mode) -> Json<HealthResponse> {
    Json(health(
        "ok",
        Connectivity {
            overall_healthy: true,
            connectivity_checks: Vec::new(),
            timestamp: iso_time(state.clock.now()),
        },
    ))
}

/// `GET /health/readyz`: 200 when the database and Redis answer, else 503.
pub async fn readyz(State(state): State<AppState>, Mode(bai): Mode) -> Response {
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

/// `GET /health/status`: every worker's slots, and the stranded circuits.
pub async fn status(
    State(state): State<AppState>,
    Authorized(_): Authorized,
) -> Result<Json<HealthStatusResponse>, BaiError> {
    let workers = state
        .store
        .list_workers()
        .await?
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
        stranded_circuits,
    }))
}
