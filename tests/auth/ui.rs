//! The status page (`/ui`), as an attacker would try it: the viewer token
//! against every endpoint that changes something, the session cookie where
//! the API expects a token, forged and expired cookies, a login from another
//! site, tokens in the URL, and the page turned off.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{self, BOOTSTRAP, Backend, MANAGER, TestApp, VIEWER, route};
use crate::on_both_backends;

on_both_backends!(
    the_viewer_token_changes_nothing_anywhere,
    the_page_needs_a_session_or_a_page_token,
    a_session_is_opened_only_by_a_page_token_from_this_site,
    a_forged_or_expired_session_opens_nothing,
    the_page_can_be_turned_off,
);

/// `POST /ui/login` with the form field `token`, from `origin` if given.
async fn login(app: &TestApp, token: &str, origin: Option<&str>) -> reqwest::Response {
    let mut request = app
        .http
        .post(format!("{}/ui/login", app.url))
        .header("content-type", "application/x-www-form-urlencoded")
        // Every token here is URL-safe as it is.
        .body(format!("token={token}"));
    if let Some(o) = origin {
        request = request.header("origin", o);
    }
    request.send().await.unwrap()
}

/// The `appproxy_ui=<value>` pair a login answer sets.
fn session_cookie(r: &reqwest::Response) -> String {
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    set.split(';').next().unwrap().to_owned()
}

async fn get(app: &TestApp, path: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut request = app.http.get(format!("{}{path}", app.url));
    if let Some(c) = cookie {
        request = request.header("cookie", c);
    }
    request.send().await.unwrap()
}

/// Everything a manager, a worker or the Backend.AI API can change, tried
/// with the viewer token (as a bearer token, as a Backend.AI token, and
/// its session cookie instead of a token): all refused, nothing changed.
async fn the_viewer_token_changes_nothing_anywhere(b: Backend) {
    let app = TestApp::builder(b)
        .backendai(common::backendai_settings())
        .auth_failures_per_minute(0)
        .start()
        .await;
    let (me, _, _) = app.register("me", [20000, 20100]).await;
    let created = app.create(route(Uuid::new_v4(), "jupyter")).await;
    let route_id = created.body["id"].as_str().unwrap().to_owned();
    let session = created.body["session_id"].as_str().unwrap().to_owned();
    let registration = json!({"name": "late", "api_url": "http://127.0.0.1:1", "frontend": {"mode": "port", "host": "h", "port_range": [1000, 1001]}});
    let before = app.revision().await;
    let native: Vec<(Method, String, Option<Value>)> = vec![
        (Method::POST, "/workers/register".into(), Some(registration)),
        (Method::GET, "/workers".into(), None),
        (Method::GET, format!("/workers/{me}"), None),
        (
            Method::POST,
            format!("/workers/{me}/heartbeat"),
            Some(json!({"acked_revision": 0})),
        ),
        (Method::GET, format!("/workers/{me}/watch"), None),
        (Method::GET, "/routes".into(), None),
        (Method::GET, "/routes/watch".into(), None),
        (
            Method::POST,
            "/routes".into(),
            Some(route(Uuid::new_v4(), "x")),
        ),
        (
            Method::PUT,
            format!("/routes/{route_id}"),
            Some(route(Uuid::new_v4(), "y")),
        ),
        (
            Method::PATCH,
            format!("/routes/{route_id}"),
            Some(json!({"labels": {"a": "b"}})),
        ),
        (Method::DELETE, format!("/routes/{route_id}"), None),
        (Method::GET, format!("/sessions/{session}/routes"), None),
        (Method::DELETE, format!("/sessions/{session}"), None),
        (
            Method::GET,
            format!("/lookup?worker_id={me}&port=20000"),
            None,
        ),
        (Method::DELETE, format!("/workers/{me}"), None),
    ];
    for (method, path, body) in &native {
        let a = app
            .call(method.clone(), path, Some(VIEWER), body.clone())
            .await;
        assert_eq!(
            a.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {:?}",
            a.body
        );
        assert_eq!(a.problem(), "forbidden");
    }
    // Its session cookie is no credential for the API.
    let cookie = session_cookie(&login(&app, VIEWER, None).await);
    for (method, path, body) in &native {
        let mut request = app
            .http
            .request(method.clone(), format!("{}{path}", app.url))
            .header("cookie", &cookie);
        if let Some(b) = body {
            request = request.json(b);
        }
        let status = request.send().await.unwrap().status();
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{method} {path} with the cookie"
        );
    }
    // Nor for Backend.AI's API, as its token or a bearer token.
    let endpoint = json!({"service_name": "x", "tags": {}, "apps": {}, "open_to_public": false,
        "port": 8000, "runtime_variant": "custom", "existing_url": null});
    let backendai: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::POST,
            format!("/v2/endpoints/{}", Uuid::new_v4()),
            Some(endpoint),
        ),
        (
            Method::DELETE,
            format!("/v2/endpoints/{}", Uuid::new_v4()),
            None,
        ),
        (Method::GET, "/api/worker".into(), None),
        (Method::PUT, "/api/worker".into(), Some(json!({}))),
        (Method::GET, format!("/api/worker/{me}/circuits"), None),
    ];
    for (method, path, body) in &backendai {
        for (name, value) in [
            ("x-backendai-token", VIEWER.to_owned()),
            ("authorization", format!("Bearer {VIEWER}")),
            ("cookie", cookie.clone()),
        ] {
            let mut request = app
                .http
                .request(method.clone(), format!("{}{path}", app.url))
                .header(name, &value);
            if let Some(b) = body {
                request = request.json(b);
            }
            let status = request.send().await.unwrap().status();
            assert!(
                status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN,
                "{method} {path} with {name}: {status}"
            );
        }
    }
    assert_eq!(app.revision().await, before, "nothing was written");
    let still = app
        .manager(Method::GET, &format!("/routes/{route_id}"), None)
        .await;
    assert_eq!(still.status, StatusCode::OK);
    assert_eq!(still.body["labels"], json!({}));
    let worker = app
        .manager(Method::GET, &format!("/workers/{me}"), None)
        .await;
    assert_eq!(worker.body["status"], "Ready");
    // The page's own paths change nothing either: only GETs and the cookie.
    let state = app.call(Method::GET, "/ui/state", Some(VIEWER), None).await;
    assert_eq!(state.status, StatusCode::OK);
    for (method, path) in [
        (Method::POST, "/ui/state"),
        (Method::DELETE, "/ui/state"),
        (Method::PUT, "/ui/events"),
        (Method::GET, "/ui/login"),
        (Method::DELETE, "/ui"),
    ] {
        let a = app.call(method.clone(), path, Some(VIEWER), None).await;
        assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
    }
    assert_eq!(app.revision().await, before);
}

