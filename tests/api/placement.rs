//! Where a create lands: the least-loaded worker and its lowest free port,
//! no capacity reported as such, and concurrent creates (committed together)
//! each answered on its own: one winner per (session, service), no port
//! handed out twice, a refused create failing alone.

use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{self, Backend, TestApp, route};
use crate::on_both_backends;

on_both_backends!(
    placement_prefers_the_least_loaded_worker_and_reports_no_capacity,
    parallel_creates_of_one_session_service_yield_one_route,
    parallel_creates_on_one_worker_never_share_a_port,
    concurrent_creates_are_answered_each_on_its_own,
    a_create_the_database_refuses_fails_alone,
);

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
