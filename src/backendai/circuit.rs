//! What Backend.AI calls a route, made from ours: the `SerializableCircuit`
//! its workers read from the API and the bus, its `RouteInfo` (our targets),
//! and the URLs as upstream writes them (the endpoint URL the Manager
//! stores, a worker's API). A worker as Backend.AI writes it is
//! [`super::worker`].

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::domain::recovery::CircuitState;
use crate::domain::{AppMode, Protocol, Route, Target, Worker, WorkerFrontend};

/// `traffic_ratio` 1.0 is this target weight: ratios keep two decimals.
pub const WEIGHT_PER_RATIO: f64 = 100.0;

/// One backend of a circuit, as Backend.AI writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RouteInfo {
    #[serde(default, alias = "route-id")]
    pub route_id: Option<Uuid>,
    #[serde(alias = "session-id")]
    pub session_id: Uuid,
    #[serde(default, alias = "session-name")]
    pub session_name: Option<String>,
    /// `null` means `localhost`.
    #[serde(alias = "kernel-host")]
    pub kernel_host: Option<String>,
    #[serde(alias = "kernel-port")]
    pub kernel_port: u16,
    pub protocol: String,
    #[serde(default = "one", alias = "traffic-ratio")]
    pub traffic_ratio: f64,
}

fn one() -> f64 {
    1.0
}

impl RouteInfo {
    /// Our target for this backend.
    pub fn to_target(&self) -> Target {
        Target {
            id: self.route_id,
            host: self
                .kernel_host
                .clone()
                .unwrap_or_else(|| "localhost".to_owned()),
            port: self.kernel_port,
            weight: (self.traffic_ratio.max(0.0) * WEIGHT_PER_RATIO).round() as u32,
            session_id: Some(self.session_id),
        }
    }

    /// The backend `target` of `route`.
    pub fn of(route: &Route, target: &Target) -> RouteInfo {
        RouteInfo {
            route_id: target.id,
            session_id: target
                .session_id
                .or(route.session_id)
                .unwrap_or_else(Uuid::nil),
            session_name: None,
            kernel_host: Some(target.host.clone()),
            kernel_port: target.port,
            protocol: app_protocol(route).to_owned(),
            traffic_ratio: f64::from(target.weight) / WEIGHT_PER_RATIO,
        }
    }
}

/// A circuit as Backend.AI's workers read it (`SerializableCircuit`), fields
/// in upstream's order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Circuit {
    pub id: Uuid,
    pub app: String,
    pub protocol: String,
    pub worker: Uuid,
    pub app_mode: AppMode,
    pub frontend_mode: String,
    pub envs: BTreeMap<String, String>,
    pub arguments: Option<String>,
    pub open_to_public: bool,
    pub allowed_client_ips: Option<String>,
    pub port: Option<u16>,
    pub subdomain: Option<String>,
    pub user_id: Option<Uuid>,
    pub endpoint_id: Option<Uuid>,
    pub runtime_variant: Option<String>,
    pub route_info: Vec<RouteInfo>,
    pub session_ids: Vec<Uuid>,
    #[serde(with = "iso")]
    #[schemars(with = "DateTime<Utc>")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "iso")]
    #[schemars(with = "DateTime<Utc>")]
    pub updated_at: DateTime<Utc>,
}

/// A circuit as the workers' API answers it (`GET /api/circuit/{id}`, its
/// statistics, `GET /api/worker/{id}/circuits`): the `SerializableCircuit`
/// and, beyond upstream, its `status` (the real worker ignores keys it does
/// not know).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CircuitBody {
    #[serde(flatten)]
    pub circuit: Circuit,
    /// Whether its worker serves it: `active` (its worker is `Ready` and
    /// holds it), `propagating` (`Ready`, not acknowledged yet),
    /// `worker_not_ready`, `worker_lost` (not served: it waits for its worker,
    /// fails over, or moves when the Manager re-syncs its endpoint) or
    /// `worker_draining` (moving away).
    pub status: CircuitState,
}

