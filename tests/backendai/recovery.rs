//! A worker that cannot serve, on both backends: `/health/status` lists
//! only the workers that can under `workers`, and circuit bodies say when
//! theirs cannot (`status`).

use appproxy_coordinator::domain::WorkerStatus;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{Backend, MANAGER, TestApp, register_backendai_worker};
use crate::manager::{Reply, ack_everything, assert_error, manager, send};
use crate::on_both_backends;

on_both_backends!(
    health_status_lists_only_the_workers_that_can_serve,
    circuit_bodies_say_when_their_worker_cannot_serve,
);

/// A port-mode Backend.AI worker on 127.0.0.1 with `range`.
async fn worker(app: &TestApp, name: &str, range: [u16; 2]) -> Uuid {
    register_backendai_worker(
        app,
        name,
        json!({"frontend_mode": "port", "port_range": range}),
    )
    .await
    .id
}

/// `POST /v2/endpoints/bulk` for `deployment`, as the Manager sends it
/// (`existing_url` is the URL it stored, on a re-sync).
async fn sync(app: &TestApp, deployment: Uuid, existing_url: Option<&str>) -> Reply {
    let item = json!({
        "deployment_id": deployment, "version": "v2", "service_name": "llm",
        "tags": {
            "session": {"user_uuid": "22222222-2222-4222-8222-222222222222",
                        "project_id": "33333333-3333-4333-8333-333333333333",
                        "domain_name": "default"},
            "endpoint": {"id": deployment, "runtime_variant": "custom",
                         "existing_url": existing_url}
        },
        "open_to_public": false, "health_check": null
    });
    manager(
        app,
        Method::POST,
        "/v2/endpoints/bulk",
        Some(json!({"endpoints": [item]})),
    )
    .await
}

/// The URL a sync answered (200).
fn url_of(reply: &Reply) -> String {
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    reply.body["endpoints"][0]["url"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The route of `deployment`, as `GET /routes` shows it.
async fn route_of(app: &TestApp, deployment: Uuid) -> Value {
    let a = app
        .manager(
            Method::GET,
            &format!("/routes?endpoint_id={deployment}"),
            None,
        )
        .await;
    a.body["items"][0].clone()
}

async fn set_status(app: &TestApp, worker: Uuid, status: WorkerStatus) {
    app.store
        .set_worker_status(worker, status, app.clock.now())
        .await
        .unwrap();
}

async fn health_status_lists_only_the_workers_that_can_serve(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let a = worker(&app, "worker-a", [10205, 10300]).await;
    worker(&app, "worker-b", [10400, 10500]).await;
    let c = worker(&app, "worker-c", [10600, 10700]).await;
    let _acks = ack_everything(&app);
    url_of(&sync(&app, Uuid::new_v4(), Some("http://127.0.0.1:10205/")).await);
    set_status(&app, a, WorkerStatus::Lost).await;
    set_status(&app, c, WorkerStatus::NotReady).await;

    let s = manager(&app, Method::GET, "/health/status", None).await;
    assert_eq!(s.status, StatusCode::OK, "{:?}", s.body);
    assert_eq!(
        s.body["workers"],
        json!([{"authority": "worker-b", "available_slots": 101, "occupied_slots": 0,
                "ha_setup": false}])
    );
    let mut unavailable = s.body["unavailable_workers"].as_array().unwrap().clone();
    unavailable.sort_by_key(|w| w["authority"].as_str().unwrap().to_owned());
    let now = appproxy_coordinator::backendai::circuit::iso_time(app.clock.now());
    assert_eq!(
        unavailable,
        vec![
            json!({"authority": "worker-a", "status": "Lost", "occupied_slots": 1,
                   "last_heartbeat": now}),
            json!({"authority": "worker-c", "status": "NotReady", "occupied_slots": 0,
                   "last_heartbeat": now}),
        ]
    );

    // Only the api_secret reads it; the open `/health` shows no worker.
    let manager_bearer = format!("Bearer {MANAGER}");
    for headers in [
        vec![],
        vec![("x-backendai-token", "wrong-secret-of-enough-length")],
        vec![("authorization", manager_bearer.as_str())],
    ] {
        let a = send(&app, Method::GET, "/health/status", &headers, None).await;
        assert_error(&a, StatusCode::UNAUTHORIZED, "auth-failed");
        let text = a.body.to_string();
        assert!(!text.contains("worker-"), "{headers:?}: {text}");
    }
    let open = send(&app, Method::GET, "/health", &[], None).await;
    assert!(
        !open.body.to_string().contains("worker-"),
        "{:?}",
        open.body
    );

    // A worker that heartbeats again is listed as serving again.
    set_status(&app, a, WorkerStatus::Ready).await;
    let s = manager(&app, Method::GET, "/health/status", None).await;
    let serving: Vec<&str> = s.body["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["authority"].as_str().unwrap())
        .collect();
    assert!(serving.contains(&"worker-a") && !serving.contains(&"worker-c"));
}

/// The `status` of circuit `id` in every circuit body: its own, its
/// statistics' and its worker's list.
async fn circuit_statuses(app: &TestApp, id: &str, worker: Uuid) -> [Value; 3] {
    let one = manager(app, Method::GET, &format!("/api/circuit/{id}"), None).await;
    assert_eq!(one.status, StatusCode::OK, "{:?}", one.body);
    let stats = manager(
        app,
        Method::GET,
        &format!("/api/circuit/{id}/statistics"),
        None,
    )
    .await;
    assert_eq!(stats.status, StatusCode::OK, "{:?}", stats.body);
    let list = manager(
        app,
        Method::GET,
        &format!("/api/worker/{worker}/circuits"),
        None,
    )
    .await;
    assert_eq!(list.status, StatusCode::OK, "{:?}", list.body);
    [
        one.body["status"].clone(),
        stats.body["status"].clone(),
        list.body["circuits"][0]["status"].clone(),
    ]
}

async fn circuit_bodies_say_when_their_worker_cannot_serve(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let a = worker(&app, "worker-a", [10205, 10300]).await;
    let _acks = ack_everything(&app);
    let deployment = Uuid::new_v4();
    url_of(&sync(&app, deployment, None).await);
    let route = route_of(&app, deployment).await;
    let id = route["id"].as_str().unwrap();
    // Not acknowledged on the bus (no bus runs here): on its way.
    assert_eq!(
        circuit_statuses(&app, id, a).await,
        [
            json!("propagating"),
            json!("propagating"),
            json!("propagating")
        ]
    );
    for (status, word) in [
        (WorkerStatus::NotReady, "worker_not_ready"),
        (WorkerStatus::Lost, "worker_lost"),
        (WorkerStatus::Draining, "worker_draining"),
    ] {
        set_status(&app, a, status).await;
        assert_eq!(
            circuit_statuses(&app, id, a).await,
            [json!(word), json!(word), json!(word)],
            "{status:?}"
        );
    }
    // The native route says so too.
    set_status(&app, a, WorkerStatus::Lost).await;
    let native = app
        .manager(Method::GET, &format!("/routes/{id}"), None)
        .await;
    assert_eq!(native.body["status"], "FailingOver");
    // The circuit bodies need the api_secret.
    let a = send(&app, Method::GET, &format!("/api/circuit/{id}"), &[], None).await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "auth-failed");
    assert!(a.body.get("status").is_none(), "{:?}", a.body);
}
