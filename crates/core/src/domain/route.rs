//! Routes (Backend.AI calls them *circuits*): what a manager asks for and what a
//! worker serves.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use super::Revision;
use super::limits::{
    HEALTH_CHECK_PATH_PATTERN, MAX_HEALTH_CHECK_SECONDS, MAX_HTTP_STATUS, MAX_NAME_LEN,
    MAX_TARGETS, MAX_WEIGHT, MIN_HTTP_STATUS, NAME_PATTERN, SUBDOMAIN_REQUEST_PATTERN,
};
use super::schemas;
use super::types::{AppMode, Protocol, WorkerFrontend, WorkerStatus};
use super::url::UrlHome;

/// One backend of a route: where the worker forwards traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// The caller's own id for this target (e.g. one replica of an endpoint);
    /// unique within a route.
    #[serde(default)]
    pub id: Option<Uuid>,
    #[schemars(schema_with = "schemas::host")]
    pub host: String,
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Share of the traffic; at least one target of a route weighs more than 0.
    #[serde(default = "default_weight")]
    #[schemars(range(max = MAX_WEIGHT))]
    pub weight: u32,
    #[serde(default)]
    pub session_id: Option<Uuid>,
}

fn default_weight() -> u32 {
    1
}

/// Who may reach the route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Access {
    #[serde(default)]
    pub open_to_public: bool,
    /// CIDR blocks (a bare address means a single host; host bits are cleared).
    #[serde(default, deserialize_with = "deserialize_cidrs")]
    #[schemars(schema_with = "schemas::cidrs")]
    pub allowed_client_ips: Vec<IpNet>,
}

fn deserialize_cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| serde::de::Error::custom(format!("invalid CIDR {s:?}")))
        })
        .collect()
}

/// A probe the worker runs against the targets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[schemars(regex(pattern = HEALTH_CHECK_PATH_PATTERN))]
    pub path: String,
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = MAX_HEALTH_CHECK_SECONDS))]
    pub interval_s: u32,
    /// At most `interval_s`, which a timeout left to its default (5) must
    /// not be shorter than either.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = MAX_HEALTH_CHECK_SECONDS))]
    pub timeout_s: u32,
    #[serde(default = "default_expected_status")]
    #[schemars(range(min = MIN_HTTP_STATUS, max = MAX_HTTP_STATUS))]
    pub expected_status: u16,
}

fn default_interval() -> u32 {
    10
}
fn default_timeout() -> u32 {
    5
}
fn default_expected_status() -> u16 {
    200
}

/// The frontend a caller asks for: a specific port or subdomain (not both),
/// or nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = schemas::frontend_request_rules)]
pub struct FrontendRequest {
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
    /// Free text with at least one ASCII letter or digit, normalised into one
    /// DNS label (lowercase, IDNA, other characters as '-', at most 63).
    #[serde(default)]
    #[schemars(regex(pattern = SUBDOMAIN_REQUEST_PATTERN))]
    pub subdomain: Option<String>,
}

/// What a manager sends to create (or upsert) a route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = schemas::route_spec_rules)]
pub struct RouteSpec {
    #[serde(default)]
    pub app_mode: AppMode,
    /// Required for interactive routes, absent for inference routes.
    #[serde(default)]
    pub session_id: Option<Uuid>,
    /// Required for inference routes, absent for interactive routes.
    #[serde(default)]
    pub endpoint_id: Option<Uuid>,
    #[schemars(length(min = 1, max = MAX_NAME_LEN), regex(pattern = NAME_PATTERN))]
    pub service: String,
    /// Inference routes serve http, grpc or h2; tcp routes cannot ask for a subdomain.
    #[serde(default)]
    pub protocol: Protocol,
    /// May be empty (an inference endpoint before its replicas exist): the
    /// worker answers 503 until targets arrive.
    #[schemars(length(max = MAX_TARGETS), extend("anyOf" = [{"maxItems": 0}, {"contains": {"properties": {"weight": {"minimum": 1}}}}]))]
    pub targets: Vec<Target>,
    #[serde(default)]
    pub frontend: FrontendRequest,
    /// Pin the route to this worker instead of letting placement choose.
    #[serde(default)]
    pub worker_id: Option<Uuid>,
    #[serde(default)]
    pub access: Access,
    #[serde(default)]
    #[schemars(schema_with = "schemas::labels")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    #[schemars(schema_with = "schemas::envs")]
    pub envs: BTreeMap<String, String>,
    #[serde(default)]
    pub args: Option<serde_json::Value>,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// In the future.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// What a Backend.AI Manager knows of the route beyond the fields above;
    /// set on routes created through its `/v2` API (`crate::backendai`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit: Option<CircuitInfo>,
}

