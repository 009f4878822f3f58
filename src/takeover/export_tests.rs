//! Our state as upstream's rows: upstream's rows mapped as the import maps
//! them and back give the same rows, for every protocol upstream knows; what
//! has no place upstream is counted or skipped.
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::types::Json;

use super::*;
use crate::takeover::map;
use crate::takeover::read::Upstream;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn now() -> DateTime<Utc> {
    "2026-12-07T12:00:00Z".parse().unwrap()
}

fn upstream_worker() -> UpstreamWorker {
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
        traefik_last_used_marker_path: Some("/run/marker".into()),
        created_at: Some("2026-01-01T00:00:00Z".parse().unwrap()),
        updated_at: Some("2026-01-02T00:00:00Z".parse().unwrap()),
        status: "ALIVE".into(),
        filters: vec![("session.domain_name".into(), "research".into())],
    }
}

/// An interactive circuit of `protocol` (upstream's member) at `port`; its
/// route info names the protocol by its value, as upstream writes it.
fn upstream_circuit(n: u128, protocol: &str, port: i32) -> UpstreamCircuit {
    let value = if protocol == "HTTP2" {
        "h2".to_owned()
    } else {
        protocol.to_lowercase()
    };
    UpstreamCircuit {
        id: id(n),
        app: Some(format!("app-{n}")),
        protocol: protocol.into(),
        worker: id(1),
        app_mode: "INTERACTIVE".into(),
        frontend_mode: "PORT".into(),
        port: Some(port),
        subdomain: None,
        envs: Some(Json(json!({"TZ": "UTC"}))),
        arguments: Some("--x".into()),
        open_to_public: false,
        allowed_client_ips: Some("10.0.0.0/8".into()),
        user_id: Some(id(3)),
        endpoint_id: None,
        runtime_variant: None,
        session_ids: vec![id(100 + n)],
        route_info: Json(json!([{"route_id": null, "session_id": id(100 + n),
            "session_name": null, "kernel_host": "10.0.0.5", "kernel_port": 8000,
            "protocol": value, "traffic_ratio": 1.0}])),
        created_at: Some("2026-02-01T00:00:00.123456Z".parse().unwrap()),
        updated_at: Some("2026-02-01T00:00:00.123456Z".parse().unwrap()),
    }
}

/// Upstream's rows as the import stores them, read back as ours.
fn as_ours(upstream: &Upstream) -> ExportState {
    let mapped = map::map(upstream, now());
    assert_eq!(mapped.refused, vec![]);
    let workers: Vec<Worker> = mapped
        .workers
        .iter()
        .map(|w| {
            let count = mapped
                .routes
                .iter()
                .filter(|r| r.worker_id == Some(w.id))
                .count();
            Worker::from_parts(
                w.id,
                w.registration.clone(),
                w.status,
                now(),
                0,
                0,
                count as u64,
                w.created_at.unwrap(),
                w.updated_at.unwrap(),
            )
        })
        .collect();
    let routes = mapped
        .routes
        .into_iter()
        .map(|r| {
            let w = workers.iter().find(|w| Some(w.id) == r.worker_id);
            r.into_route(w)
        })
        .collect();
    ExportState {
        workers,
        routes,
        tokens: mapped.tokens,
    }
}

#[test]
fn every_protocol_and_field_comes_back_as_upstream_had_it() {
    let circuits: Vec<UpstreamCircuit> = ["HTTP", "GRPC", "HTTP2", "TCP", "PREOPEN", "VNC", "RDP"]
        .iter()
        .enumerate()
        .map(|(i, p)| upstream_circuit(10 + i as u128, p, 10207 + i as i32))
        .collect();
    let upstream = Upstream {
        revision: "a1b2c3d4e5f6".into(),
        workers: vec![upstream_worker()],
        circuits: circuits.clone(),
        endpoints: vec![],
        tokens: vec![],
    };
    let out = rows(&as_ours(&upstream));
    assert_eq!(out.skipped, vec![]);
    assert_eq!((out.native_routes, out.native_workers), (0, 0));
    assert_eq!(out.workers.len(), 1);
    assert_eq!(out.workers[0].row, upstream_worker());
    assert_eq!(
        (
            out.workers[0].available_slots,
            out.workers[0].occupied_slots
        ),
        (96, 7)
    );
    let mut back = out.circuits;
    back.sort_by_key(|c| c.id);
    assert_eq!(back, circuits);
}

