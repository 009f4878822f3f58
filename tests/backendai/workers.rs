//! The workers' side: `/api/worker`, `/api/circuit`, `/api/slots` and the
//! `/v1` aliases, on both backends (Redis DB 2 on 127.0.0.1:6379 for the
//! heartbeat's `last_seen` and the circuits' statistics).

use std::time::Duration;

use appproxy_coordinator::backendai::jwt;
use appproxy_coordinator::domain::WorkerStatus;
use appproxy_coordinator::health::HealthConfig;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{API_SECRET, Answer, Backend, REDIS_URL, TestApp, wait_for};
use crate::on_both_backends;

on_both_backends!(
    registration_answers_the_worker_model_in_port_mode,
    registration_answers_the_worker_model_in_wildcard_mode,
    re_registration_keeps_the_id_and_counts_nodes,
    a_frontend_without_its_configuration_is_refused,
    heartbeats_keep_a_worker_ready_and_bring_a_lost_one_back,
    a_heartbeat_writes_last_seen_in_redis,
    circuits_are_serializable_circuits_of_routes,
    circuits_are_deleted_one_by_one_and_in_bulk,
    statistics_read_the_workers_counters,
    slots_list_the_frontends_in_use,
    the_v1_aliases_answer_upstreams_v1_shapes,
    the_api_secret_is_required_in_every_form,
);

/// Sends `body` (JSON) with `X-BackendAI-Token: <api_secret>`.
async fn bai(app: &TestApp, method: Method, path: &str, body: Option<Value>) -> Answer {
    let mut req = app
        .http
        .request(method, format!("{}{path}", app.url))
        .header("x-backendai-token", API_SECRET);
    if let Some(b) = body {
        req = req.json(&b);
    }
    answer(req.send().await.unwrap()).await
}

