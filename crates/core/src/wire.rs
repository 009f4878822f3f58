//! The shapes a worker and the coordinator exchange over HTTP, shared by the
//! API (which answers them) and the worker library, `client`
//! (which sends and reads them). Depends on the domain only.

use serde::{Deserialize, Serialize};

use crate::domain::{Revision, Route, Worker, WorkerStatus};

/// Answer to a registration: the worker, its token, and its routes as of `revision`.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Registration {
    pub worker: Worker,
    /// Bearer token for this worker's own endpoints; replaces any earlier one.
    pub token: String,
    pub revision: Revision,
    pub routes: Vec<Route>,
}

/// What a worker sends with each heartbeat.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The last revision the worker has applied: at most the coordinator's
    /// current revision.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub acked_revision: Revision,
}

/// The answer to a heartbeat.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HeartbeatAck {
    pub status: WorkerStatus,
    /// The coordinator's current revision.
    pub revision: Revision,
}
