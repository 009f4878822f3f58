//! Upstream's rows as ours (pure): a worker row as the registration its
//! `PUT /api/worker` would have made here ([`WorkerRequest::to_registration`]),
//! a circuit as the route the Manager's `/v2` calls would have stored (the
//! same fields `crate::backendai::endpoints` and `proxy` fill in), a conf
//! token as `POST /v2/conf` stores it. A row that cannot be one of ours is
//! refused with the reason, never guessed at.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::read::{Upstream, UpstreamCircuit, UpstreamEndpoint, UpstreamToken, UpstreamWorker};
use crate::backendai::circuit::RouteInfo;
use crate::backendai::interactive::{client_networks, served_protocol};
use crate::backendai::worker::WorkerRequest;
use crate::domain::app_filter::{self, AppFilter};
use crate::domain::{
    Access, AppMode, CircuitInfo, FrontendRequest, RouteSpec, StoredRoute, WorkerRegistration,
    WorkerStatus, validate,
};
use crate::store::{ConfToken, ImportedWorker};

/// A row that cannot be imported, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// `worker`, `circuit` or `token`.
    pub kind: &'static str,
    pub id: Uuid,
    pub reason: String,
}

/// Upstream's rows as ours.
#[derive(Clone, Debug, Default)]
pub struct Mapped {
    pub workers: Vec<ImportedWorker>,
    pub routes: Vec<StoredRoute>,
    pub tokens: Vec<ConfToken>,
    /// Endpoints whose health check went into their circuit.
    pub endpoints: usize,
    /// Endpoints without a circuit: nothing of theirs is served.
    pub endpoints_without_circuit: usize,
    pub refused: Vec<Refused>,
}

/// Upstream's PostgreSQL enum members (the Python members' *names*) and
/// Backend.AI's wire values, both ways: the one table import and export
/// read (`proxyprotocol`, `frontendmode`, `appmode`).
const PROTOCOLS: &[(&str, &str)] = &[
    ("HTTP", "http"),
    ("GRPC", "grpc"),
    ("HTTP2", "h2"),
    ("TCP", "tcp"),
    ("PREOPEN", "preopen"),
    ("VNC", "vnc"),
    ("RDP", "rdp"),
];
const FRONTEND_MODES: &[(&str, &str)] = &[("PORT", "port"), ("WILDCARD_DOMAIN", "wildcard")];
const APP_MODES: &[(&str, AppMode)] = &[
    ("INTERACTIVE", AppMode::Interactive),
    ("INFERENCE", AppMode::Inference),
];

fn by_name<T: Copy>(table: &[(&'static str, T)], name: &str) -> Option<T> {
    table.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

fn by_value<T: PartialEq>(table: &[(&'static str, T)], value: &T) -> Option<&'static str> {
    table.iter().find(|(_, v)| v == value).map(|(n, _)| *n)
}

/// An upstream enum member's name as Backend.AI's wire value.
fn protocol_value(name: &str) -> Option<&'static str> {
    by_name(PROTOCOLS, name)
}

/// A Backend.AI protocol (`http`, `h2`, …) as upstream's enum member.
pub fn protocol_name(value: &str) -> Option<&'static str> {
    by_value(PROTOCOLS, &value)
}

fn frontend_value(name: &str) -> Option<&'static str> {
    by_name(FRONTEND_MODES, name)
}

/// A Backend.AI frontend mode (`port`, `wildcard`) as upstream's enum member.
pub fn frontend_name(value: &str) -> Option<&'static str> {
    by_value(FRONTEND_MODES, &value)
}

fn app_mode(name: &str) -> Option<AppMode> {
    by_name(APP_MODES, name)
}

/// An app mode as upstream's enum member.
pub fn app_mode_name(mode: AppMode) -> &'static str {
    by_value(APP_MODES, &mode).expect("every app mode is in the table")
}

/// Our worker status as upstream's (`ALIVE` is the only one its workers'
/// heartbeats keep; the import reads any other as `Lost`).
pub fn status_name(status: WorkerStatus) -> &'static str {
    match status {
        WorkerStatus::Ready | WorkerStatus::NotReady => "ALIVE",
        _ => "LOST",
    }
}

fn port(value: i32, field: &str) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{field} {value} is not a port"))
}

