//! Per operation: its id, summary, success answers and the errors its
//! handler raises itself; everything else comes from the handler's types.

use aide::transform::TransformOperation;

use super::{created, event_stream, json_response, raises, respond, text_response};
use crate::api::routes::{Deleted, RouteList, SessionRoutes};
use crate::api::workers::WorkerList;
use crate::domain::{Route, Worker};
use crate::store::Removal;
use crate::wire::{HeartbeatAck, Registration};

type Op<'a> = TransformOperation<'a>;

const NO_ROUTE: &str = "not-found: no such route";
const NO_WORKER: &str = "not-found: no such worker";
const NO_PINNED_WORKER: &str = "not-found: the worker `worker_id` pins the route to does not exist";

pub fn livez(op: Op<'_>) -> Op<'_> {
    let op = op.id("livez").summary("The process is alive").tag("probes");
    respond(op, 200, text_response("text/plain", "`ok`"))
}

pub fn readyz(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("readyz")
        .summary("The process can serve: the database answers")
        .tag("probes");
    let op = respond(op, 200, text_response("text/plain", "`ok`"));
    raises(op, 503, "unavailable: the database does not answer")
}

pub fn metrics(op: Op<'_>) -> Op<'_> {
    let op = op.id("metrics").summary("Prometheus metrics").tag("probes");
    respond(
        op,
        200,
        text_response("application/openmetrics-text", "OpenMetrics text"),
    )
}

pub fn openapi(op: Op<'_>) -> Op<'_> {
    let op = op.id("openapi").summary("This document").tag("probes");
    respond(
        op,
        200,
        json_response::<serde_json::Value>("The OpenAPI 3.1 document"),
    )
}

pub fn register_worker(op: Op<'_>) -> Op<'_> {
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

pub fn list_workers(op: Op<'_>) -> Op<'_> {
    let op = op.id("listWorkers").tag("workers").summary("Every worker");
    respond(op, 200, json_response::<WorkerList>("The workers"))
}

pub fn get_worker(op: Op<'_>) -> Op<'_> {
    let op = op.id("getWorker").tag("workers").summary("One worker");
    let op = respond(op, 200, json_response::<Worker>("The worker"));
    raises(op, 404, NO_WORKER)
}

pub fn delete_worker(op: Op<'_>) -> Op<'_> {
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

pub fn heartbeat(op: Op<'_>) -> Op<'_> {
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

pub fn watch_worker(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("watchWorker")
        .tag("workers")
        .summary("A worker's routes as Server-Sent Events");
    let op = event_stream(op);
    raises(op, 404, NO_WORKER)
}

pub fn create_route(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("createRoute")
        .tag("routes")
        .summary("Create a route: place it on a worker and allocate its frontend");
    let op = respond(op, 201, created::<Route>("The route"));
    let op = raises(op, 404, NO_PINNED_WORKER);
    let op = raises(
        op,
        409,
        "conflict: the session already has this service, the endpoint a route, or the \
         requested port is taken; `existing` is the route in the way, when there is one",
    );
    raises(
        op,
        503,
        "no-eligible-worker: no worker can take the route (the detail says why), or \
         unavailable: the database does not answer",
    )
}

pub fn list_routes(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("listRoutes")
        .tag("routes")
        .summary("Routes, filtered, in pages");
    respond(
        op,
        200,
        json_response::<RouteList>("A page; `next_cursor` fetches the next"),
    )
}

pub fn get_route(op: Op<'_>) -> Op<'_> {
    let op = op.id("getRoute").tag("routes").summary("One route");
    let op = respond(op, 200, json_response::<Route>("The route"));
    raises(op, 404, NO_ROUTE)
}

pub fn upsert_route(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("upsertRoute")
        .tag("routes")
        .summary("Create or update a route by id (idempotent)");
    let op = respond(op, 201, created::<Route>("Created"));
    let op = respond(op, 200, json_response::<Route>("Updated, or unchanged"));
    let op = raises(op, 404, NO_PINNED_WORKER);
    let op = raises(
        op,
        409,
        "conflict: another route has this identity, the requested port is taken, or the \
         route exists with another identity or protocol",
    );
    raises(
        op,
        503,
        "no-eligible-worker: no worker can take the route, or unavailable: the database \
         does not answer",
    )
}

pub fn patch_route(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("patchRoute")
        .tag("routes")
        .summary("Change a route's targets, access, labels, envs, args, health check or expiry")
        .description("Absent fields stay; `null` clears an optional one.");
    let op = respond(op, 200, json_response::<Route>("The route"));
    raises(op, 404, NO_ROUTE)
}

pub fn delete_route(op: Op<'_>) -> Op<'_> {
    let op = op.id("deleteRoute").tag("routes").summary("Delete a route");
    let op = respond(
        op,
        204,
        aide::openapi::Response {
            description: "Deleted".into(),
            ..Default::default()
        },
    );
    raises(op, 404, NO_ROUTE)
}

pub fn watch_routes(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("watchRoutes")
        .tag("routes")
        .summary("Every route change as Server-Sent Events");
    event_stream(op)
}

pub fn session_routes(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("listSessionRoutes")
        .tag("sessions")
        .summary("Every route of a session");
    respond(
        op,
        200,
        json_response::<SessionRoutes>("The session's routes (none is not an error)"),
    )
}

pub fn delete_session(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("deleteSession")
        .tag("sessions")
        .summary("Delete every route of a terminated session, in one transaction");
    respond(
        op,
        200,
        json_response::<Deleted>("How many routes went (0 is not an error)"),
    )
}

pub fn lookup(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("lookup")
        .tag("routes")
        .summary("Resolve a worker's port or subdomain to its route");
    let op = respond(op, 200, json_response::<Route>("The route"));
    raises(op, 404, "not-found: no route on that worker's frontend")
}
