//! Validation of everything that comes in from outside. Each function answers
//! with the first problem found, phrased for the caller who sent it.

use std::collections::HashSet;
use std::net::IpAddr;

use chrono::{DateTime, Utc};

use super::placement::normalize_subdomain;
use super::route::{RouteSpec, Target};
use super::types::{AppMode, Protocol, WorkerFrontend};
use super::worker::WorkerRegistration;

/// Bad input, with the field it concerns.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

pub use super::limits::{
    MAX_DNS_NAME_LEN, MAX_HEALTH_CHECK_SECONDS, MAX_HTTP_STATUS, MAX_LABEL_KEY_LEN,
    MAX_LABEL_VALUE_LEN, MAX_MAP_ENTRIES, MAX_NAME_LEN, MAX_TARGETS, MAX_WEIGHT,
    MAX_WORKER_NAME_LEN, MIN_HTTP_STATUS,
};

/// Checks a route spec as sent by a manager. `now` bounds `expires_at`.
pub fn route_spec(spec: &RouteSpec, now: DateTime<Utc>) -> Result<(), ValidationError> {
    name("service", &spec.service)?;
    match spec.app_mode {
        AppMode::Interactive => {
            if spec.session_id.is_none() {
                return Err(invalid("session_id", "required for interactive routes"));
            }
            if spec.endpoint_id.is_some() {
                return Err(invalid(
                    "endpoint_id",
                    "only inference routes have an endpoint_id",
                ));
            }
        }
        AppMode::Inference => {
            if spec.endpoint_id.is_none() {
                return Err(invalid("endpoint_id", "required for inference routes"));
            }
            if spec.session_id.is_some() {
                return Err(invalid(
                    "session_id",
                    "inference routes carry session ids on their targets, not on the route",
                ));
            }
        }
    }
    protocol_for_mode(spec.protocol, spec.app_mode)?;
    targets(&spec.targets)?;
    if let Some(port) = spec.frontend.port {
        if port == 0 {
            return Err(invalid("frontend.port", "must be between 1 and 65535"));
        }
        if spec.frontend.subdomain.is_some() {
            return Err(invalid(
                "frontend",
                "ask for a port or a subdomain, not both",
            ));
        }
    }
    if let Some(sub) = &spec.frontend.subdomain {
        if !sub.bytes().any(|b| b.is_ascii_alphanumeric()) || normalize_subdomain(sub).is_none() {
            return Err(invalid(
                "frontend.subdomain",
                format!("{sub:?} has no ASCII letter or digit to make a DNS label of"),
            ));
        }
        if !spec.protocol.routable_by_host() {
            return Err(invalid(
                "frontend.subdomain",
                "tcp routes cannot be served on a subdomain",
            ));
        }
    }
    string_map("labels", &spec.labels, |_| true)?;
    string_map("envs", &spec.envs, is_env_name)?;
    if let Some(circuit) = &spec.circuit {
        string_map("circuit.properties", &circuit.properties, |_| true)?;
    }
    if let Some(hc) = &spec.health_check {
        if !hc.path.starts_with('/') {
            return Err(invalid("health_check.path", "must start with '/'"));
        }
        if !(1..=MAX_HEALTH_CHECK_SECONDS).contains(&hc.interval_s) {
            return Err(invalid(
                "health_check.interval_s",
                format!("must be 1..={MAX_HEALTH_CHECK_SECONDS}"),
            ));
        }
        if hc.timeout_s == 0 || hc.timeout_s > hc.interval_s {
            return Err(invalid(
                "health_check.timeout_s",
                "must be at least 1 and at most interval_s",
            ));
        }
        if !(MIN_HTTP_STATUS..=MAX_HTTP_STATUS).contains(&hc.expected_status) {
            return Err(invalid(
                "health_check.expected_status",
                format!("must be an HTTP status ({MIN_HTTP_STATUS}..={MAX_HTTP_STATUS})"),
            ));
        }
    }
    if let Some(at) = spec.expires_at
        && at <= now
    {
        return Err(invalid("expires_at", "must be in the future"));
    }
    Ok(())
}

