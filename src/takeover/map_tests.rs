//! The mapping of upstream's rows, row by row.
use serde_json::json;
use sqlx::types::Json;

use super::*;
use crate::domain::{Protocol, WorkerFrontend};

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn now() -> DateTime<Utc> {
    "2026-12-07T12:00:00Z".parse().unwrap()
}

fn port_worker() -> UpstreamWorker {
    UpstreamWorker {
        id: id(1),
        authority: "worker-1".into(),
        frontend_mode: "PORT".into(),
        protocol: "HTTP".into(),
        hostname: "proxy.example.com".into(),
        tls_listen: false,
        tls_advertised: true,
        api_port: 10201,
        port_range: Some(vec![10205, 10300]),
        wildcard_domain: None,
        wildcard_traffic_port: None,
        nodes: 2,
        accepted_traffics: vec!["INTERACTIVE".into(), "INFERENCE".into()],
        filtered_apps_only: true,
        traefik_last_used_marker_path: None,
        created_at: Some("2026-01-01T00:00:00Z".parse().unwrap()),
        updated_at: None,
        status: "ALIVE".into(),
        filters: vec![("session.domain_name".into(), "research".into())],
    }
}

fn inference_circuit() -> UpstreamCircuit {
    UpstreamCircuit {
        id: id(10),
        app: Some("model".into()),
        protocol: "HTTP".into(),
        worker: id(1),
        app_mode: "INFERENCE".into(),
        frontend_mode: "PORT".into(),
        port: Some(10207),
        subdomain: None,
        envs: Some(Json(json!({"A": "1", "N": 2}))),
        arguments: Some("--x".into()),
        open_to_public: true,
        allowed_client_ips: None,
        user_id: Some(id(3)),
        endpoint_id: Some(id(4)),
        runtime_variant: Some("vllm".into()),
        session_ids: vec![],
        route_info: Json(json!([{"route_id": id(5), "session_id": id(6),
            "session_name": null, "kernel_host": "10.0.0.5", "kernel_port": 8000,
            "protocol": "http", "traffic_ratio": 0.5}])),
        created_at: Some("2026-02-01T00:00:00Z".parse().unwrap()),
        updated_at: None,
    }
}

#[test]
fn a_port_worker_is_the_registration_its_put_would_make() {
    let w = worker(&port_worker()).unwrap();
    assert_eq!((w.id, w.status), (id(1), WorkerStatus::Ready));
    let r = &w.registration;
    assert_eq!(r.name, "worker-1");
    assert_eq!(r.api_url, "https://proxy.example.com:10201");
    assert_eq!(
        r.frontend,
        WorkerFrontend::Port {
            host: "proxy.example.com".into(),
            port_range: [10205, 10300]
        }
    );
    assert_eq!(r.app_modes, vec![AppMode::Interactive, AppMode::Inference]);
    let b = r.backendai.as_ref().unwrap();
    assert_eq!(
        (b.nodes, b.filtered_apps_only, b.tls_advertised),
        (2, true, true)
    );
    assert_eq!(b.app_filters[0].key, "session.domain_name");
    let lost = UpstreamWorker {
        status: "LOST".into(),
        ..port_worker()
    };
    assert_eq!(worker(&lost).unwrap().status, WorkerStatus::Lost);
}

#[test]
fn a_wildcard_worker_keeps_its_domain_and_traffic_port() {
    let w = UpstreamWorker {
        frontend_mode: "WILDCARD_DOMAIN".into(),
        port_range: None,
        wildcard_domain: Some(".apps.example.com".into()),
        wildcard_traffic_port: Some(8443),
        ..port_worker()
    };
    let r = worker(&w).unwrap().registration;
    assert_eq!(
        r.frontend,
        WorkerFrontend::Wildcard {
            domain: "apps.example.com".into(),
            port: 8443,
            tls: true
        }
    );
}

