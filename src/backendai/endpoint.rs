//! Inference endpoints as the Manager knows them: the `existing_url` it
//! sends back when it re-creates an endpoint (which worker and frontend
//! keep that URL true), and the endpoint token its users present to the
//! worker.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::circuit::{Circuit, base_url};
use crate::domain::{AppMode, Route, Worker, WorkerFrontend, WorkerStatus};

/// Where an `existing_url` says an endpoint lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UrlPlace {
    /// On this wildcard worker, at this subdomain (the URL's first label).
    Subdomain { worker: Uuid, subdomain: String },
    /// On this port-mode worker, at this port.
    Port { worker: Uuid, port: u16 },
    /// No worker serves that URL: place normally.
    Anywhere,
}

/// The host (lower-cased, IPv6 without brackets) and port (explicit, or
/// the scheme's default) of `url`; `Err` for a URL without a host.
pub fn host_and_port(url: &str) -> Result<(String, Option<u16>), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not an absolute URL"))?;
    let authority = rest
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default()
        .rsplit('@')
        .next()
        .unwrap_or_default();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?} has an unterminated IPv6 host"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| format!("{url:?} has an invalid port"))?,
        ),
        None => match scheme.to_ascii_lowercase().as_str() {
            "http" | "ws" => Some(80),
            "https" | "wss" => Some(443),
            _ => None,
        },
    };
    Ok((host.to_ascii_lowercase(), port))
}

/// Which of `workers` serves `url`, as upstream decides it: a wildcard
/// worker whose domain is the host without its first label, else a port
/// worker with that hostname whose range holds the URL's port. Only Ready
/// workers taking inference routes count: a URL whose worker is gone is
/// placed anew (the Manager stores the new URL it is answered).
pub fn place_of(url: &str, workers: &[Worker]) -> Result<UrlPlace, String> {
    let (host, port) = host_and_port(url)?;
    let usable =
        |w: &&Worker| w.status == WorkerStatus::Ready && w.app_modes.contains(&AppMode::Inference);
    if let Some((label, domain)) = host.split_once('.') {
        for w in workers.iter().filter(usable) {
            if let WorkerFrontend::Wildcard { domain: d, .. } = &w.frontend
                && d.eq_ignore_ascii_case(domain)
                && !label.is_empty()
            {
                return Ok(UrlPlace::Subdomain {
                    worker: w.id,
                    subdomain: label.to_owned(),
                });
            }
        }
    }
    let port = port.ok_or_else(|| format!("{url:?} has no port"))?;
    for w in workers.iter().filter(usable) {
        if let WorkerFrontend::Port {
            host: h,
            port_range,
        } = &w.frontend
        {
            let hostname = w.backendai.as_ref().map_or(h, |b| &b.hostname);
            if hostname.eq_ignore_ascii_case(&host)
                && (port_range[0]..=port_range[1]).contains(&port)
            {
                return Ok(UrlPlace::Port { worker: w.id, port });
            }
        }
    }
    Ok(UrlPlace::Anywhere)
}

/// An expiry as the Manager sends it: unix seconds (a number or a numeric
/// string) or an ISO-8601 datetime (UTC when it has no offset).
pub fn parse_exp(exp: &Value) -> Result<i64, String> {
    let bad = || format!("exp: {exp} is neither unix seconds nor an ISO-8601 datetime");
    match exp {
        Value::Number(n) => n.as_f64().map(|f| f.floor() as i64).ok_or_else(bad),
        Value::String(s) => {
            let s = s.trim();
            if let Ok(f) = s.parse::<f64>() {
                return Ok(f.floor() as i64);
            }
            if let Ok(t) = DateTime::parse_from_rfc3339(s) {
                return Ok(t.timestamp());
            }
            [
                "%Y-%m-%dT%H:%M:%S%.f",
                "%Y-%m-%d %H:%M:%S%.f",
                "%Y-%m-%dT%H:%M",
            ]
            .iter()
            .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
            .map(|t| t.and_utc().timestamp())
            .ok_or_else(bad)
        }
        _ => Err(bad()),
    }
}

fn unix_float(t: DateTime<Utc>) -> f64 {
    t.timestamp_micros() as f64 / 1e6
}

