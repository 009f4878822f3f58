//! Workers: the proxies that serve routes.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Revision;
use super::types::{AppMode, Protocol, WorkerFrontend, WorkerStatus};

/// The Kubernetes pod a worker runs in (from the downward API).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: Option<String>,
}

/// What a worker sends when it registers (and re-registers after a restart).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerRegistration {
    /// Stable across restarts; Backend.AI calls it the worker's *authority*.
    pub name: String,
    pub api_url: String,
    pub frontend: WorkerFrontend,
    #[serde(default = "all_protocols")]
    pub protocols: Vec<Protocol>,
    #[serde(default = "all_app_modes")]
    pub app_modes: Vec<AppMode>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub pod: Option<PodRef>,
    /// The most routes this worker takes; unlimited (within its frontend) if absent.
    #[serde(default)]
    pub capacity: Option<u32>,
}

fn all_protocols() -> Vec<Protocol> {
    Protocol::ALL.to_vec()
}
fn all_app_modes() -> Vec<AppMode> {
    AppMode::ALL.to_vec()
}

/// A registered worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Worker {
    pub id: Uuid,
    pub name: String,
    pub api_url: String,
    pub frontend: WorkerFrontend,
    pub protocols: Vec<Protocol>,
    pub app_modes: Vec<AppMode>,
    pub labels: BTreeMap<String, String>,
    pub pod: Option<PodRef>,
    pub capacity: Option<u32>,
    pub status: WorkerStatus,
    pub last_heartbeat: DateTime<Utc>,
    /// The last revision the worker reported as applied.
    pub acked_revision: Revision,
    /// The current revision minus `acked_revision`: how far behind it is.
    pub revision_lag: Revision,
    pub route_count: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Worker {
    /// A worker as stored: its registration plus what the coordinator tracks.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        id: Uuid,
        registration: WorkerRegistration,
        status: WorkerStatus,
        last_heartbeat: DateTime<Utc>,
        acked_revision: Revision,
        revision_lag: Revision,
        route_count: u64,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
    ) -> Worker {
        let WorkerRegistration {
            name,
            api_url,
            frontend,
            protocols,
            app_modes,
            labels,
            pod,
            capacity,
        } = registration;
        Worker {
            id,
            name,
            api_url,
            frontend,
            protocols,
            app_modes,
            labels,
            pod,
            capacity,
            status,
            last_heartbeat,
            acked_revision,
            revision_lag,
            route_count,
            created_at,
            updated_at,
        }
    }

    /// How many routes this worker can hold in total.
    pub fn max_routes(&self) -> u64 {
        let slots = self.frontend.slots();
        self.capacity.map_or(slots, |c| slots.min(u64::from(c)))
    }
}
