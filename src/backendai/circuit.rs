//! What Backend.AI calls a route and a worker, made from ours: the
//! `SerializableCircuit` its workers read from the API and the bus, its
//! `RouteInfo` (our targets), the endpoint URL the Manager stores, and the
//! worker registration (`WorkerRequestModel`) turned into ours.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::domain::{
    AppMode, BackendAiWorker, Protocol, Route, Target, Worker, WorkerFrontend, WorkerRegistration,
};

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

/// `PUT /api/worker`: what a Backend.AI worker sends (`WorkerRequestModel`).
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct WorkerRequest {
    pub authority: String,
    pub frontend_mode: String,
    pub protocol: String,
    pub hostname: String,
    pub tls_listen: bool,
    pub tls_advertised: bool,
    pub api_port: u16,
    #[serde(default)]
    pub port_range: Option<[u16; 2]>,
    #[serde(default)]
    pub wildcard_domain: Option<String>,
    #[serde(default)]
    pub wildcard_traffic_port: Option<u16>,
    pub filtered_apps_only: bool,
    #[serde(default)]
    pub traefik_last_used_marker_path: Option<String>,
    pub accepted_traffics: Vec<AppMode>,
    #[serde(default)]
    pub app_filters: Vec<Value>,
}

/// Why a Backend.AI registration cannot be taken.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    #[error("{0}")]
    MissingFrontend(&'static str),
    #[error("{0}")]
    Invalid(String),
}

impl WorkerRequest {
    /// Our registration for this worker; `nodes` is what its row counts
    /// after this registration.
    pub fn to_registration(&self, nodes: u32) -> Result<WorkerRegistration, RegistrationError> {
        let frontend = match self.frontend_mode.as_str() {
            "port" => WorkerFrontend::Port {
                host: self.hostname.clone(),
                port_range: self.port_range.ok_or(RegistrationError::MissingFrontend(
                    "port_range is required in port mode",
                ))?,
            },
            "wildcard" => {
                let domain = self
                    .wildcard_domain
                    .as_deref()
                    .map(|d| d.trim_start_matches('.'))
                    .filter(|d| !d.is_empty())
                    .ok_or(RegistrationError::MissingFrontend(
                        "wildcard_domain is required in wildcard mode",
                    ))?;
                let tls = self.tls_listen || self.tls_advertised;
                WorkerFrontend::Wildcard {
                    domain: domain.to_owned(),
                    port: self
                        .wildcard_traffic_port
                        .unwrap_or(if tls { 443 } else { 80 }),
                    tls,
                }
            }
            other => {
                return Err(RegistrationError::Invalid(format!(
                    "frontend_mode {other:?} is neither \"port\" nor \"wildcard\""
                )));
            }
        };
        let protocols = match self.protocol.as_str() {
            "http" => vec![Protocol::Http, Protocol::Preopen],
            "tcp" | "vnc" | "rdp" => vec![Protocol::Tcp],
            "grpc" => vec![Protocol::Grpc],
            "h2" => vec![Protocol::H2],
            "preopen" => vec![Protocol::Preopen, Protocol::Http],
            other => {
                return Err(RegistrationError::Invalid(format!(
                    "protocol {other:?} is not one of http, grpc, h2, tcp, preopen, vnc, rdp"
                )));
            }
        };
        let backendai = BackendAiWorker {
            hostname: self.hostname.clone(),
            api_port: self.api_port,
            tls_listen: self.tls_listen,
            tls_advertised: self.tls_advertised,
            filtered_apps_only: self.filtered_apps_only,
            app_filters: self.app_filters.clone(),
            traefik_last_used_marker_path: self.traefik_last_used_marker_path.clone(),
            nodes,
        };
        let scheme = backendai.scheme();
        let host = if self.hostname.contains(':') && !self.hostname.starts_with('[') {
            format!("[{}]", self.hostname)
        } else {
            self.hostname.clone()
        };
        Ok(WorkerRegistration {
            name: self.authority.clone(),
            api_url: format!("{scheme}://{host}:{}", self.api_port),
            frontend,
            protocols,
            app_modes: self.accepted_traffics.clone(),
            labels: BTreeMap::new(),
            pod: None,
            capacity: None,
            backendai: Some(backendai),
        })
    }
}

/// Upstream's ISO datetimes with microseconds and `Z`.
pub fn iso_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn registration(frontend: Value) -> WorkerRequest {
        let mut body = json!({
            "authority": "worker-1", "protocol": "http", "hostname": "127.0.0.1",
            "tls_listen": false, "tls_advertised": false, "api_port": 10201,
            "filtered_apps_only": false, "traefik_last_used_marker_path": null,
            "accepted_traffics": ["interactive", "inference"], "app_filters": []
        });
        body.as_object_mut()
            .unwrap()
            .extend(frontend.as_object().unwrap().clone());
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn a_port_mode_worker_becomes_a_port_worker_named_by_its_authority() {
        let r = registration(json!({"frontend_mode": "port", "port_range": [10205, 10300]}))
            .to_registration(1)
            .unwrap();
        assert_eq!(r.name, "worker-1");
        assert_eq!(r.api_url, "http://127.0.0.1:10201");
        assert_eq!(
            r.frontend,
            WorkerFrontend::Port {
                host: "127.0.0.1".into(),
                port_range: [10205, 10300]
            }
        );
        assert_eq!(r.app_modes, vec![AppMode::Interactive, AppMode::Inference]);
        assert_eq!(r.backendai.unwrap().nodes, 1);
    }

    #[test]
    fn a_frontend_without_its_configuration_is_refused() {
        assert!(matches!(
            registration(json!({"frontend_mode": "port"})).to_registration(1),
            Err(RegistrationError::MissingFrontend(_))
        ));
        assert!(matches!(
            registration(json!({"frontend_mode": "wildcard"})).to_registration(1),
            Err(RegistrationError::MissingFrontend(_))
        ));
        let r = registration(json!({"frontend_mode": "wildcard",
            "wildcard_domain": ".apps.example", "wildcard_traffic_port": 8080}))
        .to_registration(1)
        .unwrap();
        assert_eq!(
            r.frontend,
            WorkerFrontend::Wildcard {
                domain: "apps.example".into(),
                port: 8080,
                tls: false
            }
        );
    }

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
