//! `/health/summary`, `/health/endpoints` and `/health/circuits/{id}`:
//! always 500 upstream; here upstream's shapes with what they were meant to
//! say, worker and circuit health and the stranded circuits (see
//! [`crate::backendai::health_detail`]). The api_secret, as
//! `/health/status`.

use aide::axum::ApiRouter;
use aide::axum::routing::get_with;
use aide::transform::TransformOperation;
use axum::Json;
use axum::extract::State;

use super::auth::Authorized;
use super::circuits::CircuitIdPath;
use super::{BaiError, BaiPath};
use crate::api::AppState;
use crate::api::openapi::backendai::{operation, raises};
use crate::api::openapi::{json_response, respond};
use crate::backendai::health_detail::{self, HealthDetail};

type Op<'a> = TransformOperation<'a>;

/// Adds the three paths to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route("/health/summary", get_with(summary, summary_docs))
        .api_route("/health/endpoints", get_with(endpoints_, endpoints_docs))
        .api_route(
            "/health/circuits/{circuit_id}",
            get_with(circuit, circuit_docs),
        )
}

fn detail() -> HealthDetail {
    HealthDetail {
        success: true,
        summary: None,
        endpoints: None,
        circuits: None,
    }
}

/// `GET /health/summary`: counts of endpoints, replicas and circuits by
/// health, and every worker's.
async fn summary(
    State(state): State<AppState>,
    Authorized(_): Authorized,
) -> Result<Json<HealthDetail>, BaiError> {
    let summary = health_detail::summary(&state.store).await?;
    Ok(Json(HealthDetail {
        summary: Some(summary),
        ..detail()
    }))
}

fn summary_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiHealthSummary",
        "Backend.AI: endpoints, replicas and circuits by health (the proxy path's), and the workers",
    );
    respond(
        op,
        200,
        json_response::<HealthDetail>("`summary` set, `endpoints` and `circuits` null"),
    )
}

/// `GET /health/endpoints`: every inference endpoint with its replicas and
/// its circuit's state.
async fn endpoints_(
    State(state): State<AppState>,
    Authorized(_): Authorized,
) -> Result<Json<HealthDetail>, BaiError> {
    let endpoints = health_detail::endpoints(&state.store).await?;
    Ok(Json(HealthDetail {
        endpoints: Some(endpoints),
        ..detail()
    }))
}

fn endpoints_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiHealthEndpoints",
        "Backend.AI: every inference endpoint's health, replicas and circuit state",
    );
    respond(
        op,
        200,
        json_response::<HealthDetail>("`endpoints` set (by endpoint id), the others null"),
    )
}

/// `GET /health/circuits/{circuit_id}`: one circuit's health and state.
async fn circuit(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(CircuitIdPath { circuit_id }): BaiPath<CircuitIdPath>,
) -> Result<Json<HealthDetail>, BaiError> {
    let circuit = health_detail::circuit(&state.store, circuit_id).await?;
    Ok(Json(HealthDetail {
        circuits: Some(vec![circuit]),
        ..detail()
    }))
}

fn circuit_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiHealthCircuit",
        "Backend.AI: one circuit's health, replicas and state",
    );
    let op = respond(
        op,
        200,
        json_response::<HealthDetail>("`circuits` holds the one circuit, the others null"),
    );
    raises(
        op,
        404,
        "object-not-found: `E00002: No such circuit.` (an unknown id, or a route created \
         through the native API)",
    )
}
