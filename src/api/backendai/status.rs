//! `GET /status`: the Backend.AI Manager reads the API version and the
//! address it hands to clients for `/v2/proxy/auth`.

use aide::axum::ApiRouter;
use aide::axum::routing::get_with;
use aide::transform::TransformOperation;
use axum::Json;

use super::auth::Mode;
use crate::api::AppState;
use crate::api::openapi::backendai::operation;
use crate::api::openapi::{json_response, respond};

/// Adds `/status` to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router.api_route("/status", get_with(status, status_docs))
}

/// `GET /status`.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct StatusResponse {
    /// Always `v2`.
    pub api_version: &'static str,
    /// Where clients reach this coordinator (`APPPROXY_ADVERTISED_URL`).
    pub advertise_address: String,
}

/// `GET /status`: the Manager reads the API version and the address it
/// hands to clients for `/v2/proxy/auth`.
async fn status(Mode(bai): Mode) -> Json<StatusResponse> {
    Json(StatusResponse {
        api_version: "v2",
        advertise_address: bai.settings.advertised_url.clone(),
    })
}

fn status_docs(op: TransformOperation<'_>) -> TransformOperation<'_> {
    let op = operation(
        op,
        "backendaiStatus",
        "Backend.AI: the coordinator's API version and advertised address",
    );
    respond(op, 200, json_response::<StatusResponse>("`api_version` v2"))
}
