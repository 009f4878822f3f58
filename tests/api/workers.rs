//! Workers through the API: heartbeats acknowledging revisions, deletion
//! moving a worker's routes, a heartbeat timeout racing a drain, and the
//! registration refusing a Backend.AI description.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{BOOTSTRAP, Backend, TestApp, route};
use crate::on_both_backends;

on_both_backends!(
    heartbeats_acknowledge_revisions,
    deleting_a_worker_moves_its_routes,
    a_heartbeat_timeout_never_overwrites_a_concurrent_drain,
    only_put_api_worker_makes_a_backendai_worker,
);

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
