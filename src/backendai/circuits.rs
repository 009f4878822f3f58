//! Circuits as the Backend.AI API reads and deletes them: the worker a
//! circuit is on, and the workers' `/api/circuit` calls (read, delete,
//! traffic). The wire shape is [`super::circuit`].
//!
//! The `/api/circuit` calls see only Backend.AI circuits (routes created
//! through Backend.AI's API): every worker holds the api_secret, and it must
//! not read or delete routes created through the native API (`No such
//! circuit.`, as if absent).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::circuit::CircuitBody;
use super::{BackendAi, Error, live};
use crate::clock::Clock;
use crate::domain::{AppMode, Route, Worker};
use crate::store::{Store, StoreError};

/// The worker `route` sits on; worker-not-available while it has none.
pub async fn worker_of(store: &Store, route: &Route) -> Result<Worker, Error> {
    let id = route
        .worker_id
        .ok_or_else(|| Error::WorkerNotAvailable(format!("circuit {} has no worker", route.id)))?;
    Ok(store.get_worker(id).await?)
}

/// Backend.AI circuit `id`: a route created through Backend.AI's API (it has
/// circuit fields); `No such circuit.` for an unknown or native route.
pub async fn get(store: &Store, id: Uuid) -> Result<Route, Error> {
    let route = store.get_route(id).await.map_err(|e| match e {
        StoreError::NotFound => Error::not_found("circuit"),
        e => e.into(),
    })?;
    if route.circuit.is_none() {
        return Err(Error::not_found("circuit"));
    }
    Ok(route)
}

/// Backend.AI circuit `id` and its worker; `No such circuit.` for an unknown
/// or native route and for one no worker holds (it is `Pending`).
pub async fn placed(store: &Store, id: Uuid) -> Result<(Route, Worker), Error> {
    let route = get(store, id).await?;
    let Some(worker_id) = route.worker_id else {
        return Err(Error::NotFound {
            object: "circuit",
            detail: Some(format!("circuit {id} is on no worker yet (Pending)")),
        });
    };
    let worker = store.get_worker(worker_id).await.map_err(|e| match e {
        StoreError::NotFound => Error::not_found("circuit"),
        e => e.into(),
    })?;
    Ok((route, worker))
}

/// Deletes Backend.AI circuit `id` (a route; its worker hears of it from the
/// event bus); answers whether it was there to delete. A native route is
/// left alone, as if absent. The route is deleted only as it was read, so it
/// cannot become another route between the check and the delete.
async fn delete(store: &Store, clock: &Clock, id: Uuid) -> Result<bool, Error> {
    loop {
        let route = match get(store, id).await {
            Ok(route) => route,
            Err(Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        if store
            .delete_route_at(id, route.revision, clock.now())
            .await?
        {
            return Ok(true);
        }
    }
}

/// `DELETE /api/circuit/{id}`: `No such circuit.` when there is none.
pub async fn delete_one(store: &Store, clock: &Clock, id: Uuid) -> Result<(), Error> {
    if !delete(store, clock, id).await? {
        return Err(Error::not_found("circuit"));
    }
    tracing::info!(circuit = %id, "circuit deleted through the worker API");
    Ok(())
}

/// `DELETE /api/circuit/_/bulk`: deletes every listed Backend.AI circuit;
/// unknown ids and native routes are skipped.
pub async fn delete_many(store: &Store, clock: &Clock, ids: Vec<Uuid>) -> Result<(), Error> {
    let mut deleted = 0;
    for id in ids {
        if delete(store, clock, id).await? {
            deleted += 1;
        }
    }
    tracing::info!(deleted, "circuits deleted in bulk through the worker API");
    Ok(())
}

/// A circuit and the traffic its worker counted.
#[derive(Debug)]
pub struct Statistics {
    pub circuit: CircuitBody,
    /// Requests the worker counted (`circuit.<id>.requests` in Redis DB 2).
    pub requests: i64,
    /// Last request, unix milliseconds (the creation time before the first).
    pub last_access: i64,
    /// Seconds until an unused interactive HTTP circuit is collected (0 when
    /// due); `None` for circuits that are never collected.
    pub ttl: Option<i64>,
}

/// Circuit `id` with the traffic its worker counted in Redis DB 2
/// (unavailable when Redis does not answer).
pub async fn statistics(
    store: &Store,
    bai: &BackendAi,
    clock: &Clock,
    id: Uuid,
) -> Result<Statistics, Error> {
    let (route, worker) = placed(store, id).await?;
    let traffic = live::circuit_traffic(&bai.live, id).await.map_err(|e| {
        tracing::warn!(error = %e, circuit = %id, "cannot read circuit statistics from Redis");
        Error::Unavailable("Redis does not answer".into())
    })?;
    let circuit = CircuitBody::of(&route, &worker);
    let last_access = traffic
        .last_access
        .unwrap_or(unix_seconds(route.created_at));
    let now = unix_seconds(clock.now());
    let collected =
        circuit.circuit.app_mode == AppMode::Interactive && circuit.circuit.protocol == "http";
    let ttl = collected.then(|| {
        let idle = (now - last_access).max(0.0);
        (bai.settings.idle_timeout.as_secs_f64() - idle)
            .max(0.0)
            .round() as i64
    });
    Ok(Statistics {
        circuit,
        requests: traffic.requests,
        last_access: (last_access * 1000.0).round() as i64,
        ttl,
    })
}

fn unix_seconds(t: DateTime<Utc>) -> f64 {
    t.timestamp_micros() as f64 / 1e6
}
