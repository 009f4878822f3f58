//! Worker health, failover and cleanup: the loops the leader runs.
//!
//! Health observations (heartbeats, timeouts, pod readiness) enter through
//! [`observe`]; the rules live in `domain::health`.

use chrono::Utc;
use uuid::Uuid;

use crate::domain::WorkerStatus;
use crate::domain::health::{Observation, next_status};
use crate::store::{Store, StoreError};

/// Applies one observation about a worker. Returns the new status if it changed.
pub async fn observe(
    store: &Store,
    worker_id: Uuid,
    observation: Observation,
) -> Result<Option<WorkerStatus>, StoreError> {
    let worker = store.get_worker(worker_id).await?;
    let Some(next) = next_status(worker.status, observation) else {
        return Ok(None);
    };
    store.set_worker_status(worker_id, next, Utc::now()).await?;
    tracing::info!(worker = %worker_id, name = %worker.name, from = worker.status.as_str(), to = next.as_str(), ?observation, "worker status changed");
    Ok(Some(next))
}
