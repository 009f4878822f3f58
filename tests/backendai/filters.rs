//! Dedicated workers: the app filters a Backend.AI worker registers with
//! (`app_filters`, `filtered_apps_only`) decide where the Manager's
//! endpoints go, on both backends.

use appproxy_coordinator::domain::WorkerStatus;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{Backend, TestApp};
use crate::manager::{ack_everything, assert_error, conf, manager, proxy_auth_json};
use crate::on_both_backends;

on_both_backends!(
    endpoints_go_to_the_workers_their_app_filters_match,
    interactive_apps_match_by_their_session,
    failover_moves_a_dedicated_circuit_only_to_a_worker_it_matches,
    a_malformed_app_filter_is_refused_and_registers_nothing,
);

/// Registers a worker through `PUT /api/worker` as the real one does;
/// answers its id.
async fn register(
    app: &TestApp,
    authority: &str,
    port_range: [u16; 2],
    filtered_apps_only: bool,
    app_filters: Value,
) -> Uuid {
    let a = manager(
        app,
        Method::PUT,
        "/api/worker",
        Some(json!({
            "authority": authority, "frontend_mode": "port", "protocol": "http",
            "hostname": "127.0.0.1", "tls_listen": false, "tls_advertised": false,
            "api_port": 10201, "port_range": port_range,
            "filtered_apps_only": filtered_apps_only, "traefik_last_used_marker_path": null,
            "accepted_traffics": ["interactive", "inference"], "app_filters": app_filters
        })),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    a.body["id"].as_str().unwrap().parse().unwrap()
}

/// One bulk item of the Manager's, for a session of `domain`.
fn endpoint(deployment: Uuid, domain: &str, existing_url: Option<&str>) -> Value {
    json!({
        "deployment_id": deployment, "version": "v2", "service_name": "llm",
        "tags": {
            "session": {
                "user_uuid": "22222222-2222-4222-8222-222222222222",
                "project_id": "33333333-3333-4333-8333-333333333333",
                "domain_name": domain
            },
            "endpoint": {"id": deployment, "runtime_variant": "vllm", "existing_url": existing_url}
        },
        "open_to_public": false
    })
}

/// Creates one endpoint; answers the reply.
async fn create(app: &TestApp, deployment: Uuid, domain: &str) -> crate::manager::Reply {
    create_at(app, deployment, domain, None).await
}

async fn create_at(
    app: &TestApp,
    deployment: Uuid,
    domain: &str,
    existing_url: Option<&str>,
) -> crate::manager::Reply {
    manager(
        app,
        Method::POST,
        "/v2/endpoints/bulk",
        Some(json!({"endpoints": [endpoint(deployment, domain, existing_url)]})),
    )
    .await
}

/// The port of the URL one endpoint was answered.
fn port_of(reply: &crate::manager::Reply) -> u16 {
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let url = reply.body["endpoints"][0]["url"].as_str().unwrap();
    url.trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

async fn endpoints_go_to_the_workers_their_app_filters_match(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let _acks = ack_everything(&app);
    register(&app, "general", [10205, 10300], false, json!([])).await;
    let dedicated = register(
        &app,
        "gpu-proxy",
        [10400, 10500],
        true,
        json!([{"key": "session.domain_name", "value": "gpu-team"}]),
    )
    .await;
    let general_ports = 10205..=10300;
    let dedicated_ports = 10400..=10500;

    // Another domain's endpoints never go to the dedicated worker, though it
    // is the least loaded from the second one on.
    for _ in 0..3 {
        let port = port_of(&create(&app, Uuid::new_v4(), "default").await);
        assert!(general_ports.contains(&port), "{port}");
    }
    // A URL it had on the dedicated worker does not take it there either.
    let at = "http://127.0.0.1:10450/";
    let port = port_of(&create_at(&app, Uuid::new_v4(), "default", Some(at)).await);
    assert!(general_ports.contains(&port), "{port}");
    // The team's go only to it, also once it holds more than general.
    let gpu = Uuid::new_v4();
    let first = port_of(&create(&app, gpu, "gpu-team").await);
    assert_eq!(first, 10400);
    for _ in 0..5 {
        let port = port_of(&create(&app, Uuid::new_v4(), "gpu-team").await);
        assert!(dedicated_ports.contains(&port), "{port}");
    }
    // The circuit carries what the filter matched.
    let route = app
        .manager(Method::GET, &format!("/routes?endpoint_id={gpu}"), None)
        .await;
    let props = &route.body["items"][0]["circuit"]["properties"];
    assert_eq!(props["session.domain_name"], "gpu-team", "{props}");
    assert_eq!(props["endpoint.runtime_variant"], "vllm", "{props}");

    // With its dedicated worker Lost, the team's endpoint is upstream's 503
    // and nothing is created (it does not spill onto general).
    app.store
        .set_worker_status(dedicated, WorkerStatus::Lost, app.clock.now())
        .await
        .unwrap();
    let waiting = Uuid::new_v4();
    let a = create(&app, waiting, "gpu-team").await;
    assert_error(
        &a,
        StatusCode::SERVICE_UNAVAILABLE,
        "appproxy/worker-not-available",
    );
    let none = app
        .manager(Method::GET, &format!("/routes?endpoint_id={waiting}"), None)
        .await;
    assert_eq!(none.body["items"], json!([]), "{:?}", none.body);
    // The others are unaffected.
    let port = port_of(&create(&app, Uuid::new_v4(), "default").await);
    assert!(general_ports.contains(&port), "{port}");
}

async fn a_malformed_app_filter_is_refused_and_registers_nothing(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    for filters in [
        json!([{"key": "session.domain_name"}]),
        json!([{"key": "session.domain_name", "value": 7}]),
        json!(["session.domain_name=gpu"]),
        json!([{"key": "", "value": "gpu"}]),
    ] {
        let a = manager(
            &app,
            Method::PUT,
            "/api/worker",
            Some(json!({
                "authority": "bad", "frontend_mode": "port", "protocol": "http",
                "hostname": "127.0.0.1", "tls_listen": false, "tls_advertised": false,
                "api_port": 10201, "port_range": [10205, 10300],
                "filtered_apps_only": true, "accepted_traffics": ["inference"],
                "app_filters": filters
            })),
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{filters}: {:?}", a.body);
    }
    let listed = manager(&app, Method::GET, "/api/worker", None).await;
    assert_eq!(listed.body["workers"], json!([]), "{:?}", listed.body);
}

/// The frontend port of the route of `query` (`session_id=…` or
/// `endpoint_id=…`), and its worker.
async fn placed(app: &TestApp, query: &str) -> (u16, Uuid) {
    let a = app
        .manager(Method::GET, &format!("/routes?{query}"), None)
        .await;
    let route = &a.body["items"][0];
    let port = route["frontend"]["port"].as_u64().expect("a port") as u16;
    (port, route["worker_id"].as_str().unwrap().parse().unwrap())
}

async fn interactive_apps_match_by_their_session(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let _acks = ack_everything(&app);
    let user = Uuid::new_v4();
    register(&app, "general", [10205, 10300], false, json!([])).await;
    let dedicated = register(
        &app,
        "user-proxy",
        [10400, 10500],
        true,
        json!([{"key": "session.user_uuid", "value": user.to_string()}]),
    )
    .await;
    for (owner, expected_dedicated) in [
        (Uuid::new_v4(), false),
        (user, true),
        (Uuid::new_v4(), false),
    ] {
        let session = Uuid::new_v4();
        let token = conf(&app, session, owner, 8888).await;
        let a = proxy_auth_json(&app, &token, session, "app=jupyter&protocol=http".into()).await;
        assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
        let (port, worker) = placed(&app, &format!("session_id={session}")).await;
        assert_eq!(
            worker == dedicated,
            expected_dedicated,
            "{owner}: port {port}"
        );
    }
}

async fn failover_moves_a_dedicated_circuit_only_to_a_worker_it_matches(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let _acks = ack_everything(&app);
    let filter = json!([{"key": "session.domain_name", "value": "gpu-team"}]);
    // Every worker has the same host and a range holding 10400: each keeps
    // the circuit's URL. By name (and load) general would come first.
    let gpu_a = register(&app, "gpu-a", [10400, 10500], true, filter.clone()).await;
    register(&app, "general", [10205, 10500], false, json!([])).await;
    let gpu_b = register(&app, "gpu-b", [10400, 10500], true, filter).await;
    let deployment = Uuid::new_v4();
    let port = port_of(&create(&app, deployment, "gpu-team").await);
    let query = format!("endpoint_id={deployment}");
    assert_eq!(placed(&app, &query).await, (port, gpu_a));

    app.store
        .set_worker_status(gpu_a, WorkerStatus::Lost, app.clock.now())
        .await
        .unwrap();
    let moved = app
        .store
        .relocate_routes(gpu_a, 100, app.clock.now())
        .await
        .unwrap();
    assert_eq!(moved.len(), 1, "{moved:?}");
    // Same URL, on the other worker of the team.
    assert_eq!(placed(&app, &query).await, (port, gpu_b));
}