async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = r.text().await.unwrap();
    Answer {
        status,
        content_type,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

/// What the real worker sends to `PUT /api/worker`, with `frontend`'s fields.
fn registration(authority: &str, frontend: Value) -> Value {
    let mut body = json!({
        "authority": authority, "protocol": "http", "hostname": "127.0.0.1",
        "tls_listen": false, "tls_advertised": false, "api_port": 10201,
        "filtered_apps_only": false, "traefik_last_used_marker_path": null,
        "accepted_traffics": ["interactive", "inference"], "app_filters": []
    });
    body.as_object_mut()
        .unwrap()
        .extend(frontend.as_object().unwrap().clone());
    body
}

fn port_mode(lo: u16, hi: u16) -> Value {
    json!({"frontend_mode": "port", "port_range": [lo, hi]})
}

/// A worker authority no other test (sharing the Redis) uses.
fn authority() -> String {
    format!("bai-worker-{}", Uuid::new_v4().simple())
}

/// Registers a Backend.AI worker over HTTP; answers its id and the answer.
async fn put_worker(app: &TestApp, authority: &str, frontend: Value) -> (Uuid, Value) {
    let a = bai(
        app,
        Method::PUT,
        "/api/worker",
        Some(registration(authority, frontend)),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    (a.body["id"].as_str().unwrap().parse().unwrap(), a.body)
}

/// Creates an interactive route through the native API, pinned to `worker`.
async fn interactive_on(app: &TestApp, worker: Uuid, user: Uuid) -> Value {
    let a = app
        .create(json!({
            "session_id": Uuid::new_v4(), "service": "jupyter",
            "targets": [{"host": "10.0.1.7", "port": 8888}],
            "worker_id": worker,
            "circuit": {"user_id": user}
        }))
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    a.body
}

/// The worker's status as the store has it.
async fn status(app: &TestApp, id: Uuid) -> WorkerStatus {
    app.store.get_worker(id).await.unwrap().status
}

async fn live_db() -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("{REDIS_URL}/2"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis on 127.0.0.1:6379")
}

async fn registration_answers_the_worker_model_in_port_mode(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let name = authority();
    let a = app
        .http
        .put(format!("{}/api/worker", app.url))
        .header("x-backendai-token", API_SECRET)
        .json(&registration(&name, port_mode(10205, 10207)))
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), StatusCode::OK);
    let text = a.text().await.unwrap();
    // Upstream's field order.
    let order = [
        "authority",
        "frontend_mode",
        "protocol",
        "hostname",
        "tls_listen",
        "tls_advertised",
        "api_port",
        "port_range",
        "wildcard_domain",
        "wildcard_traffic_port",
        "filtered_apps_only",
        "traefik_last_used_marker_path",
        "accepted_traffics",
        "id",
        "created_at",
        "updated_at",
        "available_slots",
        "occupied_slots",
        "nodes",
        "slots",
    ];
    let positions: Vec<usize> = order
        .iter()
        .map(|k| text.find(&format!("\"{k}\":")).expect(k))
        .collect();
    assert!(positions.is_sorted(), "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    let id = body["id"].as_str().unwrap();
    let created = body["created_at"].as_str().unwrap();
    assert!(created.ends_with('Z'), "{created}");
    assert!(body["updated_at"].as_str().unwrap().ends_with('Z'));
    let free = |port: u16| {
        json!({"frontend_mode": "port", "in_use": false, "port": port,
               "subdomain": null, "circuit_id": null})
    };
    assert_eq!(
        body,
        json!({
            "authority": name, "frontend_mode": "port", "protocol": "http",
            "hostname": "127.0.0.1", "tls_listen": false, "tls_advertised": false,
            "api_port": 10201, "port_range": [10205, 10207], "wildcard_domain": null,
            "wildcard_traffic_port": null, "filtered_apps_only": false,
            "traefik_last_used_marker_path": null,
            "accepted_traffics": ["interactive", "inference"],
            "id": id, "created_at": created, "updated_at": body["updated_at"],
            "available_slots": 3, "occupied_slots": 0, "nodes": 1,
            "slots": [free(10205), free(10206), free(10207)]
        })
    );
    let id: Uuid = id.parse().unwrap();
    assert_eq!(status(&app, id).await, WorkerStatus::Ready);

    // A circuit takes a slot; GET answers the same model.
    let route = interactive_on(&app, id, Uuid::new_v4()).await;
    let a = bai(&app, Method::GET, &format!("/api/worker/{id}"), None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["occupied_slots"], 1);
    assert_eq!(
        a.body["slots"][0],
        json!({"frontend_mode": "port", "in_use": true, "port": 10205,
               "subdomain": null, "circuit_id": route["id"]})
    );
    let a = bai(&app, Method::GET, "/api/worker", None).await;
    assert_eq!(a.body["workers"].as_array().unwrap().len(), 1);
    assert_eq!(a.body["workers"][0]["id"], json!(id));
    // A Backend.AI worker is a worker: the native API lists it.
    let native = app.manager(Method::GET, "/workers", None).await;
    assert_eq!(native.body["items"][0]["name"], json!(name));
}

async fn registration_answers_the_worker_model_in_wildcard_mode(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let name = authority();
    let (id, body) = put_worker(
        &app,
        &name,
        json!({"frontend_mode": "wildcard", "wildcard_domain": ".apps.test",
               "wildcard_traffic_port": 8080}),
    )
    .await;
    assert_eq!(body["frontend_mode"], "wildcard");
    assert_eq!(body["port_range"], Value::Null);
    assert_eq!(body["wildcard_domain"], ".apps.test");
    assert_eq!(body["wildcard_traffic_port"], 8080);
    assert_eq!(body["available_slots"], -1);
    assert_eq!(body["slots"], json!([]));
    // Wildcard mode lists the subdomains in use only.
    let route = interactive_on(&app, id, Uuid::new_v4()).await;
    let sub = route["frontend"]["subdomain"].as_str().unwrap();
    let a = bai(&app, Method::GET, &format!("/api/worker/{id}"), None).await;
    assert_eq!(
        a.body["slots"],
        json!([{"frontend_mode": "wildcard", "in_use": true, "port": null,
                "subdomain": sub, "circuit_id": route["id"]}])
    );
    assert_eq!(a.body["occupied_slots"], 1);
}

async fn re_registration_keeps_the_id_and_counts_nodes(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let name = authority();
    let (id, _) = put_worker(&app, &name, port_mode(10205, 10210)).await;
    let route = interactive_on(&app, id, Uuid::new_v4()).await;
    // A restarted worker re-registers while its old registration is live.
    let (again, body) = put_worker(&app, &name, port_mode(10205, 10210)).await;
    assert_eq!(again, id);
    assert_eq!(body["nodes"], 2);
    assert_eq!(body["occupied_slots"], 1, "its circuits are kept");
    assert_eq!(status(&app, id).await, WorkerStatus::Ready);

    // Each DELETE is one node fewer; at zero the worker is Lost, row kept.
    let bye = bai(&app, Method::DELETE, &format!("/api/worker/{id}"), None).await;
    assert_eq!(bye.status, StatusCode::OK);
    assert_eq!(bye.body, json!({"success": true}));
    let a = bai(&app, Method::GET, &format!("/api/worker/{id}"), None).await;
    assert_eq!(a.body["nodes"], 1);
    assert_eq!(status(&app, id).await, WorkerStatus::Ready);
    bai(&app, Method::DELETE, &format!("/api/worker/{id}"), None).await;
    let a = bai(&app, Method::GET, &format!("/api/worker/{id}"), None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["nodes"], 0);
    assert_eq!(status(&app, id).await, WorkerStatus::Lost);
    let r = app
        .manager(
            Method::GET,
            &format!("/routes/{}", route["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(
        r.body["worker_id"],
        json!(id),
        "the circuit waits for its worker"
    );

    // It comes back under the same id.
    let (back, body) = put_worker(&app, &name, port_mode(10205, 10210)).await;
    assert_eq!(back, id);
    assert_eq!(body["nodes"], 1);
    assert_eq!(status(&app, id).await, WorkerStatus::Ready);

    let a = bai(
        &app,
        Method::DELETE,
        &format!("/api/worker/{}", Uuid::new_v4()),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body["title"], "E00002: No such worker.");

    // A native worker's name is not taken over by a Backend.AI registration.
    let (native, _, _) = app.register("native-worker", [20000, 20010]).await;
    let a = bai(
        &app,
        Method::PUT,
        "/api/worker",
        Some(registration("native-worker", port_mode(10205, 10210))),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{:?}", a.body);
    assert_eq!(
        a.body["type"],
        "https://api.backend.ai/probs/generic-forbidden"
    );
    let a = bai(&app, Method::GET, &format!("/api/worker/{native}"), None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = bai(&app, Method::GET, "/api/worker", None).await;
    assert_eq!(
        a.body["workers"].as_array().unwrap().len(),
        1,
        "Backend.AI workers only"
    );
}

async fn a_frontend_without_its_configuration_is_refused(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let a = bai(
        &app,
        Method::PUT,
        "/api/worker",
        Some(registration(&authority(), json!({"frontend_mode": "port"}))),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        a.body,
        json!({
            "type": "https://api.backend.ai/probs/appproxy/missing-frontend-config",
            "title": "Frontend configuration is missing.",
            "error_code": "kernel_setup_not-found",
            "msg": "port_range is required in port mode"
        })
    );
    let a = bai(
        &app,
        Method::PUT,
        "/api/worker",
        Some(registration(
            &authority(),
            json!({"frontend_mode": "wildcard"}),
        )),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["title"], "Frontend configuration is missing.");
    assert_eq!(
        a.body["msg"],
        "wildcard_domain is required in wildcard mode"
    );
    // A body that does not fit is upstream's validation error.
    let mut body = registration(&authority(), port_mode(10205, 10210));
    body.as_object_mut().unwrap().remove("hostname");
    let a = bai(&app, Method::PUT, "/api/worker", Some(body)).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["msg"], "Input validation error");
    assert_eq!(app.store.list_workers().await.unwrap().len(), 0);
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// `PATCH /api/worker/{id}` as the real worker sends it: an empty
/// octet-stream body.
async fn patch(app: &TestApp, id: Uuid) -> Answer {
    let r = app
        .http
        .patch(format!("{}/api/worker/{id}", app.url))
        .header("x-backendai-token", API_SECRET)
        .header("content-type", "application/octet-stream")
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    answer(r).await
}

async fn heartbeats_keep_a_worker_ready_and_bring_a_lost_one_back(b: Backend) {
    let mut app = TestApp::start_backendai(b).await;
    app.health = Some(HealthConfig {
        heartbeat_timeout: TIMEOUT,
        failover_grace: Duration::from_secs(3600),
        batch_size: 4,
        route_idle_ttl: None,
    });
    let (id, _) = put_worker(&app, &authority(), port_mode(10205, 10210)).await;
    // Heartbeats within the timeout keep it Ready.
    for _ in 0..3 {
        app.clock.advance(TIMEOUT / 2);
        let a = patch(&app, id).await;
        assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
        assert_eq!(a.body["id"], json!(id));
        assert!(a.body["slots"].is_array());
        app.health_pass().await;
        assert_eq!(status(&app, id).await, WorkerStatus::Ready);
    }
    // Silence makes it Lost ...
    app.clock.advance(TIMEOUT + Duration::from_secs(1));
    app.health_pass().await;
    assert_eq!(status(&app, id).await, WorkerStatus::Lost);
    // ... and the next heartbeat brings it back.
    let a = patch(&app, id).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(status(&app, id).await, WorkerStatus::Ready);
    assert_eq!(
        app.store.get_worker(id).await.unwrap().last_heartbeat,
        app.clock.now()
    );

    let a = patch(&app, Uuid::new_v4()).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(
        a.body,
        json!({
            "type": "https://api.backend.ai/probs/object-not-found",
            "title": "E00002: No such worker.",
            "error_code": "agent_read_not-found"
        })
    );
    // A native worker is no Backend.AI worker.
    let (native, _, _) = app.register("native", [20000, 20010]).await;
    assert_eq!(patch(&app, native).await.status, StatusCode::NOT_FOUND);
}

async fn a_heartbeat_writes_last_seen_in_redis(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let name = authority();
    let (id, _) = put_worker(&app, &name, port_mode(10205, 10210)).await;
    let mut redis = live_db().await;
    assert_eq!(patch(&app, id).await.status, StatusCode::OK);
    let want = app.clock.now().timestamp_micros() as f64 / 1e6;
    wait_for("proxy-worker.last_seen", async || {
        let seen: Option<f64> = redis::cmd("HGET")
            .arg("proxy-worker.last_seen")
            .arg(&name)
            .query_async(&mut redis)
            .await
            .unwrap();
        seen.is_some_and(|s| (s - want).abs() < 1e-3)
    })
    .await;
    let ttl: i64 = redis::cmd("TTL")
        .arg("proxy-worker.last_seen")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(ttl > 172_000 && ttl <= 172_800, "{ttl}");
    let _: () = redis::cmd("HDEL")
        .arg("proxy-worker.last_seen")
        .arg(&name)
        .query_async(&mut redis)
        .await
        .unwrap();
}

async fn circuits_are_serializable_circuits_of_routes(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let (id, _) = put_worker(&app, &authority(), port_mode(10205, 10210)).await;
    let user = Uuid::new_v4();
    let route = interactive_on(&app, id, user).await;
    let route_id = route["id"].as_str().unwrap();
    let session = route["session_id"].clone();
    let a = bai(
        &app,
        Method::GET,
        &format!("/api/worker/{id}/circuits"),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let circuits = a.body["circuits"].as_array().unwrap();
    assert_eq!(circuits.len(), 1);
    let c = &circuits[0];
    let created = c["created_at"].as_str().unwrap();
    assert!(created.ends_with('Z'), "{created}");
    assert_eq!(
        c,
        &json!({
            "id": route_id, "app": "jupyter", "protocol": "http", "worker": id,
            "app_mode": "interactive", "frontend_mode": "port", "envs": {},
            "arguments": null, "open_to_public": false, "allowed_client_ips": null,
            "port": 10205, "subdomain": null, "user_id": user, "endpoint_id": null,
            "runtime_variant": null,
            "route_info": [{"route_id": null, "session_id": session, "session_name": null,
                            "kernel_host": "10.0.1.7", "kernel_port": 8888,
                            "protocol": "http", "traffic_ratio": 0.01}],
            "session_ids": [session], "created_at": created, "updated_at": c["updated_at"],
            "status": "propagating"
        })
    );
    // The worker's /setup reads the same circuit.
    let one = bai(&app, Method::GET, &format!("/api/circuit/{route_id}"), None).await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(&one.body, c);
    // The route is a route like any other.
    let routes = app.manager(Method::GET, "/routes", None).await;
    assert_eq!(routes.body["items"][0]["worker_id"], json!(id));
    assert_eq!(routes.body["items"][0]["circuit"]["user_id"], json!(user));

    let a = bai(
        &app,
        Method::GET,
        &format!("/api/circuit/{}", Uuid::new_v4()),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(
        a.body,
        json!({
            "type": "https://api.backend.ai/probs/object-not-found",
            "title": "E00002: No such circuit.",
            "error_code": "agent_read_not-found"
        })
    );
    let a = bai(
        &app,
        Method::GET,
        &format!("/api/worker/{}/circuits", Uuid::new_v4()),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body["title"], "E00002: No such worker.");
}

async fn circuits_are_deleted_one_by_one_and_in_bulk(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let (id, _) = put_worker(&app, &authority(), port_mode(10205, 10220)).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        let r = interactive_on(&app, id, Uuid::new_v4()).await;
        ids.push(r["id"].as_str().unwrap().to_owned());
    }
    let a = bai(
        &app,
        Method::DELETE,
        &format!("/api/circuit/{}", ids[0]),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, json!({"success": true}));
    let a = bai(
        &app,
        Method::DELETE,
        &format!("/api/circuit/{}", ids[0]),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body["title"], "E00002: No such circuit.");
    let a = bai(
        &app,
        Method::DELETE,
        &format!("/v1/api/circuit/{}", ids[1]),
        None,
    )
    .await;
    assert_eq!(a.body, json!({"success": true}));
    // Bulk: a list (unknown ids skipped), a comma-separated string, the query.
    let a = bai(
        &app,
        Method::DELETE,
        "/api/circuit/_/bulk",
        Some(json!({"circuit_ids": [ids[2], Uuid::new_v4()]})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body, json!({"success": true}));
    let a = bai(
        &app,
        Method::DELETE,
        "/api/circuit/_/bulk",
        Some(json!({"circuit_ids": format!("{},{}", ids[3], ids[4])})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    let a = bai(
        &app,
        Method::DELETE,
        &format!("/api/circuit/_/bulk?circuit_ids={}", ids[5]),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(app.route_count().await, 0);
    let a = bai(
        &app,
        Method::DELETE,
        "/api/circuit/_/bulk",
        Some(json!({"circuit_ids": "not-a-uuid"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["data"]["errors"][0]["loc"], json!(["circuit_ids"]));
}

async fn statistics_read_the_workers_counters(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let (id, _) = put_worker(&app, &authority(), port_mode(10205, 10210)).await;
    let route = interactive_on(&app, id, Uuid::new_v4()).await;
    let route_id = route["id"].as_str().unwrap();
    let created_ms = app.clock.now().timestamp_millis();
    let path = format!("/api/circuit/{route_id}/statistics");

    // Before any traffic: no requests, last access at creation.
    let a = bai(&app, Method::GET, &path, None).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body["id"], route["id"]);
    assert_eq!(a.body["app"], "jupyter");
    assert_eq!(a.body["requests"], 0);
    assert_eq!(a.body["last_access"], created_ms);
    assert_eq!(a.body["ttl"], 3600);

    // What the worker counts in DB 2.
    let mut redis = live_db().await;
    app.clock.advance(Duration::from_secs(1000));
    let last_ms = app.clock.now().timestamp_millis() - 100_000;
    let keys = [
        format!("circuit.{route_id}.requests"),
        format!("circuit.{route_id}.last_access"),
    ];
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(&keys[0])
        .arg(7)
        .ignore()
        .cmd("SET")
        .arg(&keys[1])
        .arg(format!("{}.{:03}", last_ms / 1000, last_ms % 1000))
        .ignore()
        .query_async(&mut redis)
        .await
        .unwrap();
    let a = bai(&app, Method::GET, &path, None).await;
    let _: () = redis::cmd("DEL")
        .arg(&keys[..])
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(a.body["requests"], 7);
    assert_eq!(a.body["last_access"], last_ms);
    assert_eq!(a.body["ttl"], 3500);

    // Inference circuits are never collected: no ttl.
    let endpoint = Uuid::new_v4();
    let inference = app
        .create(
            json!({"app_mode": "inference", "endpoint_id": endpoint, "service": "llm",
                       "targets": [], "worker_id": id, "circuit": {"runtime_variant": "custom"}}),
        )
        .await;
    assert_eq!(
        inference.status,
        StatusCode::CREATED,
        "{:?}",
        inference.body
    );
    let a = bai(
        &app,
        Method::GET,
        &format!(
            "/api/circuit/{}/statistics",
            inference.body["id"].as_str().unwrap()
        ),
        None,
    )
    .await;
    assert_eq!(a.body["endpoint_id"], json!(endpoint));
    assert_eq!(a.body["ttl"], Value::Null);

    let a = bai(
        &app,
        Method::GET,
        &format!("/api/circuit/{}/statistics", Uuid::new_v4()),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body["title"], "E00002: No such circuit.");
}

async fn slots_list_the_frontends_in_use(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let name = authority();
    let (id, _) = put_worker(&app, &name, port_mode(10205, 10207)).await;
    let route = interactive_on(&app, id, Uuid::new_v4()).await;
    let in_use = json!([{"frontend_mode": "port", "in_use": true, "port": 10205,
                         "subdomain": null, "circuit_id": route["id"]}]);
    let a = bai(
        &app,
        Method::GET,
        &format!("/api/slots?wsproxy_host={name}"),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body, json!({"slots": in_use}));
    let a = bai(&app, Method::GET, "/api/slots", None).await;
    assert_eq!(a.body, json!({"slots": in_use}));
    let a = bai(
        &app,
        Method::GET,
        &format!("/api/slots?wsproxy_host={name}&in_use=false"),
        None,
    )
    .await;
    assert_eq!(a.body["slots"].as_array().unwrap().len(), 3);
    let a = bai(&app, Method::GET, "/api/slots?wsproxy_host=nobody", None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body["title"], "E00002: No such worker.");
}

async fn the_v1_aliases_answer_upstreams_v1_shapes(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let name = authority();
    let (id, body) = put_worker(&app, &name, port_mode(10205, 10207)).await;
    let route = interactive_on(&app, id, Uuid::new_v4()).await;
    let a = bai(&app, Method::GET, "/v1/api/worker", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.body,
        json!([{
            "authority": name, "endpoint": "http://127.0.0.1:10201", "total_slots": 3,
            "ports_in_use": 1, "min_range": 10205, "max_range": 10207,
            "wildcard_domain": null, "created": body["created_at"],
            "updated": a.body[0]["updated"]
        }])
    );
    let a = bai(&app, Method::GET, "/v1/api/slots", None).await;
    assert_eq!(a.status, StatusCode::OK);
    let slot = &a.body[0];
    assert_eq!(a.body.as_array().unwrap().len(), 1);
    assert_eq!(slot["rel"], route["id"]);
    assert_eq!(slot["port"], 10205);
    assert_eq!(slot["wsproxy_version"], "v2");
    assert_eq!(slot["worker__authority"], json!(name));
    assert_eq!(slot["circuit__app"], "jupyter");
    assert_eq!(slot["circuit__session_id"], route["session_id"]);
    assert_eq!(slot["circuit__envs"], Value::Null);
    assert!(slot["circuit__created"].as_str().unwrap().ends_with('Z'));
}

async fn the_api_secret_is_required_in_every_form(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let (id, _) = put_worker(&app, &authority(), port_mode(10205, 10207)).await;
    let jwt = |secret: &str| jwt::encode(json!({"sub": "test"}).as_object().unwrap(), secret);
    let good = [
        ("x-backendai-token", API_SECRET.to_owned()),
        ("x-backendai-token", format!("Bearer {API_SECRET}")),
        ("x-backendai-token", format!("BackendAI {API_SECRET}")),
        ("authorization", format!("Bearer {}", jwt(API_SECRET))),
    ];
    let bad = [
        (None, "Unauthorized access"),
        (
            Some(("x-backendai-token", "wrong".to_owned())),
            "Unauthorized access",
        ),
        (
            Some(("authorization", format!("Bearer {}", jwt("another")))),
            "Unauthorized access",
        ),
        (
            Some(("authorization", format!("Basic {API_SECRET}"))),
            "Unsupported authorization method Basic",
        ),
    ];
    let circuits = format!("/api/worker/{id}/circuits");
    for (method, path, body) in [
        (Method::GET, circuits.as_str(), None),
        // Checked before the body is read.
        (
            Method::PUT,
            "/api/worker",
            Some(json!({"not": "a registration"})),
        ),
    ] {
        for (header, value) in &good {
            let mut req = app
                .http
                .request(method.clone(), format!("{}{path}", app.url))
                .header(*header, value);
            if let Some(b) = &body {
                req = req.json(b);
            }
            let a = answer(req.send().await.unwrap()).await;
            assert_ne!(
                a.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {header}: {value}"
            );
        }
        for (credential, msg) in &bad {
            let mut req = app
                .http
                .request(method.clone(), format!("{}{path}", app.url));
            if let Some((header, value)) = credential {
                req = req.header(*header, value);
            }
            if let Some(b) = &body {
                req = req.json(b);
            }
            let a = answer(req.send().await.unwrap()).await;
            assert_eq!(
                a.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {credential:?}"
            );
            assert_eq!(
                a.body,
                json!({
                    "type": "https://api.backend.ai/probs/auth-failed",
                    "title": "Credential/signature mismatch.",
                    "error_code": "agent_auth_unauthorized",
                    "msg": msg
                })
            );
        }
    }
    // The manager token of the native API is no api_secret.
    let a = app
        .call(Method::GET, &circuits, Some(crate::common::MANAGER), None)
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}
