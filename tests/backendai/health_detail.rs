//! `/health/summary`, `/health/endpoints`, `/health/circuits/{id}` (always
//! 500 upstream): what they say of workers and circuits, and who may ask,
//! on both backends.

use appproxy_coordinator::backendai::jwt;
use appproxy_coordinator::domain::WorkerStatus;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{API_SECRET, Backend, JWT_SECRET, MANAGER, TestApp};
use crate::manager::{Reply, ack_everything, assert_error, manager, port_worker, send};
use crate::on_both_backends;

on_both_backends!(
    only_the_api_secret_reads_the_health_details,
    the_details_follow_the_circuits_and_their_workers,
);

const PATHS: [&str; 3] = [
    "/health/summary",
    "/health/endpoints",
    "/health/circuits/00000000-0000-4000-8000-000000000000",
];

async fn only_the_api_secret_reads_the_health_details(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let (_, worker_token, _) = app.register("native-1", [20000, 20010]).await;
    let now = app.clock.now().timestamp();
    let mut claims = serde_json::Map::new();
    claims.insert("iat".into(), json!(now));
    // Signed with the jwt_secret the workers hold, not the api_secret.
    let wrong_jwt = format!("Bearer {}", jwt::encode(&claims, JWT_SECRET));
    let right_jwt = format!("Bearer {}", jwt::encode(&claims, API_SECRET));
    let manager_bearer = format!("Bearer {MANAGER}");
    let worker_bearer = format!("Bearer {worker_token}");
    for path in PATHS {
        let refused: [&[(&str, &str)]; 6] = [
            &[],
            &[("x-backendai-token", "not-the-secret")],
            // The native tokens, either way they could be sent.
            &[("x-backendai-token", MANAGER)],
            &[("authorization", &manager_bearer)],
            &[("authorization", &worker_bearer)],
            &[("authorization", &wrong_jwt)],
        ];
        for headers in refused {
            let a = send(&app, Method::GET, path, headers, None).await;
            assert_error(&a, StatusCode::UNAUTHORIZED, "auth-failed");
        }
        // A wrong X-BackendAI-Token wins over a right JWT, as upstream.
        let a = send(
            &app,
            Method::GET,
            path,
            &[("x-backendai-token", "nope"), ("authorization", &right_jwt)],
            None,
        )
        .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        for headers in [
            &[("x-backendai-token", API_SECRET)][..],
            &[("authorization", right_jwt.as_str())][..],
        ] {
            let a = send(&app, Method::GET, path, headers, None).await;
            // The circuit path answers 404 for an id it does not know.
            assert!(
                a.status == StatusCode::OK || a.status == StatusCode::NOT_FOUND,
                "{path}: {:?}",
                a.body
            );
            assert_ne!(a.body["type"], "https://api.backend.ai/probs/auth-failed");
        }
    }
}

async fn get(app: &TestApp, path: &str) -> Reply {
    let a = manager(app, Method::GET, path, None).await;
    assert_eq!(a.status, StatusCode::OK, "{path}: {:?}", a.body);
    assert_eq!(a.body["success"], true);
    a
}

fn replica(route: Uuid, port: u16) -> Value {
    json!({"session_id": Uuid::new_v4(), "route_id": route,
           "kernel_host": "10.0.0.9", "kernel_port": port})
}

