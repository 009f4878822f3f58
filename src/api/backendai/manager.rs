//! What the Backend.AI Manager calls: `/status`, `/v2/endpoints`, `/v2/conf`,
//! `/v2/proxy`, `/health`.

use aide::axum::ApiRouter;
use aide::axum::routing::get_with;
use axum::Json;

use super::auth::Mode;
use crate::api::AppState;
use crate::api::openapi::backendai::manager as ops;

/// Adds the Manager's endpoints to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router.api_route("/status", get_with(status, ops::status))
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
