//! A Backend.AI worker as upstream writes it, made from ours and back: the
//! registration it sends (`WorkerRequestModel`) turned into ours, and the
//! worker, its slots and the v1 shapes as the worker API answers them.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::circuit::{self, Circuit, iso_time, worker_api_url};
use crate::domain::{
    AppFilter, AppMode, BackendAiWorker, Protocol, Route, Worker, WorkerFrontend,
    WorkerRegistration,
};

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
    /// Routes this worker is dedicated to: `{"key": "session.<field>" or
    /// "endpoint.<field>", "value": …}` (see `crate::domain::app_filter`).
    #[serde(default)]
    pub app_filters: Vec<AppFilter>,
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

/// One frontend slot of a worker (`SlotModel`).
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct SlotModel {
    /// `port` or `wildcard`.
    pub frontend_mode: &'static str,
    pub in_use: bool,
    pub port: Option<u16>,
    pub subdomain: Option<String>,
    /// The circuit on the slot, when in use.
    pub circuit_id: Option<Uuid>,
}

/// A Backend.AI worker as upstream answers it (`WorkerResponseModel`),
/// fields in upstream's order.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct WorkerResponseModel {
    pub authority: String,
    /// `port` or `wildcard`.
    pub frontend_mode: &'static str,
    /// `http`, `grpc`, `h2`, `tcp` or `preopen` (a worker registered as
    /// `vnc` or `rdp` serves, and reads back, `tcp`).
    pub protocol: &'static str,
    pub hostname: String,
    pub tls_listen: bool,
    pub tls_advertised: bool,
    pub api_port: u16,
    /// Port mode: `[low, high]`.
    pub port_range: Option<[u16; 2]>,
    /// Wildcard mode, with its leading dot.
    pub wildcard_domain: Option<String>,
    pub wildcard_traffic_port: Option<u16>,
    pub filtered_apps_only: bool,
    pub traefik_last_used_marker_path: Option<String>,
    pub accepted_traffics: Vec<AppMode>,
    pub id: Uuid,
    #[serde(with = "circuit::iso")]
    #[schemars(with = "DateTime<Utc>")]
    pub created_at: DateTime<Utc>,
    /// The last change of the worker or its last heartbeat, whichever is later.
    #[serde(with = "circuit::iso")]
    #[schemars(with = "DateTime<Utc>")]
    pub updated_at: DateTime<Utc>,
    /// The ports of the range; -1 in wildcard mode (no limit).
    pub available_slots: i64,
    /// The circuits on the worker.
    pub occupied_slots: u64,
    /// Registrations minus deregistrations.
    pub nodes: u32,
    /// Port mode: every port of the range; wildcard mode: the subdomains in use.
    pub slots: Vec<SlotModel>,
}

/// `GET /v1/api/worker`: one worker in the v1 shape.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct WorkerV1 {
    pub authority: String,
    /// The worker's API URL.
    pub endpoint: String,
    /// Ports of the range; -1 in wildcard mode.
    pub total_slots: i64,
    pub ports_in_use: u64,
    pub min_range: Option<u16>,
    pub max_range: Option<u16>,
    pub wildcard_domain: Option<String>,
    #[serde(with = "circuit::iso")]
    #[schemars(with = "DateTime<Utc>")]
    pub created: DateTime<Utc>,
    #[serde(with = "circuit::iso")]
    #[schemars(with = "DateTime<Utc>")]
    pub updated: DateTime<Utc>,
}

/// `GET /v1/api/slots`: one slot in use, in the v1 shape.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct SlotV1 {
    /// The circuit's id.
    pub rel: Uuid,
    pub port: Option<u16>,
    pub subdomain: Option<String>,
    /// Always `v2`.
    pub wsproxy_version: &'static str,
    #[serde(rename = "worker__authority")]
    pub worker_authority: String,
    #[serde(rename = "circuit__app")]
    pub circuit_app: String,
    #[serde(rename = "circuit__session_id")]
    pub circuit_session_id: Option<Uuid>,
    #[serde(rename = "circuit__open_to_public")]
    pub circuit_open_to_public: bool,
    #[serde(rename = "circuit__allowed_client_ips")]
    pub circuit_allowed_client_ips: Option<String>,
    /// The environment as a JSON string; `null` when empty.
    #[serde(rename = "circuit__envs")]
    pub circuit_envs: Option<String>,
    #[serde(rename = "circuit__arguments")]
    pub circuit_arguments: Option<String>,
    #[serde(rename = "circuit__created")]
    pub circuit_created: String,
    #[serde(rename = "circuit__modified")]
    pub circuit_modified: String,
}

fn frontend_mode(worker: &Worker) -> &'static str {
    match worker.frontend {
        WorkerFrontend::Port { .. } => "port",
        WorkerFrontend::Wildcard { .. } => "wildcard",
    }
}

