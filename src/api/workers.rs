//! Worker endpoints: registration (bootstrap token), heartbeats (the worker's
//! own token), listing and removal (manager token, or the worker itself).

use aide::axum::ApiRouter;
use aide::axum::routing::{get_with, post_with};
use aide::transform::TransformOperation;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::auth::{ManagerOnly, Registrant, WorkerSelf, WorkerSelfOrManager, issue_worker_token};
use super::openapi::{json_response, raises, respond};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, WorkerPath, json};
use crate::domain::{Worker, WorkerRegistration};
use crate::health;
use crate::store::Removal;
use crate::telemetry::WorkerLabels;
use crate::wire::{Heartbeat, HeartbeatAck, Registration};

type Op<'a> = TransformOperation<'a>;

/// The 404 of a worker's endpoints.
pub(super) const NO_WORKER: &str = "not-found: no such worker";

/// Adds the workers' endpoints (but their watch, `super::watch`) to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route("/workers/register", post_with(register, register_docs))
        .api_route("/workers", get_with(list, list_docs))
        .api_route(
            "/workers/{id}",
            get_with(get, get_docs).delete_with(delete, delete_docs),
        )
        .api_route(
            "/workers/{id}/heartbeat",
            post_with(heartbeat, heartbeat_docs),
        )
}

async fn register(
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

fn register_docs(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("registerWorker")
        .tag("workers")
        .summary("Register a worker; idempotent by name")
        .description(
            "With the bootstrap token: a new name, a Lost worker's name, or a live \
             worker's name from the same pod (same pod uid). With a worker's own token: \
             that worker's name only. The answer carries a new per-worker token, which \
             replaces any earlier one, and the worker's routes as of `revision`.",
        );
    let op = respond(
        op,
        201,
        json_response::<Registration>("Registered for the first time"),
    );
    let op = respond(
        op,
        200,
        json_response::<Registration>("The name was known: same id, routes kept"),
    );
    raises(
        op,
        409,
        "conflict: a live worker holds this name; re-register with its own token, from \
         its pod, or once it is Lost",
    )
}

async fn heartbeat(
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

fn heartbeat_docs(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("heartbeat")
        .tag("workers")
        .summary("Keep a worker alive and acknowledge the revision it applied");
    let op = respond(
        op,
        200,
        json_response::<HeartbeatAck>("The worker's status and the current revision"),
    );
    let op = raises(op, 404, NO_WORKER);
    raises(
        op,
        409,
        "conflict: `acked_revision` is past the coordinator's current revision",
    )
}

/// Every registered worker.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkerList {
    pub items: Vec<Worker>,
}

async fn list(State(state): State<AppState>, _: ManagerOnly) -> Result<Response, ApiError> {
    let items = state.store.list_workers().await?;
    Ok(json(StatusCode::OK, WorkerList { items }))
}

fn list_docs(op: Op<'_>) -> Op<'_> {
    let op = op.id("listWorkers").tag("workers").summary("Every worker");
    respond(op, 200, json_response::<WorkerList>("The workers"))
}

async fn get(
    State(state): State<AppState>,
    _: WorkerSelfOrManager,
    ApiPath(WorkerPath { id }): ApiPath<WorkerPath>,
) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, state.store.get_worker(id).await?))
}

fn get_docs(op: Op<'_>) -> Op<'_> {
    let op = op.id("getWorker").tag("workers").summary("One worker");
    let op = respond(op, 200, json_response::<Worker>("The worker"));
    raises(op, 404, NO_WORKER)
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Routes move to other workers either way; `drain` is accepted so callers
    /// can say what they mean.
    #[serde(default)]
    drain: bool,
}

async fn delete(
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

fn delete_docs(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("deleteWorker")
        .tag("workers")
        .summary("Remove a worker; its routes move to other workers or become Pending");
    let op = respond(
        op,
        200,
        json_response::<Removal>("How many routes moved and how many wait"),
    );
    raises(op, 404, NO_WORKER)
}
