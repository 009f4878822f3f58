//! The OpenAPI document (`/openapi.json`, generated from the router and the
//! types): what it lists, and that every operation it lists is served.

use reqwest::{Method, StatusCode};
use uuid::Uuid;

use crate::common::{Backend, TestApp, route};
use crate::on_both_backends;

on_both_backends!(
    the_openapi_document_lists_the_api,
    every_documented_operation_is_served,
);

async fn the_openapi_document_lists_the_api(b: Backend) {
    let app = TestApp::start(b).await;
    let doc = app
        .call(Method::GET, "/openapi.json", None, None)
        .await
        .body;
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, method) in [
        ("/workers/register", "post"),
        ("/workers/{id}/heartbeat", "post"),
        ("/routes", "post"),
        ("/routes/{id}", "put"),
        ("/routes/{id}", "patch"),
        ("/sessions/{session_id}", "delete"),
        ("/lookup", "get"),
        ("/workers/{id}/watch", "get"),
        ("/routes/watch", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} undocumented"
        );
    }
    assert!(doc["components"]["schemas"]["Route"].is_object());
}

async fn every_documented_operation_is_served(b: Backend) {
    let app = TestApp::start(b).await;
    app.register("w", [20000, 20100]).await;
    app.create(route(Uuid::new_v4(), "jupyter")).await;
    let doc = app
        .call(Method::GET, "/openapi.json", None, None)
        .await
        .body;
    // Every documented operation is served: without a token, one that takes
    // none answers, and one that takes one asks for it (not the fallback's
    // 404 or 405).
    let mut operations = 0;
    let parameter = regex::Regex::new(r"\{[a-z_]+\}").unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let url = parameter
                .replace_all(path, Uuid::new_v4().to_string().as_str())
                .into_owned();
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let answer = app.call(method.clone(), &url, None, None).await;
            // Backend.AI's paths are documented always, served in its mode only.
            let backendai = path == "/status"
                || path == "/health"
                || ["/health/", "/v1/", "/v2/", "/api/"]
                    .iter()
                    .any(|p| path.starts_with(p));
            if backendai {
                assert_eq!(answer.status, StatusCode::NOT_FOUND, "{method} {path}");
                assert_eq!(
                    answer.body["type"], "https://api.backend.ai/probs/url-not-found",
                    "{method} {path}"
                );
                continue;
            }
            let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
            let expected = if secured {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::OK
            };
            assert_eq!(
                answer.status, expected,
                "{method} {path}: {:?}",
                answer.body
            );
            operations += 1;
        }
    }
    assert_eq!(operations, 21);
}