/// Which protocols make sense for which app mode.
pub fn protocol_for_mode(protocol: Protocol, mode: AppMode) -> Result<(), ValidationError> {
    match (mode, protocol) {
        (AppMode::Inference, Protocol::Tcp | Protocol::Preopen) => Err(invalid(
            "protocol",
            format!("inference routes serve http, grpc or h2, not {protocol}"),
        )),
        _ => Ok(()),
    }
}

fn targets(targets: &[Target]) -> Result<(), ValidationError> {
    if targets.len() > MAX_TARGETS {
        return Err(invalid(
            "targets",
            format!("at most {MAX_TARGETS} targets per route"),
        ));
    }
    let mut ids = HashSet::new();
    for (i, t) in targets.iter().enumerate() {
        if !is_host(&t.host) {
            return Err(invalid(
                format!("targets[{i}].host"),
                format!("{:?} is neither an IP address nor a host name", t.host),
            ));
        }
        if t.port == 0 {
            return Err(invalid(
                format!("targets[{i}].port"),
                "must be between 1 and 65535",
            ));
        }
        if t.weight > MAX_WEIGHT {
            return Err(invalid(
                format!("targets[{i}].weight"),
                format!("must be at most {MAX_WEIGHT}"),
            ));
        }
        if let Some(id) = t.id
            && !ids.insert(id)
        {
            return Err(invalid(
                format!("targets[{i}].id"),
                format!("{id} appears twice"),
            ));
        }
    }
    if !targets.is_empty() && targets.iter().all(|t| t.weight == 0) {
        return Err(invalid(
            "targets",
            "at least one target needs a weight above 0",
        ));
    }
    Ok(())
}

/// Checks a worker's registration.
pub fn registration(reg: &WorkerRegistration) -> Result<(), ValidationError> {
    if reg.name.is_empty()
        || reg.name.len() > MAX_WORKER_NAME_LEN
        || !reg
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            "name",
            format!("1 to {MAX_WORKER_NAME_LEN} characters of letters, digits, '-', '_' and '.'"),
        ));
    }
    if !(reg.api_url.starts_with("http://") || reg.api_url.starts_with("https://"))
        || url_host(&reg.api_url).is_none_or(|h| !is_host(h))
    {
        return Err(invalid(
            "api_url",
            format!("{:?} is not an http(s) URL", reg.api_url),
        ));
    }
    match &reg.frontend {
        WorkerFrontend::Port { host, port_range } => {
            if !is_host(host) {
                return Err(invalid("frontend.host", format!("{host:?} is not a host")));
            }
            let [lo, hi] = *port_range;
            if lo == 0 || lo > hi {
                return Err(invalid(
                    "frontend.port_range",
                    "must be [low, high] with 1 <= low <= high <= 65535",
                ));
            }
        }
        WorkerFrontend::Wildcard { domain, port, .. } => {
            if !is_dns_name(domain) {
                return Err(invalid(
                    "frontend.domain",
                    format!("{domain:?} is not a DNS name"),
                ));
            }
            if *port == 0 {
                return Err(invalid("frontend.port", "must be between 1 and 65535"));
            }
        }
    }
    if reg.protocols.is_empty() {
        return Err(invalid("protocols", "at least one protocol"));
    }
    if reg.app_modes.is_empty() {
        return Err(invalid("app_modes", "at least one app mode"));
    }
    if reg.capacity == Some(0) {
        return Err(invalid("capacity", "must be at least 1 when given"));
    }
    if let Some(bai) = &reg.backendai {
        app_filters(&bai.app_filters)?;
    }
    string_map("labels", &reg.labels, |_| true)
}

