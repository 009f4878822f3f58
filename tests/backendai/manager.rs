//! The Manager's side: `/status`, `/v2`, `/health`, on both backends.
//!
//! A worker is registered straight through the store and played in
//! process: [`ack_everything`] acknowledges every route it finds, as the
//! real worker acknowledges each circuit the bus sends it.

use std::time::Duration;

use appproxy_coordinator::backendai::jwt;
use appproxy_coordinator::domain::WorkerStatus;
use appproxy_coordinator::store::RouteFilter;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{
    API_SECRET, Backend, JWT_SECRET, Task, TestApp, backendai_settings, manual_clock,
    register_backendai_worker,
};
use crate::on_both_backends;

on_both_backends!(
    status_reports_the_api_version_and_the_advertised_address,
    the_api_secret_is_taken_in_upstreams_forms_only,
    bulk_create_answers_urls_in_order_and_a_retry_changes_nothing,
    an_existing_url_keeps_its_worker_and_port,
    bad_creates_are_answered_in_upstreams_body,
    an_unacknowledged_circuit_is_503_e10001_and_stays,
    one_endpoint_is_created_and_deleted_by_its_id,
    bulk_delete_answers_per_endpoint_in_request_order,
    routes_are_replaced_registered_and_unregistered_per_endpoint,
    concurrent_registrations_all_land,
    the_endpoint_token_carries_the_circuit_and_expiry,
    the_health_check_is_stored_on_the_circuit,
    conf_then_proxy_auth_answers_json_or_a_redirect_to_setup,
    proxy_auth_reuses_the_sessions_circuit_and_updates_it_in_place,
    conf_without_a_token_only_from_allowed_networks,
    health_answers_and_lists_workers_and_stranded_circuits,
);

/// What a Backend.AI path answered.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

/// Sends `body` (JSON) with `headers`; redirects are not followed.
pub(crate) async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    appproxy_coordinator::install_crypto_provider();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut request = client.request(method, format!("{}{path}", app.url));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if let Some(b) = body {
        request = request.json(&b);
    }
    let r = request.send().await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        headers,
        body,
    }
}

