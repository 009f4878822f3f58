//! The REST API, end to end over HTTP against the real router, on both the
//! embedded SQLite and a real PostgreSQL.

mod common;

use std::collections::HashSet;

use common::{BOOTSTRAP, Backend, MANAGER, TestApp, route};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

on_both_backends!(
    a_heartbeat_timeout_never_overwrites_a_concurrent_drain,
    route_lifecycle,
    put_is_an_idempotent_upsert,
    parallel_creates_of_one_session_service_yield_one_route,
    parallel_creates_on_one_worker_never_share_a_port,
    concurrent_creates_are_answered_each_on_its_own,
    a_create_the_database_refuses_fails_alone,
    placement_prefers_the_least_loaded_worker_and_reports_no_capacity,
    sessions_are_listed_and_deleted_together,
    lookup_resolves_ports_and_subdomains,
    bad_input_is_rejected_and_changes_nothing,
    heartbeats_acknowledge_revisions,
    deleting_a_worker_moves_its_routes,
    listing_is_filtered_and_paginated,
    probes_metrics_and_openapi,
    every_mutation_is_in_the_change_log,
    a_route_may_wait_for_its_targets,
    only_put_api_worker_makes_a_backendai_worker,
);

/// `POST /workers/register` refuses a `backendai` description: a Backend.AI
/// worker is made by `PUT /api/worker` only.
async fn only_put_api_worker_makes_a_backendai_worker(b: Backend) {
    let app = TestApp::start(b).await;
    let a = app
        .call(
            Method::POST,
            "/workers/register",
            Some(BOOTSTRAP),
            Some(json!({
                "name": "w", "api_url": "http://127.0.0.1:10201",
                "frontend": {"mode": "port", "host": "proxy.test", "port_range": [20000, 20010]},
                "backendai": {"hostname": "127.0.0.1", "api_port": 10201,
                              "tls_listen": false, "tls_advertised": false, "nodes": 1}
            })),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{:?}", a.body);
    assert_eq!(a.problem(), "invalid-request");
    assert_eq!(a.body["field"], "backendai");
    assert!(app.store.list_workers().await.unwrap().is_empty());
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

async fn parallel_creates_of_one_session_service_yield_one_route(b: Backend) {
    let app = TestApp::start(b).await;
    app.register("w1", [20000, 20100]).await;
    app.register("w2", [20000, 20100]).await;
    let session = Uuid::new_v4();
    let answers =
        futures::future::join_all((0..32).map(|_| app.create(route(session, "jupyter")))).await;
    let created: Vec<&common::Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .collect();
    assert_eq!(created.len(), 1, "exactly one create wins");
    let winner = &created[0].body["id"];
    for a in answers.iter().filter(|a| a.status != StatusCode::CREATED) {
        assert_eq!(a.status, StatusCode::CONFLICT, "{:?}", a.body);
        assert_eq!(&a.body["existing"]["id"], winner);
    }
    assert_eq!(app.route_count().await, 1);
}

async fn parallel_creates_on_one_worker_never_share_a_port(b: Backend) {
    let app = TestApp::start(b).await;
    let (worker, _, _) = app.register("w", [30000, 30099]).await;
    let answers = futures::future::join_all((0..40).map(|i| {
        let mut body = route(Uuid::new_v4(), "jupyter");
        if i % 2 == 0 {
            body["worker_id"] = json!(worker);
        }
        app.create(body)
    }))
    .await;
    let mut ports = HashSet::new();
    for a in &answers {
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        assert!(
            ports.insert(a.body["frontend"]["port"].as_u64().unwrap()),
            "port handed out twice"
        );
    }
    let expected: HashSet<u64> = (30000..30040).collect();
    assert_eq!(ports, expected, "the lowest free ports, each once");
}

/// Concurrent creates are committed together; one that conflicts or finds no
/// room must not fail, or take the place of, the others.
async fn concurrent_creates_are_answered_each_on_its_own(b: Backend) {
    let app = TestApp::start(b).await;
    let (worker, _, _) = app.register("w", [31000, 31023]).await;
    let mut held = route(Uuid::new_v4(), "jupyter");
    held["worker_id"] = json!(worker);
    held["frontend"] = json!({"port": 31000});
    let held = app.create(held).await;
    assert_eq!(held.status, StatusCode::CREATED);

    let session = Uuid::new_v4();
    let mut bodies: Vec<Value> = (0..8).map(|_| route(session, "jupyter")).collect();
    let mut taken = route(Uuid::new_v4(), "jupyter");
    taken["worker_id"] = json!(worker);
    taken["frontend"] = json!({"port": 31000});
    bodies.push(taken);
    bodies.extend((0..30).map(|_| route(Uuid::new_v4(), "jupyter")));
    let answers = futures::future::join_all(bodies.into_iter().map(|b| app.create(b))).await;

    // The 23 free ports go to 23 creates, whatever order they arrive in.
    let placed = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .count();
    assert_eq!(placed, 23, "every free port used once");
    // Eight creates of one (session, service): at most one wins; the others
    // see the winner, or — had the ports run out first — no room.
    let same = &answers[..8];
    let winners: Vec<_> = same
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .collect();
    assert!(winners.len() <= 1, "one create of the session at most");
    for a in same.iter().filter(|a| a.status != StatusCode::CREATED) {
        match a.status {
            StatusCode::CONFLICT => assert_eq!(a.body["existing"]["id"], winners[0].body["id"]),
            _ => assert_eq!(a.problem(), "no-eligible-worker", "{:?}", a.body),
        }
    }
    // The pinned port was held before: a conflict naming the holder (or, had
    // the worker filled up first, no room).
    match answers[8].status {
        StatusCode::CONFLICT => assert_eq!(answers[8].body["existing"]["id"], held.body["id"]),
        _ => assert_eq!(
            answers[8].problem(),
            "no-eligible-worker",
            "{:?}",
            answers[8].body
        ),
    }
    // The routes that found no room are told so.
    for a in answers[9..]
        .iter()
        .filter(|a| a.status != StatusCode::CREATED)
    {
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", a.body);
        assert_eq!(a.problem(), "no-eligible-worker");
    }

    let created: Vec<&common::Answer> = std::iter::once(&held)
        .chain(answers.iter())
        .filter(|a| a.status == StatusCode::CREATED)
        .collect();
    let ports: HashSet<u64> = created
        .iter()
        .map(|a| a.body["frontend"]["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, (31000..=31023).collect(), "each port once");
    let revisions: HashSet<i64> = created
        .iter()
        .map(|a| a.body["revision"].as_i64().unwrap())
        .collect();
    assert_eq!(
        revisions.len(),
        created.len(),
        "each create has its own revision"
    );
    assert_eq!(app.route_count().await, 24);
    // What was answered is what is stored.
    for a in &created {
        let stored = app
            .manager(
                Method::GET,
                &format!("/routes/{}", a.body["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(stored.body["frontend"], a.body["frontend"]);
        assert_eq!(stored.body["revision"], a.body["revision"]);
    }
}

/// A create the database itself refuses (here: a trigger the test installs)
/// fails alone, however it was batched with others, and leaves no trace.
async fn a_create_the_database_refuses_fails_alone(b: Backend) {
    let app = TestApp::start(b).await;
    app.register("w", [32000, 32099]).await;
    match app.store.db() {
        appproxy_coordinator::store::Db::Postgres(p) => {
            sqlx::raw_sql(
                "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN RAISE EXCEPTION 'poisoned route'; END; $$; \
                 CREATE TRIGGER refuse_poison BEFORE INSERT ON routes FOR EACH ROW \
                 WHEN (NEW.service = 'poison') EXECUTE FUNCTION refuse_poison();",
            )
            .execute(p)
            .await
            .unwrap();
        }
        appproxy_coordinator::store::Db::Sqlite(p) => {
            sqlx::raw_sql(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON routes \
                 WHEN NEW.service = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned route'); END;",
            )
            .execute(p)
            .await
            .unwrap();
        }
    }
    let bodies: Vec<Value> = (0..24)
        .map(|i| route(Uuid::new_v4(), if i == 11 { "poison" } else { "jupyter" }))
        .collect();
    let answers = futures::future::join_all(bodies.into_iter().map(|b| app.create(b))).await;
    for (i, a) in answers.iter().enumerate() {
        if i == 11 {
            assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR, "{:?}", a.body);
            assert_eq!(a.problem(), "internal");
        } else {
            assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        }
    }
    assert_eq!(app.route_count().await, 23);
    let ports: HashSet<u64> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .map(|a| a.body["frontend"]["port"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ports,
        (32000..32023).collect(),
        "the refused create took no port"
    );
}

async fn placement_prefers_the_least_loaded_worker_and_reports_no_capacity(b: Backend) {
    let app = TestApp::start(b).await;
    let none = app.create(route(Uuid::new_v4(), "jupyter")).await;
    assert_eq!(none.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(none.problem(), "no-eligible-worker");

    let (a, _, _) = app.register("a", [40000, 40001]).await;
    let (b_id, _, _) = app.register("b", [40000, 40001]).await;
    let mut placed = Vec::new();
    for _ in 0..4 {
        let r = app.create(route(Uuid::new_v4(), "jupyter")).await;
        assert_eq!(r.status, StatusCode::CREATED);
        placed.push(r.body["worker_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        placed,
        [
            a.to_string(),
            b_id.to_string(),
            a.to_string(),
            b_id.to_string()
        ]
    );
    let full = app.create(route(Uuid::new_v4(), "jupyter")).await;
    assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        full.body["detail"].as_str().unwrap().contains("full"),
        "{:?}",
        full.body
    );

    // A requested port that is taken on the pinned worker is a conflict naming the holder.
    app.manager(
        Method::DELETE,
        &format!("/sessions/{}", Uuid::new_v4()),
        None,
    )
    .await;
    let holder = app
        .manager(
            Method::GET,
            &format!("/lookup?worker_id={a}&port=40000"),
            None,
        )
        .await;
    let mut body = route(Uuid::new_v4(), "x");
    body["worker_id"] = json!(a);
    body["frontend"] = json!({"port": 40000});
    let taken = app.create(body).await;
    // The pinned worker is full, so it is not eligible at all.
    assert_eq!(taken.status, StatusCode::SERVICE_UNAVAILABLE);
    app.manager(
        Method::DELETE,
        &format!("/routes/{}", holder.body["id"].as_str().unwrap()),
        None,
    )
    .await;
    let mut body = route(Uuid::new_v4(), "x");
    body["worker_id"] = json!(a);
    body["frontend"] = json!({"port": 40001});
    let taken = app.create(body).await;
    assert_eq!(taken.status, StatusCode::CONFLICT, "{:?}", taken.body);
    assert_eq!(taken.body["existing"]["frontend"]["port"], 40001);
    let mut body = route(Uuid::new_v4(), "x");
    body["worker_id"] = json!(a);
    body["frontend"] = json!({"port": 40000});
    let ok = app.create(body).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert_eq!(ok.body["frontend"]["port"], 40000);
}

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

async fn heartbeats_acknowledge_revisions(b: Backend) {
    let app = TestApp::start(b).await;
    let (worker, token, _) = app.register("w", [20000, 20100]).await;
    let created = app.create(route(Uuid::new_v4(), "jupyter")).await;
    let id = created.body["id"].as_str().unwrap();
    let rev = created.body["revision"].as_i64().unwrap();
    assert_eq!(created.body["status"], "Propagating");
    let ack = app
        .call(
            Method::POST,
            &format!("/workers/{worker}/heartbeat"),
            Some(&token),
            Some(json!({"acked_revision": rev})),
        )
        .await;
    assert_eq!(ack.status, StatusCode::OK);
    assert_eq!(
        ack.body,
        json!({"status": "Ready", "revision": app.revision().await})
    );
    let r = app
        .manager(Method::GET, &format!("/routes/{id}"), None)
        .await;
    assert_eq!(r.body["status"], "Active");
    let w = app
        .manager(Method::GET, &format!("/workers/{worker}"), None)
        .await;
    assert_eq!(w.body["acked_revision"], rev);
    // An older acknowledgement never moves the worker backwards.
    app.call(
        Method::POST,
        &format!("/workers/{worker}/heartbeat"),
        Some(&token),
        Some(json!({"acked_revision": 0})),
    )
    .await;
    let w = app
        .call(
            Method::GET,
            &format!("/workers/{worker}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(w.body["acked_revision"], rev);
}

async fn deleting_a_worker_moves_its_routes(b: Backend) {
    let app = TestApp::start(b).await;
    let (doomed, _, _) = app.register("doomed", [20000, 20001]).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut body = route(Uuid::new_v4(), "jupyter");
        body["worker_id"] = json!(doomed);
        ids.push(
            app.create(body).await.body["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let (heir, _, _) = app.register("heir", [30000, 30000]).await;
    let removed = app
        .manager(
            Method::DELETE,
            &format!("/workers/{doomed}?drain=true"),
            None,
        )
        .await;
    assert_eq!(removed.status, StatusCode::OK, "{:?}", removed.body);
    assert_eq!(removed.body, json!({"moved": 1, "pending": 1}));
    let mut workers = Vec::new();
    for id in &ids {
        let r = app
            .manager(Method::GET, &format!("/routes/{id}"), None)
            .await
            .body;
        workers.push((
            r["worker_id"].clone(),
            r["status"].clone(),
            r["frontend"]["port"].clone(),
        ));
    }
    workers.sort_by_key(|w| w.1.to_string());
    assert_eq!(workers[0], (Value::Null, json!("Pending"), Value::Null));
    assert_eq!(
        workers[1],
        (json!(heir), json!("Propagating"), json!(30000))
    );
    let gone = app
        .manager(Method::GET, &format!("/workers/{doomed}"), None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
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

async fn probes_metrics_and_openapi(b: Backend) {
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
    assert_eq!(operations, 20);

    // readyz reflects the database.
    app.store.close().await;
    let down = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(down.problem(), "unavailable");
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

/// A heartbeat timeout decided from `Ready` must not overwrite a `Draining`
/// set meanwhile: the transition is a compare-and-set in one transaction.
/// Whatever the interleaving, a worker being drained ends `Draining`.
async fn a_heartbeat_timeout_never_overwrites_a_concurrent_drain(b: Backend) {
    use appproxy_coordinator::domain::WorkerStatus;
    use appproxy_coordinator::domain::health::Observation;
    use appproxy_coordinator::health;
    let app = TestApp::start(b).await;
    for round in 0..20 {
        let (id, _, _) = app.register(&format!("w{round}"), [20000, 20100]).await;
        let timeouts = (0..4).map(|_| {
            health::observe(
                &app.store,
                id,
                Observation::HeartbeatTimeout,
                app.clock.now(),
            )
        });
        let drain = app
            .store
            .set_worker_status(id, WorkerStatus::Draining, chrono::Utc::now());
        let (observed, drained) = tokio::join!(futures::future::join_all(timeouts), drain);
        drained.unwrap();
        for o in observed {
            o.unwrap();
        }
        let worker = app.store.get_worker(id).await.unwrap();
        assert_eq!(worker.status, WorkerStatus::Draining, "round {round}");
    }
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