/// Upstream's worker row as our registration of it, its status (`ALIVE`:
/// `Ready`; `LOST`, `TERMINATED`: `Lost`) and its times.
pub fn worker(w: &UpstreamWorker) -> Result<ImportedWorker, String> {
    let frontend_mode = frontend_value(&w.frontend_mode)
        .ok_or_else(|| format!("unknown frontend_mode {:?}", w.frontend_mode))?;
    let protocol =
        protocol_value(&w.protocol).ok_or_else(|| format!("unknown protocol {:?}", w.protocol))?;
    let port_range = match w.port_range.as_deref() {
        None => None,
        Some([low, high]) => Some([port(*low, "port_range")?, port(*high, "port_range")?]),
        Some(other) => return Err(format!("port_range {other:?} is not [low, high]")),
    };
    let accepted_traffics = w
        .accepted_traffics
        .iter()
        .map(|t| app_mode(t).ok_or_else(|| format!("unknown accepted traffic {t:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let request = WorkerRequest {
        authority: w.authority.clone(),
        frontend_mode: frontend_mode.to_owned(),
        protocol: protocol.to_owned(),
        hostname: w.hostname.clone(),
        tls_listen: w.tls_listen,
        tls_advertised: w.tls_advertised,
        api_port: port(w.api_port, "api_port")?,
        port_range,
        wildcard_domain: w.wildcard_domain.clone(),
        wildcard_traffic_port: w
            .wildcard_traffic_port
            .map(|p| port(p, "wildcard_traffic_port"))
            .transpose()?,
        filtered_apps_only: w.filtered_apps_only,
        traefik_last_used_marker_path: w.traefik_last_used_marker_path.clone(),
        accepted_traffics,
        app_filters: w
            .filters
            .iter()
            .map(|(key, value)| AppFilter {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
    };
    let nodes = u32::try_from(w.nodes).unwrap_or(0);
    let registration: WorkerRegistration =
        request.to_registration(nodes).map_err(|e| e.to_string())?;
    validate::registration(&registration).map_err(|e| e.to_string())?;
    Ok(ImportedWorker {
        id: w.id,
        registration,
        status: if w.status == "ALIVE" {
            WorkerStatus::Ready
        } else {
            WorkerStatus::Lost
        },
        created_at: w.created_at,
        updated_at: w.updated_at,
    })
}

/// The circuit's environment as ours (strings; any other JSON value as its
/// JSON text).
fn envs(c: &UpstreamCircuit) -> Result<BTreeMap<String, String>, String> {
    match c.envs.as_ref().map(|j| &j.0) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(map)) => Ok(map
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect()),
        Some(other) => Err(format!("envs {other} is not an object")),
    }
}

/// What workers' app filters match of the circuit, as the `/v2` calls that
/// create one record it (a conf token of its session tells the rest).
fn properties(
    c: &UpstreamCircuit,
    mode: AppMode,
    token: Option<&UpstreamToken>,
) -> BTreeMap<String, String> {
    let user = c.user_id.map(|u| u.to_string());
    match mode {
        AppMode::Interactive => app_filter::properties([
            ("session.id", c.session_ids.first().map(Uuid::to_string)),
            ("session.user_uuid", user),
            ("session.project_id", token.map(|t| t.group_id.to_string())),
            ("session.access_key", token.map(|t| t.access_key.clone())),
            ("session.domain_name", token.map(|t| t.domain_name.clone())),
        ]),
        AppMode::Inference => app_filter::properties([
            ("session.user_uuid", user),
            ("endpoint.id", c.endpoint_id.map(|e| e.to_string())),
            ("endpoint.runtime_variant", c.runtime_variant.clone()),
        ]),
    }
}

/// The endpoint's health check as the Manager sent it (stored on the
/// circuit, as `/v2/endpoints` stores it), when it is enabled.
fn health_check(endpoint: Option<&UpstreamEndpoint>) -> Option<Value> {
    let e = endpoint.filter(|e| e.health_check_enabled)?;
    e.health_check_config
        .as_ref()
        .map(|j| j.0.clone())
        .filter(Value::is_object)
}

/// Upstream's circuit as the route our `/v2` calls would have stored, on
/// its worker at its port or subdomain; `now` stands for missing times.
pub fn circuit(
    c: &UpstreamCircuit,
    endpoint: Option<&UpstreamEndpoint>,
    token: Option<&UpstreamToken>,
    now: DateTime<Utc>,
) -> Result<StoredRoute, String> {
    let mode = app_mode(&c.app_mode).ok_or_else(|| format!("unknown app_mode {:?}", c.app_mode))?;
    let asked =
        protocol_value(&c.protocol).ok_or_else(|| format!("unknown protocol {:?}", c.protocol))?;
    let (protocol, app_protocol) = served_protocol(asked).expect("every upstream protocol");
    let (port, subdomain) = match frontend_value(&c.frontend_mode) {
        Some("port") => (
            Some(port(
                c.port.ok_or("a port-mode circuit without a port")?,
                "port",
            )?),
            None,
        ),
        Some(_) => (
            None,
            Some(
                c.subdomain
                    .clone()
                    .filter(|s| !s.is_empty())
                    .ok_or("a wildcard-mode circuit without a subdomain")?,
            ),
        ),
        None => return Err(format!("unknown frontend_mode {:?}", c.frontend_mode)),
    };
    let route_info: Vec<RouteInfo> = serde_json::from_value(c.route_info.0.clone())
        .map_err(|e| format!("route_info is not a list of routes: {e}"))?;
    let session_id = match mode {
        AppMode::Interactive => Some(
            *c.session_ids
                .first()
                .ok_or("an interactive circuit without a session")?,
        ),
        AppMode::Inference => None,
    };
    if mode == AppMode::Inference && c.endpoint_id.is_none() {
        return Err("an inference circuit without an endpoint".into());
    }
    let spec = RouteSpec {
        app_mode: mode,
        session_id,
        endpoint_id: c.endpoint_id.filter(|_| mode == AppMode::Inference),
        service: c.app.clone().ok_or("a circuit without an app")?,
        protocol,
        targets: route_info.iter().map(RouteInfo::to_target).collect(),
        frontend: FrontendRequest::default(),
        worker_id: None,
        access: Access {
            open_to_public: c.open_to_public,
            allowed_client_ips: client_networks(c.allowed_client_ips.as_deref())?,
        },
        labels: BTreeMap::new(),
        envs: envs(c)?,
        args: c.arguments.clone().map(Value::String),
        health_check: None,
        expires_at: None,
        circuit: Some(CircuitInfo {
            user_id: c.user_id,
            runtime_variant: c.runtime_variant.clone(),
            session_ids: c.session_ids.clone(),
            app_protocol,
            health_check: health_check(endpoint),
            properties: properties(c, mode, token),
        }),
    };
    validate::route_spec(&spec, now).map_err(|e| e.to_string())?;
    let created_at = c.created_at.unwrap_or(now);
    Ok(StoredRoute {
        id: c.id,
        spec,
        worker_id: Some(c.worker),
        port,
        subdomain,
        pending_reason: None,
        revision: 0,
        created_at,
        updated_at: c.updated_at.unwrap_or(created_at),
    })
}

/// Upstream's conf token as ours, stored at `now` (upstream's have no time:
/// they live one `backendai_conf_token_ttl` from the import).
pub fn token(t: &UpstreamToken, now: DateTime<Utc>) -> Result<ConfToken, String> {
    Ok(ConfToken {
        id: t.id,
        login_session_token: t.login_session_token.clone(),
        kernel_host: t.kernel_host.clone(),
        kernel_port: port(t.kernel_port, "kernel_port")?,
        session_id: t.session_id,
        user_uuid: t.user_uuid,
        group_id: t.group_id,
        access_key: t.access_key.clone(),
        domain_name: t.domain_name.clone(),
        created_at: now,
    })
}

/// Every row of `upstream` as ours; a circuit whose worker is refused is
/// refused too.
pub fn map(upstream: &Upstream, now: DateTime<Utc>) -> Mapped {
    let mut out = Mapped::default();
    for w in &upstream.workers {
        match worker(w) {
            Ok(imported) => out.workers.push(imported),
            Err(reason) => out.refused.push(Refused {
                kind: "worker",
                id: w.id,
                reason,
            }),
        }
    }
    let endpoints: HashMap<Uuid, &UpstreamEndpoint> =
        upstream.endpoints.iter().map(|e| (e.id, e)).collect();
    let tokens: HashMap<Uuid, &UpstreamToken> =
        upstream.tokens.iter().map(|t| (t.session_id, t)).collect();
    let mut served_endpoints = std::collections::HashSet::new();
    for c in &upstream.circuits {
        let result = if out.workers.iter().any(|w| w.id == c.worker) {
            let endpoint = c.endpoint_id.and_then(|e| endpoints.get(&e).copied());
            let token = c.session_ids.first().and_then(|s| tokens.get(s).copied());
            circuit(c, endpoint, token, now)
        } else {
            Err(format!("its worker {} is not imported", c.worker))
        };
        match result {
            Ok(route) => {
                served_endpoints.extend(route.spec.endpoint_id);
                out.routes.push(route);
            }
            Err(reason) => out.refused.push(Refused {
                kind: "circuit",
                id: c.id,
                reason,
            }),
        }
    }
    out.endpoints = served_endpoints
        .iter()
        .filter(|e| endpoints.contains_key(e))
        .count();
    out.endpoints_without_circuit = endpoints
        .keys()
        .filter(|e| !served_endpoints.contains(e))
        .count();
    for t in &upstream.tokens {
        match token(t, now) {
            Ok(token) => out.tokens.push(token),
            Err(reason) => out.refused.push(Refused {
                kind: "token",
                id: t.id,
                reason,
            }),
        }
    }
    out
}

#[cfg(test)]
#[path = "map_tests.rs"]
mod tests;
