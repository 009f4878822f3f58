//! Who may do what, over HTTP against the real router on both backends:
//! the kinds of token on every endpoint, worker registration (and why a
//! leaked bootstrap token cannot take over a live worker), what a flood
//! of made-up worker tokens costs, and the status page's viewer token and
//! session cookie (`ui_*`).

mod common;

/// The status page: the viewer token and the session cookie.
#[path = "auth/ui.rs"]
mod ui;

use common::{BOOTSTRAP, Backend, MANAGER, TestApp, route};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

on_both_backends!(
    registration_is_idempotent_by_name,
    the_bootstrap_token_cannot_take_over_a_live_worker,
    auth_matrix,
    worker_tokens_are_read_from_the_database_at_most_once_per_ttl,
    refused_tokens_are_limited_per_address,
    made_up_methods_are_one_metric_label,
);

async fn registration_is_idempotent_by_name(b: Backend) {
    let app = TestApp::start(b).await;
    let (id, first_token, body) = app.register("worker-1", [10205, 10300]).await;
    assert_eq!(body["worker"]["status"], "Ready");
    assert_eq!(body["routes"], json!([]));
    let r = app.create(route(Uuid::new_v4(), "jupyter")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let registration = json!({
        "name": "worker-1",
        "api_url": "http://127.0.0.1:10201",
        "frontend": {"mode": "port", "host": "proxy.test", "port_range": [10205, 10300]}
    });

    // The worker registers again under the same name, with its own token.
    let again = app
        .call(
            Method::POST,
            "/workers/register",
            Some(&first_token),
            Some(registration.clone()),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert_eq!(again.body["worker"]["id"], id.to_string());
    assert_eq!(again.body["routes"].as_array().unwrap().len(), 1);
    assert_eq!(again.body["routes"][0]["id"], r.body["id"]);
    assert!(again.body["revision"].as_i64().unwrap() >= r.body["revision"].as_i64().unwrap());

    // The old token was replaced; the new one works.
    let new_token = again.body["token"].as_str().unwrap();
    let beat = json!({"acked_revision": 0});
    let old = app
        .call(
            Method::POST,
            &format!("/workers/{id}/heartbeat"),
            Some(&first_token),
            Some(beat.clone()),
        )
        .await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    let new = app
        .call(
            Method::POST,
            &format!("/workers/{id}/heartbeat"),
            Some(new_token),
            Some(beat),
        )
        .await;
    assert_eq!(new.status, StatusCode::OK);

    let list = app.manager(Method::GET, "/workers", None).await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(list.body["items"][0]["route_count"], 1);
}

/// A leaked bootstrap token is not enough to impersonate a live worker: a
/// registration of its name with the bootstrap token is refused, reveals none
/// of its routes, changes nothing and leaves its token working; another
/// worker's token registers no other name; once the worker is Lost, the
/// bootstrap token brings a restarted worker back with its routes.
async fn the_bootstrap_token_cannot_take_over_a_live_worker(b: Backend) {
    let app = TestApp::start(b).await;
    let (id, token, _) = app.register("victim", [10205, 10300]).await;
    let (_, other_token, _) = app.register("other", [10400, 10500]).await;
    let mut secret_route = route(Uuid::new_v4(), "jupyter");
    secret_route["worker_id"] = json!(id);
    secret_route["envs"] = json!({"JUPYTER_TOKEN": "s3cret-env"});
    assert_eq!(app.create(secret_route).await.status, StatusCode::CREATED);
    let revision = app.revision().await;
    let hijack = json!({
        "name": "victim",
        "api_url": "http://attacker.example:10201",
        "frontend": {"mode": "port", "host": "attacker.example", "port_range": [10205, 10300]}
    });

    let refused = app
        .call(
            Method::POST,
            "/workers/register",
            Some(BOOTSTRAP),
            Some(hijack.clone()),
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{:?}", refused.body);
    assert!(
        !refused.body.to_string().contains("s3cret-env"),
        "{:?}",
        refused.body
    );
    assert!(
        refused.body["detail"].as_str().unwrap().contains("Lost"),
        "{:?}",
        refused.body
    );
    let by_other = app
        .call(
            Method::POST,
            "/workers/register",
            Some(&other_token),
            Some(hijack.clone()),
        )
        .await;
    assert_eq!(
        by_other.status,
        StatusCode::FORBIDDEN,
        "{:?}",
        by_other.body
    );
    let by_manager = app
        .call(
            Method::POST,
            "/workers/register",
            Some(MANAGER),
            Some(hijack.clone()),
        )
        .await;
    assert_eq!(by_manager.status, StatusCode::FORBIDDEN);

    // Nothing changed: the worker keeps its address and its token.
    assert_eq!(app.revision().await, revision);
    let w = app
        .manager(Method::GET, &format!("/workers/{id}"), None)
        .await;
    assert_eq!(w.body["api_url"], "http://127.0.0.1:10201");
    let beat = app
        .call(
            Method::POST,
            &format!("/workers/{id}/heartbeat"),
            Some(&token),
            Some(json!({"acked_revision": 0})),
        )
        .await;
    assert_eq!(beat.status, StatusCode::OK);

    // The same pod may register again (a restarted container).
    let (pod_id, _, _) = app
        .register_with(json!({
            "name": "in-pod", "api_url": "http://10.0.0.9:10201",
            "frontend": {"mode": "port", "host": "h", "port_range": [11000, 11100]},
            "pod": {"namespace": "ns", "name": "in-pod-0", "uid": "uid-1"}
        }))
        .await;
    let (same, _, _) = app
        .register_with(json!({
            "name": "in-pod", "api_url": "http://10.0.0.9:10201",
            "frontend": {"mode": "port", "host": "h", "port_range": [11000, 11100]},
            "pod": {"namespace": "ns", "name": "in-pod-0", "uid": "uid-1"}
        }))
        .await;
    assert_eq!(same, pod_id);

    // Once the worker is Lost, the bootstrap token brings it back, routes and all.
    app.store
        .set_worker_status(
            id,
            appproxy_coordinator::domain::WorkerStatus::Lost,
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    let back = app
        .call(
            Method::POST,
            "/workers/register",
            Some(BOOTSTRAP),
            Some(hijack),
        )
        .await;
    assert_eq!(back.status, StatusCode::OK, "{:?}", back.body);
    assert_eq!(back.body["worker"]["id"], id.to_string());
    assert_eq!(back.body["routes"].as_array().unwrap().len(), 1);
}

async fn auth_matrix(b: Backend) {
    let app = TestApp::start(b).await;
    let (me, my_token, _) = app.register("me", [20000, 20100]).await;
    let (other, other_token, _) = app.register("other", [20000, 20100]).await;
    let created = app.create(route(Uuid::new_v4(), "jupyter")).await;
    let route_id = created.body["id"].as_str().unwrap().to_owned();
    let session = created.body["session_id"].as_str().unwrap().to_owned();
    let registration = json!({"name": "late", "api_url": "http://127.0.0.1:1", "frontend": {"mode": "port", "host": "h", "port_range": [1000, 1001]}});

    // (method, path, body, [none, bogus, manager, bootstrap, own worker, other worker])
    let u = 401;
    let f = 403;
    let cases: Vec<(Method, String, Option<Value>, [u16; 6])> = vec![
        (
            Method::POST,
            "/workers/register".into(),
            Some(registration),
            [u, u, f, 201, f, f],
        ),
        (Method::GET, "/workers".into(), None, [u, u, 200, f, f, f]),
        (
            Method::GET,
            format!("/workers/{me}"),
            None,
            [u, u, 200, f, 200, f],
        ),
        (
            Method::POST,
            format!("/workers/{me}/heartbeat"),
            Some(json!({"acked_revision": 0})),
            [u, u, f, f, 200, f],
        ),
        (Method::GET, "/routes".into(), None, [u, u, 200, f, f, f]),
        (
            Method::POST,
            "/routes".into(),
            Some(route(Uuid::new_v4(), "x")),
            [u, u, 201, f, f, f],
        ),
        (
            Method::GET,
            format!("/routes/{route_id}"),
            None,
            [u, u, 200, f, f, f],
        ),
        (
            Method::PATCH,
            format!("/routes/{route_id}"),
            Some(json!({"labels": {}})),
            [u, u, 200, f, f, f],
        ),
        (
            Method::GET,
            format!("/sessions/{session}/routes"),
            None,
            [u, u, 200, f, f, f],
        ),
        (
            Method::GET,
            format!("/lookup?worker_id={me}&port=20000"),
            None,
            [u, u, 200, f, 200, f],
        ),
        (
            Method::DELETE,
            format!("/sessions/{}", Uuid::new_v4()),
            None,
            [u, u, 200, f, f, f],
        ),
        (
            // Another replica's creates, sent on to the leader.
            Method::POST,
            "/internal/creates".into(),
            Some(json!([{"id": Uuid::new_v4(), "spec": route(Uuid::new_v4(), "x")}])),
            [u, u, 200, f, f, f],
        ),
        (
            Method::DELETE,
            format!("/workers/{other}"),
            None,
            // Once the manager has deleted it, the other worker's token is void too.
            [u, u, 200, f, f, u],
        ),
    ];
    for (method, path, body, expected) in cases {
        let tokens = [
            None,
            Some("bogus"),
            Some(MANAGER),
            Some(BOOTSTRAP),
            Some(my_token.as_str()),
            Some(other_token.as_str()),
        ];
        for (token, want) in tokens.iter().zip(expected) {
            let a = app.call(method.clone(), &path, *token, body.clone()).await;
            assert_eq!(
                a.status.as_u16(),
                want,
                "{method} {path} with {token:?}: {:?}",
                a.body
            );
            if want == 401 {
                assert_eq!(a.problem(), "unauthorized");
            } else if want == 403 {
                assert_eq!(a.problem(), "forbidden");
            }
        }
    }
    // Only the manager's token makes another replica's creates: no other
    // credential creates anything there.
    let id = Uuid::new_v4();
    let item = json!([{"id": id, "spec": route(Uuid::new_v4(), "y")}]);
    for token in [
        None,
        Some("bogus"),
        Some(BOOTSTRAP),
        Some(my_token.as_str()),
        Some(common::VIEWER),
    ] {
        let a = app
            .call(Method::POST, "/internal/creates", token, Some(item.clone()))
            .await;
        assert!(
            a.status == 401 || a.status == 403,
            "{token:?}: {:?}",
            a.body
        );
    }
    let route_now = app
        .manager(Method::GET, &format!("/routes/{id}"), None)
        .await;
    assert_eq!(route_now.status, StatusCode::NOT_FOUND);
    // Probes and metrics need no token.
    for path in ["/livez", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(
            app.call(Method::GET, path, None, None).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
}

/// Requests with per-worker tokens, valid or made up, read the token from the
/// database at most once per id and cache period, so a flood of bad tokens
/// does not turn into a flood of queries.
async fn worker_tokens_are_read_from_the_database_at_most_once_per_ttl(b: Backend) {
    use appproxy_coordinator::store::TOKEN_CACHE_TTL;
    let app = TestApp::start(b).await;
    let (id, token, _) = app.register("w", [20000, 20100]).await;
    let reads = || app.store.token_reads().get();
    let started = std::time::Instant::now();
    let before = reads();
    let path = format!("/workers/{id}/heartbeat");
    let beats = (0..30).map(|_| {
        app.call(
            Method::POST,
            &path,
            Some(&token),
            Some(json!({"acked_revision": 0})),
        )
    });
    for beat in futures::future::join_all(beats).await {
        assert_eq!(beat.status, StatusCode::OK);
    }
    let made_up = format!("apw.{}.not-a-real-secret", Uuid::new_v4().simple());
    let floods = (0..60).map(|_| app.call(Method::GET, "/workers/x", Some(&made_up), None));
    // Refused, and past the failure limit answered 429 without a lookup.
    for answer in futures::future::join_all(floods).await {
        assert!(
            [StatusCode::UNAUTHORIZED, StatusCode::TOO_MANY_REQUESTS].contains(&answer.status),
            "{:?}",
            answer.status
        );
    }
    // One read per id (the valid one was cached at registration) per period.
    let periods = 1 + (started.elapsed().as_secs_f64() / TOKEN_CACHE_TTL.as_secs_f64()) as u64;
    let read = reads() - before;
    assert!(
        read >= 1 && read <= 2 * periods,
        "{read} reads in {periods} cache period(s)"
    );
}

/// A client whose requests come from `source` (any address of 127/8 is
/// this host's loopback).
fn client_from(source: &str) -> reqwest::Client {
    appproxy_coordinator::install_crypto_provider();
    reqwest::Client::builder()
        .local_address(source.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// 30 refused tokens from one address (the default burst), then 429 with
/// `Retry-After` for that address only, until the clock says it may try
/// again; right tokens cost nothing, and no token at all is no attempt.
async fn refused_tokens_are_limited_per_address(b: Backend) {
    let app = TestApp::builder(b)
        .clock(common::manual_clock())
        .start()
        .await;
    let (attacker, manager) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    let workers = |client: &reqwest::Client, token: Option<&str>| {
        let mut request = client.get(format!("{}/workers", app.url));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request.send()
    };
    for _ in 0..100 {
        assert_eq!(
            workers(&manager, Some(MANAGER)).await.unwrap().status(),
            200
        );
        assert_eq!(workers(&attacker, None).await.unwrap().status(), 401);
    }
    for i in 0..30 {
        let r = workers(&attacker, Some(&format!("guess-{i:04}-0123456789")))
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "guess {i}");
    }
    let r = workers(&attacker, Some("guess-0030-0123456789"))
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "2");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["type"],
        "https://appproxy.backend.ai/problems/too-many-requests"
    );
    // The address's right token waits too; another address does not.
    assert_eq!(
        workers(&attacker, Some(MANAGER)).await.unwrap().status(),
        429
    );
    assert_eq!(
        workers(&manager, Some(MANAGER)).await.unwrap().status(),
        200
    );
    app.clock.advance(std::time::Duration::from_secs(2));
    assert_eq!(
        workers(&attacker, Some(MANAGER)).await.unwrap().status(),
        200
    );
    let metrics = app.call(Method::GET, "/metrics", None, None).await;
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.contains(r#"appproxy_auth_failures_total{api="native",outcome="refused"} 30"#),
        "{text}"
    );
    assert!(text.contains(r#"appproxy_auth_failures_total{api="native",outcome="limited"} 2"#));
}

/// Request metrics are labelled by route template and a bounded method:
/// methods a client makes up are all `other`, so no request adds series.
async fn made_up_methods_are_one_metric_label(b: Backend) {
    let app = TestApp::start(b).await;
    let series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("appproxy_http_"))
            .count()
    };
    let before = app.call(Method::GET, "/metrics", None, None).await;
    let before = series(before.body.as_str().unwrap());
    let sends = (0..2000).map(|i| {
        let method = Method::from_bytes(format!("M{i:05}X").as_bytes()).unwrap();
        app.http
            .request(method, format!("{}/routes/{i}", app.url))
            .send()
    });
    for r in futures::future::join_all(sends).await {
        assert!(r.unwrap().status().is_client_error());
    }
    let after = app.call(Method::GET, "/metrics", None, None).await;
    let text = after.body.as_str().unwrap();
    assert!(
        !text.contains("M00000X") && !text.contains("M01999X"),
        "{text}"
    );
    assert!(text.contains(r#"method="other""#), "{text}");
    // The methods added a handful of series (count, latency buckets), not 2000 × that.
    let added = series(text).saturating_sub(before);
    assert!(added < 40, "{added} series added by 2000 made-up methods");
}