/// The parts of a Backend.AI *circuit* that have no other place in a route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CircuitInfo {
    /// Whose app it is: a Backend.AI worker admits a user to an interactive
    /// route by a cookie derived from this id.
    #[serde(default)]
    pub user_id: Option<Uuid>,
    /// The model server's runtime (inference), e.g. `vllm` or `custom`.
    #[serde(default)]
    #[schemars(length(max = MAX_NAME_LEN))]
    pub runtime_variant: Option<String>,
    /// The sessions the route serves (interactive: its session).
    #[serde(default)]
    #[schemars(length(max = MAX_TARGETS))]
    pub session_ids: Vec<Uuid>,
    /// The protocol the app was asked for when it is served as another one
    /// (`preopen` as http, `vnc` and `rdp` as tcp).
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub app_protocol: Option<String>,
    /// The model health check as the Manager sent it (stored, not run).
    #[serde(default)]
    pub health_check: Option<serde_json::Value>,
    /// What the Manager said of the app's session and endpoint, as
    /// `session.<field>` / `endpoint.<field>` → value: what workers' app
    /// filters match ([`super::app_filter`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "schemas::labels")]
    pub properties: BTreeMap<String, String>,
}

/// The identity that makes a route unique: one per (session, service) for
/// interactive routes, one per endpoint for inference routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteKey {
    Interactive { session_id: Uuid, service: String },
    Inference { endpoint_id: Uuid },
}

impl RouteSpec {
    /// The unique key of a *validated* spec.
    pub fn key(&self) -> RouteKey {
        match (self.app_mode, self.session_id, self.endpoint_id) {
            (AppMode::Inference, _, Some(endpoint_id)) => RouteKey::Inference { endpoint_id },
            (_, Some(session_id), _) => RouteKey::Interactive {
                session_id,
                service: self.service.clone(),
            },
            _ => unreachable!("key() called on an unvalidated route spec"),
        }
    }

    /// True when `other` names the same route with the same placement inputs, so
    /// an upsert may update it in place; identity and protocol cannot change.
    pub fn same_identity(&self, other: &RouteSpec) -> bool {
        self.app_mode == other.app_mode
            && self.session_id == other.session_id
            && self.endpoint_id == other.endpoint_id
            && self.service == other.service
            && self.protocol == other.protocol
    }

    /// Whether this route is an interactive Backend.AI circuit of session
    /// `session` (one the Manager's `session_terminated` takes away): an
    /// interactive route of that session with circuit fields, whose
    /// `session_ids` (as the worker sees them: the route's session when
    /// empty) name it. Whatever its protocol; native routes (no circuit
    /// fields) and inference circuits are not.
    pub fn is_circuit_of_session(&self, session: Uuid) -> bool {
        self.app_mode == AppMode::Interactive
            && self.session_id == Some(session)
            && self
                .circuit
                .as_ref()
                .is_some_and(|c| c.session_ids.is_empty() || c.session_ids.contains(&session))
    }

    /// Applies a patch, returning the new spec.
    pub fn patched(&self, patch: RoutePatch) -> RouteSpec {
        let mut spec = self.clone();
        if let Some(targets) = patch.targets {
            spec.targets = targets;
        }
        if let Some(access) = patch.access {
            spec.access = access;
        }
        if let Some(labels) = patch.labels {
            spec.labels = labels;
        }
        if let Some(envs) = patch.envs {
            spec.envs = envs;
        }
        if let Some(args) = patch.args {
            spec.args = args;
        }
        if let Some(health_check) = patch.health_check {
            spec.health_check = health_check;
        }
        if let Some(expires_at) = patch.expires_at {
            spec.expires_at = expires_at;
        }
        spec
    }

    /// The fields a worker acts on changed (anything but identity).
    pub fn mutable_fields_equal(&self, other: &RouteSpec) -> bool {
        self.targets == other.targets
            && self.access == other.access
            && self.labels == other.labels
            && self.envs == other.envs
            && self.args == other.args
            && self.health_check == other.health_check
            && self.expires_at == other.expires_at
            && self.circuit == other.circuit
    }
}

