//! What operators read: the probes (readiness follows the database), the
//! Prometheus metrics, and the request id every answer carries.

use reqwest::{Method, StatusCode};
use uuid::Uuid;

use crate::common::{Backend, TestApp, route};
use crate::on_both_backends;

on_both_backends!(
    probes_answer_and_readiness_follows_the_database,
    metrics_count_routes_workers_requests_and_batches,
);

async fn probes_answer_and_readiness_follows_the_database(b: Backend) {
    let app = TestApp::start(b).await;
    app.register("w", [20000, 20100]).await;
    app.create(route(Uuid::new_v4(), "jupyter")).await;
    assert_eq!(
        app.call(Method::GET, "/livez", None, None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.call(Method::GET, "/readyz", None, None).await.status,
        StatusCode::OK
    );

    // readyz reflects the database.
    app.store.close().await;
    let down = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(down.problem(), "unavailable");
}

async fn metrics_count_routes_workers_requests_and_batches(b: Backend) {
    let app = TestApp::start(b).await;
    app.register("w", [20000, 20100]).await;
    app.create(route(Uuid::new_v4(), "jupyter")).await;
    let metrics = app.call(Method::GET, "/metrics", None, None).await.body;
    let text = metrics.as_str().unwrap();
    for line in [
        "appproxy_routes{status=\"Propagating\"} 1",
        "appproxy_routes{status=\"Active\"} 0",
        "appproxy_workers{status=\"Ready\"} 1",
        "appproxy_http_requests_total{method=\"POST\",path=\"/routes\",status=\"201\"} 1",
        // The one create was committed in a batch of one.
        "appproxy_create_batch_size_count 1",
        "appproxy_create_batch_size_bucket{le=\"1.0\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    assert!(text.contains("appproxy_http_request_duration_seconds_bucket"));
}

/// Every answer carries the request's id back: the client's own when it is
/// a sane value (also when sent as Backend.AI's `X-BackendAI-RequestID`), a
/// new UUID otherwise.
#[tokio::test]
async fn answers_carry_the_request_id() {
    let app = TestApp::start(Backend::Sqlite).await;
    let send = async |path: &str, headers: &[(&str, &str)]| {
        let mut req = app.http.get(format!("{}{path}", app.url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        let ids: Vec<String> = r
            .headers()
            .get_all("x-request-id")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 1, "exactly one X-Request-Id on {path}: {ids:?}");
        (r.status(), ids[0].clone())
    };
    let (status, id) = send("/livez", &[("X-Request-Id", "abc-123")]).await;
    assert_eq!((status, id.as_str()), (StatusCode::OK, "abc-123"));
    // Error answers too: an unknown path, a missing token.
    let (status, id) = send("/nowhere", &[("X-Request-Id", "abc-124")]).await;
    assert_eq!((status, id.as_str()), (StatusCode::NOT_FOUND, "abc-124"));
    let (status, id) = send("/routes", &[("X-Request-Id", "abc-125")]).await;
    assert_eq!((status, id.as_str()), (StatusCode::UNAUTHORIZED, "abc-125"));
    let (_, id) = send("/livez", &[("X-BackendAI-RequestID", "bai-7")]).await;
    assert_eq!(id, "bai-7");
    let (_, id) = send(
        "/livez",
        &[("X-Request-Id", "own"), ("X-BackendAI-RequestID", "bai-8")],
    )
    .await;
    assert_eq!(id, "own", "X-Request-Id wins over the alias");

    // Without an id, or with one that is no sane value, a new UUID each time.
    let (_, first) = send("/livez", &[]).await;
    let (_, second) = send("/livez", &[]).await;
    let too_long = "x".repeat(129);
    for bad in ["two words", too_long.as_str()] {
        let (status, id) = send("/livez", &[("X-Request-Id", bad)]).await;
        assert_eq!(status, StatusCode::OK);
        assert_ne!(id, bad);
        id.parse::<Uuid>()
            .unwrap_or_else(|e| panic!("{id} instead of {bad:?}: {e}"));
    }
    for id in [&first, &second] {
        id.parse::<Uuid>()
            .unwrap_or_else(|e| panic!("generated id {id}: {e}"));
    }
    assert_ne!(first, second);
    let longest = "y".repeat(128);
    let (_, id) = send("/livez", &[("X-Request-Id", longest.as_str())]).await;
    assert_eq!(id, longest, "128 characters are taken");
}
