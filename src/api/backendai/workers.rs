//! What Backend.AI App Proxy workers call: `/api/worker`, `/api/circuit`,
//! `/api/slots`, and the read-only `/v1` aliases.

use aide::axum::ApiRouter;

use crate::api::AppState;

/// Adds the workers' endpoints to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
}