async fn the_details_follow_the_circuits_and_their_workers(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let worker = port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let deployment = Uuid::new_v4();
    let created = manager(
        &app,
        Method::POST,
        "/v2/endpoints/bulk",
        Some(json!({"endpoints": [{
            "deployment_id": deployment, "version": "v2", "service_name": "llm",
            "tags": {
                "session": {"user_uuid": Uuid::new_v4(), "project_id": Uuid::new_v4(),
                            "domain_name": "default"},
                "endpoint": {"id": deployment, "runtime_variant": "vllm", "existing_url": null}
            },
            "health_check": {"enable": true, "path": "/health"}
        }]})),
    )
    .await;
    assert_eq!(created.status, StatusCode::OK, "{:?}", created.body);
    let url = created.body["endpoints"][0]["url"].clone();
    let (r1, r2) = (Uuid::new_v4(), Uuid::new_v4());
    let a = manager(
        &app,
        Method::POST,
        "/v2/endpoints/bulk/routes",
        Some(json!({"endpoints": [{"deployment_id": deployment,
                                   "routes": [replica(r1, 8000), replica(r2, 8001)]}]})),
    )
    .await;
    assert_eq!(a.body["endpoints"][0]["success"], true, "{:?}", a.body);

    // Not yet acknowledged by the worker: unknown.
    let e = get(&app, "/health/endpoints").await;
    assert_eq!(
        (&e.body["summary"], &e.body["circuits"]),
        (&json!(null), &json!(null))
    );
    let endpoint = &e.body["endpoints"][0];
    assert_eq!(endpoint["status"], "Propagating", "{endpoint}");
    assert_eq!(endpoint["unknown_routes"], 2, "{endpoint}");
    let circuit_id = endpoint["circuit_id"].as_str().unwrap().to_owned();

    // Acknowledged: served, so both replicas are healthy.
    let head = app.store.current_revision().await.unwrap();
    app.store
        .advance_acked_revision(worker.id, head)
        .await
        .unwrap();
    let e = get(&app, "/health/endpoints").await;
    let endpoint = &e.body["endpoints"][0];
    assert_eq!(endpoint["endpoint_id"], json!(deployment));
    assert_eq!(endpoint["health_check_enabled"], true);
    assert_eq!(endpoint["status"], "Active");
    assert_eq!(endpoint["healthy"], true);
    assert_eq!(endpoint["worker"], "worker-1");
    assert_eq!(endpoint["worker_status"], "Ready");
    assert_eq!(endpoint["url"], url);
    assert_eq!(
        (
            &endpoint["total_routes"],
            &endpoint["healthy_routes"],
            &endpoint["unhealthy_routes"]
        ),
        (&json!(2), &json!(2), &json!(0))
    );
    let ids: Vec<&Value> = endpoint["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["route_id"])
        .collect();
    assert_eq!(ids, [&json!(r1), &json!(r2)]);
    assert_eq!(endpoint["routes"][1]["kernel_port"], 8001);
    assert_eq!(endpoint["routes"][1]["health_status"], "healthy");
    let s = get(&app, "/health/summary").await;
    let summary = &s.body["summary"];
    assert_eq!(summary["total_endpoints"], 1, "{summary}");
    assert_eq!(summary["healthy_routes"], 2, "{summary}");
    assert_eq!(summary["healthy_circuits"], 1, "{summary}");
    assert_eq!(summary["stranded_circuits"], 0, "{summary}");
    let workers = summary["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{summary}");
    assert_eq!(workers[0]["authority"], "worker-1");
    assert_eq!(workers[0]["status"], "Ready");
    assert_eq!(workers[0]["occupied_slots"], 1);

    // Its worker lost and failover over: the circuit stays (its URL would
    // change anywhere else), stranded and unhealthy.
    app.store
        .set_worker_status(worker.id, WorkerStatus::Lost, app.clock.now())
        .await
        .unwrap();
    app.store
        .relocate_routes(worker.id, 100, app.clock.now())
        .await
        .unwrap();
    let c = get(&app, &format!("/health/circuits/{circuit_id}")).await;
    let circuit = &c.body["circuits"][0];
    assert_eq!(c.body["circuits"].as_array().unwrap().len(), 1);
    assert_eq!(circuit["circuit_id"], circuit_id.as_str());
    assert_eq!(circuit["endpoint_id"], json!(deployment));
    assert_eq!(circuit["status"], "FailingOver");
    assert_eq!(circuit["healthy"], false);
    assert_eq!(circuit["worker_status"], "Lost");
    assert_eq!(circuit["url"], url);
    assert!(
        circuit["stranded_reason"]
            .as_str()
            .is_some_and(|r| r.contains("worker-1")),
        "{circuit}"
    );
    assert_eq!(
        (&circuit["total_routes"], &circuit["healthy_routes"]),
        (&json!(2), &json!(0))
    );
    assert_eq!(circuit["all_routes"][0]["health_status"], "unhealthy");
    let s = get(&app, "/health/summary").await;
    let summary = &s.body["summary"];
    assert_eq!(summary["unhealthy_routes"], 2, "{summary}");
    assert_eq!(summary["unhealthy_circuits"], 1, "{summary}");
    assert_eq!(summary["stranded_circuits"], 1, "{summary}");
    assert_eq!(summary["workers"][0]["status"], "Lost");

    // An id that is no circuit: upstream's 404; not an id: 400.
    let a = manager(
        &app,
        Method::GET,
        &format!("/health/circuits/{}", Uuid::new_v4()),
        None,
    )
    .await;
    assert_error(&a, StatusCode::NOT_FOUND, "object-not-found");
    let a = manager(&app, Method::GET, "/health/circuits/not-an-id", None).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid-api-params");
    // A route created through the native API is not the api_secret's to read.
    let (_, _, _) = app.register("native-1", [20000, 20010]).await;
    let native = app
        .create(json!({"session_id": Uuid::new_v4(), "service": "jupyter",
                       "targets": [{"host": "10.0.0.1", "port": 8888}]}))
        .await;
    assert_eq!(native.status, StatusCode::CREATED, "{:?}", native.body);
    let id = native.body["id"].as_str().unwrap();
    let a = manager(&app, Method::GET, &format!("/health/circuits/{id}"), None).await;
    assert_error(&a, StatusCode::NOT_FOUND, "object-not-found");
}