#[test]
fn a_worker_keeps_its_protocol_where_ours_tells_it_apart() {
    for (asked, back) in [
        ("HTTP", "HTTP"),
        ("PREOPEN", "PREOPEN"),
        ("GRPC", "GRPC"),
        ("HTTP2", "HTTP2"),
        ("TCP", "TCP"),
        // A worker registered as vnc or rdp speaks TCP here: that is all
        // its row says after the round trip.
        ("VNC", "TCP"),
        ("RDP", "TCP"),
    ] {
        let upstream = Upstream {
            workers: vec![UpstreamWorker {
                protocol: asked.into(),
                ..upstream_worker()
            }],
            ..Upstream::default()
        };
        let out = rows(&as_ours(&upstream));
        assert_eq!(out.workers[0].row.protocol, back, "{asked}");
    }
}

#[test]
fn a_wildcard_worker_and_circuit_keep_domain_port_and_subdomain() {
    let worker = UpstreamWorker {
        frontend_mode: "WILDCARD_DOMAIN".into(),
        port_range: None,
        wildcard_domain: Some(".apps.example.com".into()),
        wildcard_traffic_port: Some(8443),
        ..upstream_worker()
    };
    let circuit = UpstreamCircuit {
        frontend_mode: "WILDCARD_DOMAIN".into(),
        port: None,
        subdomain: Some("s1-jupyter".into()),
        ..upstream_circuit(10, "HTTP", 0)
    };
    let upstream = Upstream {
        workers: vec![worker.clone()],
        circuits: vec![circuit.clone()],
        ..Upstream::default()
    };
    let out = rows(&as_ours(&upstream));
    assert_eq!(out.workers[0].row, worker);
    assert_eq!(
        (
            out.workers[0].available_slots,
            out.workers[0].occupied_slots
        ),
        (-1, 1)
    );
    assert_eq!(out.circuits, vec![circuit]);
}

#[test]
fn native_routes_and_workers_are_counted_and_circuits_without_a_home_skipped() {
    let upstream = Upstream {
        workers: vec![upstream_worker()],
        circuits: vec![upstream_circuit(10, "HTTP", 10207)],
        ..Upstream::default()
    };
    let mut state = as_ours(&upstream);
    let circuit = state.routes[0].clone();
    // A native worker, a native route on it, a Backend.AI circuit on it, and
    // a Backend.AI circuit waiting for a worker.
    let mut native = state.workers[0].clone();
    native.id = id(2);
    native.name = "native-1".into();
    native.backendai = None;
    let native_route = Route {
        id: id(20),
        circuit: None,
        worker_id: Some(id(2)),
        ..circuit.clone()
    };
    let on_native = Route {
        id: id(21),
        worker_id: Some(id(2)),
        ..circuit.clone()
    };
    let pending = Route {
        id: id(22),
        worker_id: None,
        ..circuit.clone()
    };
    state.workers.push(native);
    state
        .routes
        .extend([native_route, on_native.clone(), pending.clone()]);
    let out = rows(&state);
    assert_eq!((out.native_routes, out.native_workers), (1, 1));
    assert_eq!(out.circuits.len(), 1);
    assert_eq!(
        out.skipped,
        vec![
            Skipped {
                kind: "circuit",
                id: id(21),
                reason: "its worker native-1 is not exported".into()
            },
            Skipped {
                kind: "circuit",
                id: id(22),
                reason: "it waits for a worker (Pending): upstream has no such state".into()
            },
        ]
    );
    assert_eq!(out.workers[0].occupied_slots, 1);
}

#[test]
fn an_inference_circuit_brings_its_endpoint_and_health_check() {
    let mut inference = upstream_circuit(10, "HTTP", 10207);
    inference.app_mode = "INFERENCE".into();
    inference.endpoint_id = Some(id(4));
    inference.runtime_variant = Some("vllm".into());
    inference.session_ids = vec![];
    let mut unchecked = upstream_circuit(11, "HTTP", 10208);
    unchecked.app_mode = "INFERENCE".into();
    unchecked.endpoint_id = Some(id(5));
    unchecked.session_ids = vec![];
    let endpoints = vec![
        UpstreamEndpoint {
            id: id(4),
            health_check_enabled: true,
            health_check_config: Some(Json(json!({"path": "/health", "interval": 10}))),
        },
        UpstreamEndpoint {
            id: id(5),
            health_check_enabled: false,
            health_check_config: None,
        },
    ];
    let upstream = Upstream {
        workers: vec![upstream_worker()],
        circuits: vec![inference, unchecked],
        endpoints: endpoints.clone(),
        ..Upstream::default()
    };
    let out = rows(&as_ours(&upstream));
    assert_eq!(out.endpoints, endpoints);
}