/// A call as the Manager makes it: the api_secret in `X-BackendAI-Token`.
pub(crate) async fn manager(
    app: &TestApp,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Reply {
    send(
        app,
        method,
        path,
        &[
            ("x-backendai-token", API_SECRET),
            ("accept", "application/json"),
        ],
        body,
    )
    .await
}

/// Plays the worker: acknowledges every route in the store, again and
/// again, until the answer is dropped (hold it for the test's duration).
pub(crate) fn ack_everything(app: &TestApp) -> Task {
    let store = app.store.clone();
    let bai = app.backendai.clone().expect("Backend.AI mode");
    Task::spawn(async move {
        loop {
            if let Ok(page) = store.list_routes(&RouteFilter::default(), 1000, None).await {
                bai.acks.heard(page.items.iter().map(|r| r.id).collect());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

pub(crate) async fn port_worker(
    app: &TestApp,
    authority: &str,
) -> appproxy_coordinator::domain::Worker {
    register_backendai_worker(
        app,
        authority,
        json!({"frontend_mode": "port", "port_range": [10205, 10300]}),
    )
    .await
}

pub(crate) fn endpoint(deployment: Uuid, service: &str, existing_url: Option<&str>) -> Value {
    json!({
        "deployment_id": deployment,
        "version": "v2",
        "service_name": service,
        "tags": {
            "session": {
                "user_uuid": "22222222-2222-4222-8222-222222222222",
                "project_id": "33333333-3333-4333-8333-333333333333",
                "domain_name": "default"
            },
            "endpoint": {"id": deployment, "runtime_variant": "custom", "existing_url": existing_url}
        },
        "open_to_public": false,
        "health_check": null
    })
}

pub(crate) async fn bulk_create(app: &TestApp, endpoints: Vec<Value>) -> Reply {
    manager(
        app,
        Method::POST,
        "/v2/endpoints/bulk",
        Some(json!({ "endpoints": endpoints })),
    )
    .await
}

/// The route of `deployment`, as `GET /routes` shows it.
async fn route_of(app: &TestApp, deployment: Uuid) -> Option<Value> {
    let a = app
        .manager(
            Method::GET,
            &format!("/routes?endpoint_id={deployment}"),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    a.body["items"].as_array().unwrap().first().cloned()
}

pub(crate) fn assert_error(reply: &Reply, status: StatusCode, kind: &str) {
    assert_eq!(reply.status, status, "{:?}", reply.body);
    assert_eq!(
        reply.body["type"],
        format!("https://api.backend.ai/probs/{kind}"),
        "{:?}",
        reply.body
    );
    assert!(reply.body["title"].is_string());
    assert!(reply.body["error_code"].is_string());
}

async fn status_reports_the_api_version_and_the_advertised_address(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let a = app.call(Method::GET, "/status", None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.body,
        json!({"api_version": "v2", "advertise_address": "http://coordinator.test:10200"})
    );

    // Without Backend.AI mode the path is not served, in upstream's shape.
    let off = TestApp::start(b).await;
    let a = off.call(Method::GET, "/status", None, None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body["type"], "https://api.backend.ai/probs/url-not-found");
    assert_eq!(a.body["data"], "/status");
}

async fn the_api_secret_is_taken_in_upstreams_forms_only(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let now = app.clock.now().timestamp();
    let claims = |exp: i64| {
        json!({"sub": "manager", "exp": exp})
            .as_object()
            .unwrap()
            .clone()
    };
    let valid_jwt = format!("Bearer {}", jwt::encode(&claims(now + 600), API_SECRET));
    let expired_jwt = format!("Bearer {}", jwt::encode(&claims(now - 1), API_SECRET));
    let foreign_jwt = format!("Bearer {}", jwt::encode(&claims(now + 600), JWT_SECRET));
    let bearer = format!("Bearer {API_SECRET}");
    let backendai = format!("BackendAI {API_SECRET}");
    let basic = format!("Basic {API_SECRET}");
    // The headers sent, and the 401 message when they are refused.
    type Case<'a> = (Vec<(&'a str, &'a str)>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (vec![("x-backendai-token", API_SECRET)], None),
        (vec![("x-backendai-token", &bearer)], None),
        (vec![("x-backendai-token", &backendai)], None),
        (vec![("authorization", &valid_jwt)], None),
        (vec![], Some("Unauthorized access")),
        (
            vec![("x-backendai-token", "wrong")],
            Some("Unauthorized access"),
        ),
        // A wrong X-BackendAI-Token wins over a valid Authorization.
        (
            vec![
                ("x-backendai-token", "wrong"),
                ("authorization", &valid_jwt),
            ],
            Some("Unauthorized access"),
        ),
        (
            vec![("authorization", &expired_jwt)],
            Some("Unauthorized access"),
        ),
        (
            vec![("authorization", &foreign_jwt)],
            Some("Unauthorized access"),
        ),
        (
            vec![("authorization", &basic)],
            Some("Unsupported authorization method Basic"),
        ),
    ];
    for (headers, refused) in cases {
        for (method, path, body) in [
            (
                Method::DELETE,
                "/v2/endpoints/bulk",
                Some(json!({"endpoints": []})),
            ),
            (Method::GET, "/health/status", None),
        ] {
            let a = send(&app, method.clone(), path, &headers, body).await;
            match refused {
                None => assert_eq!(a.status, StatusCode::OK, "{headers:?} {:?}", a.body),
                Some(msg) => {
                    assert_error(&a, StatusCode::UNAUTHORIZED, "auth-failed");
                    assert_eq!(a.body["msg"], msg, "{headers:?}");
                    assert_eq!(a.body["error_code"], "agent_auth_unauthorized");
                }
            }
        }
    }
    // Checked before the body is read.
    let a = send(
        &app,
        Method::POST,
        "/v2/endpoints/bulk",
        &[],
        Some(json!({"nonsense": true})),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

async fn bulk_create_answers_urls_in_order_and_a_retry_changes_nothing(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let mut with_check = endpoint(second, "llama", None);
    with_check["health_check"] = json!({"enable": true, "path": "/health", "max-retries": 3});
    let body = vec![endpoint(first, "smoke", None), with_check];

    let a = bulk_create(&app, body.clone()).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(
        a.body,
        json!({"endpoints": [
            {"deployment_id": first, "url": "http://127.0.0.1:10205/", "health_check_enabled": false},
            {"deployment_id": second, "url": "http://127.0.0.1:10206/", "health_check_enabled": true},
        ]})
    );
    let revision = app.revision().await;

    // The Manager retries: same answer, nothing written.
    let again = bulk_create(&app, body).await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert_eq!(again.body, a.body);
    assert_eq!(app.revision().await, revision);
    assert_eq!(app.route_count().await, 2);

    // Each circuit is a route like any other, with its Backend.AI fields.
    let route = route_of(&app, second).await.expect("a route");
    assert_eq!(route["app_mode"], "inference");
    assert_eq!(route["service"], "llama");
    assert_eq!(route["targets"], json!([]));
    assert_eq!(route["frontend"]["port"], 10206);
    assert_eq!(
        route["circuit"]["user_id"],
        "22222222-2222-4222-8222-222222222222"
    );
    assert_eq!(route["circuit"]["runtime_variant"], "custom");
    assert_eq!(route["circuit"]["health_check"]["max-retries"], 3);
    assert_eq!(route["access"]["open_to_public"], false);
}

async fn an_existing_url_keeps_its_worker_and_port(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    let wild = register_backendai_worker(
        &app,
        "worker-wild",
        json!({"frontend_mode": "wildcard", "wildcard_domain": ".apps.test", "wildcard_traffic_port": 8080}),
    )
    .await;
    let _acks = ack_everything(&app);
    let (kept, moved, sub) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let a = bulk_create(
        &app,
        vec![
            endpoint(kept, "smoke", Some("http://127.0.0.1:10250/")),
            endpoint(moved, "other", Some("http://gone.example:10250/")),
            endpoint(sub, "vllm", Some("http://my-model.apps.test:8080/")),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body["endpoints"][0]["url"], "http://127.0.0.1:10250/");
    assert_eq!(
        a.body["endpoints"][2]["url"], "http://my-model.apps.test:8080/",
        "the wildcard worker keeps the subdomain"
    );
    let on_wild = route_of(&app, sub).await.unwrap();
    assert_eq!(on_wild["worker_id"], json!(wild.id));
    // No worker serves that host: placed anew, and the answer says where.
    let url = a.body["endpoints"][1]["url"].as_str().unwrap();
    assert_ne!(url, "http://gone.example:10250/");

    // An endpoint re-created with its old URL after a delete gets it back.
    let d = manager(&app, Method::DELETE, &format!("/v2/endpoints/{kept}"), None).await;
    assert_eq!(d.status, StatusCode::OK);
    let a = bulk_create(
        &app,
        vec![endpoint(kept, "smoke", Some("http://127.0.0.1:10250/"))],
    )
    .await;
    assert_eq!(a.body["endpoints"][0]["url"], "http://127.0.0.1:10250/");
}

async fn bad_creates_are_answered_in_upstreams_body(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    // No worker at all.
    let a = bulk_create(&app, vec![endpoint(Uuid::new_v4(), "smoke", None)]).await;
    assert_error(
        &a,
        StatusCode::SERVICE_UNAVAILABLE,
        "appproxy/worker-not-available",
    );

    port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let mut bad = endpoint(Uuid::new_v4(), "smoke", None);
    bad["tags"]["session"]["user_uuid"] = json!("not-a-uuid");
    let a = bulk_create(&app, vec![bad]).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid-api-params");
    assert_eq!(a.body["msg"], "Input validation error");
    assert_eq!(
        a.body["data"]["errors"][0]["loc"],
        json!(["endpoints", 0, "tags", "session", "user_uuid"])
    );

    let a = send(
        &app,
        Method::POST,
        "/v2/endpoints/bulk",
        &[("x-backendai-token", API_SECRET)],
        None,
    )
    .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid-api-params");

    let a = bulk_create(
        &app,
        vec![endpoint(Uuid::new_v4(), "smoke", Some("not a url"))],
    )
    .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "appproxy/invalid-url");

    // The earlier item stays created when a later one fails; a retry of
    // the list converges.
    let (good, taken) = (Uuid::new_v4(), Uuid::new_v4());
    let a = bulk_create(
        &app,
        vec![endpoint(taken, "one", Some("http://127.0.0.1:10260/"))],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    let a = bulk_create(
        &app,
        vec![
            endpoint(good, "two", None),
            endpoint(Uuid::new_v4(), "three", Some("http://127.0.0.1:10260/")),
        ],
    )
    .await;
    assert_error(&a, StatusCode::CONFLICT, "appproxy/port-not-available");
    assert!(route_of(&app, good).await.is_some());

    // A path id that is not a UUID is a 400, not upstream's 500.
    let a = manager(&app, Method::DELETE, "/v2/endpoints/not-a-uuid", None).await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid-api-params");
}

async fn an_unacknowledged_circuit_is_503_e10001_and_stays(b: Backend) {
    let mut settings = backendai_settings();
    settings.ack_timeout = Duration::from_millis(200);
    let app = TestApp::builder(b)
        .clock(manual_clock())
        .backendai(settings)
        .start()
        .await;
    port_worker(&app, "worker-1").await;
    let deployment = Uuid::new_v4();
    let a = bulk_create(&app, vec![endpoint(deployment, "smoke", None)]).await;
    assert_error(&a, StatusCode::SERVICE_UNAVAILABLE, "service-unavailable");
    assert_eq!(a.body["msg"], "E10001: Proxy worker not responding");
    assert_eq!(a.body["data"], json!({"worker": "worker-1"}));
    assert!(
        route_of(&app, deployment).await.is_some(),
        "the circuit stays"
    );

    // Once the worker answers, the retry is answered with the same circuit.
    let _acks = ack_everything(&app);
    let a = bulk_create(&app, vec![endpoint(deployment, "smoke", None)]).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body["endpoints"][0]["url"], "http://127.0.0.1:10205/");
    assert_eq!(app.route_count().await, 1);
}

async fn one_endpoint_is_created_and_deleted_by_its_id(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let deployment = Uuid::new_v4();
    let body = json!({
        "version": "v2",
        "service_name": "smoke",
        "tags": {
            "session": {"id": null, "user_uuid": Uuid::new_v4(), "group_id": Uuid::new_v4(),
                        "access_key": null, "domain_name": "default"},
            "endpoint": {"id": deployment, "runtime_variant": "vllm", "existing_url": null}
        },
        "open_to_public": true,
        "health_check": {"enable": false}
    });
    let path = format!("/v2/endpoints/{deployment}");
    let a = manager(&app, Method::POST, &path, Some(body.clone())).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(
        a.body,
        json!({"success": true, "endpoint": "http://127.0.0.1:10205/", "health_check_enabled": true})
    );
    let route = route_of(&app, deployment).await.unwrap();
    assert_eq!(route["access"]["open_to_public"], true);
    assert_eq!(route["circuit"]["runtime_variant"], "vllm");
    let again = manager(&app, Method::POST, &path, Some(body)).await;
    assert_eq!(again.body, a.body);

    let d = manager(&app, Method::DELETE, &path, None).await;
    assert_eq!(d.status, StatusCode::OK);
    assert_eq!(d.body, json!({"success": true}));
    assert!(route_of(&app, deployment).await.is_none());
    // Unknown: success too.
    let d = manager(&app, Method::DELETE, &path, None).await;
    assert_eq!(d.body, json!({"success": true}));
}

async fn bulk_delete_answers_per_endpoint_in_request_order(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let (a1, a2, unknown) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let c = bulk_create(
        &app,
        vec![endpoint(a1, "one", None), endpoint(a2, "two", None)],
    )
    .await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.body);
    let d = manager(
        &app,
        Method::DELETE,
        "/v2/endpoints/bulk",
        Some(json!({"endpoints": [
            {"deployment_id": a2}, {"deployment_id": unknown}, {"endpoint_id": a1}
        ]})),
    )
    .await;
    assert_eq!(d.status, StatusCode::OK);
    assert_eq!(
        d.body,
        json!({"endpoints": [
            {"deployment_id": a2, "success": true, "error": null},
            {"deployment_id": unknown, "success": true, "error": null},
            {"deployment_id": a1, "success": true, "error": null},
        ]})
    );
    assert_eq!(app.route_count().await, 0);
}

async fn routes_are_replaced_registered_and_unregistered_per_endpoint(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let (deployment, unknown) = (Uuid::new_v4(), Uuid::new_v4());
    let c = bulk_create(&app, vec![endpoint(deployment, "smoke", None)]).await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.body);
    let (r1, r2, r3, session) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let entry = |route: Uuid, port: i64| json!({"session_id": session, "route_id": route, "kernel_host": "10.0.0.5", "kernel_port": port});

    let a = manager(
        &app,
        Method::POST,
        "/v2/endpoints/bulk/routes/register",
        Some(json!({"endpoints": [
            {"deployment_id": deployment, "routes": [entry(r1, 8001), entry(r2, 8002)]},
            {"deployment_id": unknown, "routes": [entry(r3, 8003)]},
        ]})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.body,
        json!({"endpoints": [
            {"deployment_id": deployment, "success": true, "registered_route_ids": [r1, r2],
             "already_registered_route_ids": [], "error": null},
            {"deployment_id": unknown, "success": false, "registered_route_ids": [],
             "already_registered_route_ids": [],
             "error": "No circuit registered for this endpoint yet."},
        ]})
    );
    let a = manager(
        &app,
        Method::POST,
        "/v2/endpoints/bulk/routes/register",
        Some(json!({"endpoints": [
            {"deployment_id": deployment, "routes": [entry(r2, 8002), entry(r3, 8003)]},
        ]})),
    )
    .await;
    assert_eq!(a.body["endpoints"][0]["registered_route_ids"], json!([r3]));
    assert_eq!(
        a.body["endpoints"][0]["already_registered_route_ids"],
        json!([r2])
    );
    let route = route_of(&app, deployment).await.unwrap();
    let targets = route["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 3);
    assert_eq!(
        targets[0],
        json!({"id": r1, "host": "10.0.0.5", "port": 8001, "weight": 100, "session_id": session})
    );

    let a = manager(
        &app,
        Method::POST,
        "/v2/endpoints/bulk/routes/unregister",
        Some(json!({"endpoints": [
            {"deployment_id": deployment, "route_ids": [r1, unknown]},
            {"deployment_id": unknown, "route_ids": [r1]},
        ]})),
    )
    .await;
    assert_eq!(
        a.body,
        json!({"endpoints": [
            {"deployment_id": deployment, "success": true, "unregistered_route_ids": [r1],
             "already_absent_route_ids": [unknown], "error": null},
            {"deployment_id": unknown, "success": false, "unregistered_route_ids": [],
             "already_absent_route_ids": [],
             "error": "No circuit registered for this endpoint yet."},
        ]})
    );

    // A bad port fails its item only.
    let other = Uuid::new_v4();
    let c = bulk_create(&app, vec![endpoint(other, "other", None)]).await;
    assert_eq!(c.status, StatusCode::OK);
    let a = manager(
        &app,
        Method::POST,
        "/v2/endpoints/bulk/routes",
        Some(json!({"endpoints": [
            {"deployment_id": deployment, "routes": [entry(r3, 8003)]},
            {"deployment_id": other, "routes": [entry(r1, 0)]},
            {"deployment_id": unknown, "routes": []},
        ]})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let items = a.body["endpoints"].as_array().unwrap();
    assert_eq!(
        items[0],
        json!({"deployment_id": deployment, "success": true, "error": null})
    );
    assert_eq!(items[1]["success"], false);
    assert!(items[1]["error"].as_str().unwrap().contains("kernel_port"));
    assert_eq!(
        items[2]["error"],
        "No circuit registered for this endpoint yet."
    );
    let route = route_of(&app, deployment).await.unwrap();
    assert_eq!(route["targets"].as_array().unwrap().len(), 1);

    // Replacing with nothing leaves a circuit without replicas.
    let a = manager(
        &app,
        Method::POST,
        "/v2/endpoints/bulk/routes",
        Some(json!({"endpoints": [{"deployment_id": deployment, "routes": []}]})),
    )
    .await;
    assert_eq!(a.body["endpoints"][0]["success"], true);
    let route = route_of(&app, deployment).await.unwrap();
    assert_eq!(route["targets"], json!([]));
    let a = manager(
        &app,
        Method::POST,
        "/v2/endpoints/bulk/routes",
        Some(json!({"endpoints": []})),
    )
    .await;
    assert_eq!(a.body, json!({"endpoints": []}));
}

async fn concurrent_registrations_all_land(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let deployment = Uuid::new_v4();
    let c = bulk_create(&app, vec![endpoint(deployment, "smoke", None)]).await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.body);
    // The Manager registers each replica as it becomes healthy: the
    // registrations read and write the route list in one transaction each,
    // so none is lost.
    let ids: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    let replies = futures::future::join_all(ids.iter().enumerate().map(|(i, id)| {
        manager(
            &app,
            Method::POST,
            "/v2/endpoints/bulk/routes/register",
            Some(
                json!({"endpoints": [{"deployment_id": deployment, "routes": [
                    {"session_id": Uuid::new_v4(), "route_id": id, "kernel_host": "10.0.0.5",
                     "kernel_port": 8000 + i}
                ]}]}),
            ),
        )
    }))
    .await;
    for (reply, id) in replies.iter().zip(&ids) {
        assert_eq!(
            reply.body["endpoints"][0]["registered_route_ids"],
            json!([id])
        );
    }
    let route = route_of(&app, deployment).await.unwrap();
    let mut registered: Vec<Uuid> = route["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().parse().unwrap())
        .collect();
    registered.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(registered, expected);
}

async fn the_endpoint_token_carries_the_circuit_and_expiry(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let worker = port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let deployment = Uuid::new_v4();
    let c = bulk_create(&app, vec![endpoint(deployment, "smoke", None)]).await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.body);
    let route = route_of(&app, deployment).await.unwrap();
    let user = Uuid::new_v4();
    let path = format!("/v2/endpoints/{deployment}/token");

    for exp in [json!("2030-01-01T00:00:00Z"), json!(1_893_456_000)] {
        let a = manager(
            &app,
            Method::POST,
            &path,
            Some(json!({"user_uuid": user, "exp": exp})),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
        let token = a.body["token"].as_str().unwrap();
        let claims = jwt::decode(token, JWT_SECRET, app.clock.now().timestamp()).unwrap();
        assert_eq!(claims["id"], route["id"]);
        assert_eq!(claims["exp"], 1_893_456_000);
        assert_eq!(claims["user"], json!(user));
        assert_eq!(claims["app_url"], "http://127.0.0.1:10205");
        assert_eq!(claims["endpoint_id"], json!(deployment));
        assert_eq!(claims["worker"], json!(worker.id));
        assert_eq!(claims["app_mode"], "inference");
        assert_eq!(claims["port"], 10205);
        assert_eq!(claims["runtime_variant"], "custom");
        assert!(claims["created_at"].is_f64());
        assert!(claims.get("route_info").is_none());
        assert!(jwt::decode(token, API_SECRET, 0).is_err());
    }

    let a = manager(
        &app,
        Method::POST,
        &format!("/v2/endpoints/{}/token", Uuid::new_v4()),
        Some(json!({"user_uuid": user, "exp": 1_893_456_000})),
    )
    .await;
    assert_error(&a, StatusCode::NOT_FOUND, "object-not-found");
    assert_eq!(a.body["title"], "E00002: No such circuit.");
    let a = manager(
        &app,
        Method::POST,
        &path,
        Some(json!({"user_uuid": user, "exp": "someday"})),
    )
    .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid-api-params");
}

async fn the_health_check_is_stored_on_the_circuit(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let deployment = Uuid::new_v4();
    let c = bulk_create(&app, vec![endpoint(deployment, "smoke", None)]).await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.body);
    let path = format!("/v2/endpoints/{deployment}/health-check");
    let a = manager(
        &app,
        Method::PUT,
        &path,
        Some(json!({"health_check": {"enable": true, "path": "/ready"}})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body, json!({"success": true}));
    let route = route_of(&app, deployment).await.unwrap();
    assert_eq!(route["circuit"]["health_check"]["path"], "/ready");
    let a = manager(
        &app,
        Method::PUT,
        &path,
        Some(json!({"health_check": null})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let route = route_of(&app, deployment).await.unwrap();
    assert!(route["circuit"]["health_check"].is_null());
    let a = manager(
        &app,
        Method::PUT,
        &format!("/v2/endpoints/{}/health-check", Uuid::new_v4()),
        Some(json!({"health_check": null})),
    )
    .await;
    assert_error(&a, StatusCode::NOT_FOUND, "object-not-found");
}

/// `POST /v2/conf` as the Manager sends it (no token); answers the token.
pub(crate) async fn conf(app: &TestApp, session: Uuid, user: Uuid, port: u16) -> String {
    let a = send(
        app,
        Method::POST,
        "/v2/conf",
        &[],
        Some(conf_body(session, user, port)),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    a.body["token"].as_str().unwrap().to_owned()
}

pub(crate) fn conf_body(session: Uuid, user: Uuid, port: u16) -> Value {
    json!({
        "login_session_token": null,
        "kernel_host": "10.0.0.9",
        "kernel_port": port,
        "session": {"id": session, "user_uuid": user, "group_id": Uuid::new_v4(),
                    "access_key": "AKIAEXAMPLE", "domain_name": "default"}
    })
}

async fn conf_then_proxy_auth_answers_json_or_a_redirect_to_setup(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let (session, user) = (Uuid::new_v4(), Uuid::new_v4());
    let token = conf(&app, session, user, 8888).await;
    let path = format!(
        "/v2/proxy/auth?token={token}&session_id={session}&app=jupyter&protocol=http&redirect=/lab"
    );

    let a = send(
        &app,
        Method::GET,
        &path,
        &[("accept", "application/json")],
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.headers["access-control-allow-origin"], "*");
    assert_eq!(a.headers["access-control-expose-headers"], "*");
    assert_eq!(a.body["reuse"], false);
    let url = a.body["redirect_url"].as_str().unwrap();
    let setup = url
        .strip_prefix("http://127.0.0.1:10201/setup?token=")
        .unwrap_or_else(|| panic!("{url}"));
    let claims = jwt::decode(setup, JWT_SECRET, 0).unwrap();
    let route = app
        .manager(Method::GET, &format!("/routes?session_id={session}"), None)
        .await
        .body["items"][0]
        .clone();
    assert_eq!(
        Value::Object(claims),
        json!({"id": token, "version": "v2", "redirect": "/lab", "circuit": route["id"]})
    );
    assert_eq!(route["service"], "jupyter");
    assert_eq!(route["app_mode"], "interactive");
    assert_eq!(
        route["targets"],
        json!([{"id": null, "host": "10.0.0.9", "port": 8888, "weight": 100, "session_id": session}])
    );
    assert_eq!(route["circuit"]["user_id"], json!(user));
    assert_eq!(route["circuit"]["session_ids"], json!([session]));

    // The same again: the circuit is reused.
    let a = send(
        &app,
        Method::GET,
        &path,
        &[("accept", "application/json")],
        None,
    )
    .await;
    assert_eq!(a.body["reuse"], true);
    // A browser (no Accept, or */*) is redirected.
    for headers in [vec![], vec![("accept", "*/*")]] {
        let a = send(&app, Method::GET, &path, &headers, None).await;
        assert_eq!(a.status, StatusCode::PERMANENT_REDIRECT);
        let location = a.headers["location"].to_str().unwrap();
        assert!(location.starts_with("http://127.0.0.1:10201/setup?token="));
        assert_eq!(a.body, "308: Permanent Redirect");
    }
    assert_eq!(app.route_count().await, 1);

    // The deprecated /add answers the auth URL.
    let a = send(
        &app,
        Method::GET,
        &format!("/v2/proxy/{token}/{session}/add?app=jupyter&protocol=http"),
        &[],
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(
        a.body,
        json!({"code": 200, "url": format!(
            "http://coordinator.test:10200/v2/proxy/auth?app=jupyter&protocol=http&token={token}&session_id={session}"
        )})
    );

    // Errors: another session, an unknown token, a malformed one.
    let json_accept = [("accept", "application/json")];
    let other = Uuid::new_v4();
    let a = send(
        &app,
        Method::GET,
        &format!("/v2/proxy/auth?token={token}&session_id={other}&app=jupyter&protocol=http"),
        &json_accept,
        None,
    )
    .await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "invalid-credentials");
    assert_eq!(a.body["msg"], "E20007: Session ID mismatch");
    let a = send(
        &app,
        Method::GET,
        &format!("/v2/proxy/auth?token={other}&session_id={session}&app=jupyter&protocol=http"),
        &json_accept,
        None,
    )
    .await;
    assert_error(&a, StatusCode::NOT_FOUND, "object-not-found");
    assert_eq!(a.body["title"], "E00002: No such token.");
    for bad in [
        format!("token=nope&session_id={session}&app=jupyter&protocol=http"),
        format!("token={token}&session_id={session}&app=jupyter&protocol=gopher"),
        format!(
            "token={token}&session_id={session}&app=jupyter&protocol=http&allowed_client_ips=10.0.0.0/33"
        ),
        format!("token={token}&session_id={session}&app=jupyter"),
    ] {
        let a = send(
            &app,
            Method::GET,
            &format!("/v2/proxy/auth?{bad}"),
            &json_accept,
            None,
        )
        .await;
        assert_error(&a, StatusCode::BAD_REQUEST, "invalid-api-params");
    }
}

async fn proxy_auth_reuses_the_sessions_circuit_and_updates_it_in_place(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    register_backendai_worker(
        &app,
        "worker-tcp",
        json!({"frontend_mode": "port", "port_range": [20000, 20010], "protocol": "tcp"}),
    )
    .await;
    let _acks = ack_everything(&app);
    let (session, user) = (Uuid::new_v4(), Uuid::new_v4());
    let token = conf(&app, session, user, 8888).await;
    let auth = |query: &str| proxy_auth_json(&app, &token, session, query.to_owned());
    let a = auth("app=jupyter&protocol=preopen").await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    let first = app
        .manager(Method::GET, &format!("/routes?session_id={session}"), None)
        .await
        .body["items"][0]
        .clone();
    assert_eq!(first["protocol"], "http");
    assert_eq!(first["circuit"]["app_protocol"], "preopen");

    // Other access settings: the same circuit, updated, not "reused".
    let a = auth("app=jupyter&protocol=preopen&open_to_public=true&allowed_client_ips=10.0.0.0/8")
        .await;
    assert_eq!(a.body["reuse"], false);
    let a = auth("app=jupyter&protocol=preopen&open_to_public=true&allowed_client_ips=10.0.0.0/8&no_reuse=true").await;
    assert_eq!(a.body["reuse"], false);
    let items = app
        .manager(Method::GET, &format!("/routes?session_id={session}"), None)
        .await
        .body["items"]
        .clone();
    assert_eq!(items.as_array().unwrap().len(), 1);
    assert_eq!(items[0]["id"], first["id"]);
    assert_eq!(items[0]["access"]["open_to_public"], true);
    assert_eq!(
        items[0]["access"]["allowed_client_ips"],
        json!(["10.0.0.0/8"])
    );
    assert_eq!(items[0]["frontend"]["port"], first["frontend"]["port"]);

    // vnc is served as tcp, on a tcp worker; tcp is never "reused".
    let a = auth("app=novnc&protocol=vnc").await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    let a = auth("app=novnc&protocol=vnc").await;
    assert_eq!(a.body["reuse"], false);
    let vnc = app
        .manager(
            Method::GET,
            &format!("/routes?session_id={session}&service=novnc"),
            None,
        )
        .await
        .body["items"][0]
        .clone();
    assert_eq!(vnc["protocol"], "tcp");
    assert_eq!(vnc["circuit"]["app_protocol"], "vnc");
    assert_eq!(vnc["frontend"]["port"], 20000);
}

/// `GET /v2/proxy/auth` for `token` and `session` plus `query`, asking JSON.
pub(crate) async fn proxy_auth_json(
    app: &TestApp,
    token: &str,
    session: Uuid,
    query: String,
) -> Reply {
    send(
        app,
        Method::GET,
        &format!("/v2/proxy/auth?token={token}&session_id={session}&{query}"),
        &[("accept", "application/json")],
        None,
    )
    .await
}

async fn conf_without_a_token_only_from_allowed_networks(b: Backend) {
    let mut settings = backendai_settings();
    settings.conf_allowed_networks = Vec::new();
    let app = TestApp::builder(b)
        .clock(manual_clock())
        .backendai(settings)
        .start()
        .await;
    let body = conf_body(Uuid::new_v4(), Uuid::new_v4(), 8888);
    let a = send(&app, Method::POST, "/v2/conf", &[], Some(body.clone())).await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "auth-failed");
    let bearer = format!("Bearer {API_SECRET}");
    let a = send(
        &app,
        Method::POST,
        "/v2/conf",
        &[("x-backendai-token", &bearer)],
        Some(body.clone()),
    )
    .await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "auth-failed");
    let a = send(
        &app,
        Method::POST,
        "/v2/conf",
        &[("x-backendai-token", API_SECRET)],
        Some(body.clone()),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert!(Uuid::parse_str(a.body["token"].as_str().unwrap()).is_ok());

    // The caller is checked first (before the body is read), then the
    // body, then the session.
    let a = send(&app, Method::POST, "/v2/conf", &[], Some(json!({}))).await;
    assert_error(&a, StatusCode::UNAUTHORIZED, "auth-failed");
    let a = send(
        &app,
        Method::POST,
        "/v2/conf",
        &[("x-backendai-token", API_SECRET)],
        Some(json!({})),
    )
    .await;
    assert_error(&a, StatusCode::BAD_REQUEST, "invalid-api-params");
    let mut inference = body;
    inference["session"]["id"] = Value::Null;
    let a = send(
        &app,
        Method::POST,
        "/v2/conf",
        &[("x-backendai-token", API_SECRET)],
        Some(inference),
    )
    .await;
    assert_error(
        &a,
        StatusCode::BAD_REQUEST,
        "appproxy/invalid-session-parameter",
    );
    assert_eq!(a.body["msg"], "Not meant for inference apps");

    // Loopback allowed (the default test settings): no token needed.
    let open = TestApp::start_backendai(b).await;
    conf(&open, Uuid::new_v4(), Uuid::new_v4(), 8888).await;
}

async fn health_answers_and_lists_workers_and_stranded_circuits(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let worker = port_worker(&app, "worker-1").await;
    register_backendai_worker(
        &app,
        "worker-wild",
        json!({"frontend_mode": "wildcard", "wildcard_domain": ".apps.test"}),
    )
    .await;
    let _acks = ack_everything(&app);

    let a = send(&app, Method::GET, "/health", &[], None).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body["component"], "appproxy-coordinator");
    let checks = a.body["connectivity"]["connectivity_checks"]
        .as_array()
        .unwrap();
    assert_eq!(checks[0]["service_group"], "database");
    assert_eq!(checks[0]["is_healthy"], true);
    let healthy = a.body["connectivity"]["overall_healthy"].as_bool().unwrap();
    assert_eq!(a.body["status"], if healthy { "ok" } else { "degraded" });
    let a = send(&app, Method::GET, "/health/livez", &[], None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["status"], "ok");
    let a = send(&app, Method::GET, "/health/readyz", &[], None).await;
    let ready = a.body["connectivity"]["overall_healthy"].as_bool().unwrap();
    assert_eq!(
        a.status,
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    );

    let deployment = Uuid::new_v4();
    let c = bulk_create(&app, vec![endpoint(deployment, "smoke", None)]).await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.body);
    let a = manager(&app, Method::GET, "/health/status", None).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body["appproxy_api_version"], "v2");
    assert_eq!(
        a.body["workers"],
        json!([
            {"authority": "worker-1", "available_slots": 96, "occupied_slots": 1, "ha_setup": false},
            {"authority": "worker-wild", "available_slots": -1, "occupied_slots": 0, "ha_setup": false},
        ])
    );
    assert_eq!(a.body["stranded_circuits"], json!([]));

    // Its worker lost, failover keeps the circuit there (a move would change
    // its URL): it is reported stranded, with the URL the Manager holds.
    app.store
        .set_worker_status(worker.id, WorkerStatus::Lost, app.clock.now())
        .await
        .unwrap();
    let moved = app
        .store
        .relocate_routes(worker.id, 100, app.clock.now())
        .await
        .unwrap();
    assert!(moved.iter().all(|m| m.stranded), "{moved:?}");
    let route = route_of(&app, deployment).await.unwrap();
    let a = manager(&app, Method::GET, "/health/status", None).await;
    let stranded = &a.body["stranded_circuits"];
    assert_eq!(stranded.as_array().unwrap().len(), 1, "{stranded}");
    let mut entry = stranded[0].clone();
    assert!(entry["reason"].is_string());
    entry.as_object_mut().unwrap().remove("reason");
    assert_eq!(
        entry,
        json!({"id": route["id"], "endpoint_id": deployment, "session_id": null,
               "worker": "worker-1", "url": "http://127.0.0.1:10205/"})
    );
    // The status page lists it too, with the route's URL as the native API
    // has it.
    let page = app
        .call(Method::GET, "/ui/state", Some(crate::common::VIEWER), None)
        .await;
    assert_eq!(
        page.body["stranded"],
        json!([{"route_id": route["id"], "worker": "worker-1",
                "url": route["frontend"]["url"], "reason": stranded[0]["reason"]}])
    );
    // (The Manager's re-sync of it: tests/backendai/recovery.rs.)
}
