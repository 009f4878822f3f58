//! What the Backend.AI workers' `/api/worker` and `/api/slots` calls do:
//! register, heartbeat, deregister, and the workers with the routes on them.
//! The shapes they are answered in are [`super::worker`].
//!
//! A Backend.AI worker is a worker registered through `PUT /api/worker` (its
//! name is its authority); these calls see only those: a worker registered
//! through the native API has no Backend.AI description (host, API port,
//! TLS, nodes) and is `No such worker.` here. A worker's own list (its
//! circuits, its slots) is whatever is placed on it, since it serves all of
//! that.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::circuit::{Circuit, CircuitBody};
use super::worker::{RegistrationError, SlotModel, WorkerRequest, slots_of};
use super::{BackendAi, Error, live};
use crate::domain::health::Observation;
use crate::domain::{Route, Worker};
use crate::health;
use crate::store::{Registered, Store, StoreError};

/// `No such worker.` for a store's `NotFound`.
fn no_worker(e: StoreError) -> Error {
    match e {
        StoreError::NotFound => Error::not_found("worker"),
        e => e.into(),
    }
}

impl From<RegistrationError> for Error {
    fn from(e: RegistrationError) -> Error {
        match e {
            RegistrationError::MissingFrontend(msg) => Error::MissingFrontendConfig(msg.into()),
            RegistrationError::Invalid(msg) => {
                let field = if msg.starts_with("frontend_mode") {
                    "frontend_mode"
                } else {
                    "protocol"
                };
                Error::invalid(&[field], msg)
            }
        }
    }
}

/// Registers a Backend.AI worker, or re-registers it by authority (same id,
/// routes kept, one node more). The api_secret is trusted like the worker
/// itself, so a worker restarted before its old registration went silent
/// gets its registration back at once.
pub async fn register(
    store: &Store,
    now: DateTime<Utc>,
    request: &WorkerRequest,
) -> Result<Registered, Error> {
    // A native worker's name is refused by the store (`may_register`).
    let existing = store.worker_by_name(&request.authority).await?;
    let nodes = existing
        .as_ref()
        .and_then(|w| w.backendai.as_ref())
        .map_or(1, |b| b.nodes.saturating_add(1));
    let registration = request.to_registration(nodes)?;
    // The worker never presents a token of ours: the hash is of one nobody has.
    let registered = store
        .register_worker(registration, existing.map(|w| w.id), now, |_| {
            rand::random()
        })
        .await?;
    let worker = &registered.worker;
    tracing::info!(worker = %worker.id, authority = %worker.name, nodes, created = registered.created, "Backend.AI worker registered");
    Ok(registered)
}

/// Backend.AI worker `id`; `No such worker.` for an unknown or native one.
pub async fn get(store: &Store, id: Uuid) -> Result<Worker, Error> {
    let worker = store.get_worker(id).await.map_err(no_worker)?;
    if worker.backendai.is_none() {
        return Err(Error::not_found("worker"));
    }
    Ok(worker)
}

/// The routes on worker `id`.
pub async fn routes_of(store: &Store, id: Uuid) -> Result<Vec<Route>, Error> {
    Ok(store.snapshot(Some(id)).await?.1)
}

/// Backend.AI worker `id` with the routes on it.
pub async fn with_routes(store: &Store, id: Uuid) -> Result<(Worker, Vec<Route>), Error> {
    let worker = get(store, id).await?;
    let routes = routes_of(store, id).await?;
    Ok((worker, routes))
}

/// Every Backend.AI worker with its routes.
pub async fn all(store: &Store) -> Result<Vec<(Worker, Vec<Route>)>, Error> {
    let workers = store.list_workers().await?;
    let (_, routes) = store.snapshot(None).await?;
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

/// A heartbeat of Backend.AI worker `id`, by the same rules as a native
/// worker's (a `Lost` worker comes back); also writes
/// `proxy-worker.last_seen` in Redis DB 2 (in the background: a Redis failure
/// is logged, not answered). Answers the worker, as it is now, with its
/// routes.
pub async fn heartbeat(
    store: &Store,
    bai: &BackendAi,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<(Worker, Vec<Route>), Error> {
    let worker = get(store, id).await?;
    // Revision 0 acknowledges nothing new: what the worker applied is the
    // event bus's business.
    health::heartbeat(store, id, 0, now)
        .await
        .map_err(no_worker)?;
    let authority = worker.name.clone();
    let seen = now.timestamp_micros() as f64 / 1e6;
    let redis = bai.live.clone();
    tokio::spawn(async move { live::record_last_seen(&redis, &authority, seen).await });
    let worker = store.get_worker(id).await.map_err(no_worker)?;
    let routes = routes_of(store, id).await?;
    Ok((worker, routes))
}

/// One node of worker `id` stopped. When none is left the worker is `Lost`,
/// as if it had gone silent: its circuits wait for it (or fail over) by the
/// usual rules; the row stays.
pub async fn deregister(store: &Store, id: Uuid, now: DateTime<Utc>) -> Result<(), Error> {
    let worker = store
        .backendai_node_left(id, now)
        .await
        .map_err(no_worker)?;
    let nodes = worker.backendai.as_ref().map_or(0, |b| b.nodes);
    tracing::info!(worker = %id, authority = %worker.name, nodes, "Backend.AI worker deregistered");
    if nodes == 0 {
        health::observe(store, id, Observation::HeartbeatTimeout, now)
            .await
            .map_err(no_worker)?;
    }
    Ok(())
}

/// Every circuit on Backend.AI worker `id`, with its status. The worker
/// registers each as it reads them: they count as delivered
/// ([`BackendAi::fetched`]).
pub async fn circuits(store: &Store, bai: &BackendAi, id: Uuid) -> Result<Vec<CircuitBody>, Error> {
    let (worker, routes) = with_routes(store, id).await?;
    let fetched = routes
        .iter()
        .map(|r| serde_json::to_value(Circuit::of(r, &worker)).expect("circuits serialise"))
        .collect();
    bai.fetched(&worker.name, fetched).await;
    Ok(routes.iter().map(|r| CircuitBody::of(r, &worker)).collect())
}

/// The slots of the Backend.AI worker named `authority` (`No such worker.`
/// when there is none), else of all; only those in use when `in_use_only`.
pub async fn slots(
    store: &Store,
    authority: Option<&str>,
    in_use_only: bool,
) -> Result<Vec<SlotModel>, Error> {
    let workers = match authority {
        Some(name) => {
            let worker = store
                .worker_by_name(name)
                .await?
                .filter(|w| w.backendai.is_some())
                .ok_or_else(|| Error::not_found("worker"))?;
            let routes = routes_of(store, worker.id).await?;
            vec![(worker, routes)]
        }
        None => all(store).await?,
    };
    Ok(workers
        .iter()
        .flat_map(|(w, routes)| slots_of(w, routes))
        .filter(|s| s.in_use || !in_use_only)
        .collect())
}