#[test]
fn an_inference_circuit_keeps_its_port_targets_and_health_check() {
    let endpoint = UpstreamEndpoint {
        id: id(4),
        health_check_enabled: true,
        health_check_config: Some(Json(json!({"path": "/health"}))),
    };
    let r = circuit(&inference_circuit(), Some(&endpoint), None, now()).unwrap();
    assert_eq!(
        (r.id, r.worker_id, r.port, r.subdomain.as_deref()),
        (id(10), Some(id(1)), Some(10207), None)
    );
    assert_eq!(r.created_at, inference_circuit().created_at.unwrap());
    let s = &r.spec;
    assert_eq!(
        (s.app_mode, s.endpoint_id, s.session_id),
        (AppMode::Inference, Some(id(4)), None)
    );
    assert_eq!((s.service.as_str(), s.protocol), ("model", Protocol::Http));
    assert_eq!(
        (
            s.targets[0].host.as_str(),
            s.targets[0].port,
            s.targets[0].weight
        ),
        ("10.0.0.5", 8000, 50)
    );
    assert_eq!(s.targets[0].id, Some(id(5)));
    assert_eq!(s.envs.get("N").map(String::as_str), Some("2"));
    assert_eq!(s.args, Some(Value::String("--x".into())));
    assert!(s.access.open_to_public);
    let info = s.circuit.as_ref().unwrap();
    assert_eq!(
        (info.user_id, info.runtime_variant.as_deref()),
        (Some(id(3)), Some("vllm"))
    );
    assert_eq!(info.health_check, Some(json!({"path": "/health"})));
    let disabled = UpstreamEndpoint {
        health_check_enabled: false,
        ..endpoint
    };
    let r = circuit(&inference_circuit(), Some(&disabled), None, now()).unwrap();
    assert_eq!(r.spec.circuit.unwrap().health_check, None);
}

#[test]
fn an_interactive_preopen_circuit_on_a_subdomain_keeps_what_it_was_asked() {
    let c = UpstreamCircuit {
        app: Some("jupyter".into()),
        protocol: "PREOPEN".into(),
        app_mode: "INTERACTIVE".into(),
        frontend_mode: "WILDCARD_DOMAIN".into(),
        port: None,
        subdomain: Some("abc-jupyter".into()),
        allowed_client_ips: Some("10.0.0.0/8, 192.168.1.7".into()),
        endpoint_id: None,
        runtime_variant: None,
        session_ids: vec![id(7)],
        ..inference_circuit()
    };
    let token = UpstreamToken {
        id: id(8),
        login_session_token: None,
        kernel_host: "10.0.0.9".into(),
        kernel_port: 8888,
        session_id: id(7),
        user_uuid: id(3),
        group_id: id(9),
        access_key: "AKIA".into(),
        domain_name: "default".into(),
    };
    let r = circuit(&c, None, Some(&token), now()).unwrap();
    assert_eq!(
        (r.port, r.subdomain.as_deref()),
        (None, Some("abc-jupyter"))
    );
    assert_eq!(
        (r.spec.session_id, r.spec.protocol),
        (Some(id(7)), Protocol::Http)
    );
    let info = r.spec.circuit.as_ref().unwrap();
    assert_eq!(info.app_protocol.as_deref(), Some("preopen"));
    assert_eq!(info.session_ids, vec![id(7)]);
    assert_eq!(info.properties["session.domain_name"], "default");
    assert_eq!(info.properties["session.project_id"], id(9).to_string());
    let ips: Vec<String> = r
        .spec
        .access
        .allowed_client_ips
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ips, ["10.0.0.0/8", "192.168.1.7/32"]);
}

#[test]
fn rows_that_cannot_be_ours_are_refused_with_the_reason() {
    let unknown = UpstreamCircuit {
        protocol: "QUIC".into(),
        ..inference_circuit()
    };
    let err = circuit(&unknown, None, None, now()).unwrap_err();
    assert!(err.contains("QUIC"), "{err}");
    let no_port = UpstreamCircuit {
        port: None,
        ..inference_circuit()
    };
    assert!(
        circuit(&no_port, None, None, now())
            .unwrap_err()
            .contains("without a port")
    );
    let no_session = UpstreamCircuit {
        app_mode: "INTERACTIVE".into(),
        ..inference_circuit()
    };
    assert!(
        circuit(&no_session, None, None, now())
            .unwrap_err()
            .contains("without a session")
    );
    // A circuit on a refused worker is refused too, naming the worker.
    let upstream = Upstream {
        revision: "a1b2c3d4e5f6".into(),
        workers: vec![UpstreamWorker {
            port_range: None,
            ..port_worker()
        }],
        circuits: vec![inference_circuit()],
        endpoints: vec![],
        tokens: vec![],
    };
    let mapped = map(&upstream, now());
    assert!(mapped.workers.is_empty() && mapped.routes.is_empty());
    let kinds: Vec<&str> = mapped.refused.iter().map(|r| r.kind).collect();
    assert_eq!(kinds, ["worker", "circuit"]);
    assert!(mapped.refused[1].reason.contains(&id(1).to_string()));
}