/// `PATCH /routes/{id}`: absent fields stay, `null` clears an optional one.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutePatch {
    #[serde(default)]
    #[schemars(length(max = MAX_TARGETS), extend("anyOf" = [{"maxItems": 0}, {"contains": {"properties": {"weight": {"minimum": 1}}}}]))]
    pub targets: Option<Vec<Target>>,
    #[serde(default)]
    pub access: Option<Access>,
    #[serde(default)]
    #[schemars(schema_with = "schemas::optional_labels")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    #[schemars(schema_with = "schemas::optional_envs")]
    pub envs: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "present")]
    pub args: Option<Option<serde_json::Value>>,
    #[serde(default, deserialize_with = "present")]
    pub health_check: Option<Option<HealthCheck>>,
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<DateTime<Utc>>>,
}

/// Distinguishes a field sent as `null` (`Some(None)`) from one left out (`None`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FrontendMode {
    Port,
    Wildcard,
}

/// The frontend a route was given on its worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Frontend {
    pub mode: Option<FrontendMode>,
    pub port: Option<u16>,
    pub subdomain: Option<String>,
    /// Where users reach the route; `null` while it has no worker.
    pub url: Option<String>,
}

impl Frontend {
    pub const UNASSIGNED: Frontend = Frontend {
        mode: None,
        port: None,
        subdomain: None,
        url: None,
    };

    /// The frontend of a route placed on a worker with `frontend` at `port`
    /// or `subdomain`, its URL made by the worker's [`UrlHome`].
    pub fn on(
        frontend: &WorkerFrontend,
        home: &UrlHome,
        port: Option<u16>,
        subdomain: Option<&str>,
    ) -> Frontend {
        match frontend {
            WorkerFrontend::Port { .. } => Frontend {
                mode: Some(FrontendMode::Port),
                port,
                subdomain: None,
                url: home.url(port, None),
            },
            WorkerFrontend::Wildcard { port, .. } => Frontend {
                mode: Some(FrontendMode::Wildcard),
                port: Some(*port),
                subdomain: subdomain.map(str::to_owned),
                url: home.url(None, subdomain),
            },
        }
    }
}

/// Derived state of a route, as a manager sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RouteStatus {
    /// No worker can take it yet.
    Pending,
    /// Its worker has not acknowledged its latest revision.
    Propagating,
    /// Its worker has acknowledged its latest revision.
    Active,
    /// Its worker is lost; it is about to move.
    FailingOver,
}

impl RouteStatus {
    pub const ALL: [RouteStatus; 4] = [
        RouteStatus::Pending,
        RouteStatus::Propagating,
        RouteStatus::Active,
        RouteStatus::FailingOver,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteStatus::Pending => "Pending",
            RouteStatus::Propagating => "Propagating",
            RouteStatus::Active => "Active",
            RouteStatus::FailingOver => "FailingOver",
        }
    }

    /// The status of a route, given its worker's status and whether that
    /// worker has acknowledged the route's latest revision; `None` while the
    /// route has no worker. The one place this rule is written: metrics count
    /// routes by these two facts and ask here.
    pub fn derive(worker: Option<(WorkerStatus, bool)>) -> RouteStatus {
        match worker {
            None => RouteStatus::Pending,
            Some((WorkerStatus::Lost, _)) => RouteStatus::FailingOver,
            Some((_, true)) => RouteStatus::Active,
            Some((_, false)) => RouteStatus::Propagating,
        }
    }
}