/// A Backend.AI worker's app filters: as many as labels, each key a
/// label key and each value a label value.
fn app_filters(filters: &[super::AppFilter]) -> Result<(), ValidationError> {
    if filters.len() > MAX_MAP_ENTRIES {
        return Err(invalid(
            "app_filters",
            format!("at most {MAX_MAP_ENTRIES} filters"),
        ));
    }
    for (i, f) in filters.iter().enumerate() {
        if f.key.is_empty() || f.key.chars().count() > MAX_LABEL_KEY_LEN {
            return Err(invalid(
                format!("app_filters.{i}.key"),
                format!("1 to {MAX_LABEL_KEY_LEN} characters"),
            ));
        }
        if f.value.chars().count() > MAX_LABEL_VALUE_LEN {
            return Err(invalid(
                format!("app_filters.{i}.value"),
                format!("at most {MAX_LABEL_VALUE_LEN} characters"),
            ));
        }
    }
    Ok(())
}

/// A short identifier: service names and the like.
fn name(field: &str, s: &str) -> Result<(), ValidationError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("1 to {MAX_NAME_LEN} characters of letters, digits, '-', '_' and '.'"),
        ))
    }
}

fn string_map(
    field: &str,
    map: &std::collections::BTreeMap<String, String>,
    key_ok: impl Fn(&str) -> bool,
) -> Result<(), ValidationError> {
    if map.len() > MAX_MAP_ENTRIES {
        return Err(invalid(field, format!("at most {MAX_MAP_ENTRIES} entries")));
    }
    for (k, v) in map {
        if k.is_empty() || k.chars().count() > MAX_LABEL_KEY_LEN || !key_ok(k) {
            return Err(invalid(format!("{field}.{k}"), "invalid key"));
        }
        if v.chars().count() > MAX_LABEL_VALUE_LEN {
            return Err(invalid(
                format!("{field}.{k}"),
                format!("value longer than {MAX_LABEL_VALUE_LEN} characters"),
            ));
        }
    }
    Ok(())
}

