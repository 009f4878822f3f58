//! A session's routes listed and deleted together, and `/lookup` from a
//! worker's port or subdomain to its route.

use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

use crate::common::{Backend, MANAGER, TestApp, route};
use crate::on_both_backends;

on_both_backends!(
    sessions_are_listed_and_deleted_together,
    lookup_resolves_ports_and_subdomains,
);

async fn sessions_are_listed_and_deleted_together(b: Backend) {
    let app = TestApp::start(b).await;
    app.register("w", [20000, 20100]).await;
    let session = Uuid::new_v4();
    let other = Uuid::new_v4();
    for service in ["jupyter", "ssh", "tensorboard"] {
        assert_eq!(
            app.create(route(session, service)).await.status,
            StatusCode::CREATED
        );
    }
    assert_eq!(
        app.create(route(other, "jupyter")).await.status,
        StatusCode::CREATED
    );

    let listed = app
        .manager(Method::GET, &format!("/sessions/{session}/routes"), None)
        .await;
    let services: HashSet<&str> = listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["service"].as_str().unwrap())
        .collect();
    assert_eq!(services, HashSet::from(["jupyter", "ssh", "tensorboard"]));

    let before = app.revision().await;
    let deleted = app
        .manager(Method::DELETE, &format!("/sessions/{session}"), None)
        .await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(deleted.body, json!({"deleted": 3}));
    assert_eq!(
        app.revision().await,
        before + 3,
        "one revision per removed route"
    );
    let again = app
        .manager(Method::DELETE, &format!("/sessions/{session}"), None)
        .await;
    assert_eq!(again.body, json!({"deleted": 0}));
    assert_eq!(app.route_count().await, 1);
    let empty = app
        .manager(Method::GET, &format!("/sessions/{session}/routes"), None)
        .await;
    assert_eq!(empty.body, json!({"items": []}));
}

async fn lookup_resolves_ports_and_subdomains(b: Backend) {
    let app = TestApp::start(b).await;
    let (pw, ptoken, _) = app.register("ports", [20000, 20100]).await;
    let (ww, wtoken, _) = app
        .register_with(json!({
            "name": "wild",
            "api_url": "https://10.0.0.6:10201",
            "frontend": {"mode": "wildcard", "domain": "apps.example.com", "port": 443, "tls": true}
        }))
        .await;
    let mut by_port = route(Uuid::new_v4(), "jupyter");
    by_port["worker_id"] = json!(pw);
    let by_port = app.create(by_port).await;
    let session = Uuid::new_v4();
    let mut by_sub = route(session, "jupyter");
    by_sub["worker_id"] = json!(ww);
    by_sub["frontend"] = json!({"subdomain": "My Notebook"});
    let by_sub = app.create(by_sub).await;
    assert_eq!(by_sub.status, StatusCode::CREATED, "{:?}", by_sub.body);
    assert_eq!(by_sub.body["frontend"]["subdomain"], "my-notebook");
    assert_eq!(
        by_sub.body["frontend"]["url"],
        "https://my-notebook.apps.example.com"
    );
    // The same subdomain asked again gets a suffix.
    let mut clash = route(Uuid::new_v4(), "jupyter");
    clash["frontend"] = json!({"subdomain": "my-notebook"});
    clash["worker_id"] = json!(ww);
    let clash = app.create(clash).await;
    assert_eq!(clash.body["frontend"]["subdomain"], "my-notebook-2");

    let port = by_port.body["frontend"]["port"].as_u64().unwrap();
    let found = app
        .call(
            Method::GET,
            &format!("/lookup?worker_id={pw}&port={port}"),
            Some(&ptoken),
            None,
        )
        .await;
    assert_eq!(found.status, StatusCode::OK);
    assert_eq!(found.body["id"], by_port.body["id"]);
    let found = app
        .call(
            Method::GET,
            &format!("/lookup?worker_id={ww}&subdomain=my-notebook"),
            Some(MANAGER),
            None,
        )
        .await;
    assert_eq!(found.body["id"], by_sub.body["id"]);
    let missing = app
        .call(
            Method::GET,
            &format!("/lookup?worker_id={pw}&port=20099"),
            Some(&ptoken),
            None,
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let foreign = app
        .call(
            Method::GET,
            &format!("/lookup?worker_id={pw}&port={port}"),
            Some(&wtoken),
            None,
        )
        .await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN);
    let both = app
        .manager(
            Method::GET,
            &format!("/lookup?worker_id={pw}&port=1&subdomain=x"),
            None,
        )
        .await;
    assert_eq!(both.status, StatusCode::BAD_REQUEST);
}
