//! A worker that cannot serve, on both backends: `/health/status` lists
//! only the workers that can under `workers`, circuit bodies say when
//! theirs cannot (`status`), and the Manager's re-sync of an endpoint whose
//! circuit sits on a `Lost` worker moves it where it is served (a new URL
//! when no worker keeps the old one), with the events on the real Redis.

use std::time::Duration;

use appproxy_coordinator::backendai::bus;
use appproxy_coordinator::domain::WorkerStatus;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::bus::{Loops, Subscriber, acknowledger_on, authority, bai_worker};
use crate::common::{
    Backend, MANAGER, REDIS_URL, TestApp, backendai_settings, manual_clock,
    register_backendai_worker, wait_for,
};
use crate::manager::{Reply, ack_everything, assert_error, manager, send};
use crate::on_both_backends;

on_both_backends!(
    health_status_lists_only_the_workers_that_can_serve,
    circuit_bodies_say_when_their_worker_cannot_serve,
    a_resync_moves_a_stranded_circuit_to_a_ready_worker_with_a_new_url,
    a_resync_keeps_the_url_where_another_worker_serves_it,
    a_resync_waits_for_the_new_worker_and_with_nowhere_to_go_answers_e10001,
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

async fn a_resync_moves_a_stranded_circuit_to_a_ready_worker_with_a_new_url(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let (a_name, b_name) = (authority("lost"), authority("live"));
    let a = bai_worker(&app, &a_name, [10205, 10210]).await;
    let redis = redis::Client::open(REDIS_URL).unwrap();
    let mut events = Subscriber::on(&redis, &[&a_name, &b_name]).await;
    let worker_a = acknowledger_on(&redis, &a_name, 0).await;
    let _worker_b = acknowledger_on(&redis, &b_name, 0).await;
    let loops = Loops::of(&app, true);

    let deployment = Uuid::new_v4();
    let url = url_of(&sync(&app, deployment, None).await);
    assert_eq!(url, "http://127.0.0.1:10205/");
    let route = route_of(&app, deployment).await;
    let id = route["id"].as_str().unwrap().to_owned();
    events.expect(bus::CREATED, &a_name, &id).await;
    wait_for("the circuit active on A", async || {
        circuit_statuses(&app, &id, a).await[0] == "active"
    })
    .await;
    // A re-sync of a healthy circuit changes nothing.
    assert_eq!(url_of(&sync(&app, deployment, Some(&url)).await), url);
    assert_eq!(
        route_of(&app, deployment).await["revision"],
        route["revision"]
    );

    // B serves other ports: no worker keeps the URL. A dies for good.
    let b = bai_worker(&app, &b_name, [10305, 10310]).await;
    drop(worker_a);
    set_status(&app, a, WorkerStatus::Lost).await;
    let moved = app
        .store
        .relocate_routes(a, 100, app.clock.now())
        .await
        .unwrap();
    assert!(moved.iter().all(|m| m.stranded), "{moved:?}");
    assert_eq!(circuit_statuses(&app, &id, a).await[0], "worker_lost");

    // The Manager's re-sync moves it to B and answers the URL there.
    let new_url = url_of(&sync(&app, deployment, Some(&url)).await);
    assert_eq!(new_url, "http://127.0.0.1:10305/");
    events.expect(bus::REMOVED, &a_name, &id).await;
    let created = events.expect(bus::CREATED, &b_name, &id).await;
    assert_eq!(created.circuit()["worker"], b.to_string());
    assert_eq!(created.circuit()["port"], 10305);
    let route = route_of(&app, deployment).await;
    assert_eq!(route["worker_id"], b.to_string());
    wait_for("the circuit active on B", async || {
        circuit_statuses(&app, &id, b).await == [json!("active"), json!("active"), json!("active")]
    })
    .await;
    let s = manager(&app, Method::GET, "/health/status", None).await;
    assert_eq!(s.body["stranded_circuits"], json!([]));
    // Its next re-sync (with the new URL) is idempotent again.
    assert_eq!(
        url_of(&sync(&app, deployment, Some(&new_url)).await),
        new_url
    );
    assert_eq!(
        route_of(&app, deployment).await["revision"],
        route["revision"]
    );
    loops.stop().await;
}

async fn a_resync_keeps_the_url_where_another_worker_serves_it(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let a = worker(&app, "worker-a", [10205, 10210]).await;
    let _acks = ack_everything(&app);
    let deployment = Uuid::new_v4();
    let url = url_of(&sync(&app, deployment, None).await);
    // A twin on the same hostname and ports, and A lost (still in its
    // failover grace: nothing moved yet).
    let twin = worker(&app, "worker-a2", [10205, 10210]).await;
    set_status(&app, a, WorkerStatus::Lost).await;
    assert_eq!(route_of(&app, deployment).await["worker_id"], a.to_string());
    assert_eq!(url_of(&sync(&app, deployment, Some(&url)).await), url);
    let route = route_of(&app, deployment).await;
    assert_eq!(route["worker_id"], twin.to_string());
    assert_eq!(route["frontend"]["port"], 10205);
}

async fn a_resync_waits_for_the_new_worker_and_with_nowhere_to_go_answers_e10001(b: Backend) {
    let mut settings = backendai_settings();
    settings.ack_timeout = Duration::from_millis(200);
    let app = TestApp::builder(b)
        .clock(manual_clock())
        .backendai(settings)
        .start()
        .await;
    let a = worker(&app, "worker-a", [10205, 10210]).await;
    let deployment = Uuid::new_v4();
    let acks = ack_everything(&app);
    let url = url_of(&sync(&app, deployment, None).await);
    drop(acks);
    let seat = |r: Value| {
        (
            r["worker_id"].clone(),
            r["frontend"].clone(),
            r["revision"].clone(),
        )
    };
    let before = seat(route_of(&app, deployment).await);

    // No other worker: it stays where it is, URL and all.
    set_status(&app, a, WorkerStatus::Lost).await;
    let r = sync(&app, deployment, Some(&url)).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "service-unavailable");
    assert_eq!(r.body["data"], json!({"worker": "worker-a"}));
    assert_eq!(seat(route_of(&app, deployment).await), before);

    // B can take it: it moves, and the answer waits for B's own
    // acknowledgement (A's does not count).
    let b = worker(&app, "worker-b", [10305, 10310]).await;
    let r = sync(&app, deployment, Some(&url)).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "service-unavailable");
    assert_eq!(r.body["data"], json!({"worker": "worker-b"}));
    assert_eq!(route_of(&app, deployment).await["worker_id"], b.to_string());
    // B holds it: the Manager's retry gets the URL on B.
    let _acks = ack_everything(&app);
    assert_eq!(
        url_of(&sync(&app, deployment, Some(&url)).await),
        "http://127.0.0.1:10305/"
    );
}
