//! `POST /internal/creates`: route creates another replica of this
//! installation sends the leader, a batch at a time (manager token, which all
//! replicas share). Why and how: [`crate::store::ForwardedCreate`]'s module.

use aide::axum::ApiRouter;
use aide::axum::routing::post_with;
use aide::transform::TransformOperation;
use axum::extract::State;

use super::auth::ManagerOnly;
use super::openapi::{json_response, raises, respond};
use super::{ApiError, ApiJson, AppState};
use crate::domain::validate;
use crate::store::{FORWARD_PATH, ForwardedAnswer, ForwardedCreate};

/// Most creates one request may carry (the create writer's batch).
pub const MAX_FORWARDED: usize = 64;

/// Adds the replicas' endpoint to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router.api_route(FORWARD_PATH, post_with(creates, creates_docs))
}

async fn creates(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiJson(items): ApiJson<Vec<ForwardedCreate>>,
) -> Result<axum::Json<Vec<ForwardedAnswer>>, ApiError> {
    if items.len() > MAX_FORWARDED {
        return Err(ApiError::invalid(format!(
            "at most {MAX_FORWARDED} creates per request, not {}",
            items.len()
        )));
    }
    let now = state.clock.now();
    // A batch with a create that is not valid is refused whole, before
    // anything is created: its sender validated each (so they differ in
    // version or clock) and commits them itself, wording each refusal.
    for (i, item) in items.iter().enumerate() {
        validate::route_spec(&item.spec, now).map_err(|e| ApiError {
            field: Some(format!("[{i}].spec.{}", e.field)),
            ..ApiError::invalid(format!("create {i}: {e}"))
        })?;
    }
    Ok(axum::Json(state.store.create_forwarded(items, now).await))
}

fn creates_docs(op: TransformOperation<'_>) -> TransformOperation<'_> {
    let op = op
        .id("forwardCreates")
        .tag("replicas")
        .summary("Route creates from another replica, committed by this one's create writer")
        .description(
            "A replica that does not lead sends the leader its queued creates, so one writer \
             commits every replica's creates. Each item is created as `POST /routes` would \
             (with the id the sending replica chose) and answered on its own, in order: \
             `outcome` is `created` with the route, or says why not. A batch holding a create \
             that is not valid is refused whole (400) and nothing of it is created. Sent with \
             the manager token; not for clients.",
        );
    let op = respond(
        op,
        200,
        json_response::<Vec<ForwardedAnswer>>("One answer per create, in order"),
    );
    raises(
        op,
        400,
        "invalid-request: not a list of creates, more than 64, or one of them not valid \
         (`field` names it); nothing was created",
    )
}