impl CircuitBody {
    /// Route `route`, placed on `worker`, as the workers' API answers it.
    pub fn of(route: &Route, worker: &Worker) -> CircuitBody {
        CircuitBody {
            circuit: Circuit::of(route, worker),
            status: CircuitState::of(route.status, worker.status),
        }
    }
}

/// ISO-8601 with microseconds and `Z`, as upstream writes datetimes.
pub mod iso {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        DateTime::<Utc>::deserialize(d)
    }
}

/// The protocol the app was asked for (`preopen`, `vnc`, `rdp` are kept
/// on the circuit's routes), else the route's.
fn app_protocol(route: &Route) -> &str {
    route
        .circuit
        .as_ref()
        .and_then(|c| c.app_protocol.as_deref())
        .unwrap_or(route.protocol.as_str())
}

/// Backend.AI's circuit protocol: what the worker serves (`preopen` as http).
fn circuit_protocol(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Preopen => "http",
        p => p.as_str(),
    }
}

impl Circuit {
    /// Route `route`, placed on `worker`, as a Backend.AI circuit.
    pub fn of(route: &Route, worker: &Worker) -> Circuit {
        let info = route.circuit.clone().unwrap_or_default();
        let wildcard = matches!(worker.frontend, WorkerFrontend::Wildcard { .. });
        let session_ids = if info.session_ids.is_empty() {
            route.session_id.into_iter().collect()
        } else {
            info.session_ids
        };
        Circuit {
            id: route.id,
            app: route.service.clone(),
            protocol: circuit_protocol(route.protocol).to_owned(),
            worker: worker.id,
            app_mode: route.app_mode,
            frontend_mode: if wildcard { "wildcard" } else { "port" }.to_owned(),
            envs: route.envs.clone(),
            arguments: route.args.as_ref().map(|a| match a {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
            open_to_public: route.access.open_to_public,
            allowed_client_ips: (!route.access.allowed_client_ips.is_empty()).then(|| {
                route
                    .access
                    .allowed_client_ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            port: if wildcard { None } else { route.frontend.port },
            subdomain: if wildcard {
                route.frontend.subdomain.clone()
            } else {
                None
            },
            user_id: info.user_id,
            endpoint_id: route.endpoint_id,
            runtime_variant: info.runtime_variant,
            route_info: route
                .targets
                .iter()
                .map(|t| RouteInfo::of(route, t))
                .collect(),
            session_ids,
            created_at: route.created_at,
            updated_at: route.updated_at,
        }
    }
}

/// The URL users reach `route` at on `worker`, as upstream writes it (with a
/// trailing `/`); `None` while it has no frontend there.
pub fn endpoint_url(route: &Route, worker: &Worker) -> Option<String> {
    let base = base_url(route, worker)?;
    Some(format!("{base}/"))
}

/// [`endpoint_url`] without the trailing `/` (the endpoint token's `app_url`):
/// the route's URL by the one rule ([`crate::domain::UrlHome`]).
pub fn base_url(route: &Route, worker: &Worker) -> Option<String> {
    worker
        .url_home(route.protocol)
        .url(route.frontend.port, route.frontend.subdomain.as_deref())
}

/// The worker's API as its users' browsers reach it (`/setup`).
pub fn worker_api_url(worker: &Worker) -> String {
    match &worker.backendai {
        Some(b) => crate::domain::url::origin(b.scheme(), &b.hostname, b.api_port),
        None => worker.api_url.trim_end_matches('/').to_owned(),
    }
}

// Their old home: the registration moved to `worker`.
pub use super::worker::{RegistrationError, WorkerRequest};

/// Upstream's ISO datetimes with microseconds and `Z`.
pub fn iso_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn traffic_ratios_and_weights_convert_both_ways() {
        let info: RouteInfo = serde_json::from_value(json!({
            "route-id": null, "session_id": Uuid::nil(), "kernel_host": null,
            "kernel_port": 8080, "protocol": "http", "traffic_ratio": 0.5
        }))
        .unwrap();
        let t = info.to_target();
        assert_eq!((t.host.as_str(), t.port, t.weight), ("localhost", 8080, 50));
    }
}
