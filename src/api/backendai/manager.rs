//! What the Backend.AI Manager calls: `/status`, `/v2/endpoints`
//! ([`super::endpoints`]), `/v2/conf` and `/v2/proxy` ([`super::proxy`]),
//! `/health` ([`super::health`]).

use aide::axum::ApiRouter;
use aide::axum::routing::{get_with, post_with, put_with};
use axum::Json;

use super::auth::Mode;
use super::endpoints as inference;
use super::{health, proxy};
use crate::api::AppState;
use crate::api::openapi::backendai::manager as ops;

/// Adds the Manager's endpoints to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route("/status", get_with(status, ops::status))
        .api_route(
            "/v2/endpoints/bulk",
            post_with(inference::bulk_create, ops::bulk_create)
                .delete_with(inference::bulk_delete, ops::bulk_delete),
        )
        .api_route(
            "/v2/endpoints/bulk/routes",
            post_with(inference::replace_routes, ops::replace_routes),
        )
        .api_route(
            "/v2/endpoints/bulk/routes/register",
            post_with(inference::register_routes, ops::register_routes),
        )
        .api_route(
            "/v2/endpoints/bulk/routes/unregister",
            post_with(inference::unregister_routes, ops::unregister_routes),
        )
        .api_route(
            "/v2/endpoints/{endpoint_id}",
            post_with(inference::create, ops::create_endpoint)
                .delete_with(inference::delete, ops::delete_endpoint),
        )
        .api_route(
            "/v2/endpoints/{endpoint_id}/health-check",
            put_with(inference::health_check, ops::health_check),
        )
        .api_route(
            "/v2/endpoints/{endpoint_id}/token",
            post_with(inference::token, ops::endpoint_token),
        )
        .api_route("/v2/conf", post_with(proxy::conf, ops::conf))
        .api_route("/v2/proxy/auth", get_with(proxy::auth, ops::proxy_auth))
        .api_route(
            "/v2/proxy/{token}/{session_id}/add",
            get_with(proxy::add, ops::proxy_add),
        )
        .api_route("/health", get_with(health::overall, ops::health))
        .api_route("/health/livez", get_with(health::livez, ops::livez))
        .api_route("/health/readyz", get_with(health::readyz, ops::readyz))
        .api_route(
            "/health/status",
            get_with(health::status, ops::health_status),
        )
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
