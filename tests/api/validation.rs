//! Bad input: every refusal is a problem+json answer with the right status,
//! problem type and a detail, and changes nothing (the revision, the routes
//! and the workers stay as they were).

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{Answer, BOOTSTRAP, Backend, MANAGER, TestApp, route};
use crate::on_both_backends;

on_both_backends!(
    route_bodies_that_are_no_route_are_refused,
    route_values_out_of_range_are_refused,
    a_refused_value_names_its_field,
    a_route_on_an_unknown_worker_is_not_found,
    a_body_not_sent_as_json_is_unsupported,
    a_body_over_the_limit_is_too_large,
    malformed_ids_and_query_parameters_are_refused,
    patches_and_puts_that_change_no_route_are_refused,
    unknown_paths_and_methods_are_refused,
    a_heartbeat_acknowledging_a_revision_not_issued_is_a_conflict,
    a_negative_acknowledged_revision_is_refused,
    bad_registrations_are_refused,
    a_batch_of_creates_with_one_bad_create_is_refused_whole,
);

const JSON: Option<&str> = Some("application/json");

/// A coordinator with one worker and one route, and what it held before
/// the test's bad requests.
struct Held {
    app: TestApp,
    worker: Uuid,
    token: String,
    /// The route's id.
    route: String,
    revision: i64,
    routes: Value,
}

impl Held {
    async fn new(b: Backend) -> Held {
        let app = TestApp::start(b).await;
        let (worker, token, _) = app.register("w", [20000, 20100]).await;
        let existing = app.create(route(Uuid::new_v4(), "jupyter")).await;
        let route = existing.body["id"].as_str().unwrap().to_owned();
        let revision = app.revision().await;
        let routes = app.manager(Method::GET, "/routes", None).await.body;
        Held {
            app,
            worker,
            token,
            route,
            revision,
            routes,
        }
    }

    /// Sends a manager's request that must be refused with `status` and the
    /// problem `slug`, explained in a detail.
    async fn refuses(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
        status: u16,
        slug: &str,
    ) -> Answer {
        let a = self
            .app
            .raw(method.clone(), path, MANAGER, content_type, body)
            .await;
        assert_eq!(a.status.as_u16(), status, "{method} {path}: {:?}", a.body);
        assert_eq!(a.problem(), slug, "{method} {path}");
        assert!(a.body["detail"].as_str().is_some_and(|d| !d.is_empty()));
        a
    }