/// The page itself loads for anyone (it is the login form), with a strict
/// policy; what it shows needs a session or the manager or viewer token.
async fn the_page_needs_a_session_or_a_page_token(b: Backend) {
    let app = TestApp::start(b).await;
    let (_, worker_token, _) = app.register("w1", [20000, 20100]).await;
    let page = get(&app, "/ui", None).await;
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let html = page.text().await.unwrap();
    assert!(
        html.contains("/ui/app.js") && !html.contains("<script>"),
        "no inline script"
    );
    for asset in ["/ui/app.js", "/ui/app.css"] {
        assert_eq!(
            get(&app, asset, None).await.status(),
            StatusCode::OK,
            "{asset}"
        );
    }
    let who: Value = get(&app, "/ui/session", None).await.json().await.unwrap();
    assert_eq!(who, json!({"session": null}));
    for path in ["/ui/state", "/ui/events"] {
        let a = app.call(Method::GET, path, None, None).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(a.problem(), "unauthorized");
        // Tokens that are not the page's, and a token in the URL, are refused.
        for token in [BOOTSTRAP, worker_token.as_str()] {
            let a = app.call(Method::GET, path, Some(token), None).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{path}");
        }
        for query in [
            format!("?token={MANAGER}"),
            format!("?access_token={VIEWER}"),
        ] {
            let a = app
                .call(Method::GET, &format!("{path}{query}"), None, None)
                .await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}{query}");
        }
        let a = app
            .call(Method::GET, path, Some("made-up-0123456789"), None)
            .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    for token in [MANAGER, VIEWER] {
        let state = app.call(Method::GET, "/ui/state", Some(token), None).await;
        assert_eq!(state.status, StatusCode::OK);
        assert_eq!(state.body["workers"][0]["name"], "w1");
        let events = app
            .http
            .get(format!("{}/ui/events", app.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(events.status(), StatusCode::OK);
        assert_eq!(events.headers()["content-type"], "text/event-stream");
    }
}

/// Only the manager or viewer token opens a session, only from this site,
/// and never from the URL; the cookie is HttpOnly, SameSite=Strict, scoped
/// to /ui and expiring; logging out drops it.
async fn a_session_is_opened_only_by_a_page_token_from_this_site(b: Backend) {
    let app = TestApp::builder(b)
        .auth_failures_per_minute(0)
        .start()
        .await;
    let (_, worker_token, _) = app.register("w1", [20000, 20100]).await;
    let ok = login(&app, VIEWER, Some(&app.url)).await;
    assert_eq!(ok.status(), StatusCode::NO_CONTENT);
    let set = ok.headers()["set-cookie"].to_str().unwrap().to_owned();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=43200"] {
        assert!(set.contains(part), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    assert!(!set.contains(VIEWER), "the cookie is not the token");
    let cookie = session_cookie(&ok);
    let who: Value = get(&app, "/ui/session", Some(&cookie))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(who, json!({"session": "viewer"}));
    let state = get(&app, "/ui/state", Some(&cookie)).await;
    assert_eq!(state.status(), StatusCode::OK);
    let manager = login(&app, MANAGER, None).await;
    assert_eq!(manager.status(), StatusCode::NO_CONTENT);
    let who: Value = get(&app, "/ui/session", Some(&session_cookie(&manager)))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(who, json!({"session": "manager"}));

    // Other tokens, wrong ones, and malformed bodies: no cookie.
    for (token, want) in [
        (BOOTSTRAP, StatusCode::FORBIDDEN),
        (worker_token.as_str(), StatusCode::FORBIDDEN),
        ("made-up-0123456789", StatusCode::UNAUTHORIZED),
        ("", StatusCode::BAD_REQUEST),
    ] {
        let r = login(&app, token, None).await;
        assert_eq!(r.status(), want, "{token:?}");
        assert!(r.headers().get("set-cookie").is_none());
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    // Another site posting the right token (a login CSRF) is refused.
    let r = login(&app, VIEWER, Some("https://evil.example")).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.headers().get("set-cookie").is_none());
    // The token in the URL, or as JSON, opens nothing.
    for r in [
        app.http
            .post(format!("{}/ui/login?token={VIEWER}", app.url))
            .send()
            .await
            .unwrap(),
        app.http
            .post(format!("{}/ui/login", app.url))
            .json(&json!({"token": VIEWER}))
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(r.headers().get("set-cookie").is_none());
    }
    // Logging out drops the cookie.
    let out = app
        .http
        .post(format!("{}/ui/logout", app.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::NO_CONTENT);
    let set = out.headers()["set-cookie"].to_str().unwrap();
    assert!(
        set.starts_with("appproxy_ui=;") && set.contains("Max-Age=0"),
        "{set}"
    );
}

/// A cookie changed in any way, signed for the other kind, or past its
/// twelve hours opens nothing, and counts as a refused credential.
async fn a_forged_or_expired_session_opens_nothing(b: Backend) {
    let app = TestApp::builder(b)
        .clock(common::manual_clock())
        .start()
        .await;
    let cookie = session_cookie(&login(&app, VIEWER, None).await);
    let value = cookie.strip_prefix("appproxy_ui=").unwrap().to_owned();
    let parts: Vec<&str> = value.split('.').collect();
    assert_eq!(parts.len(), 3, "{value}");
    let later: i64 = parts[1].parse::<i64>().unwrap() + 3600;
    let forged = [
        format!("m.{}.{}", parts[1], parts[2]),
        format!("v.{later}.{}", parts[2]),
        format!("v.{}.{}", parts[1], &parts[2][..parts[2].len() - 1]),
        format!("v.{}.AAAA{}", parts[1], &parts[2][4..]),
        "v.99999999999.x".to_owned(),
        "manager-test-token".to_owned(),
        MANAGER.to_owned(),
    ];
    for f in &forged {
        let c = format!("appproxy_ui={f}");
        assert_eq!(get(&app, "/ui/state", Some(&c)).await.status(), 401, "{f}");
        let who: Value = get(&app, "/ui/session", Some(&c))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(who, json!({"session": null}), "{f}");
    }
    assert_eq!(get(&app, "/ui/state", Some(&cookie)).await.status(), 200);
    app.clock.advance(Duration::from_secs(12 * 3600 - 1));
    assert_eq!(get(&app, "/ui/state", Some(&cookie)).await.status(), 200);
    app.clock.advance(Duration::from_secs(1));
    assert_eq!(
        get(&app, "/ui/state", Some(&cookie)).await.status(),
        401,
        "expired"
    );
    let metrics = app.call(Method::GET, "/metrics", None, None).await;
    let text = metrics.body.as_str().unwrap();
    let refused = 2 * forged.len() + 1;
    assert!(
        text.contains(&format!(
            r#"appproxy_auth_failures_total{{api="native",outcome="refused"}} {refused}"#
        )),
        "{text}"
    );
}

/// `--ui=false`: every path of the page is 404, whatever the credential.
async fn the_page_can_be_turned_off(b: Backend) {
    let app = TestApp::builder(b).ui(false).start().await;
    for path in appproxy_coordinator::api::ui::PATHS {
        for token in [None, Some(MANAGER), Some(VIEWER)] {
            let method = if path.ends_with("login") || path.ends_with("logout") {
                Method::POST
            } else {
                Method::GET
            };
            let a = app.call(method, path, token, None).await;
            assert_eq!(a.status, StatusCode::NOT_FOUND, "{path} {token:?}");
        }
    }
    let viewer = login(&app, VIEWER, None).await;
    assert_eq!(viewer.status(), StatusCode::NOT_FOUND);
}
