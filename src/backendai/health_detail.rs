//! What upstream's `/health/summary`, `/health/endpoints` and
//! `/health/circuits/{id}` were meant to say (they always fail there):
//! upstream's shapes (`HealthStatusResponseModel` and its parts), filled
//! with what the coordinator knows of the workers and circuits, and beyond
//! upstream each circuit's state (status, worker, URL, why it is pending or
//! stranded) and each worker's.
//!
//! **Health is the proxy path's, not the model's.** Neither upstream nor
//! this coordinator probes the model servers (the worker picks among
//! replicas with its own TCP probe). A circuit is *healthy* when it is
//! served — `Active` on a worker that is not `Lost` or `NotReady` —,
//! *unhealthy* when it cannot be — `Pending` (no worker), its worker `Lost`
//! (failing over, or stranded there) or `NotReady` —, and *unknown* while its
//! worker has not yet acknowledged it (`Propagating`). Each replica of a
//! circuit (a `route_info` entry with a route id, as upstream counts them)
//! has its circuit's health.

use std::collections::HashMap;

use serde::Serialize;
use uuid::Uuid;

use super::Error;
use super::circuit::{RouteInfo, endpoint_url, iso_time};
use super::circuits;
use crate::domain::{Route, RouteStatus, Worker, WorkerStatus};
use crate::store::Store;

/// One replica (`RouteHealthStatusModel`).
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct RouteHealth {
    pub route_id: Uuid,
    pub session_id: Uuid,
    pub kernel_host: Option<String>,
    pub kernel_port: u16,
    pub protocol: String,
    /// `healthy`, `unhealthy`, or `null` (unknown): its circuit's health.
    pub health_status: Option<&'static str>,
    /// Always `null`: the coordinator runs no model health checks.
    pub last_health_check: Option<f64>,
    /// Always 0, for the same reason.
    pub consecutive_failures: u32,
    /// The circuit's.
    pub created_at: String,
    pub updated_at: String,
}

/// What a circuit's state is, beyond upstream's counts.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct CircuitState {
    pub circuit_id: Uuid,
    pub app: String,
    pub session_id: Option<Uuid>,
    pub status: RouteStatus,
    /// `true` served, `false` cannot be served, `null` not yet acknowledged.
    pub healthy: Option<bool>,
    /// Its worker's authority; `null` while it has none (`Pending`).
    pub worker: Option<String>,
    pub worker_status: Option<WorkerStatus>,
    /// Where users reach it (trailing `/`).
    pub url: Option<String>,
    /// Why no worker can take it, while `Pending`.
    pub pending_reason: Option<String>,
    /// Why it stays on its Lost worker (a move would change its URL).
    pub stranded_reason: Option<String>,
}

/// One circuit (`CircuitHealthStatusModel` and its state).
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct CircuitHealth {
    pub endpoint_id: Option<Uuid>,
    /// Its replicas (an interactive circuit has one, its session's).
    pub total_routes: usize,
    pub healthy_routes: usize,
    /// The replicas with a route id (inference), as upstream lists them.
    pub all_routes: Vec<RouteHealth>,
    #[serde(flatten)]
    pub state: CircuitState,
}

/// One inference endpoint (`EndpointHealthStatusModel` and its circuit's
/// state).
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct EndpointHealth {
    pub endpoint_id: Uuid,
    /// Whether the Manager sent a model health check (stored, not run).
    pub health_check_enabled: bool,
    pub total_routes: usize,
    pub healthy_routes: usize,
    pub unhealthy_routes: usize,
    pub unknown_routes: usize,
    pub routes: Vec<RouteHealth>,
    #[serde(flatten)]
    pub state: CircuitState,
}

/// A worker's health.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct WorkerHealth {
    pub authority: String,
    pub status: WorkerStatus,
    pub last_heartbeat: String,
    /// The circuits (routes) on it.
    pub occupied_slots: u64,
    /// Revisions it has not acknowledged yet.
    pub revision_lag: i64,
}