    /// No bad request wrote anything.
    async fn changed_nothing(&self) {
        let app = &self.app;
        assert_eq!(
            app.revision().await,
            self.revision,
            "no bad request wrote anything"
        );
        assert_eq!(
            app.manager(Method::GET, "/routes", None).await.body,
            self.routes
        );
        assert_eq!(
            app.manager(Method::GET, "/workers", None).await.body["items"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }
}

/// A route body, changed by `f`, as bytes.
fn route_with(f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = route(Uuid::new_v4(), "jupyter");
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

/// Not JSON, or JSON that is no route: 400 `invalid-request`.
async fn route_bodies_that_are_no_route_are_refused(b: Backend) {
    let held = Held::new(b).await;
    for body in [
        b"{\"session_id\": ".to_vec(),
        route_with(|v| v["colour"] = json!("red")),
        route_with(|v| {
            v.as_object_mut().unwrap().remove("session_id");
        }),
        route_with(|v| v["session_id"] = json!("not-a-uuid")),
        route_with(|v| v["protocol"] = json!("ftp")),
        route_with(|v| v["health_check"] = json!(["/", 10, 5, 200])),
        route_with(|v| v["targets"][0]["port"] = json!(8888.5)),
    ] {
        held.refuses(Method::POST, "/routes", JSON, body, 400, "invalid-request")
            .await;
    }
    held.changed_nothing().await;
}

/// Ports, networks, weights and expiry outside what a route may have: 400.
async fn route_values_out_of_range_are_refused(b: Backend) {
    let held = Held::new(b).await;
    for body in [
        route_with(|v| v["targets"][0]["port"] = json!(70000)),
        route_with(|v| v["targets"][0]["port"] = json!(0)),
        route_with(|v| v["frontend"] = json!({"port": 65536})),
        route_with(|v| v["access"] = json!({"allowed_client_ips": ["10.0.0.0/40"]})),
        route_with(|v| v["targets"] = json!([{"host": "10.0.0.1", "port": 80, "weight": 0}])),
        route_with(|v| v["expires_at"] = json!("2001-01-01T00:00:00Z")),
    ] {
        held.refuses(Method::POST, "/routes", JSON, body, 400, "invalid-request")
            .await;
    }
    held.changed_nothing().await;
}

/// The answer names the field it refused.
async fn a_refused_value_names_its_field(b: Backend) {
    let held = Held::new(b).await;
    let bad_field = held.app.create(json!({"session_id": Uuid::new_v4(), "service": "bad name", "targets": [{"host": "h", "port": 1}]})).await;
    assert_eq!(bad_field.body["field"], "service");
    held.changed_nothing().await;
}

/// A route pinned to a worker that does not exist: 404.
async fn a_route_on_an_unknown_worker_is_not_found(b: Backend) {
    let held = Held::new(b).await;
    let body = route_with(|v| v["worker_id"] = json!(Uuid::new_v4()));
    held.refuses(Method::POST, "/routes", JSON, body, 404, "not-found")
        .await;
    held.changed_nothing().await;
}

/// A body without a JSON content type: 415.
async fn a_body_not_sent_as_json_is_unsupported(b: Backend) {
    let held = Held::new(b).await;
    let body = route_with(|_| {});
    held.refuses(
        Method::POST,
        "/routes",
        None,
        body,
        415,
        "unsupported-media-type",
    )
    .await;
    held.changed_nothing().await;
}

/// A body over the router's limit (64 KiB here): 413.
async fn a_body_over_the_limit_is_too_large(b: Backend) {
    let held = Held::new(b).await;
    let body = vec![b' '; 70 * 1024];
    held.refuses(
        Method::POST,
        "/routes",
        JSON,
        body,
        413,
        "payload-too-large",
    )
    .await;
    held.changed_nothing().await;
}

/// Ids in paths and query parameters that do not parse: 400.
async fn malformed_ids_and_query_parameters_are_refused(b: Backend) {
    let held = Held::new(b).await;
    for (method, path) in [
        (Method::GET, "/routes/not-a-uuid"),
        (Method::DELETE, "/routes/not-a-uuid"),
        (Method::DELETE, "/sessions/123"),
        (Method::GET, "/routes?limit=0"),
        (Method::GET, "/routes?worker_id=x"),
    ] {
        held.refuses(method, path, None, vec![], 400, "invalid-request")
            .await;
    }
    held.changed_nothing().await;
}

/// A PATCH that changes what may not change or breaks a rule, and a PATCH
/// or PUT whose body is no object: 400. (serde alone would fill a struct
/// from an array, field by field.)
async fn patches_and_puts_that_change_no_route_are_refused(b: Backend) {
    let held = Held::new(b).await;
    let path = format!("/routes/{}", held.route);
    for (method, body) in [
        (Method::PATCH, br#"{"service": "renamed"}"#.to_vec()),
        (
            Method::PATCH,
            br#"{"targets": [{"host": "10.0.0.1", "port": 80, "weight": 0}]}"#.to_vec(),
        ),
        (Method::PUT, b"[]".to_vec()),
        (Method::PATCH, b"[null, null]".to_vec()),
    ] {
        held.refuses(method, &path, JSON, body, 400, "invalid-request")
            .await;
    }
    held.changed_nothing().await;
}

/// A path nobody serves is 404; a method a path does not take, 405.
async fn unknown_paths_and_methods_are_refused(b: Backend) {
    let held = Held::new(b).await;
    held.refuses(Method::POST, "/nowhere", None, vec![], 404, "not-found")
        .await;
    held.refuses(
        Method::PUT,
        "/routes",
        JSON,
        b"{}".to_vec(),
        405,
        "method-not-allowed",
    )
    .await;
    held.changed_nothing().await;
}

/// A heartbeat acknowledging a revision this coordinator has not issued
/// yet is well formed, but a conflict.
async fn a_heartbeat_acknowledging_a_revision_not_issued_is_a_conflict(b: Backend) {
    let held = Held::new(b).await;
    let beat = held
        .app
        .call(
            Method::POST,
            &format!("/workers/{}/heartbeat", held.worker),
            Some(&held.token),
            Some(json!({"acked_revision": 1_000_000})),
        )
        .await;
    assert_eq!(beat.status, StatusCode::CONFLICT, "{:?}", beat.body);
    assert_eq!(beat.body["field"], "acked_revision");
    held.changed_nothing().await;
}

/// A negative acknowledged revision: 400.
async fn a_negative_acknowledged_revision_is_refused(b: Backend) {
    let held = Held::new(b).await;
    let beat = held
        .app
        .call(
            Method::POST,
            &format!("/workers/{}/heartbeat", held.worker),
            Some(&held.token),
            Some(json!({"acked_revision": -1})),
        )
        .await;
    assert_eq!(beat.status, StatusCode::BAD_REQUEST);
    held.changed_nothing().await;
}

/// A registration with an unknown frontend mode, or a bad URL and port
/// range: 400.
async fn bad_registrations_are_refused(b: Backend) {
    let held = Held::new(b).await;
    let reg = held
        .app
        .call(Method::POST, "/workers/register", Some(BOOTSTRAP), Some(json!({"name": "x", "api_url": "http://x", "frontend": {"mode": 0, "host": "h", "port_range": [1, 2]}})))
        .await;
    assert_eq!(reg.status, StatusCode::BAD_REQUEST, "{:?}", reg.body);
    let reg = held
        .app
        .call(Method::POST, "/workers/register", Some(BOOTSTRAP), Some(json!({"name": "x", "api_url": "nope", "frontend": {"mode": "port", "host": "h", "port_range": [2, 1]}})))
        .await;
    assert_eq!(reg.status, StatusCode::BAD_REQUEST);
    assert_eq!(reg.problem(), "invalid-request");
    held.changed_nothing().await;
}

/// Another replica's creates (`POST /internal/creates`): one that is not
/// valid refuses the batch, naming its place, and none of it is created; so
/// does a batch of more than 64.
async fn a_batch_of_creates_with_one_bad_create_is_refused_whole(b: Backend) {
    let held = Held::new(b).await;
    let good = json!({"id": Uuid::new_v4(), "spec": route(Uuid::new_v4(), "a")});
    let mut expired = route(Uuid::new_v4(), "b");
    expired["expires_at"] = json!("2001-01-01T00:00:00Z");
    let bad = json!({"id": Uuid::new_v4(), "spec": expired});
    let body = serde_json::to_vec(&json!([good, bad])).unwrap();
    let a = held
        .refuses(
            Method::POST,
            "/internal/creates",
            JSON,
            body,
            400,
            "invalid-request",
        )
        .await;
    assert_eq!(a.body["field"], "[1].spec.expires_at", "{:?}", a.body);
    let many: Vec<Value> = (0..65)
        .map(|_| json!({"id": Uuid::new_v4(), "spec": route(Uuid::new_v4(), "c")}))
        .collect();
    let body = serde_json::to_vec(&many).unwrap();
    held.refuses(
        Method::POST,
        "/internal/creates",
        JSON,
        body,
        400,
        "invalid-request",
    )
    .await;
    held.changed_nothing().await;
}