fn is_env_name(k: &str) -> bool {
    let mut bytes = k.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// An IP address (IPv6 may be bracketed) or a DNS host name.
pub fn is_host(s: &str) -> bool {
    let unbracketed = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    unbracketed.parse::<IpAddr>().is_ok() || is_dns_name(s)
}

/// A DNS name of RFC 1123 labels, at most 253 characters (an optional
/// trailing dot included).
pub fn is_dns_name(s: &str) -> bool {
    let bounded = s.len() <= MAX_DNS_NAME_LEN;
    let s = s.strip_suffix('.').unwrap_or(s);
    bounded && !s.is_empty() && s.split('.').all(is_dns_label)
}

/// One RFC 1123 label: 1–63 letters, digits and inner hyphens.
pub fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if authority.starts_with('[') {
        return authority.find(']').map(|end| &authority[..=end]);
    }
    Some(authority.split(':').next().unwrap_or(authority))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::route::{FrontendRequest, HealthCheck};
    use uuid::Uuid;

    fn spec() -> RouteSpec {
        serde_json::from_value(serde_json::json!({
            "session_id": Uuid::new_v4(),
            "service": "jupyter",
            "targets": [{"host": "10.0.1.7", "port": 8888}]
        }))
        .unwrap()
    }

    fn field_of(spec: &RouteSpec) -> String {
        route_spec(spec, Utc::now()).unwrap_err().field
    }

    #[test]
    fn a_plain_interactive_route_is_valid() {
        route_spec(&spec(), Utc::now()).unwrap();
    }

    #[test]
    fn mode_decides_which_id_is_required() {
        let mut s = spec();
        s.session_id = None;
        assert_eq!(field_of(&s), "session_id");
        s.app_mode = AppMode::Inference;
        assert_eq!(field_of(&s), "endpoint_id");
        s.endpoint_id = Some(Uuid::new_v4());
        route_spec(&s, Utc::now()).unwrap();
        s.session_id = Some(Uuid::new_v4());
        assert_eq!(field_of(&s), "session_id");
    }

    #[test]
    fn inference_rejects_raw_tcp_and_preopen() {
        let mut s = spec();
        s.app_mode = AppMode::Inference;
        s.session_id = None;
        s.endpoint_id = Some(Uuid::new_v4());
        for p in [Protocol::Tcp, Protocol::Preopen] {
            s.protocol = p;
            assert_eq!(field_of(&s), "protocol");
        }
        for p in [Protocol::Http, Protocol::Grpc, Protocol::H2] {
            s.protocol = p;
            route_spec(&s, Utc::now()).unwrap();
        }
    }

    #[test]
    fn targets_are_checked() {
        let mut s = spec();
        s.targets.clear();
        assert!(
            route_spec(&s, Utc::now()).is_ok(),
            "no targets yet is valid"
        );
        s = spec();
        s.targets[0].host = "not a host!".into();
        assert_eq!(field_of(&s), "targets[0].host");
        s = spec();
        s.targets[0].port = 0;
        assert_eq!(field_of(&s), "targets[0].port");
        s = spec();
        let id = Uuid::new_v4();
        s.targets[0].id = Some(id);
        s.targets.push(s.targets[0].clone());
        assert_eq!(field_of(&s), "targets[1].id");
        s = spec();
        s.targets[0].weight = 0;
        assert_eq!(field_of(&s), "targets");
    }

    #[test]
    fn frontend_requests_are_checked() {
        let mut s = spec();
        s.frontend = FrontendRequest {
            port: Some(0),
            subdomain: None,
        };
        assert_eq!(field_of(&s), "frontend.port");
        s.frontend = FrontendRequest {
            port: Some(10000),
            subdomain: Some("x".into()),
        };
        assert_eq!(field_of(&s), "frontend");
        s.frontend = FrontendRequest {
            port: None,
            subdomain: Some("---".into()),
        };
        assert_eq!(field_of(&s), "frontend.subdomain");
        s.frontend.subdomain = Some("ok".into());
        s.protocol = Protocol::Tcp;
        assert_eq!(field_of(&s), "frontend.subdomain");
    }

    #[test]
    fn service_names_envs_health_checks_and_expiry() {
        let mut s = spec();
        s.service = "has space".into();
        assert_eq!(field_of(&s), "service");
        s = spec();
        s.envs.insert("1BAD".into(), "x".into());
        assert_eq!(field_of(&s), "envs.1BAD");
        s = spec();
        s.health_check = Some(HealthCheck {
            path: "/health".into(),
            interval_s: 5,
            timeout_s: 10,
            expected_status: 200,
        });
        assert_eq!(field_of(&s), "health_check.timeout_s");
        s = spec();
        s.expires_at = Some(Utc::now() - chrono::Duration::seconds(1));
        assert_eq!(field_of(&s), "expires_at");
    }

    #[test]
    fn hosts_and_dns_names() {
        for ok in ["10.0.0.1", "::1", "[::1]", "kernel-1.cluster.local", "a"] {
            assert!(is_host(ok), "{ok}");
        }
        for bad in ["", "-a", "a..b", "a b", "x_y.com", &"a".repeat(64)] {
            assert!(!is_host(bad), "{bad}");
        }
    }

    fn registration_json() -> serde_json::Value {
        serde_json::json!({
            "name": "worker-1",
            "api_url": "http://10.0.0.5:10201",
            "frontend": {"mode": "port", "host": "proxy.example.com", "port_range": [10205, 10300]}
        })
    }

    #[test]
    fn registrations_are_checked() {
        let reg: WorkerRegistration = serde_json::from_value(registration_json()).unwrap();
        registration(&reg).unwrap();
        assert_eq!(reg.protocols.len(), 5);
        assert_eq!(reg.app_modes.len(), 2);

        let mut bad = reg.clone();
        bad.api_url = "ftp://x".into();
        assert_eq!(registration(&bad).unwrap_err().field, "api_url");
        let mut bad = reg.clone();
        bad.frontend = WorkerFrontend::Port {
            host: "proxy".into(),
            port_range: [200, 100],
        };
        assert_eq!(registration(&bad).unwrap_err().field, "frontend.port_range");
        let mut bad = reg;
        bad.name = "no/slash".into();
        assert_eq!(registration(&bad).unwrap_err().field, "name");

        let mut v = registration_json();
        v["frontend"]["colour"] = "red".into();
        assert!(serde_json::from_value::<WorkerRegistration>(v).is_err());
    }
}
