//! Bad input: every refusal is a problem+json answer with the right status,
//! problem type and a detail, and changes nothing.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{BOOTSTRAP, Backend, MANAGER, TestApp, route};
use crate::on_both_backends;

on_both_backends!(bad_input_is_rejected_and_changes_nothing);

async fn bad_input_is_rejected_and_changes_nothing(b: Backend) {
    let app = TestApp::start(b).await;
    let (worker, token, _) = app.register("w", [20000, 20100]).await;
    let existing = app.create(route(Uuid::new_v4(), "jupyter")).await;
    let id = existing.body["id"].as_str().unwrap().to_owned();
    let revision = app.revision().await;
    let snapshot = app.manager(Method::GET, "/routes", None).await.body;

    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = route(Uuid::new_v4(), "jupyter");
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let json_ct = Some("application/json");
    // (method, path, content type, body, status, problem type)
    type Case<'a> = (Method, String, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            b"{\"session_id\": ".to_vec(),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| v["colour"] = json!("red")),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| v["targets"][0]["port"] = json!(70000)),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| v["targets"][0]["port"] = json!(0)),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| v["frontend"] = json!({"port": 65536})),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| v["access"] = json!({"allowed_client_ips": ["10.0.0.0/40"]})),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| v["session_id"] = json!("not-a-uuid")),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| v["protocol"] = json!("ftp")),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| {
                v.as_object_mut().unwrap().remove("session_id");
            }),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| v["targets"] = json!([{"host": "10.0.0.1", "port": 80, "weight": 0}])),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| v["worker_id"] = json!(Uuid::new_v4())),
            404,
            "not-found",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| v["expires_at"] = json!("2001-01-01T00:00:00Z")),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            None,
            with(&|_| {}),
            415,
            "unsupported-media-type",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            vec![b' '; 70 * 1024],
            413,
            "payload-too-large",
        ),
        (
            Method::GET,
            "/routes/not-a-uuid".into(),
            None,
            vec![],
            400,
            "invalid-request",
        ),
        (
            Method::DELETE,
            "/routes/not-a-uuid".into(),
            None,
            vec![],
            400,
            "invalid-request",
        ),
        (
            Method::DELETE,
            "/sessions/123".into(),
            None,
            vec![],
            400,
            "invalid-request",
        ),
        (
            Method::GET,
            "/routes?limit=0".into(),
            None,
            vec![],
            400,
            "invalid-request",
        ),
        (
            Method::GET,
            "/routes?worker_id=x".into(),
            None,
            vec![],
            400,
            "invalid-request",
        ),
        (
            Method::PATCH,
            format!("/routes/{id}"),
            json_ct,
            br#"{"service": "renamed"}"#.to_vec(),
            400,
            "invalid-request",
        ),
        (
            Method::PATCH,
            format!("/routes/{id}"),
            json_ct,
            br#"{"targets": [{"host": "10.0.0.1", "port": 80, "weight": 0}]}"#.to_vec(),
            400,
            "invalid-request",
        ),
        (
            Method::PUT,
            format!("/routes/{id}"),
            json_ct,
            b"[]".to_vec(),
            400,
            "invalid-request",
        ),
        // serde alone would fill a struct from an array, field by field.
        (
            Method::PATCH,
            format!("/routes/{id}"),
            json_ct,
            b"[null, null]".to_vec(),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| v["health_check"] = json!(["/", 10, 5, 200])),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/routes".into(),
            json_ct,
            with(&|v| v["targets"][0]["port"] = json!(8888.5)),
            400,
            "invalid-request",
        ),
        (
            Method::POST,
            "/nowhere".into(),
            None,
            vec![],
            404,
            "not-found",
        ),
        (
            Method::PUT,
            "/routes".into(),
            json_ct,
            b"{}".to_vec(),
            405,
            "method-not-allowed",
        ),
    ];
    for (method, path, ct, body, status, slug) in cases {
        let a = app.raw(method.clone(), &path, MANAGER, ct, body).await;
        assert_eq!(a.status.as_u16(), status, "{method} {path}: {:?}", a.body);
        assert_eq!(a.problem(), slug, "{method} {path}");
        assert!(a.body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    let bad_field = app.create(json!({"session_id": Uuid::new_v4(), "service": "bad name", "targets": [{"host": "h", "port": 1}]})).await;
    assert_eq!(bad_field.body["field"], "service");

    // Worker-side bad input.
    let beat = app
        .call(
            Method::POST,
            &format!("/workers/{worker}/heartbeat"),
            Some(&token),
            Some(json!({"acked_revision": 1_000_000})),
        )
        .await;
    // Well formed, but not a revision this coordinator has issued yet.
    assert_eq!(beat.status, StatusCode::CONFLICT, "{:?}", beat.body);
    assert_eq!(beat.body["field"], "acked_revision");
    let beat = app
        .call(
            Method::POST,
            &format!("/workers/{worker}/heartbeat"),
            Some(&token),
            Some(json!({"acked_revision": -1})),
        )
        .await;
    assert_eq!(beat.status, StatusCode::BAD_REQUEST);
    let reg = app
        .call(Method::POST, "/workers/register", Some(BOOTSTRAP), Some(json!({"name": "x", "api_url": "http://x", "frontend": {"mode": 0, "host": "h", "port_range": [1, 2]}})))
        .await;
    assert_eq!(reg.status, StatusCode::BAD_REQUEST, "{:?}", reg.body);
    let reg = app
        .call(Method::POST, "/workers/register", Some(BOOTSTRAP), Some(json!({"name": "x", "api_url": "nope", "frontend": {"mode": "port", "host": "h", "port_range": [2, 1]}})))
        .await;
    assert_eq!(reg.status, StatusCode::BAD_REQUEST);
    assert_eq!(reg.problem(), "invalid-request");

    assert_eq!(
        app.revision().await,
        revision,
        "no bad request wrote anything"
    );
    assert_eq!(
        app.manager(Method::GET, "/routes", None).await.body,
        snapshot
    );
    assert_eq!(
        app.manager(Method::GET, "/workers", None).await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