/// The claims of an endpoint token (upstream's): the circuit's fields but
/// its routes, `created_at`/`updated_at` as float unix timestamps, the
/// endpoint's URL without its trailing `/` as `app_url`, the user it is
/// for and its expiry (unix seconds). The worker checks `id` and `exp`.
pub fn token_claims(route: &Route, worker: &Worker, user: Uuid, exp: i64) -> Map<String, Value> {
    let circuit = Circuit::of(route, worker);
    let Value::Object(mut claims) = serde_json::to_value(&circuit).expect("a circuit serialises")
    else {
        unreachable!("a circuit is a JSON object")
    };
    claims.remove("route_info");
    claims.insert("created_at".into(), json!(unix_float(route.created_at)));
    claims.insert("updated_at".into(), json!(unix_float(route.updated_at)));
    claims.insert("app_url".into(), json!(base_url(route, worker)));
    claims.insert("user".into(), json!(user));
    claims.insert("exp".into(), json!(exp));
    claims
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::domain::WorkerRegistration;

    fn worker(name: &str, frontend: WorkerFrontend, status: WorkerStatus) -> Worker {
        let registration = WorkerRegistration {
            name: name.into(),
            api_url: "http://127.0.0.1:10201".into(),
            frontend,
            protocols: vec![crate::domain::Protocol::Http],
            app_modes: vec![AppMode::Inference],
            labels: BTreeMap::new(),
            pod: None,
            capacity: None,
            backendai: None,
        };
        let now = Utc::now();
        Worker::from_parts(Uuid::now_v7(), registration, status, now, 0, 0, 0, now, now)
    }

    #[test]
    fn urls_give_their_host_and_port_or_the_schemes_default() {
        assert_eq!(
            host_and_port("http://127.0.0.1:10205/").unwrap(),
            ("127.0.0.1".into(), Some(10205))
        );
        assert_eq!(
            host_and_port("https://Model.Apps.Example/v1?x=1").unwrap(),
            ("model.apps.example".into(), Some(443))
        );
        assert_eq!(
            host_and_port("http://[::1]:8080").unwrap(),
            ("::1".into(), Some(8080))
        );
        assert_eq!(host_and_port("grpc://host").unwrap(), ("host".into(), None));
        assert!(host_and_port("http:///path").is_err());
        assert!(host_and_port("not a url").is_err());
        assert!(host_and_port("http://h:99999").is_err());
    }

    #[test]
    fn an_existing_url_finds_its_worker_and_frontend() {
        let wild = worker(
            "wild",
            WorkerFrontend::Wildcard {
                domain: "apps.example".into(),
                port: 443,
                tls: true,
            },
            WorkerStatus::Ready,
        );
        let port = worker(
            "port",
            WorkerFrontend::Port {
                host: "proxy.example".into(),
                port_range: [10200, 10300],
            },
            WorkerStatus::Ready,
        );
        let lost = worker(
            "lost",
            WorkerFrontend::Port {
                host: "old.example".into(),
                port_range: [10200, 10300],
            },
            WorkerStatus::Lost,
        );
        let workers = vec![wild.clone(), port.clone(), lost];
        assert_eq!(
            place_of("https://my-model.apps.example/", &workers).unwrap(),
            UrlPlace::Subdomain {
                worker: wild.id,
                subdomain: "my-model".into()
            }
        );
        assert_eq!(
            place_of("http://proxy.example:10250/", &workers).unwrap(),
            UrlPlace::Port {
                worker: port.id,
                port: 10250
            }
        );
        // Outside the range, another host, or a lost worker: anywhere.
        for url in [
            "http://proxy.example:9000/",
            "http://elsewhere:10250/",
            "http://old.example:10250/",
        ] {
            assert_eq!(
                place_of(url, &workers).unwrap(),
                UrlPlace::Anywhere,
                "{url}"
            );
        }
        assert!(place_of("ftp://proxy.example/", &workers).is_err());
        assert!(place_of("garbage", &workers).is_err());
    }

    #[test]
    fn token_claims_are_the_circuit_with_float_times_and_the_url_without_slash() {
        let worker = worker(
            "w",
            WorkerFrontend::Port {
                host: "proxy.example".into(),
                port_range: [10200, 10300],
            },
            WorkerStatus::Ready,
        );
        let (endpoint, user) = (Uuid::now_v7(), Uuid::now_v7());
        let created = DateTime::parse_from_rfc3339("2026-11-25T16:48:19.690012Z")
            .unwrap()
            .to_utc();
        let route = Route {
            id: Uuid::now_v7(),
            app_mode: AppMode::Inference,
            session_id: None,
            endpoint_id: Some(endpoint),
            service: "smoke".into(),
            protocol: crate::domain::Protocol::Http,
            targets: Vec::new(),
            frontend: crate::domain::served::frontend_on(
                &worker,
                crate::domain::Protocol::Http,
                Some(10205),
                None,
            ),
            worker_id: Some(worker.id),
            access: Default::default(),
            labels: BTreeMap::new(),
            envs: BTreeMap::new(),
            args: None,
            health_check: None,
            expires_at: None,
            circuit: Some(crate::domain::CircuitInfo {
                user_id: Some(user),
                runtime_variant: Some("vllm".into()),
                ..Default::default()
            }),
            status: crate::domain::RouteStatus::Active,
            pending_reason: None,
            revision: 1,
            created_at: created,
            updated_at: created,
        };
        let claims = token_claims(&route, &worker, user, 1_900_000_000);
        assert_eq!(claims["id"], json!(route.id));
        assert_eq!(claims["worker"], json!(worker.id));
        assert_eq!(claims["endpoint_id"], json!(endpoint));
        assert_eq!(claims["app_url"], "http://proxy.example:10205");
        assert_eq!(claims["user"], json!(user));
        assert_eq!(claims["exp"], 1_900_000_000);
        assert_eq!(claims["created_at"], json!(1_795_625_299.690_012));
        assert_eq!(claims["runtime_variant"], "vllm");
        assert_eq!(claims["frontend_mode"], "port");
        assert!(!claims.contains_key("route_info"));
    }

    #[test]
    fn expiries_are_unix_seconds_or_iso_datetimes() {
        assert_eq!(parse_exp(&json!(1_900_000_000)), Ok(1_900_000_000));
        assert_eq!(parse_exp(&json!(1_900_000_000.7)), Ok(1_900_000_000));
        assert_eq!(parse_exp(&json!("1900000000")), Ok(1_900_000_000));
        assert_eq!(parse_exp(&json!("2030-01-01T00:00:00Z")), Ok(1_893_456_000));
        assert_eq!(
            parse_exp(&json!("2030-01-01T09:00:00+09:00")),
            Ok(1_893_456_000)
        );
        assert_eq!(
            parse_exp(&json!("2030-01-01T00:00:00.123456")),
            Ok(1_893_456_000)
        );
        assert!(parse_exp(&json!("tomorrow")).is_err());
        assert!(parse_exp(&json!(null)).is_err());
    }
}
