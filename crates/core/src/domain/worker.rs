//! Workers: the proxies that serve routes.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Revision;
use super::app_filter::AppFilter;
use super::limits::{HTTP_URL_PATTERN, MAX_WORKER_NAME_LEN, NAME_PATTERN};
use super::schemas;
use super::types::{AppMode, Protocol, WorkerFrontend, WorkerStatus};
use super::url::UrlHome;

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
    #[schemars(length(min = 1, max = MAX_WORKER_NAME_LEN), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// An http(s) URL whose host is a DNS name (at most 253 characters) or a
    /// bracketed IPv6 address.
    #[schemars(regex(pattern = HTTP_URL_PATTERN))]
    pub api_url: String,
    #[serde(deserialize_with = "frontend_by_name")]
    pub frontend: WorkerFrontend,
    #[serde(default = "all_protocols")]
    #[schemars(length(min = 1))]
    pub protocols: Vec<Protocol>,
    #[serde(default = "all_app_modes")]
    #[schemars(length(min = 1))]
    pub app_modes: Vec<AppMode>,
    #[serde(default)]
    #[schemars(schema_with = "schemas::labels")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub pod: Option<PodRef>,
    /// The most routes this worker takes; unlimited (within its frontend) if absent.
    #[serde(default)]
    #[schemars(range(min = 1, max = u32::MAX))]
    pub capacity: Option<u32>,
    /// Set for a Backend.AI App Proxy worker (registered through
    /// `PUT /api/worker`): what it told about itself that has no other place.
    /// Not part of the native registration (`POST /workers/register` refuses
    /// it), so not in its schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub backendai: Option<BackendAiWorker>,
}

/// What a Backend.AI worker registers besides its name (`authority`), API
/// URL and frontend. It learns its routes over Redis, not a watch stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendAiWorker {
    /// Host of its API and, in port mode, of its frontends.
    #[schemars(schema_with = "schemas::host")]
    pub hostname: String,
    pub api_port: u16,
    pub tls_listen: bool,
    pub tls_advertised: bool,
    #[serde(default)]
    pub filtered_apps_only: bool,
    /// Routes this worker is dedicated to ([`super::app_filter`]).
    #[serde(default, deserialize_with = "super::app_filter::lenient_filters")]
    #[schemars(length(max = 64))]
    pub app_filters: Vec<AppFilter>,
    #[serde(default)]
    pub traefik_last_used_marker_path: Option<String>,
    /// Registrations minus deregistrations, as Backend.AI counts them.
    #[serde(default)]
    pub nodes: u32,
}

impl BackendAiWorker {
    /// `https` when the worker listens or is advertised with TLS.
    pub fn scheme(&self) -> &'static str {
        if self.tls_listen || self.tls_advertised {
            "https"
        } else {
            "http"
        }
    }
}

/// A frontend whose `mode` is its name: serde would also take a variant's
/// index (`"mode": 0`).
fn frontend_by_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<WorkerFrontend, D::Error> {
    use serde::de::Error;
    let value = serde_json::Value::deserialize(d)?;
    if value.get("mode").is_some_and(|mode| !mode.is_string()) {
        return Err(D::Error::custom("mode: expected \"port\" or \"wildcard\""));
    }
    WorkerFrontend::deserialize(value).map_err(D::Error::custom)
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backendai: Option<BackendAiWorker>,
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
            backendai,
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
            backendai,
            status,
            last_heartbeat,
            acked_revision,
            revision_lag,
            route_count,
            created_at,
            updated_at,
        }
    }

    /// Where this worker's routes of `protocol` are reached: the one URL
    /// rule ([`UrlHome`]), with a Backend.AI worker's own TLS.
    pub fn url_home(&self, protocol: Protocol) -> UrlHome {
        let tls = self
            .backendai
            .as_ref()
            .map(|b| b.tls_listen || b.tls_advertised);
        UrlHome::new(&self.frontend, tls, protocol)
    }

    /// How many routes this worker can hold in total.
    pub fn max_routes(&self) -> u64 {
        let slots = self.frontend.slots();
        self.capacity.map_or(slots, |c| slots.min(u64::from(c)))
    }
}

/// Why a registration may not take over an existing worker's name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationRefused {
    /// The caller presented another worker's token.
    #[error(
        "this token belongs to another worker; register with the bootstrap token or worker {0}'s own token"
    )]
    OtherWorker(String),
    /// The named worker is alive: taking its name would hand its routes and a
    /// new token (revoking its own) to whoever holds the bootstrap token.
    #[error(
        "worker {name} is {status} and still heartbeating; re-register with its own token, \
         from its pod, or once it is Lost"
    )]
    Live { name: String, status: &'static str },
    /// The name belongs to a worker of the other kind: a Backend.AI worker
    /// (registered with `PUT /api/worker` and the api_secret) is never taken
    /// over through the native API, whatever its status, and the reverse.
    #[error(
        "{name} is the name of a {existing} worker; it cannot be registered as a {registering} worker"
    )]
    OtherKind {
        name: String,
        existing: &'static str,
        registering: &'static str,
    },
}

/// The kind of a worker, by how it registered.
fn kind(backendai: bool) -> &'static str {
    if backendai { "Backend.AI" } else { "native" }
}

