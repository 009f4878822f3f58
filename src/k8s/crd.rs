//! The `AppProxyRoute` custom resource: a read-only mirror of one route.
//!
//! The spec is the route as stored (camelCase, as Kubernetes objects are);
//! the status is its live state. Both are written by the coordinator only,
//! with server-side apply under [`FIELD_MANAGER`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{AppMode, FrontendMode, Protocol, Route};

/// The API group of the CRD.
pub const GROUP: &str = "appproxy.backend.ai";
/// The one field manager every coordinator replica writes with.
pub const FIELD_MANAGER: &str = "appproxy-coordinator";
/// Marks the CRs the coordinator owns; the mirror only lists and deletes these.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "appproxy-coordinator";
/// The id of the route a CR mirrors.
pub const ROUTE_ID_LABEL: &str = "appproxy.backend.ai/route-id";

/// The label selector of the CRs the coordinator manages.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")
}

/// The name of a route's CR: deterministic, a valid DNS subdomain.
pub fn cr_name(route_id: Uuid) -> String {
    format!("r-{route_id}")
}

/// The route id a CR name stands for, if it is one of ours.
pub fn route_id_of(name: &str) -> Option<Uuid> {
    name.strip_prefix("r-")?.parse().ok()
}

/// One route of the application proxy, mirrored from the coordinator's
/// database. Edits are reverted: change routes through the coordinator's API.
// Clippy takes the repeated `type_ = "string"` of the printer columns for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "appproxy.backend.ai",
    version = "v1alpha1",
    kind = "AppProxyRoute",
    plural = "appproxyroutes",
    singular = "appproxyroute",
    shortname = "apr",
    namespaced,
    status = "AppProxyRouteStatus",
    derive = "PartialEq",
    printcolumn(name = "Session", type_ = "string", json_path = ".spec.sessionId"),
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.service"),
    printcolumn(name = "Worker", type_ = "string", json_path = ".status.worker"),
    printcolumn(name = "Frontend", type_ = "string", json_path = ".spec.frontend.url"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AppProxyRouteSpec {
    /// The route's id in the coordinator.
    pub route_id: Uuid,
    pub app_mode: AppMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_id: Option<Uuid>,
    pub service: String,
    pub protocol: Protocol,
    #[serde(default)]
    pub targets: Vec<RouteTarget>,
    #[serde(default)]
    pub frontend: RouteFrontend,
    /// The worker serving the route; absent while it is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<Uuid>,
    #[serde(default)]
    pub access: RouteAccess,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Free-form arguments passed through to the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form")]
    pub args: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RouteHealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// Any JSON value, kept as is by the API server.
fn free_form(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-preserve-unknown-fields": true,
        "nullable": true,
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    pub host: String,
    pub port: u16,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Uuid>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteFrontend {
    /// `port` or `wildcard`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdomain: Option<String>,
    /// Where users reach the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteAccess {
    #[serde(default)]
    pub open_to_public: bool,
    /// CIDR blocks.
    #[serde(default)]
    pub allowed_client_ips: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteHealthCheck {
    pub path: String,
    pub interval_seconds: u32,
    pub timeout_seconds: u32,
    pub expected_status: u16,
}

/// The live state of a route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppProxyRouteStatus {
    /// Pending, Propagating, Active or FailingOver.
    pub phase: String,
    /// The name of the worker serving the route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The revision of the route's last change.
    pub revision: i64,
    /// The route revision its worker has acknowledged; equals `revision` once
    /// the latest change has propagated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_revision: Option<i64>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (the route serves its latest revision) and `Propagated` (its
    /// worker acknowledged the latest revision).
    #[serde(default)]
    pub conditions: Vec<RouteCondition>,
}

/// A standard Kubernetes condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    pub last_transition_time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl AppProxyRouteSpec {
    /// The CR spec of a route.
    pub fn of(route: &Route) -> AppProxyRouteSpec {
        AppProxyRouteSpec {
            route_id: route.id,
            app_mode: route.app_mode,
            session_id: route.session_id,
            endpoint_id: route.endpoint_id,
            service: route.service.clone(),
            protocol: route.protocol,
            targets: route
                .targets
                .iter()
                .map(|t| RouteTarget {
                    id: t.id,
                    host: t.host.clone(),
                    port: t.port,
                    weight: t.weight,
                    session_id: t.session_id,
                })
                .collect(),
            frontend: RouteFrontend {
                mode: route.frontend.mode.map(|m| {
                    match m {
                        FrontendMode::Port => "port",
                        FrontendMode::Wildcard => "wildcard",
                    }
                    .to_owned()
                }),
                port: route.frontend.port,
                subdomain: route.frontend.subdomain.clone(),
                url: route.frontend.url.clone(),
            },
            worker_id: route.worker_id,
            access: RouteAccess {
                open_to_public: route.access.open_to_public,
                allowed_client_ips: route
                    .access
                    .allowed_client_ips
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            },
            labels: route.labels.clone(),
            args: route.args.clone(),
            health_check: route.health_check.as_ref().map(|h| RouteHealthCheck {
                path: h.path.clone(),
                interval_seconds: h.interval_s,
                timeout_seconds: h.timeout_s,
                expected_status: h.expected_status,
            }),
            expires_at: route.expires_at,
        }
    }
}

/// The CRD as YAML, exactly what `appproxy-coordinator crdgen` prints.
pub fn crd_yaml() -> String {
    let crd = AppProxyRoute::crd();
    let yaml = serde_saphyr::to_string(&crd).expect("the CRD serialises");
    format!("---\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every node of a structural schema has a type, unless it preserves
    /// unknown fields; objects with free-form keys declare them.
    fn assert_structural(path: &str, schema: &serde_json::Value) {
        let obj = schema.as_object().expect("schema nodes are objects");
        for banned in ["$ref", "anyOf", "oneOf", "allOf", "definitions", "$defs"] {
            assert!(!obj.contains_key(banned), "{path} uses {banned}: {schema}");
        }
        if let Some(values) = obj.get("enum").and_then(|e| e.as_array()) {
            assert!(
                values.iter().all(|v| !v.is_null()),
                "{path}: null in an enum"
            );
        }
        let preserves = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&true.into());
        assert!(
            obj.contains_key("type") || preserves,
            "{path} has no type: {schema}"
        );
        if let Some(props) = obj.get("properties").and_then(|p| p.as_object()) {
            for (k, v) in props {
                assert_structural(&format!("{path}.{k}"), v);
            }
        }
        if let Some(items) = obj.get("items") {
            assert_structural(&format!("{path}[]"), items);
        }
        if let Some(extra) = obj.get("additionalProperties") {
            assert_structural(&format!("{path}{{}}"), extra);
        }
    }

    #[test]
    fn the_crd_is_structural_and_complete() {
        let crd = serde_json::to_value(AppProxyRoute::crd()).unwrap();
        assert_eq!(
            crd["metadata"]["name"],
            "appproxyroutes.appproxy.backend.ai"
        );
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "apr");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            columns,
            ["Session", "Service", "Worker", "Frontend", "Phase", "Age"]
        );
        let schema = &version["schema"]["openAPIV3Schema"];
        assert_structural("", schema);
        let spec = &schema["properties"]["spec"]["properties"];
        assert_eq!(spec["labels"]["additionalProperties"]["type"], "string");
        assert_eq!(spec["args"]["x-kubernetes-preserve-unknown-fields"], true);
        let status = &schema["properties"]["status"]["properties"];
        for field in [
            "phase",
            "worker",
            "url",
            "ackedRevision",
            "revision",
            "observedGeneration",
            "conditions",
        ] {
            assert!(status[field].is_object(), "status.{field} missing");
        }
    }

    #[test]
    fn the_committed_crds_are_what_crdgen_prints() {
        let printed = crd_yaml();
        for path in [
            "crds/appproxyroute.yaml",
            "charts/appproxy-coordinator/crds/appproxyroute.yaml",
        ] {
            let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
            let committed = std::fs::read_to_string(&file).unwrap_or_default();
            assert!(
                committed == printed,
                "{path} is stale: run `cargo run -- crdgen > {path}`"
            );
        }
    }

    #[test]
    fn names_round_trip() {
        let id = Uuid::new_v4();
        assert_eq!(route_id_of(&cr_name(id)), Some(id));
        assert_eq!(route_id_of("something-else"), None);
        assert!(cr_name(id).len() <= 63);
    }
}
