//! The Manager's operations (`/status`, `/v2`, `/health`): ids, summaries,
//! success answers and the errors their handlers raise.

use aide::transform::TransformOperation;

use super::super::{json_response, respond, text_response};
use super::raises;
use crate::api::backendai::endpoints::{
    BulkCreateResponse, BulkResults, CreateEndpointResponse, RegisterResults, Success,
    TokenResponse, UnregisterResults,
};
use crate::api::backendai::health::{HealthResponse, HealthStatusResponse};
use crate::api::backendai::manager::StatusResponse;
use crate::api::backendai::proxy::{AddResponse, ProxyResponse};

type Op<'a> = TransformOperation<'a>;

fn op<'a>(op: Op<'a>, id: &str, summary: &str) -> Op<'a> {
    op.id(id).tag("backendai").summary(summary)
}

/// The errors of a create that places a circuit and waits for its worker.
fn create_errors(op: Op<'_>) -> Op<'_> {
    let op = raises(
        op,
        400,
        "invalid-api-params (a bad field) or appproxy/invalid-url (a bad `existing_url`)",
    );
    let op = raises(
        op,
        409,
        "appproxy/port-not-available: the `existing_url`'s port is taken",
    );
    raises(
        op,
        503,
        "appproxy/worker-not-available (no worker can take the circuit) or \
         service-unavailable `E10001: Proxy worker not responding` (`data.worker`): \
         the worker did not acknowledge in time; the circuit stays and a retry answers it",
    )
}

pub fn status(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiStatus",
        "Backend.AI: the coordinator's API version and advertised address",
    );
    respond(op, 200, json_response::<StatusResponse>("`api_version` v2"))
}

pub fn bulk_create(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiBulkCreateEndpoints",
        "Backend.AI: create (or find) inference endpoints, answering their URLs in request order",
    );
    let op = create_errors(op);
    respond(
        op,
        200,
        json_response::<BulkCreateResponse>(
            "The endpoints' URLs in request order; an existing endpoint keeps its URL",
        ),
    )
}

pub fn bulk_delete(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiBulkDeleteEndpoints",
        "Backend.AI: delete inference endpoints (unknown ones succeed)",
    );
    respond(
        op,
        200,
        json_response::<BulkResults>("Per endpoint, in request order"),
    )
}

pub fn replace_routes(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiReplaceEndpointRoutes",
        "Backend.AI: replace each endpoint's replicas",
    );
    respond(
        op,
        200,
        json_response::<BulkResults>(
            "Per endpoint, in request order; `No circuit registered for this endpoint yet.` \
             for an unknown one",
        ),
    )
}

pub fn register_routes(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiRegisterEndpointRoutes",
        "Backend.AI: add replicas to endpoints (ones already there are kept)",
    );
    respond(
        op,
        200,
        json_response::<RegisterResults>("Per endpoint, in request order"),
    )
}

pub fn unregister_routes(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiUnregisterEndpointRoutes",
        "Backend.AI: remove replicas from endpoints",
    );
    respond(
        op,
        200,
        json_response::<UnregisterResults>("Per endpoint, in request order"),
    )
}

pub fn create_endpoint(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiCreateEndpoint",
        "Backend.AI: create (or find) one inference endpoint",
    );
    let op = create_errors(op);
    respond(
        op,
        200,
        json_response::<CreateEndpointResponse>("The endpoint's URL"),
    )
}

pub fn delete_endpoint(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiDeleteEndpoint",
        "Backend.AI: delete one inference endpoint (an unknown one succeeds)",
    );
    respond(op, 200, json_response::<Success>("Deleted"))
}

pub fn health_check(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiUpdateEndpointHealthCheck",
        "Backend.AI: store an endpoint's model health check",
    );
    let op = raises(op, 404, "object-not-found `E00002: No such circuit.`");
    respond(op, 200, json_response::<Success>("Stored"))
}

pub fn endpoint_token(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiEndpointToken",
        "Backend.AI: a token for an inference endpoint's users (HS256, jwt_secret)",
    );
    let op = raises(op, 404, "object-not-found `E00002: No such circuit.`");
    let op = raises(
        op,
        503,
        "appproxy/worker-not-available: the circuit has no worker",
    );
    respond(op, 200, json_response::<TokenResponse>("The token"))
}

pub fn conf(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiConf",
        "Backend.AI: register where a session's app listens; answers a conf token",
    );
    let op = raises(
        op,
        400,
        "invalid-api-params (a bad field) or appproxy/invalid-session-parameter \
         (no session id or access key: `Not meant for inference apps`)",
    );
    let op = raises(
        op,
        401,
        "auth-failed: not from an allowed network and without the exact api_secret \
         in X-BackendAI-Token",
    );
    respond(op, 200, json_response::<TokenResponse>("The conf token"))
}

pub fn proxy_auth(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiProxyAuth",
        "Backend.AI: the circuit of a session's app and the worker's setup URL",
    );
    let op = raises(
        op,
        400,
        "invalid-api-params: a bad parameter (token, session_id, protocol, port, \
         allowed_client_ips, a boolean)",
    );
    let op = raises(
        op,
        401,
        "invalid-credentials `E20007: Session ID mismatch`: the token is another session's",
    );
    let op = raises(op, 404, "object-not-found `E00002: No such token.`");
    let op = raises(
        op,
        409,
        "appproxy/port-not-available: the preferred port is taken",
    );
    let op = raises(
        op,
        503,
        "appproxy/worker-not-available or service-unavailable `E10001` (`data.worker`)",
    );
    let op = respond(
        op,
        200,
        json_response::<ProxyResponse>("With `Accept: application/json`"),
    );
    respond(
        op,
        308,
        text_response(
            "text/plain",
            "Otherwise: `Location` is the setup URL, the body `308: Permanent Redirect`",
        ),
    )
}

pub fn proxy_add(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiProxyAdd",
        "Backend.AI (deprecated): the /v2/proxy/auth URL for a token and session",
    );
    respond(op, 200, json_response::<AddResponse>("The URL"))
}

pub fn health(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiHealth",
        "Backend.AI: health with the database and Redis checks (always 200)",
    );
    respond(
        op,
        200,
        json_response::<HealthResponse>("`ok` or `degraded`"),
    )
}

pub fn livez(op: Op<'_>) -> Op<'_> {
    let op = self::op(op, "backendaiLivez", "Backend.AI: the process answers");
    respond(op, 200, json_response::<HealthResponse>("`ok`"))
}

pub fn readyz(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiReadyz",
        "Backend.AI: the database and Redis answer",
    );
    let op = respond(op, 200, json_response::<HealthResponse>("`ok`"));
    respond(
        op,
        503,
        json_response::<HealthResponse>("A check failed: `status` `error`"),
    )
}

pub fn health_status(op: Op<'_>) -> Op<'_> {
    let op = self::op(
        op,
        "backendaiHealthStatus",
        "Backend.AI: workers' slots and the circuits stranded on Lost workers",
    );
    respond(op, 200, json_response::<HealthStatusResponse>("The status"))
}
