//! The Backend.AI workers' operations (`/api`, `/v1`): ids, summaries,
//! success answers and the errors their handlers raise.

use aide::generate::GenContext;
use aide::openapi::{Operation, Response, StatusCode};
use aide::operation::OperationInput;
use aide::transform::TransformOperation;
use axum::Json;

use super::super::{json_response, respond};
use super::{error, raises};
use crate::api::backendai::SuccessModel;
use crate::api::backendai::circuits::{BulkDelete, BulkDeleteRequest, CircuitStatistics};
use crate::api::backendai::workers::{CircuitListModel, SlotListModel, WorkerListModel};
use crate::backendai::circuit::Circuit;
use crate::backendai::worker::{SlotV1, WorkerResponseModel, WorkerV1};

type Op<'a> = TransformOperation<'a>;

const NO_WORKER: &str = "object-not-found: `E00002: No such worker.` (also for a worker \
                         registered through the native API)";
const NO_CIRCUIT: &str = "object-not-found: `E00002: No such circuit.` (also while the \
                          circuit is on no worker, `Pending`)";

fn tagged<'a>(op: Op<'a>, id: &str, summary: &str) -> Op<'a> {
    op.id(id).tag("backendai").summary(summary)
}

pub fn register(op: Op<'_>) -> Op<'_> {
    let op = tagged(
        op,
        "backendaiRegisterWorker",
        "Backend.AI: register a worker; idempotent by authority",
    )
    .description(
        "Creates the worker, or re-registers it by `authority` (same id, its circuits kept, \
         `nodes` + 1, `Ready`). The answer's `id` is what the worker calls itself from then on; \
         `slots` lists its frontend.",
    );
    let op = respond(
        op,
        200,
        json_response::<WorkerResponseModel>("The worker (`WorkerResponseModel`)"),
    );
    let op = raises(
        op,
        400,
        "missing-frontend-config: port mode without `port_range`, wildcard mode without \
         `wildcard_domain` (upstream answers status -1); invalid-api-params otherwise",
    );
    raises(
        op,
        403,
        "generic-forbidden: the authority is a worker registered through the native API",
    )
}

pub fn list(op: Op<'_>) -> Op<'_> {
    let op = tagged(
        op,
        "backendaiListWorkers",
        "Backend.AI: the Backend.AI workers (native workers are not listed)",
    );
    respond(
        op,
        200,
        json_response::<WorkerListModel>("`{\"workers\": [...]}`"),
    )
}

pub fn get(op: Op<'_>) -> Op<'_> {
    let op = tagged(op, "backendaiGetWorker", "Backend.AI: one worker");
    let op = respond(op, 200, json_response::<WorkerResponseModel>("The worker"));
    raises(op, 404, NO_WORKER)
}

pub fn heartbeat(op: Op<'_>) -> Op<'_> {
    let op = tagged(
        op,
        "backendaiHeartbeat",
        "Backend.AI: a worker's heartbeat (no body)",
    )
    .description(
        "By the same health rules as a native worker's heartbeat: a `Lost` worker comes back. \
         Also writes `proxy-worker.last_seen` in Redis DB 2 (a Redis failure is logged, \
         not answered).",
    );
    let op = respond(op, 200, json_response::<WorkerResponseModel>("The worker"));
    raises(op, 404, NO_WORKER)
}

pub fn deregister(op: Op<'_>) -> Op<'_> {
    let op = tagged(
        op,
        "backendaiDeregisterWorker",
        "Backend.AI: one node of a worker stops",
    )
    .description(
        "`nodes` − 1; at 0 the worker is `Lost` (its circuits fail over by the usual rules). \
         The worker stays registered.",
    );
    let op = respond(
        op,
        200,
        json_response::<SuccessModel>("`{\"success\": true}`"),
    );
    raises(op, 404, NO_WORKER)
}

pub fn circuits(op: Op<'_>) -> Op<'_> {
    let op = tagged(
        op,
        "backendaiWorkerCircuits",
        "Backend.AI: every circuit on a worker",
    );
    let op = respond(
        op,
        200,
        json_response::<CircuitListModel>("`{\"circuits\": [SerializableCircuit, ...]}`"),
    );
    raises(op, 404, NO_WORKER)
}

pub fn get_circuit(op: Op<'_>) -> Op<'_> {
    let op = tagged(op, "backendaiGetCircuit", "Backend.AI: one circuit");
    let op = respond(
        op,
        200,
        json_response::<Circuit>("The circuit (`SerializableCircuit`)"),
    );
    raises(op, 404, NO_CIRCUIT)
}

pub fn delete_circuit(op: Op<'_>) -> Op<'_> {
    let op = tagged(op, "backendaiDeleteCircuit", "Backend.AI: delete a circuit");
    let op = respond(
        op,
        200,
        json_response::<SuccessModel>("`{\"success\": true}`"),
    );
    raises(op, 404, NO_CIRCUIT)
}

pub fn delete_circuit_v1(op: Op<'_>) -> Op<'_> {
    let op = tagged(
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

pub fn delete_circuits(op: Op<'_>) -> Op<'_> {
    let op = tagged(
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

pub fn statistics(op: Op<'_>) -> Op<'_> {
    let op = tagged(
        op,
        "backendaiCircuitStatistics",
        "Backend.AI: a circuit and its traffic",
    );
    let op = respond(
        op,
        200,
        json_response::<CircuitStatistics>("The circuit with `requests`, `last_access`, `ttl`"),
    );
    let op = raises(op, 404, NO_CIRCUIT);
    raises(op, 503, "service-unavailable: Redis does not answer")
}

pub fn slots(op: Op<'_>) -> Op<'_> {
    let op = tagged(
        op,
        "backendaiSlots",
        "Backend.AI: the workers' frontend slots",
    );
    let op = respond(
        op,
        200,
        json_response::<SlotListModel>("`{\"slots\": [...]}`"),
    );
    raises(
        op,
        404,
        "object-not-found: `E00002: No such worker.` for `wsproxy_host`",
    )
}

pub fn list_v1(op: Op<'_>) -> Op<'_> {
    let op = tagged(
        op,
        "backendaiListWorkersV1",
        "Backend.AI v1: the workers, as a bare array",
    );
    respond(op, 200, json_response::<Vec<WorkerV1>>("The workers"))
}

pub fn slots_v1(op: Op<'_>) -> Op<'_> {
    let op = tagged(
        op,
        "backendaiSlotsV1",
        "Backend.AI v1: the slots in use, as a bare array",
    );
    respond(op, 200, json_response::<Vec<SlotV1>>("The slots in use"))
}

impl OperationInput for BulkDeleteRequest {
    fn operation_input(ctx: &mut GenContext, operation: &mut Operation) {
        Json::<BulkDelete>::operation_input(ctx, operation);
    }

    fn inferred_early_responses(
        ctx: &mut GenContext,
        _: &mut Operation,
    ) -> Vec<(Option<StatusCode>, Response)> {
        vec![(
            Some(StatusCode::Code(400)),
            error(
                ctx,
                "invalid-api-params: `Malformed body` or `Input validation error` \
                 (`data.errors[].loc` names the field)",
            ),
        )]
    }
}
