//! Worker endpoints: registration (bootstrap token), heartbeats (the worker's
//! own token), listing and removal (manager token, or the worker itself).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::auth::{ManagerOnly, Registrant, WorkerSelf, WorkerSelfOrManager, issue_worker_token};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, WorkerPath, json};
use crate::domain::{Worker, WorkerRegistration};
use crate::health;
use crate::store::Removal;
use crate::telemetry::WorkerLabels;
use crate::wire::{Heartbeat, HeartbeatAck, Registration};

pub async fn register(
    State(state): State<AppState>,
    Registrant(as_worker): Registrant,
    ApiJson(registration): ApiJson<WorkerRegistration>,
) -> Result<Response, ApiError> {
    if registration.backendai.is_some() {
        return Err(ApiError {
            field: Some("backendai".into()),
            ..ApiError::invalid("backendai: a Backend.AI worker registers through PUT /api/worker")
        });
    }
    let now = state.clock.now();
    let mut token = String::new();
    let registered = state
        .store
        .register_worker(registration, as_worker, now, |id| {
            let (issued, hash) = issue_worker_token(id);
            token = issued;
            hash
        })
        .await?;
    let status = if registered.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    tracing::info!(worker = %registered.worker.id, name = %registered.worker.name, created = registered.created, "worker registered");
    Ok(json(
        status,
        Registration {
            worker: registered.worker,
            token,
            revision: registered.revision,
            routes: registered.routes,
        },
    ))
}

pub async fn heartbeat(
    State(state): State<AppState>,
    WorkerSelf(id): WorkerSelf,
    ApiJson(beat): ApiJson<Heartbeat>,
) -> Result<Response, ApiError> {
    if beat.acked_revision < 0 {
        return Err(ApiError {
            field: Some("acked_revision".into()),
            ..ApiError::invalid("acked_revision: a revision is not negative")
        });
    }
    let now = state.clock.now();
    let (status, revision) = health::heartbeat(&state.store, id, beat.acked_revision, now).await?;
    state
        .metrics
        .ack_lag
        .get_or_create(&WorkerLabels {
            worker: id.to_string(),
        })
        .set(revision - beat.acked_revision.min(revision));
    Ok(json(StatusCode::OK, HeartbeatAck { status, revision }))
}

/// Every registered worker.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkerList {
    pub items: Vec<Worker>,
}

pub async fn list(State(state): State<AppState>, _: ManagerOnly) -> Result<Response, ApiError> {
    let items = state.store.list_workers().await?;
    Ok(json(StatusCode::OK, WorkerList { items }))
}

pub async fn get(
    State(state): State<AppState>,
    _: WorkerSelfOrManager,
    ApiPath(WorkerPath { id }): ApiPath<WorkerPath>,
) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, state.store.get_worker(id).await?))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Routes move to other workers either way; `drain` is accepted so callers
    /// can say what they mean.
    #[serde(default)]
    drain: bool,
}

pub async fn delete(
    State(state): State<AppState>,
    _: WorkerSelfOrManager,
    ApiPath(WorkerPath { id }): ApiPath<WorkerPath>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let removal: Removal = state.store.delete_worker(id, state.batch_size, now).await?;
    tracing::info!(worker = %id, drain = query.drain, moved = removal.moved, pending = removal.pending, "worker removed");
    Ok(json(StatusCode::OK, removal))
}
