//! The Backend.AI mode tried as an attacker on an allowed network would try
//! it: who may change which circuit, what the api_secret reaches, how many
//! guesses an address gets, what a hostile body costs, how long conf tokens
//! live. Each test failed before its fix.

use std::net::IpAddr;
use std::time::Duration;

use appproxy_coordinator::backendai::jwt;
use appproxy_coordinator::store::Db;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{
    API_SECRET, BOOTSTRAP, Backend, PrivateRedis, TestApp, backendai_settings, manual_clock,
};
use crate::manager::{
    ack_everything, assert_error, conf, conf_body, manager, port_worker, proxy_auth_json, send,
};
use crate::on_both_backends;

on_both_backends!(
    another_users_conf_token_cannot_touch_an_open_app,
    the_same_user_may_update_its_app_in_place,
    a_redirect_must_be_a_path_on_the_workers_origin,
    the_native_bootstrap_token_never_takes_a_backendai_workers_name,
    the_api_secret_reaches_backendai_circuits_only,
    refused_secrets_are_limited_per_address,
    conf_tokens_keep_upstreams_sizes_and_expire,
    a_yaml_body_is_read_within_a_budget,
    manager_jwts_are_checked_as_pyjwt_checks_them,
);

/// The app's circuit (the route of `session`'s `app`) as the manager sees it.
async fn app_route(app: &TestApp, session: Uuid, service: &str) -> Value {
    let a = app
        .manager(
            Method::GET,
            &format!("/routes?session_id={session}&service={service}"),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    a.body["items"][0].clone()
}

/// A conf token for `session` of `user`, pointing at `host`.
async fn conf_at(app: &TestApp, session: Uuid, user: Uuid, host: &str) -> String {
    let mut body = conf_body(session, user, 6666);
    body["kernel_host"] = json!(host);
    let a = send(app, Method::POST, "/v2/conf", &[], Some(body)).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    a.body["token"].as_str().unwrap().to_owned()
}

async fn another_users_conf_token_cannot_touch_an_open_app(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let (session, victim) = (Uuid::new_v4(), Uuid::new_v4());
    let token = conf(&app, session, victim, 8888).await;
    let a = proxy_auth_json(&app, &token, session, "app=jupyter&protocol=http".into()).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    let before = app_route(&app, session, "jupyter").await;

    // A token-less conf from the allowed network names the victim's session,
    // another user and the attacker's host; every way of using it for the
    // open app is refused.
    let attacker = conf_at(&app, session, Uuid::new_v4(), "203.0.113.66").await;
    for query in [
        "app=jupyter&protocol=http",
        "app=jupyter&protocol=http&open_to_public=true",
        "app=jupyter&protocol=http&no_reuse=true&allowed_client_ips=0.0.0.0/0",
        // Another protocol would replace the circuit.
        "app=jupyter&protocol=tcp",
    ] {
        let a = proxy_auth_json(&app, &attacker, session, query.into()).await;
        assert_error(&a, StatusCode::FORBIDDEN, "generic-forbidden");
        assert!(
            a.body["redirect_url"].is_null(),
            "no setup token: {:?}",
            a.body
        );
    }
    let after = app_route(&app, session, "jupyter").await;
    assert_eq!(after, before, "the app's circuit is unchanged");
    assert_eq!(after["targets"][0]["host"], "10.0.0.9");
    assert_eq!(after["access"]["open_to_public"], false);
    assert_eq!(after["circuit"]["user_id"], json!(victim));
}

async fn the_same_user_may_update_its_app_in_place(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let (session, user) = (Uuid::new_v4(), Uuid::new_v4());
    let token = conf(&app, session, user, 8888).await;
    let a = proxy_auth_json(&app, &token, session, "app=jupyter&protocol=http".into()).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    let before = app_route(&app, session, "jupyter").await;
    // The kernel moved (the session was restarted): the user's new conf
    // token takes the app's circuit there, with the access it asks for.
    let moved = conf_at(&app, session, user, "10.0.0.10").await;
    let a = proxy_auth_json(
        &app,
        &moved,
        session,
        "app=jupyter&protocol=http&allowed_client_ips=10.0.0.0/8".into(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body["reuse"], false);
    let after = app_route(&app, session, "jupyter").await;
    assert_eq!(after["id"], before["id"]);
    assert_eq!(after["frontend"], before["frontend"], "the URL stays");
    assert_eq!(after["targets"][0]["host"], "10.0.0.10");
    assert_eq!(after["access"]["allowed_client_ips"], json!(["10.0.0.0/8"]));
    assert_eq!(after["circuit"]["user_id"], json!(user));
}

async fn a_redirect_must_be_a_path_on_the_workers_origin(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let (session, user) = (Uuid::new_v4(), Uuid::new_v4());
    let token = conf(&app, session, user, 8888).await;
    for redirect in [
        "https%3A%2F%2Fevil.example%2F",
        "%2F%2Fevil.example",
        "%2F%40evil.example",
        "%2F%5Cevil.example",
        "lab",
    ] {
        let a = proxy_auth_json(
            &app,
            &token,
            session,
            format!("app=jupyter&protocol=http&redirect={redirect}"),
        )
        .await;
        assert_error(&a, StatusCode::BAD_REQUEST, "invalid-api-params");
        assert_eq!(
            a.body["data"]["errors"][0]["loc"],
            json!(["query", "redirect"])
        );
    }
    assert_eq!(app.route_count().await, 0, "nothing was created");
    let a = proxy_auth_json(
        &app,
        &token,
        session,
        "app=jupyter&protocol=http&redirect=%2Flab%3Ftoken%3D1".into(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    let url = a.body["redirect_url"].as_str().unwrap();
    let setup = url.split("token=").nth(1).unwrap();
    let claims = jwt::decode(setup, crate::common::JWT_SECRET, 0).unwrap();
    assert_eq!(claims["redirect"], "/lab?token=1");
}

/// `PUT /api/worker` as the stock worker sends it.
fn registration(authority: &str) -> Value {
    json!({
        "authority": authority, "frontend_mode": "port", "protocol": "http",
        "hostname": "127.0.0.1", "tls_listen": false, "tls_advertised": false,
        "api_port": 10201, "port_range": [10205, 10210], "filtered_apps_only": false,
        "traefik_last_used_marker_path": null,
        "accepted_traffics": ["interactive", "inference"], "app_filters": []
    })
}

async fn the_native_bootstrap_token_never_takes_a_backendai_workers_name(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let a = manager(
        &app,
        Method::PUT,
        "/api/worker",
        Some(registration("bai-1")),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    let id = a.body["id"].as_str().unwrap().to_owned();
    let circuit = app
        .create(json!({"session_id": Uuid::new_v4(), "service": "jupyter",
            "targets": [{"host": "10.0.0.9", "port": 8888}], "worker_id": id,
            "circuit": {"user_id": Uuid::new_v4()}}))
        .await;
    assert_eq!(circuit.status, StatusCode::CREATED, "{:?}", circuit.body);
    // The stock worker deregisters at every shutdown: Lost until it returns.
    let a = manager(&app, Method::DELETE, &format!("/api/worker/{id}"), None).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    let worker = app.store.get_worker(id.parse().unwrap()).await.unwrap();
    assert_eq!(worker.status.as_str(), "Lost");

    let native = json!({"name": "bai-1", "api_url": "http://203.0.113.66:1",
        "frontend": {"mode": "port", "host": "203.0.113.66", "port_range": [10205, 10210]}});
    let a = app
        .call(
            Method::POST,
            "/workers/register",
            Some(BOOTSTRAP),
            Some(native),
        )
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{:?}", a.body);
    assert_eq!(a.problem(), "conflict");
    assert!(
        a.body["token"].is_null() && a.body["routes"].is_null(),
        "{:?}",
        a.body
    );
    assert!(
        a.body.to_string().find("10.0.0.9").is_none(),
        "no circuit revealed"
    );
    // The real worker comes back with its id and circuit.
    let a = manager(
        &app,
        Method::PUT,
        "/api/worker",
        Some(registration("bai-1")),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.body["id"].as_str(), Some(id.as_str()));
    let a = manager(
        &app,
        Method::GET,
        &format!("/api/worker/{id}/circuits"),
        None,
    )
    .await;
    assert_eq!(a.body["circuits"][0]["id"], circuit.body["id"]);
}

async fn the_api_secret_reaches_backendai_circuits_only(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let a = manager(
        &app,
        Method::PUT,
        "/api/worker",
        Some(registration("bai-1")),
    )
    .await;
    let worker = a.body["id"].as_str().unwrap().to_owned();
    let native = app
        .create(
            json!({"session_id": Uuid::new_v4(), "service": "secret-app",
            "targets": [{"host": "10.9.9.9", "port": 7777}], "envs": {"TOKEN": "hunter2"}}),
        )
        .await;
    assert_eq!(native.status, StatusCode::CREATED, "{:?}", native.body);
    let native = native.body["id"].as_str().unwrap().to_owned();
    let circuit = app
        .create(json!({"session_id": Uuid::new_v4(), "service": "jupyter",
            "targets": [{"host": "10.0.0.9", "port": 8888}], "worker_id": worker,
            "circuit": {"user_id": Uuid::new_v4()}}))
        .await;
    let circuit = circuit.body["id"].as_str().unwrap().to_owned();

    for (method, path) in [
        (Method::GET, format!("/api/circuit/{native}")),
        (Method::GET, format!("/api/circuit/{native}/statistics")),
        (Method::DELETE, format!("/api/circuit/{native}")),
        (Method::DELETE, format!("/v1/api/circuit/{native}")),
    ] {
        let a = manager(&app, method.clone(), &path, None).await;
        assert_error(&a, StatusCode::NOT_FOUND, "object-not-found");
        assert_eq!(
            a.body["title"], "E00002: No such circuit.",
            "{method} {path}"
        );
    }
    let a = manager(
        &app,
        Method::DELETE,
        "/api/circuit/_/bulk",
        Some(json!({"circuit_ids": [native, circuit]})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    // The native route is still there, with its secrets unread; the
    // Backend.AI circuit is gone.
    let kept = app
        .manager(Method::GET, &format!("/routes/{native}"), None)
        .await;
    assert_eq!(kept.status, StatusCode::OK);
    let gone = app
        .manager(Method::GET, &format!("/routes/{circuit}"), None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}

/// A client whose requests come from `source` (any address of 127/8 is
/// this host's loopback).
fn client_from(source: &str) -> reqwest::Client {
    appproxy_coordinator::install_crypto_provider();
    reqwest::Client::builder()
        .local_address(source.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn status_with(app: &TestApp, client: &reqwest::Client, token: &str) -> reqwest::Response {
    client
        .get(format!("{}/health/status", app.url))
        .header("x-backendai-token", token)
        .send()
        .await
        .unwrap()
}

async fn refused_secrets_are_limited_per_address(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let (attacker, manager_host, worker_host) = (
        client_from("127.0.0.2"),
        client_from("127.0.0.3"),
        client_from("127.0.0.4"),
    );
    // Right credentials cost nothing, however many.
    for _ in 0..100 {
        assert_eq!(
            status_with(&app, &worker_host, API_SECRET).await.status(),
            200
        );
    }
    // 30 refusals (the default burst) are answered 401; the 31st is 429,
    // and so is every credential from that address until the penalty ends,
    // the right one too: guessing gets no faster by being right.
    for i in 0..30 {
        let r = status_with(&app, &attacker, &format!("guess-{i}")).await;
        assert_eq!(r.status(), 401, "guess {i}");
    }
    let r = status_with(&app, &attacker, "guess-30").await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry, 2, "one failure more per 2 s");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["type"],
        "https://api.backend.ai/probs/too-many-requests"
    );
    assert_eq!(status_with(&app, &attacker, API_SECRET).await.status(), 429);
    // Other addresses are not affected, and the worker's earlier calls did
    // not use up its own allowance.
    assert_eq!(
        status_with(&app, &manager_host, API_SECRET).await.status(),
        200
    );
    for i in 0..30 {
        let r = status_with(&app, &worker_host, &format!("typo-{i}")).await;
        assert_eq!(r.status(), 401, "typo {i}");
    }
    // The penalty ends on the clock.
    app.clock.advance(Duration::from_secs(retry));
    assert_eq!(status_with(&app, &attacker, API_SECRET).await.status(), 200);
    let metrics = app.call(Method::GET, "/metrics", None, None).await;
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.contains(r#"appproxy_auth_failures_total{api="backendai",outcome="limited"} 2"#),
        "{text}"
    );
    assert!(text.contains(r#"appproxy_auth_failures_total{api="backendai",outcome="refused"} 60"#));
}

/// Rows in the conf-token table, read with SQL.
async fn conf_token_rows(app: &TestApp) -> i64 {
    const COUNT: &str = "SELECT COUNT(*) FROM backendai_conf_tokens";
    match app.store.db() {
        Db::Postgres(pool) => sqlx::query_scalar(COUNT).fetch_one(pool).await.unwrap(),
        Db::Sqlite(pool) => sqlx::query_scalar(COUNT).fetch_one(pool).await.unwrap(),
    }
}

async fn conf_tokens_keep_upstreams_sizes_and_expire(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    port_worker(&app, "worker-1").await;
    let _acks = ack_everything(&app);
    let (session, user) = (Uuid::new_v4(), Uuid::new_v4());
    let post = |field: &'static str, value: Value| {
        let mut body = conf_body(session, user, 8888);
        match field.split_once('.') {
            Some((outer, inner)) => body[outer][inner] = value,
            None => body[field] = value,
        }
        send(&app, Method::POST, "/v2/conf", &[], Some(body))
    };
    for (field, max) in [
        ("login_session_token", 127),
        ("kernel_host", 255),
        ("session.access_key", 255),
        ("session.domain_name", 255),
    ] {
        let a = post(field, json!("x".repeat(max + 1))).await;
        assert_error(&a, StatusCode::BAD_REQUEST, "invalid-api-params");
        let loc: Vec<&str> = field.split('.').collect();
        assert_eq!(a.body["data"]["errors"][0]["loc"], json!(loc));
        let a = post(field, json!("x".repeat(max))).await;
        assert_eq!(a.status, StatusCode::OK, "{field}: {:?}", a.body);
    }
    assert_eq!(conf_token_rows(&app).await, 4);

    // A token is usable for ten minutes (the default), then it is absent…
    let token = conf(&app, session, user, 8888).await;
    app.clock.advance(Duration::from_secs(601));
    let a = proxy_auth_json(&app, &token, session, "app=jupyter&protocol=http".into()).await;
    assert_error(&a, StatusCode::NOT_FOUND, "object-not-found");
    assert_eq!(a.body["title"], "E00002: No such token.");
    // …and the next conf deletes every expired row: the table holds at most
    // ten minutes of them.
    let fresh = conf(&app, session, user, 8888).await;
    assert_eq!(conf_token_rows(&app).await, 1);
    let a = proxy_auth_json(&app, &fresh, session, "app=jupyter&protocol=http".into()).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
}

/// A 9 KB YAML document whose aliases expand a billion times.
fn alias_bomb() -> String {
    let mut doc = String::from(
        "a0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for level in 1..10 {
        let prev = format!("*a{}", level - 1);
        doc.push_str(&format!(
            "a{level}: &a{level} [{}]\n",
            vec![prev; 9].join(",")
        ));
    }
    doc.push_str("kernel_host: *a9\n");
    doc
}

async fn a_yaml_body_is_read_within_a_budget(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let yaml = |body: String| {
        let app = &app;
        async move {
            appproxy_coordinator::install_crypto_provider();
            let r = reqwest::Client::new()
                .post(format!("{}/v2/conf", app.url))
                .header("content-type", "text/yaml")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = yaml(alias_bomb()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["msg"], "Malformed body");
    // Anchors and aliases within reason still read.
    let session = Uuid::new_v4();
    let ok = format!(
        "login_session_token: null\nkernel_host: &h 10.0.0.9\nkernel_port: 8888\n\
         session: {{id: {session}, user_uuid: {}, group_id: {}, access_key: *h, domain_name: default}}\n",
        Uuid::new_v4(),
        Uuid::new_v4()
    );
    let (status, body) = yaml(ok).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // From a network that needs the api_secret, nothing is read without it.
    let mut settings = backendai_settings();
    settings.conf_allowed_networks = Vec::new();
    let closed = TestApp::builder(b)
        .clock(manual_clock())
        .backendai(settings)
        .start()
        .await;
    appproxy_coordinator::install_crypto_provider();
    let r = reqwest::Client::new()
        .post(format!("{}/v2/conf", closed.url))
        .header("content-type", "text/yaml")
        .body(alias_bomb())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

async fn manager_jwts_are_checked_as_pyjwt_checks_them(b: Backend) {
    let app = TestApp::start_backendai(b).await;
    let now = app.clock.now().timestamp();
    let status = |claims: Value| {
        let token = jwt::encode(claims.as_object().unwrap(), API_SECRET);
        let app = &app;
        async move {
            let bearer = format!("Bearer {token}");
            send(
                app,
                Method::GET,
                "/health/status",
                &[("authorization", &bearer)],
                None,
            )
            .await
            .status
        }
    };
    assert_eq!(
        status(json!({"iat": now, "nbf": now})).await,
        StatusCode::OK
    );
    assert_eq!(
        status(json!({"nbf": now + 86_400})).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(json!({"iat": now + 60})).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(json!({"iat": "yesterday"})).await,
        StatusCode::UNAUTHORIZED
    );
}

/// `/health` shares one Redis connection and one check among its callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_share_one_redis_connection() {
    let redis = PrivateRedis::start();
    let mut settings = backendai_settings();
    settings.redis_url = redis.url();
    let app = TestApp::builder(Backend::Sqlite)
        .clock(manual_clock())
        .backendai(settings)
        .start()
        .await;
    let before = redis.connections_received();
    for _ in 0..200 {
        let a = app.call(Method::GET, "/health", None, None).await;
        assert_eq!(a.body["status"], "ok", "{:?}", a.body);
    }
    let concurrent = (0..300).map(|_| app.call(Method::GET, "/health/readyz", None, None));
    for a in futures::future::join_all(concurrent).await {
        assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    }
    let opened = redis.connections_received() - before;
    assert!(opened <= 1, "{opened} connections for 500 health checks");
    drop(redis);
}
