//! Interactive apps (`/v2/proxy/auth`): the protocol a circuit is served
//! as, the client networks it admits, the setup token the browser carries
//! to the worker, and how the answer is rendered.

use ipnet::IpNet;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::domain::Protocol;

/// The protocol an app asked for becomes what the worker serves (`preopen`
/// as http, `vnc` and `rdp` as tcp) plus, when those differ, the asked one
/// (kept in `circuit.app_protocol`). `None` for an unknown protocol.
pub fn served_protocol(asked: &str) -> Option<(Protocol, Option<String>)> {
    Some(match asked {
        "http" => (Protocol::Http, None),
        "grpc" => (Protocol::Grpc, None),
        "h2" => (Protocol::H2, None),
        "tcp" => (Protocol::Tcp, None),
        "preopen" => (Protocol::Http, Some("preopen".to_owned())),
        "vnc" | "rdp" => (Protocol::Tcp, Some(asked.to_owned())),
        _ => return None,
    })
}

/// Upstream's `allowed_client_ips`: comma-separated CIDRs (a bare address
/// is one host), at most 255 characters.
pub fn client_networks(raw: Option<&str>) -> Result<Vec<IpNet>, String> {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(Vec::new());
    };
    if raw.len() > 255 {
        return Err("allowed_client_ips: at most 255 characters".into());
    }
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| format!("allowed_client_ips: {s:?} is not a CIDR"))
        })
        .collect()
}

/// The setup token's claims: the conf token, where to go after `/setup`,
/// and the circuit. No expiry (as upstream).
pub fn setup_claims(conf_token: Uuid, redirect: &str, circuit: Uuid) -> Map<String, Value> {
    let Value::Object(claims) = json!({
        "id": conf_token,
        "version": "v2",
        "redirect": redirect,
        "circuit": circuit,
    }) else {
        unreachable!("an object literal")
    };
    claims
}

/// Upstream answers JSON only when `Accept` names `application/json`
/// itself (`*/*` does not count; no header means a browser: redirect).
pub fn wants_json(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            part.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        })
    })
}

/// A query-string boolean as upstream's validation reads it.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Some(true),
        "0" | "false" | "f" | "no" | "n" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asked_protocols_map_onto_served_ones() {
        assert_eq!(served_protocol("http"), Some((Protocol::Http, None)));
        assert_eq!(
            served_protocol("preopen"),
            Some((Protocol::Http, Some("preopen".into())))
        );
        assert_eq!(
            served_protocol("vnc"),
            Some((Protocol::Tcp, Some("vnc".into())))
        );
        assert_eq!(served_protocol("gopher"), None);
    }

    #[test]
    fn client_networks_are_comma_separated_cidrs() {
        let nets = client_networks(Some("10.0.0.0/8, 192.168.1.7")).unwrap();
        let shown: Vec<String> = nets.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.168.1.7/32"]);
        assert_eq!(client_networks(None).unwrap(), vec![]);
        assert_eq!(client_networks(Some("")).unwrap(), vec![]);
        assert!(client_networks(Some("10.0.0.0/33")).is_err());
        assert!(client_networks(Some(&"1".repeat(256))).is_err());
    }

    #[test]
    fn only_an_explicit_json_accept_gets_json() {
        assert!(wants_json(Some("application/json")));
        assert!(wants_json(Some("text/html, application/json;q=0.9")));
        assert!(!wants_json(Some("*/*")));
        assert!(!wants_json(Some("application/*")));
        assert!(!wants_json(None));
    }

    #[test]
    fn query_booleans_read_as_upstream_reads_them() {
        assert_eq!(parse_bool("true"), Some(true));
        assert_eq!(parse_bool("1"), Some(true));
        assert_eq!(parse_bool("False"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
