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

/// Upstream's column sizes for a conf token (`login_session_token` is a
/// VARCHAR(127), `kernel_host` a VARCHAR(255)); `access_key` and
/// `domain_name` are TEXT there and held to 255 here, far above what the
/// Manager sends (a 20-character access key, a domain name).
pub const CONF_LIMITS: [(&str, usize); 4] = [
    ("login_session_token", 127),
    ("kernel_host", 255),
    ("session.access_key", 255),
    ("session.domain_name", 255),
];

/// Checks a conf token's text fields against [`CONF_LIMITS`] (values in the
/// same order); answers the offending field and why.
pub fn conf_fields_fit(values: [Option<&str>; 4]) -> Result<(), (&'static str, String)> {
    for ((field, max), value) in CONF_LIMITS.into_iter().zip(values) {
        let Some(value) = value else { continue };
        if value.chars().count() > max {
            return Err((field, format!("at most {max} characters")));
        }
        if value.chars().any(char::is_control) {
            return Err((field, "no control characters".to_owned()));
        }
    }
    if values[1].is_some_and(|host| host.trim().is_empty()) {
        return Err(("kernel_host", "must not be empty".to_owned()));
    }
    Ok(())
}

/// `redirect` of `/v2/proxy/auth`: the path the worker sends the browser to
/// after `/setup`, appended to the worker's own origin. Empty, or a path: one
/// leading `/`, and nothing that would make a browser leave the origin (no
/// `//` or `\\` at the start, no `@`, no backslash or control character
/// anywhere). Answers why not.
pub fn redirect_path(raw: &str) -> Result<&str, &'static str> {
    if raw.is_empty() {
        return Ok(raw);
    }
    if !raw.starts_with('/') {
        return Err("a path starting with one '/'");
    }
    if raw.starts_with("//") {
        return Err("a path, not '//' (a host)");
    }
    if raw.contains('@') {
        return Err("a path without '@'");
    }
    if raw.contains('\\') || raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("a path without backslashes, spaces or control characters");
    }
    Ok(raw)
}

/// Whether a conf token of `token_user` may use (and update) an app's
/// existing circuit, which belongs to `circuit_user`: only the same user's
/// may. Another user's token is refused and changes nothing: it would
/// otherwise re-target the app's URL, open it to the public, or hand its
/// setup token (and with it the owner's permit cookie) to whoever forged
/// the token.
pub fn same_user(circuit_user: Option<Uuid>, token_user: Uuid) -> bool {
    circuit_user == Some(token_user)
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
    fn a_redirect_is_a_path_on_the_workers_own_origin() {
        for ok in ["", "/", "/lab", "/lab?token=1&x=/y", "/a/b#c"] {
            assert_eq!(redirect_path(ok), Ok(ok), "{ok:?}");
        }
        for bad in [
            "https://evil.example/",
            "evil.example",
            "//evil.example/x",
            "/\\evil.example",
            "\\\\evil.example",
            "/@evil.example",
            "/x@evil.example",
            "/a b",
            "/a\nb",
            "javascript:alert(1)",
        ] {
            assert!(redirect_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn conf_fields_keep_upstreams_sizes() {
        assert_eq!(
            conf_fields_fit([None, Some("10.0.0.1"), Some("AK"), Some("default")]),
            Ok(())
        );
        let long = "x".repeat(128);
        assert_eq!(
            conf_fields_fit([Some(&long), Some("h"), Some("a"), Some("d")])
                .unwrap_err()
                .0,
            "login_session_token"
        );
        assert!(conf_fields_fit([Some(&long[..127]), Some("h"), Some("a"), Some("d")]).is_ok());
        let host = "h".repeat(256);
        assert_eq!(
            conf_fields_fit([None, Some(&host), Some("a"), Some("d")])
                .unwrap_err()
                .0,
            "kernel_host"
        );
        assert_eq!(
            conf_fields_fit([None, Some(" "), Some("a"), Some("d")])
                .unwrap_err()
                .0,
            "kernel_host"
        );
        assert_eq!(
            conf_fields_fit([None, Some("h\n"), Some("a"), Some("d")])
                .unwrap_err()
                .0,
            "kernel_host"
        );
    }

    #[test]
    fn only_the_circuits_own_user_may_use_it() {
        let owner = Uuid::now_v7();
        assert!(same_user(Some(owner), owner));
        assert!(!same_user(Some(owner), Uuid::now_v7()));
        assert!(!same_user(None, owner));
    }

    #[test]
    fn query_booleans_read_as_upstream_reads_them() {
        assert_eq!(parse_bool("true"), Some(true));
        assert_eq!(parse_bool("1"), Some(true));
        assert_eq!(parse_bool("False"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
