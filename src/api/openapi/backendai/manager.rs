//! The Manager's operations (`/status`, `/v2`, `/health`): ids, summaries,
//! success answers and the errors their handlers raise.

use aide::transform::TransformOperation;

use super::super::{json_response, respond};
use crate::api::backendai::manager::StatusResponse;

type Op<'a> = TransformOperation<'a>;

pub fn status(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("backendaiStatus")
        .tag("backendai")
        .summary("Backend.AI: the coordinator's API version and advertised address");
    respond(op, 200, json_response::<StatusResponse>("`api_version` v2"))
}