/// A route as stored and served.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Route {
    pub id: Uuid,
    pub app_mode: AppMode,
    pub session_id: Option<Uuid>,
    pub endpoint_id: Option<Uuid>,
    pub service: String,
    pub protocol: Protocol,
    pub targets: Vec<Target>,
    pub frontend: Frontend,
    pub worker_id: Option<Uuid>,
    pub access: Access,
    pub labels: BTreeMap<String, String>,
    pub envs: BTreeMap<String, String>,
    pub args: Option<serde_json::Value>,
    pub health_check: Option<HealthCheck>,
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit: Option<CircuitInfo>,
    pub status: RouteStatus,
    /// Why no worker could take the route, while it is `Pending`.
    pub pending_reason: Option<String>,
    /// The revision of the route's last change.
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Where a route sits, as stored next to its spec.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRoute {
    pub id: Uuid,
    pub spec: RouteSpec,
    pub worker_id: Option<Uuid>,
    pub port: Option<u16>,
    pub subdomain: Option<String>,
    pub pending_reason: Option<String>,
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json() -> serde_json::Value {
        serde_json::json!({
            "session_id": "3f6c9a52-0d61-4a6d-9b59-2f3d6c0a1e11",
            "service": "jupyter",
            "targets": [{"host": "10.0.1.7", "port": 8888}]
        })
    }

    #[test]
    fn defaults_fill_in_mode_protocol_and_weight() {
        let spec: RouteSpec = serde_json::from_value(spec_json()).unwrap();
        assert_eq!(spec.app_mode, AppMode::Interactive);
        assert_eq!(spec.protocol, Protocol::Http);
        assert_eq!(spec.targets[0].weight, 1);
        assert!(!spec.access.open_to_public);
    }

    #[test]
    fn a_session_s_circuits_are_its_interactive_routes_with_circuit_fields() {
        let session: Uuid = "3f6c9a52-0d61-4a6d-9b59-2f3d6c0a1e11".parse().unwrap();
        let other = Uuid::new_v4();
        let native: RouteSpec = serde_json::from_value(spec_json()).unwrap();
        assert!(!native.is_circuit_of_session(session), "no circuit fields");
        let mut circuit = native.clone();
        circuit.protocol = Protocol::Tcp;
        circuit.circuit = Some(CircuitInfo::default());
        assert!(
            circuit.is_circuit_of_session(session),
            "empty session_ids: its session"
        );
        assert!(!circuit.is_circuit_of_session(other));
        circuit.circuit.as_mut().unwrap().session_ids = vec![session];
        assert!(circuit.is_circuit_of_session(session));
        circuit.circuit.as_mut().unwrap().session_ids = vec![other];
        assert!(
            !circuit.is_circuit_of_session(session),
            "session_ids name another"
        );
        let mut inference = circuit.clone();
        inference.app_mode = AppMode::Inference;
        inference.circuit.as_mut().unwrap().session_ids = vec![session];
        assert!(!inference.is_circuit_of_session(session));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let mut v = spec_json();
        v["colour"] = "blue".into();
        let err = serde_json::from_value::<RouteSpec>(v).unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn cidrs_accept_bare_addresses_and_reject_garbage() {
        let mut v = spec_json();
        v["access"] =
            serde_json::json!({"allowed_client_ips": ["10.0.0.0/8", "192.168.1.7", "10.1.2.3/16"]});
        let spec: RouteSpec = serde_json::from_value(v.clone()).unwrap();
        let nets: Vec<String> = spec
            .access
            .allowed_client_ips
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.168.1.7/32", "10.1.0.0/16"]);

        v["access"] = serde_json::json!({"allowed_client_ips": ["10.0.0.0/33"]});
        let err = serde_json::from_value::<RouteSpec>(v).unwrap_err();
        assert!(err.to_string().contains("invalid CIDR"), "{err}");
    }

    #[test]
    fn out_of_range_ports_do_not_parse() {
        let mut v = spec_json();
        v["targets"][0]["port"] = 70000.into();
        assert!(serde_json::from_value::<RouteSpec>(v).is_err());
    }

    #[test]
    fn patch_distinguishes_null_from_absent() {
        let p: RoutePatch = serde_json::from_str(r#"{"expires_at": null}"#).unwrap();
        assert_eq!(p.expires_at, Some(None));
        assert_eq!(p.health_check, None);
        let spec: RouteSpec = serde_json::from_value(spec_json()).unwrap();
        let mut with_expiry = spec.clone();
        with_expiry.expires_at = Some(Utc::now());
        assert_eq!(with_expiry.patched(p).expires_at, None);
    }

    #[test]
    fn a_frontend_has_its_workers_mode_and_url() {
        let port = WorkerFrontend::Port {
            host: "proxy.example.com".into(),
            port_range: [10205, 10300],
        };
        let home = UrlHome::new(&port, None, Protocol::Tcp);
        let f = Frontend::on(&port, &home, Some(10211), None);
        assert_eq!(f.mode, Some(FrontendMode::Port));
        assert_eq!(f.url.as_deref(), Some("tcp://proxy.example.com:10211"));
        let wild = WorkerFrontend::Wildcard {
            domain: "apps.example.com".into(),
            port: 443,
            tls: true,
        };
        let home = UrlHome::new(&wild, None, Protocol::Http);
        let f = Frontend::on(&wild, &home, None, Some("jupyter-3f6c"));
        assert_eq!(
            (f.port, f.subdomain.as_deref()),
            (Some(443), Some("jupyter-3f6c"))
        );
        assert_eq!(
            f.url.as_deref(),
            Some("https://jupyter-3f6c.apps.example.com")
        );
    }
}
