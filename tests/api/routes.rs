//! A route's life through the manager's API: create, read, PATCH, PUT (an
//! idempotent upsert), delete, listing with filters and pages, and the
//! change-log row each write leaves.

use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

use crate::common::{Backend, TestApp, route};
use crate::on_both_backends;

on_both_backends!(
    route_lifecycle,
    put_is_an_idempotent_upsert,
    a_route_may_wait_for_its_targets,
    listing_is_filtered_and_paginated,
    every_mutation_is_in_the_change_log,
);

async fn route_lifecycle(b: Backend) {
    let app = TestApp::start(b).await;
    let (worker, _, _) = app.register("w", [20000, 20010]).await;
    let session = Uuid::new_v4();
    let mut body = route(session, "jupyter");
    body["access"] = json!({"allowed_client_ips": ["10.0.0.0/8"]});
    body["labels"] = json!({"user_id": "u1"});
    let created = app.create(body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let r = &created.body;
    assert_eq!(r["worker_id"], worker.to_string());
    assert_eq!(r["frontend"]["mode"], "port");
    assert_eq!(r["frontend"]["port"], 20000);
    assert_eq!(r["frontend"]["url"], "http://proxy.test:20000");
    assert_eq!(r["status"], "Propagating");
    assert_eq!(r["access"]["allowed_client_ips"], json!(["10.0.0.0/8"]));
    let id = r["id"].as_str().unwrap();

    let got = app
        .manager(Method::GET, &format!("/routes/{id}"), None)
        .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, created.body);

    let patched = app
        .manager(
            Method::PATCH,
            &format!("/routes/{id}"),
            // JSON does not tell 8889 from 8889.0; neither does the server.
            Some(json!({"targets": [{"host": "10.0.1.8", "port": 8889.0, "weight": 2}], "labels": {"user_id": "u2"}})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
    assert_eq!(patched.body["targets"][0]["host"], "10.0.1.8");
    assert_eq!(patched.body["targets"][0]["port"], 8889);
    assert_eq!(patched.body["labels"]["user_id"], "u2");
    assert_eq!(
        patched.body["access"], created.body["access"],
        "untouched fields stay"
    );
    assert!(patched.body["revision"].as_i64() > created.body["revision"].as_i64());
    assert_eq!(
        patched.body["frontend"], created.body["frontend"],
        "a patch does not move the route"
    );

    let deleted = app
        .manager(Method::DELETE, &format!("/routes/{id}"), None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let gone = app
        .manager(Method::GET, &format!("/routes/{id}"), None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(gone.problem(), "not-found");
    let again = app
        .manager(Method::DELETE, &format!("/routes/{id}"), None)
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);

    // The freed port is reused (lowest free).
    let next = app.create(route(Uuid::new_v4(), "jupyter")).await;
    assert_eq!(next.body["frontend"]["port"], 20000);
}

async fn put_is_an_idempotent_upsert(b: Backend) {
    let app = TestApp::start(b).await;
    app.register("w", [20000, 20010]).await;
    let id = Uuid::now_v7();
    let session = Uuid::new_v4();
    let path = format!("/routes/{id}");
    let first = app
        .manager(Method::PUT, &path, Some(route(session, "ssh")))
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    assert_eq!(first.body["id"], id.to_string());
    let rev = app.revision().await;

    let same = app
        .manager(Method::PUT, &path, Some(route(session, "ssh")))
        .await;
    assert_eq!(same.status, StatusCode::OK);
    assert_eq!(same.body["revision"], first.body["revision"]);
    assert_eq!(
        app.revision().await,
        rev,
        "an unchanged upsert writes nothing"
    );

    let mut changed = route(session, "ssh");
    changed["targets"][0]["port"] = json!(2222);
    let updated = app.manager(Method::PUT, &path, Some(changed)).await;
    assert_eq!(updated.status, StatusCode::OK);
    assert_eq!(updated.body["targets"][0]["port"], 2222);
    assert_eq!(updated.body["frontend"], first.body["frontend"]);
    assert!(updated.body["revision"].as_i64() > first.body["revision"].as_i64());

    let other_identity = app
        .manager(Method::PUT, &path, Some(route(Uuid::new_v4(), "ssh")))
        .await;
    assert_eq!(other_identity.status, StatusCode::CONFLICT);
    assert_eq!(other_identity.problem(), "conflict");
    assert_eq!(other_identity.body["existing"]["id"], id.to_string());

    // Another id for the same (session, service) conflicts with the existing route.
    let dup = app
        .manager(
            Method::PUT,
            &format!("/routes/{}", Uuid::now_v7()),
            Some(route(session, "ssh")),
        )
        .await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert_eq!(dup.body["existing"]["id"], id.to_string());
    assert_eq!(app.route_count().await, 1);
}

/// An inference endpoint exists before its replicas do: a route with no
/// targets is placed and served (its worker answers 503 until targets come).
async fn a_route_may_wait_for_its_targets(b: Backend) {
    let app = TestApp::start(b).await;
    app.register("w", [20000, 20010]).await;
    let endpoint = Uuid::new_v4();
    let created = app
        .create(json!({
            "app_mode": "inference", "endpoint_id": endpoint,
            "service": "llm", "targets": []
        }))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["targets"], json!([]));
    assert!(
        created.body["frontend"]["port"].is_u64(),
        "placed: {:?}",
        created.body
    );
    let id = created.body["id"].as_str().unwrap();
    let patched = app
        .manager(
            Method::PATCH,
            &format!("/routes/{id}"),
            Some(json!({"targets": [{"host": "10.0.0.9", "port": 8000}]})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
    assert_eq!(patched.body["targets"][0]["port"], 8000);
    // And back to none, as when its last replica goes away.
    let emptied = app
        .manager(
            Method::PATCH,
            &format!("/routes/{id}"),
            Some(json!({"targets": []})),
        )
        .await;
    assert_eq!(emptied.status, StatusCode::OK, "{:?}", emptied.body);
    assert_eq!(emptied.body["targets"], json!([]));
}

async fn listing_is_filtered_and_paginated(b: Backend) {
    let app = TestApp::start(b).await;
    let (w1, _, _) = app.register("w1", [20000, 20100]).await;
    app.register("w2", [20000, 20100]).await;
    let mut sessions = Vec::new();
    for i in 0..25 {
        let s = Uuid::new_v4();
        sessions.push(s);
        let r = app
            .create(route(s, if i % 5 == 0 { "ssh" } else { "jupyter" }))
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let endpoint = Uuid::new_v4();
    let inference = app
        .create(json!({"app_mode": "inference", "endpoint_id": endpoint, "service": "model", "targets": [
            {"id": Uuid::new_v4(), "host": "10.0.2.1", "port": 8000, "session_id": Uuid::new_v4()},
            {"id": Uuid::new_v4(), "host": "10.0.2.2", "port": 8000, "weight": 3}
        ]}))
        .await;
    assert_eq!(
        inference.status,
        StatusCode::CREATED,
        "{:?}",
        inference.body
    );

    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/routes?limit=10&cursor={c}"),
            None => "/routes?limit=10".to_owned(),
        };
        let page = app.manager(Method::GET, &path, None).await.body;
        pages += 1;
        for r in page["items"].as_array().unwrap() {
            assert!(
                seen.insert(r["id"].as_str().unwrap().to_owned()),
                "listed twice"
            );
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!((seen.len(), pages), (26, 3));

    let count = |q: String| {
        let app = &app;
        async move {
            app.manager(Method::GET, &format!("/routes?{q}"), None)
                .await
                .body["items"]
                .as_array()
                .unwrap()
                .len()
        }
    };
    assert_eq!(count("service=ssh".into()).await, 5);
    assert_eq!(count(format!("session_id={}", sessions[3])).await, 1);
    assert_eq!(count(format!("endpoint_id={endpoint}")).await, 1);
    let on_w1 = count(format!("worker_id={w1}")).await;
    assert!(
        (12..=14).contains(&on_w1),
        "balanced across two workers: {on_w1}"
    );
    assert_eq!(
        count(format!(
            "worker_id={w1}&service=ssh&session_id={}",
            Uuid::new_v4()
        ))
        .await,
        0
    );
}

async fn every_mutation_is_in_the_change_log(b: Backend) {
    let app = TestApp::start(b).await;
    let (worker, _, _) = app.register("w", [20000, 20100]).await;
    let session = Uuid::new_v4();
    let created = app.create(route(session, "jupyter")).await;
    let id = created.body["id"].as_str().unwrap();
    app.manager(
        Method::PATCH,
        &format!("/routes/{id}"),
        Some(json!({"labels": {"a": "b"}})),
    )
    .await;
    app.create(route(session, "ssh")).await;
    app.manager(Method::DELETE, &format!("/sessions/{session}"), None)
        .await;

    let rows: Vec<(i64, String, Option<Uuid>)> = match app.store.db() {
        appproxy_coordinator::store::Db::Postgres(p) => {
            sqlx::query_as("SELECT revision, kind, worker_id FROM change_log ORDER BY revision")
                .fetch_all(p)
                .await
                .unwrap()
        }
        appproxy_coordinator::store::Db::Sqlite(p) => {
            sqlx::query_as("SELECT revision, kind, worker_id FROM change_log ORDER BY revision")
                .fetch_all(p)
                .await
                .unwrap()
        }
    };
    let kinds: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "worker_upsert",
            "route_upsert",
            "route_upsert",
            "route_upsert",
            "route_delete",
            "route_delete"
        ]
    );
    let revisions: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(
        revisions,
        (1..=6).collect::<Vec<_>>(),
        "contiguous revisions"
    );
    assert_eq!(app.revision().await, 6);
    assert!(rows.iter().all(|r| r.2 == Some(worker)));
}
