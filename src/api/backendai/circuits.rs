//! What Backend.AI App Proxy workers call about circuits: `/api/circuit`
//! and its `/v1` alias. These see only Backend.AI circuits (routes created
//! through Backend.AI's API); what each call does is
//! [`crate::backendai::circuits`].

use std::collections::HashMap;

use aide::axum::ApiRouter;
use aide::axum::routing::{delete_with, get_with};
use aide::transform::TransformOperation;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::auth::Authorized;
use super::{BaiError, BaiPath, SUCCESS, SuccessModel, validation_error};
use crate::api::AppState;
use crate::api::openapi::backendai::{operation, raises};
use crate::api::openapi::{json_response, respond};
use crate::backendai::circuit::CircuitBody;
use crate::backendai::circuits;

type Op<'a> = TransformOperation<'a>;

const NO_CIRCUIT: &str = "object-not-found: `E00002: No such circuit.` (also while the \
                          circuit is on no worker, `Pending`)";

/// Adds the circuits' endpoints to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route(
            "/api/circuit/{circuit_id}",
            get_with(get, get_docs).delete_with(delete, delete_docs),
        )
        .api_route(
            "/api/circuit/{circuit_id}/statistics",
            get_with(statistics, statistics_docs),
        )
        .api_route(
            "/api/circuit/_/bulk",
            delete_with(delete_many, delete_many_docs),
        )
        .api_route(
            "/v1/api/circuit/{circuit_id}",
            delete_with(delete_v1, delete_v1_docs),
        )
}

/// `{circuit_id}` of a circuit.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CircuitIdPath {
    /// The circuit's id (a route id).
    pub circuit_id: Uuid,
}

/// `GET /api/circuit/{circuit_id}/statistics`: the circuit and its traffic.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct CircuitStatistics {
    #[serde(flatten)]
    pub circuit: CircuitBody,
    /// Requests the worker counted (`circuit.<id>.requests` in Redis DB 2).
    pub requests: i64,
    /// Last request, unix milliseconds (`circuit.<id>.last_access`; the
    /// creation time before the first request).
    pub last_access: i64,
    /// Seconds until an unused interactive HTTP circuit is collected (0 when
    /// due); `null` for circuits that are never collected (inference, TCP).
    pub ttl: Option<i64>,
}

async fn get(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(CircuitIdPath { circuit_id }): BaiPath<CircuitIdPath>,
) -> Result<Json<CircuitBody>, BaiError> {
    let (route, worker) = circuits::placed(&state.store, circuit_id).await?;
    Ok(Json(CircuitBody::of(&route, &worker)))
}

fn get_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(op, "backendaiGetCircuit", "Backend.AI: one circuit");
    let op = respond(
        op,
        200,
        json_response::<CircuitBody>(
            "The circuit (`SerializableCircuit`) with, beyond upstream, its `status`: `active` \
             when its worker is `Ready` and holds it; `propagating` (`Ready`, not acknowledged \
             yet), `worker_not_ready`, `worker_lost` (not served until its worker returns, it \
             fails over, or the Manager re-syncs its endpoint) or `worker_draining` otherwise",
        ),
    );
    raises(op, 404, NO_CIRCUIT)
}

/// `DELETE /api/circuit/{circuit_id}`: 404 `No such circuit.` when there is
/// none (or it is a native route).
async fn delete(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(CircuitIdPath { circuit_id }): BaiPath<CircuitIdPath>,
) -> Result<Json<SuccessModel>, BaiError> {
    circuits::delete_one(&state.store, &state.clock, circuit_id).await?;
    Ok(Json(SUCCESS))
}

fn delete_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(op, "backendaiDeleteCircuit", "Backend.AI: delete a circuit");
    let op = respond(
        op,
        200,
        json_response::<SuccessModel>("`{\"success\": true}`"),
    );
    raises(op, 404, NO_CIRCUIT)
}

/// `DELETE /v1/api/circuit/{circuit_id}`: as `/api/circuit/{circuit_id}`.
async fn delete_v1(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BaiPath(CircuitIdPath { circuit_id }): BaiPath<CircuitIdPath>,
) -> Result<Json<SuccessModel>, BaiError> {
    circuits::delete_one(&state.store, &state.clock, circuit_id).await?;
    Ok(Json(SUCCESS))
}

fn delete_v1_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiDeleteCircuitV1",
        "Backend.AI v1: delete a circuit",
    );
    let op = respond(
        op,
        200,
        json_response::<SuccessModel>("`{\"success\": true}`"),
    );
    raises(op, 404, NO_CIRCUIT)
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
async fn delete_many(
    State(state): State<AppState>,
    Authorized(_): Authorized,
    BulkDeleteRequest(ids): BulkDeleteRequest,
) -> Result<Json<SuccessModel>, BaiError> {
    circuits::delete_many(&state.store, &state.clock, ids).await?;
    Ok(Json(SUCCESS))
}

fn delete_many_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiDeleteCircuits",
        "Backend.AI: delete circuits in bulk (unknown ids are skipped)",
    );
    respond(
        op,
        200,
        json_response::<SuccessModel>("`{\"success\": true}`"),
    )
}

/// `GET /api/circuit/{circuit_id}/statistics`: the circuit, with the
/// traffic its worker counted in Redis DB 2 (503 when Redis does not answer).
async fn statistics(
    State(state): State<AppState>,
    Authorized(bai): Authorized,
    BaiPath(CircuitIdPath { circuit_id }): BaiPath<CircuitIdPath>,
) -> Result<Json<CircuitStatistics>, BaiError> {
    let s = circuits::statistics(&state.store, &bai, &state.clock, circuit_id).await?;
    Ok(Json(CircuitStatistics {
        circuit: s.circuit,
        requests: s.requests,
        last_access: s.last_access,
        ttl: s.ttl,
    }))
}

fn statistics_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiCircuitStatistics",
        "Backend.AI: a circuit and its traffic",
    );
    let op = respond(
        op,
        200,
        json_response::<CircuitStatistics>(
            "The circuit (with its `status`, as `GET /api/circuit/{circuit_id}`) and \
             `requests`, `last_access`, `ttl`",
        ),
    );
    let op = raises(op, 404, NO_CIRCUIT);
    raises(op, 503, "service-unavailable: Redis does not answer")
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