/// Everything at a glance (`HealthSummaryModel` and beyond).
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct HealthSummary {
    /// Inference endpoints (every one, not only those with a health check).
    pub total_endpoints: usize,
    pub endpoints_with_health_checks: usize,
    /// Their replicas, by their circuit's health.
    pub total_routes: usize,
    pub healthy_routes: usize,
    pub unhealthy_routes: usize,
    pub unknown_routes: usize,
    /// Every circuit, interactive ones included, by health.
    pub total_circuits: usize,
    pub healthy_circuits: usize,
    pub unhealthy_circuits: usize,
    /// Circuits kept on their Lost worker (counted unhealthy too).
    pub stranded_circuits: usize,
    pub workers: Vec<WorkerHealth>,
}

/// `HealthStatusResponseModel`: one of the three is set, by path.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct HealthDetail {
    pub success: bool,
    pub summary: Option<HealthSummary>,
    pub endpoints: Option<Vec<EndpointHealth>>,
    pub circuits: Option<Vec<CircuitHealth>>,
}

/// A circuit's path health: see the module's documentation.
pub fn path_health(route: &Route, worker: Option<&Worker>) -> Option<bool> {
    match (route.status, worker.map(|w| w.status)) {
        (RouteStatus::Pending | RouteStatus::FailingOver, _) | (_, None) => Some(false),
        (_, Some(WorkerStatus::Lost | WorkerStatus::NotReady)) => Some(false),
        (RouteStatus::Active, _) => Some(true),
        (RouteStatus::Propagating, _) => None,
    }
}

fn health_word(health: Option<bool>) -> Option<&'static str> {
    health.map(|h| if h { "healthy" } else { "unhealthy" })
}

/// The workers, the circuits and the stranded reasons, read once.
struct Facts {
    workers: HashMap<Uuid, Worker>,
    circuits: Vec<Route>,
    stranded: HashMap<Uuid, String>,
}

impl Facts {
    async fn read(store: &Store) -> Result<Facts, Error> {
        let workers = store.list_workers().await?;
        let (_, routes) = store.snapshot(None).await?;
        let stranded = store.stranded_routes().await?;
        Ok(Facts {
            workers: workers.into_iter().map(|w| (w.id, w)).collect(),
            circuits: routes.into_iter().filter(|r| r.circuit.is_some()).collect(),
            stranded: stranded
                .into_iter()
                .map(|s| (s.route.id, s.reason))
                .collect(),
        })
    }

    fn state(&self, route: &Route) -> CircuitState {
        state(
            route,
            route.worker_id.and_then(|id| self.workers.get(&id)),
            self.stranded.get(&route.id).cloned(),
        )
    }
}

fn state(route: &Route, worker: Option<&Worker>, stranded: Option<String>) -> CircuitState {
    CircuitState {
        circuit_id: route.id,
        app: route.service.clone(),
        session_id: route.session_id,
        status: route.status,
        healthy: path_health(route, worker),
        worker: worker.map(|w| w.name.clone()),
        worker_status: worker.map(|w| w.status),
        url: worker.and_then(|w| endpoint_url(route, w)),
        pending_reason: route.pending_reason.clone(),
        stranded_reason: stranded,
    }
}

/// The replicas of `route` with a route id, each with `health`.
fn replicas(route: &Route, health: Option<bool>) -> Vec<RouteHealth> {
    route
        .targets
        .iter()
        .map(|t| RouteInfo::of(route, t))
        .filter_map(|info| {
            Some(RouteHealth {
                route_id: info.route_id?,
                session_id: info.session_id,
                kernel_host: info.kernel_host,
                kernel_port: info.kernel_port,
                protocol: info.protocol,
                health_status: health_word(health),
                last_health_check: None,
                consecutive_failures: 0,
                created_at: iso_time(route.created_at),
                updated_at: iso_time(route.updated_at),
            })
        })
        .collect()
}