/// The worker's slots: in port mode every port of its range, in wildcard
/// mode the subdomains its routes hold.
pub fn slots_of(worker: &Worker, routes: &[Route]) -> Vec<SlotModel> {
    match &worker.frontend {
        WorkerFrontend::Port { port_range, .. } => {
            let by_port: HashMap<u16, Uuid> = routes
                .iter()
                .filter_map(|r| r.frontend.port.map(|p| (p, r.id)))
                .collect();
            (port_range[0]..=port_range[1])
                .map(|port| {
                    let circuit_id = by_port.get(&port).copied();
                    SlotModel {
                        frontend_mode: "port",
                        in_use: circuit_id.is_some(),
                        port: Some(port),
                        subdomain: None,
                        circuit_id,
                    }
                })
                .collect()
        }
        WorkerFrontend::Wildcard { .. } => {
            let mut used: Vec<SlotModel> = routes
                .iter()
                .filter_map(|r| {
                    r.frontend.subdomain.as_ref().map(|s| SlotModel {
                        frontend_mode: "wildcard",
                        in_use: true,
                        port: None,
                        subdomain: Some(s.clone()),
                        circuit_id: Some(r.id),
                    })
                })
                .collect();
            used.sort_by(|a, b| a.subdomain.cmp(&b.subdomain));
            used
        }
    }
}

/// Backend.AI worker `worker` (with the routes on it) as upstream answers it.
pub fn worker_response(worker: &Worker, routes: &[Route]) -> WorkerResponseModel {
    let bai = worker.backendai.clone().unwrap_or_else(|| {
        // Only Backend.AI workers get here; a native one reads as a
        // single-node worker on its frontend's host.
        BackendAiWorker {
            hostname: String::new(),
            api_port: 0,
            tls_listen: false,
            tls_advertised: false,
            filtered_apps_only: false,
            app_filters: Vec::new(),
            traefik_last_used_marker_path: None,
            nodes: 1,
        }
    });
    let (port_range, wildcard_domain, wildcard_traffic_port, available_slots) =
        match &worker.frontend {
            WorkerFrontend::Port { port_range, .. } => (
                Some(*port_range),
                None,
                None,
                i64::from(port_range[1].saturating_sub(port_range[0])) + 1,
            ),
            WorkerFrontend::Wildcard { domain, port, .. } => {
                (None, Some(format!(".{domain}")), Some(*port), -1)
            }
        };
    WorkerResponseModel {
        authority: worker.name.clone(),
        frontend_mode: frontend_mode(worker),
        protocol: worker.protocols.first().map_or("http", |p| p.as_str()),
        hostname: bai.hostname,
        tls_listen: bai.tls_listen,
        tls_advertised: bai.tls_advertised,
        api_port: bai.api_port,
        port_range,
        wildcard_domain,
        wildcard_traffic_port,
        filtered_apps_only: bai.filtered_apps_only,
        traefik_last_used_marker_path: bai.traefik_last_used_marker_path,
        accepted_traffics: worker.app_modes.clone(),
        id: worker.id,
        created_at: worker.created_at,
        updated_at: worker.updated_at.max(worker.last_heartbeat),
        available_slots,
        occupied_slots: worker.route_count,
        nodes: bai.nodes,
        slots: slots_of(worker, routes),
    }
}

impl WorkerV1 {
    /// Backend.AI worker `worker` in the v1 shape.
    pub fn of(worker: &Worker) -> WorkerV1 {
        let model = worker_response(worker, &[]);
        let range = model.port_range;
        WorkerV1 {
            authority: worker.name.clone(),
            endpoint: worker_api_url(worker),
            total_slots: model.available_slots,
            ports_in_use: worker.route_count,
            min_range: range.map(|r| r[0]),
            max_range: range.map(|r| r[1]),
            wildcard_domain: model.wildcard_domain,
            created: model.created_at,
            updated: model.updated_at,
        }
    }
}

impl SlotV1 {
    /// The slot `route` holds on `worker`, with its circuit, in the v1 shape.
    pub fn of(route: &Route, worker: &Worker) -> SlotV1 {
        let c = Circuit::of(route, worker);
        SlotV1 {
            rel: c.id,
            port: c.port,
            subdomain: c.subdomain.clone(),
            wsproxy_version: "v2",
            worker_authority: worker.name.clone(),
            circuit_app: c.app.clone(),
            circuit_session_id: c.session_ids.first().copied(),
            circuit_open_to_public: c.open_to_public,
            circuit_allowed_client_ips: c.allowed_client_ips.clone(),
            circuit_envs: (!c.envs.is_empty())
                .then(|| serde_json::to_string(&c.envs).unwrap_or_default()),
            circuit_arguments: c.arguments.clone(),
            circuit_created: iso_time(c.created_at),
            circuit_modified: iso_time(c.updated_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

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
}