/// Whether `registration` may (re-)register under the name of `existing`.
///
/// The bootstrap token alone is enough for a new name and for a worker that
/// is `Lost` (a restarted worker gets its routes back once its old self timed
/// out). For a live worker it takes that worker's own token (`as_worker` is
/// its id) or a registration from the same pod (same uid). A worker's own
/// token never registers another name. A name keeps its kind (native or
/// Backend.AI) for good: neither kind's credentials take over the other's
/// workers.
pub fn may_register(
    existing: Option<&Worker>,
    registration: &WorkerRegistration,
    as_worker: Option<uuid::Uuid>,
) -> Result<(), RegistrationRefused> {
    let name = || registration.name.clone();
    if let Some(w) = existing
        && w.backendai.is_some() != registration.backendai.is_some()
    {
        return Err(RegistrationRefused::OtherKind {
            name: name(),
            existing: kind(w.backendai.is_some()),
            registering: kind(registration.backendai.is_some()),
        });
    }
    match (existing, as_worker) {
        (Some(w), Some(id)) if w.id == id => Ok(()),
        (_, Some(_)) => Err(RegistrationRefused::OtherWorker(name())),
        (None, None) => Ok(()),
        (Some(w), None) => {
            let same_pod = matches!(
                (w.pod.as_ref().and_then(|p| p.uid.as_ref()), registration.pod.as_ref().and_then(|p| p.uid.as_ref())),
                (Some(a), Some(b)) if a == b
            );
            if w.status == WorkerStatus::Lost || same_pod {
                Ok(())
            } else {
                Err(RegistrationRefused::Live {
                    name: name(),
                    status: w.status.as_str(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(uid: Option<&str>) -> WorkerRegistration {
        serde_json::from_value(serde_json::json!({
            "name": "w", "api_url": "http://w",
            "frontend": {"mode": "port", "host": "h", "port_range": [1000, 1010]},
            "pod": uid.map(|u| serde_json::json!({"namespace": "ns", "name": "w-0", "uid": u}))
        }))
        .unwrap()
    }

    fn worker(status: WorkerStatus, uid: Option<&str>) -> Worker {
        let now = Utc::now();
        Worker::from_parts(
            Uuid::now_v7(),
            registration(uid),
            status,
            now,
            0,
            0,
            0,
            now,
            now,
        )
    }

    #[test]
    fn the_bootstrap_token_registers_new_names_and_lost_workers_only() {
        assert_eq!(may_register(None, &registration(None), None), Ok(()));
        let lost = worker(WorkerStatus::Lost, None);
        assert_eq!(may_register(Some(&lost), &registration(None), None), Ok(()));
        for status in [
            WorkerStatus::Ready,
            WorkerStatus::NotReady,
            WorkerStatus::Draining,
        ] {
            let live = worker(status, None);
            assert!(
                matches!(
                    may_register(Some(&live), &registration(None), None),
                    Err(RegistrationRefused::Live { .. })
                ),
                "{status:?}"
            );
        }
    }

    #[test]
    fn a_name_never_changes_its_kind_whatever_the_status() {
        let backendai: crate::domain::BackendAiWorker = serde_json::from_value(serde_json::json!({
            "hostname": "w", "api_port": 10201, "tls_listen": false, "tls_advertised": false,
            "filtered_apps_only": false, "nodes": 0
        }))
        .unwrap();
        let mut bai_registration = registration(None);
        bai_registration.backendai = Some(backendai);
        for status in [
            WorkerStatus::Lost,
            WorkerStatus::Ready,
            WorkerStatus::Draining,
        ] {
            let mut bai_worker = worker(status, None);
            bai_worker.backendai = bai_registration.backendai.clone();
            // The bootstrap token (None) and even the worker's own id.
            for as_worker in [None, Some(bai_worker.id)] {
                assert!(
                    matches!(
                        may_register(Some(&bai_worker), &registration(None), as_worker),
                        Err(RegistrationRefused::OtherKind {
                            existing: "Backend.AI",
                            ..
                        })
                    ),
                    "{status:?} {as_worker:?}"
                );
            }
            let native = worker(status, None);
            assert!(matches!(
                may_register(Some(&native), &bai_registration, Some(native.id)),
                Err(RegistrationRefused::OtherKind {
                    existing: "native",
                    ..
                })
            ));
        }
    }

    #[test]
    fn a_live_worker_re_registers_with_its_own_token_or_from_its_pod() {
        let live = worker(WorkerStatus::Ready, Some("uid-1"));
        assert_eq!(
            may_register(Some(&live), &registration(None), Some(live.id)),
            Ok(())
        );
        assert_eq!(
            may_register(Some(&live), &registration(Some("uid-1")), None),
            Ok(())
        );
        assert!(may_register(Some(&live), &registration(Some("uid-2")), None).is_err());
    }

    #[test]
    fn a_worker_s_token_registers_no_other_name() {
        let live = worker(WorkerStatus::Lost, None);
        let other = Uuid::now_v7();
        assert!(matches!(
            may_register(Some(&live), &registration(None), Some(other)),
            Err(RegistrationRefused::OtherWorker(_))
        ));
        assert!(matches!(
            may_register(None, &registration(None), Some(other)),
            Err(RegistrationRefused::OtherWorker(_))
        ));
    }
}