fn endpoint_health(route: &Route, state: CircuitState) -> Option<EndpointHealth> {
    let routes = replicas(route, state.healthy);
    let count = |h: Option<bool>| if state.healthy == h { routes.len() } else { 0 };
    Some(EndpointHealth {
        endpoint_id: route.endpoint_id?,
        health_check_enabled: route
            .circuit
            .as_ref()
            .is_some_and(|c| c.health_check.is_some()),
        total_routes: routes.len(),
        healthy_routes: count(Some(true)),
        unhealthy_routes: count(Some(false)),
        unknown_routes: count(None),
        routes,
        state,
    })
}

/// `/health/summary`.
pub async fn summary(store: &Store) -> Result<HealthSummary, Error> {
    let facts = Facts::read(store).await?;
    let endpoints: Vec<EndpointHealth> = facts
        .circuits
        .iter()
        .filter_map(|r| endpoint_health(r, facts.state(r)))
        .collect();
    let states: Vec<CircuitState> = facts.circuits.iter().map(|r| facts.state(r)).collect();
    let mut workers: Vec<WorkerHealth> = facts
        .workers
        .values()
        .map(|w| WorkerHealth {
            authority: w.name.clone(),
            status: w.status,
            last_heartbeat: iso_time(w.last_heartbeat),
            occupied_slots: w.route_count,
            revision_lag: w.revision_lag,
        })
        .collect();
    workers.sort_by(|a, b| a.authority.cmp(&b.authority));
    let sum = |f: fn(&EndpointHealth) -> usize| endpoints.iter().map(f).sum::<usize>();
    Ok(HealthSummary {
        total_endpoints: endpoints.len(),
        endpoints_with_health_checks: endpoints.iter().filter(|e| e.health_check_enabled).count(),
        total_routes: sum(|e| e.total_routes),
        healthy_routes: sum(|e| e.healthy_routes),
        unhealthy_routes: sum(|e| e.unhealthy_routes),
        unknown_routes: sum(|e| e.unknown_routes),
        total_circuits: states.len(),
        healthy_circuits: states.iter().filter(|s| s.healthy == Some(true)).count(),
        unhealthy_circuits: states.iter().filter(|s| s.healthy == Some(false)).count(),
        stranded_circuits: states
            .iter()
            .filter(|s| s.stranded_reason.is_some())
            .count(),
        workers,
    })
}

/// `/health/endpoints`: every inference endpoint, by endpoint id.
pub async fn endpoints(store: &Store) -> Result<Vec<EndpointHealth>, Error> {
    let facts = Facts::read(store).await?;
    let mut endpoints: Vec<EndpointHealth> = facts
        .circuits
        .iter()
        .filter_map(|r| endpoint_health(r, facts.state(r)))
        .collect();
    endpoints.sort_by_key(|e| e.endpoint_id);
    Ok(endpoints)
}

/// `/health/circuits/{id}`: one Backend.AI circuit; `No such circuit.` for
/// an unknown or native route.
pub async fn circuit(store: &Store, id: Uuid) -> Result<CircuitHealth, Error> {
    let route = circuits::get(store, id).await?;
    let worker = match route.worker_id {
        Some(w) => store.get_worker(w).await.ok(),
        None => None,
    };
    let stranded = if worker
        .as_ref()
        .is_some_and(|w| w.status == WorkerStatus::Lost)
    {
        store
            .stranded_routes()
            .await?
            .into_iter()
            .find(|s| s.route.id == id)
            .map(|s| s.reason)
    } else {
        None
    };
    let state = state(&route, worker.as_ref(), stranded);
    let all_routes = replicas(&route, state.healthy);
    let total_routes = route.targets.len();
    Ok(CircuitHealth {
        endpoint_id: route.endpoint_id,
        total_routes,
        healthy_routes: if state.healthy == Some(true) {
            total_routes
        } else {
            0
        },
        all_routes,
        state,
    })
}
