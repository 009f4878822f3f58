//! Route propagation: worker and manager watch streams, resume, compaction,
//! acknowledgements, replicas and restarts — driven with the library's worker
//! client against the real router (and the real binary for restarts).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use appproxy_coordinator::client::{Agent, EventStream, RoutingTable, WorkerClient};
use appproxy_coordinator::domain::WorkerRegistration;
use appproxy_coordinator::domain::events::{Audience, Snapshot, StreamEvent};
use appproxy_coordinator::store::{Db, NOTIFY_CHANNEL};
use common::{
    BOOTSTRAP, Backend, Coordinator, MANAGER, PATIENCE, TestApp, TestDb, route, wait_for,
};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

on_both_backends!(
    streams_are_ordered_without_gaps_or_duplicates_under_concurrent_writers,
    a_dropped_stream_resumes_exactly_where_it_left_off,
    last_event_id_resumes_too,
    a_resume_point_older_than_the_log_gets_a_snapshot,
    a_worker_can_only_open_its_own_stream,
    managers_see_every_route_change,
    acknowledgements_make_routes_active_and_lag_visible,
    shutdown_ends_streams_with_a_final_bookmark,
    a_restarted_coordinator_resumes_the_agent_without_a_gap,
    a_streamed_snapshot_is_byte_for_byte_the_snapshot_event,
    a_stream_that_falls_behind_reads_what_it_missed_from_the_log,
    a_quiet_worker_stream_follows_the_head_with_bookmarks,
);

fn registration(name: &str) -> WorkerRegistration {
    serde_json::from_value(json!({
        "name": name,
        "api_url": "http://127.0.0.1:10201",
        "frontend": {"mode": "port", "host": "proxy.test", "port_range": [20000, 29999]}
    }))
    .unwrap()
}

async fn connect(app_url: &str, name: &str) -> (WorkerClient, RoutingTable) {
    let (client, answer) = WorkerClient::register(
        &common::http_client(),
        app_url,
        BOOTSTRAP,
        &registration(name),
    )
    .await
    .unwrap();
    (client, RoutingTable::new(answer.revision, answer.routes))
}

async fn next(stream: &mut EventStream) -> StreamEvent {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("an event within the patience")
        .expect("the stream is open")
        .expect("a well-formed event")
}

/// Applies events until the table reaches `revision`; returns the data events' revisions.
async fn follow_until(
    stream: &mut EventStream,
    table: &mut RoutingTable,
    revision: i64,
) -> Vec<i64> {
    let mut seen = Vec::new();
    while table.revision < revision {
        let e = next(stream).await;
        table
            .apply(&e)
            .unwrap_or_else(|err| panic!("protocol violation: {err}"));
        if matches!(e, StreamEvent::Upsert(_) | StreamEvent::Delete(_)) {
            seen.push(e.revision());
        }
    }
    seen
}

/// The worker's routes according to the API.
async fn routes_of(app: &TestApp, worker: Uuid) -> BTreeMap<Uuid, i64> {
    let page = app
        .manager(
            Method::GET,
            &format!("/routes?worker_id={worker}&limit=1000"),
            None,
        )
        .await;
    page.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().parse().unwrap(),
                r["revision"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn table_view(t: &RoutingTable) -> BTreeMap<Uuid, i64> {
    t.routes.iter().map(|(id, r)| (*id, r.revision)).collect()
}

/// Revisions of the change-log rows that belong on `worker`'s stream.
async fn logged_for(app: &TestApp, worker: Uuid, after: i64) -> Vec<i64> {
    app.store
        .changes_after(after, Some(worker), 100_000)
        .await
        .unwrap()
        .iter()
        .filter(|c| c.route_id.is_some())
        .map(|c| c.revision)
        .collect()
}

async fn streams_are_ordered_without_gaps_or_duplicates_under_concurrent_writers(b: Backend) {
    let app = TestApp::start(b).await;
    let (wa, mut ta) = connect(&app.url, "a").await;
    let (wb, mut tb) = connect(&app.url, "b").await;
    let start = ta.revision.min(tb.revision);
    let mut sa = wa.watch(Some(ta.revision)).await.unwrap();
    let mut sb = wb.watch(Some(tb.revision)).await.unwrap();

    // Eight writers create, patch and delete routes on both workers at once.
    let writers = (0..8).map(|w| {
        let app = &app;
        let workers = [wa.worker_id, wb.worker_id];
        async move {
            for i in 0..15 {
                let mut body = route(Uuid::new_v4(), "jupyter");
                body["worker_id"] = json!(workers[(w + i) % 2]);
                let created = app.create(body).await;
                assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
                let id = created.body["id"].as_str().unwrap().to_owned();
                if i % 3 == 0 {
                    app.manager(
                        Method::PATCH,
                        &format!("/routes/{id}"),
                        Some(json!({"labels": {"i": i.to_string()}})),
                    )
                    .await;
                }
                if i % 4 == 0 {
                    app.manager(Method::DELETE, &format!("/routes/{id}"), None)
                        .await;
                }
            }
        }
    });
    futures::future::join_all(writers).await;
    let head = app.revision().await;

    let got_a = follow_until(&mut sa, &mut ta, head).await;
    let got_b = follow_until(&mut sb, &mut tb, head).await;
    assert_eq!(
        got_a,
        logged_for(&app, wa.worker_id, start)
            .await
            .into_iter()
            .filter(|r| *r > start)
            .collect::<Vec<_>>()
    );
    assert_eq!(got_b, logged_for(&app, wb.worker_id, start).await);
    assert!(!got_a.is_empty() && !got_b.is_empty());
    assert_eq!(table_view(&ta), routes_of(&app, wa.worker_id).await);
    assert_eq!(table_view(&tb), routes_of(&app, wb.worker_id).await);
    let a_routes: BTreeSet<_> = ta.routes.keys().collect();
    assert!(
        tb.routes.keys().all(|id| !a_routes.contains(id)),
        "a stream carries only its worker's routes"
    );
}

async fn a_dropped_stream_resumes_exactly_where_it_left_off(b: Backend) {
    let app = TestApp::start(b).await;
    let (w, mut table) = connect(&app.url, "w").await;
    let start = table.revision;
    let mut stream = w.watch(Some(table.revision)).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            app.create(route(Uuid::new_v4(), "ssh")).await.body["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = next(&mut stream).await;
        table.apply(&e).unwrap();
        seen.push(e.revision());
    }
    drop(stream); // the connection drops mid-stream
    for id in &ids[..2] {
        app.manager(Method::DELETE, &format!("/routes/{id}"), None)
            .await;
    }
    app.create(route(Uuid::new_v4(), "ssh")).await;

    let mut resumed = w.watch(Some(table.revision)).await.unwrap();
    let first = next(&mut resumed).await;
    assert!(
        !matches!(first, StreamEvent::Snapshot(_)),
        "a retained revision resumes without a snapshot"
    );
    table.apply(&first).unwrap();
    seen.push(first.revision());
    seen.extend(follow_until(&mut resumed, &mut table, app.revision().await).await);
    seen.dedup();
    assert_eq!(
        seen,
        logged_for(&app, w.worker_id, start).await,
        "no gap, no duplicate across the reconnect"
    );
    assert_eq!(table_view(&table), routes_of(&app, w.worker_id).await);
}

async fn last_event_id_resumes_too(b: Backend) {
    let app = TestApp::start(b).await;
    let (w, table) = connect(&app.url, "w").await;
    let created = app.create(route(Uuid::new_v4(), "ssh")).await;
    let token = w.token().expose().to_owned();
    let response = app
        .http
        .get(format!("{}/workers/{}/watch", app.url, w.worker_id))
        .bearer_auth(&token)
        .header("Last-Event-ID", table.revision.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(PATIENCE, body.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let rev = created.body["revision"].as_i64().unwrap();
    assert!(text.contains("event: upsert"), "{text}");
    assert!(text.contains(&format!("id: {rev}\n")), "{text}");
    let bad = app
        .http
        .get(format!("{}/workers/{}/watch", app.url, w.worker_id))
        .bearer_auth(&token)
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

async fn a_resume_point_older_than_the_log_gets_a_snapshot(b: Backend) {
    let app = TestApp::start(b).await;
    let (w, table) = connect(&app.url, "w").await;
    let old = table.revision;
    for _ in 0..4 {
        app.create(route(Uuid::new_v4(), "ssh")).await;
    }
    let deleted = app
        .store
        .compact_log(1, chrono::Utc::now() + chrono::Duration::seconds(5))
        .await
        .unwrap();
    assert!(deleted >= 4, "compacted {deleted}");
    let (compacted, head) = app.store.log_horizon().await.unwrap();
    assert_eq!(compacted, head - 1, "only the last revision is kept");

    let mut stream = w.watch(Some(old)).await.unwrap();
    let StreamEvent::Snapshot(snapshot) = next(&mut stream).await else {
        panic!("expected a snapshot")
    };
    assert_eq!(snapshot.revision, head);
    assert_eq!(snapshot.routes.len(), 4);
    // A revision from the future (another database) is not trusted either.
    let mut stream = w.watch(Some(head + 1000)).await.unwrap();
    assert!(matches!(next(&mut stream).await, StreamEvent::Snapshot(_)));
    // Still-retained revisions resume normally.
    let mut stream = w.watch(Some(head - 1)).await.unwrap();
    assert!(matches!(next(&mut stream).await, StreamEvent::Upsert(u) if u.revision == head));
}

async fn a_worker_can_only_open_its_own_stream(b: Backend) {
    let app = TestApp::start(b).await;
    let (me, my_token, _) = app.register("me", [20000, 20100]).await;
    let (other, _, _) = app.register("other", [20000, 20100]).await;
    for (token, worker, status) in [
        (Some(my_token.as_str()), other, 403),
        (Some(MANAGER), me, 403),
        (Some(BOOTSTRAP), me, 403),
        (None, me, 401),
        (Some("bogus"), me, 401),
    ] {
        let a = app
            .call(
                Method::GET,
                &format!("/workers/{worker}/watch"),
                token,
                None,
            )
            .await;
        assert_eq!(a.status.as_u16(), status, "{token:?} on {worker}");
    }
    let a = app
        .call(Method::GET, "/routes/watch", Some(&my_token), None)
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
}

async fn managers_see_every_route_change(b: Backend) {
    let app = TestApp::start(b).await;
    app.register("a", [20000, 20100]).await;
    app.register("b", [20000, 20100]).await;
    let before = app.create(route(Uuid::new_v4(), "x")).await;
    let response = app
        .http
        .get(format!("{}/routes/watch", app.url))
        .bearer_auth(MANAGER)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut events = response
        .bytes_stream()
        .map(|r| r.map(|b| b.to_vec()))
        .map(|r| r.map_err(std::io::Error::other));
    let mut buffer = String::new();
    let mut parsed = Vec::new();
    let one = app.create(route(Uuid::new_v4(), "x")).await;
    let two = app.create(route(Uuid::new_v4(), "x")).await;
    app.manager(
        Method::DELETE,
        &format!("/routes/{}", one.body["id"].as_str().unwrap()),
        None,
    )
    .await;
    while parsed.len() < 4 {
        let chunk = tokio::time::timeout(PATIENCE, events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let name = frame
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .map(str::to_owned);
            let data = frame
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned);
            if let (Some(n), Some(d)) = (name, data) {
                parsed.push(StreamEvent::parse(&n, &d).unwrap());
            }
        }
    }
    let StreamEvent::Snapshot(s) = &parsed[0] else {
        panic!("{parsed:?}")
    };
    assert_eq!(s.routes.len(), 1);
    assert_eq!(
        s.routes[0].id.to_string(),
        before.body["id"].as_str().unwrap()
    );
    let workers: BTreeSet<_> = [&parsed[1], &parsed[2]]
        .iter()
        .map(|e| match e {
            StreamEvent::Upsert(u) => u.route.worker_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(workers.len(), 2, "routes on both workers reach the manager");
    assert!(
        matches!(&parsed[3], StreamEvent::Delete(d) if d.route_id.to_string() == one.body["id"].as_str().unwrap())
    );
    assert!(two.status.is_success());
}

async fn acknowledgements_make_routes_active_and_lag_visible(b: Backend) {
    let app = TestApp::start(b).await;
    let (tx, mut rx) = watch::channel(RoutingTable::default());
    let mut agent = Agent::new(&app.url, BOOTSTRAP, registration("agent"));
    agent.heartbeat_interval = Duration::from_millis(100);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(agent.run(tx, async move {
        let _ = stop_rx.await;
    }));
    rx.wait_for(|t| t.revision > 0).await.unwrap();
    // Create the route once the agent's stream is open, so it arrives live.
    wait_for("the agent to open its stream", async || {
        app.call(Method::GET, "/metrics", None, None)
            .await
            .body
            .as_str()
            .unwrap()
            .contains("appproxy_open_streams 1")
    })
    .await;
    let created = app.create(route(Uuid::new_v4(), "jupyter")).await;
    let id: Uuid = created.body["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(created.body["status"], "Propagating");
    tokio::time::timeout(PATIENCE, rx.wait_for(|t| t.routes.contains_key(&id)))
        .await
        .unwrap()
        .unwrap();
    let worker = created.body["worker_id"].as_str().unwrap();
    let (r, w) = wait_for("the route to become Active", async || {
        let r = app
            .manager(Method::GET, &format!("/routes/{id}"), None)
            .await;
        let w = app
            .manager(Method::GET, &format!("/workers/{worker}"), None)
            .await;
        (r.body["status"] == "Active" && w.body["revision_lag"] == 0).then_some((r, w))
    })
    .await;
    assert!(
        w.body["acked_revision"].as_i64().unwrap() >= created.body["revision"].as_i64().unwrap(),
        "{:?} {:?}",
        r.body,
        w.body
    );
    let metrics = app.call(Method::GET, "/metrics", None, None).await.body;
    let text = metrics.as_str().unwrap();
    assert!(text.contains("appproxy_open_streams 1"), "{text}");
    assert!(
        text.contains("appproxy_stream_events_sent_total{event=\"upsert\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("appproxy_fanout_latency_seconds_count 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "appproxy_worker_ack_lag_revisions{{worker=\"{worker}\"}} 0"
        )),
        "{text}"
    );
    stop_tx.send(()).unwrap();
    running.await.unwrap();
}

async fn shutdown_ends_streams_with_a_final_bookmark(b: Backend) {
    let app = TestApp::start(b).await;
    let (w, mut table) = connect(&app.url, "quiet").await;
    let (busy, _, _) = app.register("busy", [30000, 30100]).await;
    let mut stream = w.watch(Some(table.revision)).await.unwrap();
    let mut body = route(Uuid::new_v4(), "x");
    body["worker_id"] = json!(busy);
    app.create(body).await;
    let head = app.revision().await;
    app.hub.shutdown();
    let mut last = None;
    while let Ok(Some(e)) = tokio::time::timeout(PATIENCE, stream.next()).await {
        let e = e.unwrap();
        table.apply(&e).unwrap();
        last = Some(e);
    }
    assert_eq!(
        last,
        Some(StreamEvent::Bookmark(
            appproxy_coordinator::domain::events::Bookmark { revision: head }
        ))
    );
}

async fn a_restarted_coordinator_resumes_the_agent_without_a_gap(b: Backend) {
    let db = TestDb::new(b).await;
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let bind = format!("127.0.0.1:{port}");
    let data = dir.path().to_str().unwrap().to_owned();
    let db_url = match b {
        Backend::Postgres => db.url.clone(),
        Backend::Sqlite => format!("sqlite://{data}/coordinator.db"),
    };
    let args = [
        "--bind",
        &bind,
        "--data-dir",
        &data,
        "--database-url",
        &db_url,
        "--bookmark-interval",
        "200ms",
    ];
    let envs = [
        ("APPPROXY_MANAGER_TOKEN", MANAGER),
        ("APPPROXY_WORKER_TOKEN", BOOTSTRAP),
    ];
    let coordinator = Coordinator::start(&args, &envs, "http");
    let url = coordinator.url.clone();

    let (tx, mut rx) = watch::channel(RoutingTable::default());
    let mut agent = Agent::new(&url, BOOTSTRAP, registration("survivor"));
    agent.heartbeat_interval = Duration::from_millis(200);
    agent.max_backoff = Duration::from_millis(300);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(agent.run(tx, async move {
        let _ = stop_rx.await;
    }));
    rx.wait_for(|t| t.revision > 0).await.unwrap();
    let http = common::http_client();
    let create = |session: Uuid| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = http
                .post(format!("{url}/routes"))
                .bearer_auth(MANAGER)
                .json(&route(session, "jupyter"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            r.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .parse::<Uuid>()
                .unwrap()
        }
    };
    let first = create(Uuid::new_v4()).await;
    tokio::time::timeout(PATIENCE, rx.wait_for(|t| t.routes.contains_key(&first)))
        .await
        .unwrap()
        .unwrap();
    let before_restart = rx.borrow().revision;
    assert!(coordinator.terminate().success());

    let coordinator = Coordinator::start(&args, &envs, "http");
    let second = create(Uuid::new_v4()).await;
    tokio::time::timeout(PATIENCE, rx.wait_for(|t| t.routes.contains_key(&second)))
        .await
        .expect("the agent reconnects and catches up")
        .unwrap();
    let table = rx.borrow().clone();
    assert!(table.revision > before_restart);
    assert_eq!(
        table.routes.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([first, second])
    );
    stop_tx.send(()).unwrap();
    running.await.unwrap();
    drop(coordinator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_postgres() {
    let db = std::sync::Arc::new(TestDb::new(Backend::Postgres).await);
    let slow_poll = appproxy_coordinator::hub::HubConfig {
        // Far longer than the test waits: only NOTIFY can deliver a change
        // committed on replica A to a stream on replica B.
        poll_interval: 100 * PATIENCE,
        bookmark_interval: 100 * PATIENCE,
        ..Default::default()
    };
    let store_a = db.store().await;
    let replica_a = TestApp::builder(Backend::Postgres)
        .db(db.clone(), store_a)
        .hub(slow_poll.clone())
        .start()
        .await;
    let store_b = appproxy_coordinator::store::Store::connect(&db.url, 4)
        .await
        .unwrap();
    let replica_b = TestApp::builder(Backend::Postgres)
        .db(db, store_b)
        .hub(slow_poll)
        .start()
        .await;

    // Both replicas listen for each other's commits (the hubs' LISTEN
    // sessions on the shared database) before anything is committed.
    let Db::Postgres(pool) = replica_a.store.db() else {
        unreachable!()
    };
    wait_for("both replicas to LISTEN", async || {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND query = $1",
        )
        .bind(format!("LISTEN \"{NOTIFY_CHANNEL}\""))
        .fetch_one(pool)
        .await
        .unwrap();
        listening == 2
    })
    .await;
    let (w, mut table) = connect(&replica_b.url, "w").await;
    let mut stream = w.watch(Some(table.revision)).await.unwrap();
    let created = replica_a.create(route(Uuid::new_v4(), "jupyter")).await;
    assert_eq!(created.status, StatusCode::CREATED);
    // Within the patience, far below either replica's poll interval.
    let e = next(&mut stream).await;
    table.apply(&e).unwrap();
    assert!(
        matches!(&e, StreamEvent::Upsert(u) if u.route.id.to_string() == created.body["id"].as_str().unwrap())
    );
}

/// The first SSE frame of `path` (up to its blank line), as bytes.
async fn first_frame(app: &TestApp, path: &str, token: &str) -> String {
    let response = app
        .http
        .get(format!("{}{path}", app.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let mut bytes = Vec::new();
    while !bytes.windows(2).any(|w| w == b"\n\n") {
        let chunk = tokio::time::timeout(PATIENCE, body.next())
            .await
            .expect("a frame within 10 s")
            .expect("the stream is open")
            .unwrap();
        bytes.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(bytes).unwrap();
    let end = text.find("\n\n").unwrap() + 2;
    text[..end].to_owned()
}

/// A snapshot is sent from the routes' stored JSON as it is read; what the
/// client receives is exactly the `snapshot` event built whole from decoded
/// routes: for routes created, updated, patched, pending, with every kind of
/// field, and for a route written without its stored JSON.
async fn a_streamed_snapshot_is_byte_for_byte_the_snapshot_event(b: Backend) {
    let app = TestApp::start(b).await;
    let (w, token, _) = app.register("w", [20000, 20100]).await;
    app.register("other", [20000, 20100]).await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let mut body = route(Uuid::new_v4(), "jupyter");
        if i % 2 == 0 {
            body["worker_id"] = json!(w);
        }
        if i % 3 == 0 {
            body["labels"] = json!({"team": "a\"b", "n": i.to_string()});
            body["envs"] = json!({"X": "1"});
            body["args"] = json!({"k": [1, 2.5, null, "é"]});
            body["access"] = json!({"open_to_public": true, "allowed_client_ips": ["10.0.0.0/8"]});
            body["health_check"] = json!({"path": "/health", "interval_s": 5});
            body["expires_at"] = json!("2099-01-02T03:04:05.123456Z");
        }
        let a = app.create(body).await;
        assert!(a.status.is_success(), "{:?}", a.body);
        ids.push(a.body["id"].as_str().unwrap().to_owned());
    }
    // Patched and replaced specs are stored with their JSON too.
    let a = app
        .manager(
            Method::PATCH,
            &format!("/routes/{}", ids[0]),
            Some(
                json!({"labels": {"patched": "yes"}, "targets": [{"host": "10.0.0.9", "port": 1}]}),
            ),
        )
        .await;
    assert!(a.status.is_success(), "{:?}", a.body);
    // One route as if written by an older version: no stored JSON.
    let bare: Uuid = ids[2].parse().unwrap();
    match app.store.db() {
        Db::Postgres(pool) => {
            sqlx::query("UPDATE routes SET spec_wire = NULL WHERE id = $1")
                .bind(bare)
                .execute(pool)
                .await
                .unwrap();
        }
        Db::Sqlite(pool) => {
            sqlx::query("UPDATE routes SET spec_wire = NULL WHERE id = $1")
                .bind(bare)
                .execute(pool)
                .await
                .unwrap();
        }
    }
    for (worker, path, token) in [
        (Some(w), format!("/workers/{w}/watch"), token.as_str()),
        (None, "/routes/watch".to_owned(), MANAGER),
    ] {
        let (revision, routes) = app.store.snapshot(worker).await.unwrap();
        assert!(routes.len() >= 6, "{}", routes.len());
        let event = StreamEvent::Snapshot(Snapshot { revision, routes });
        let expected = format!(
            "event: snapshot\nid: {revision}\ndata: {}\n\n",
            event.data()
        );
        assert_eq!(first_frame(&app, &path, token).await, expected, "{path}");
    }
    // An empty table is an empty snapshot.
    let (empty, empty_token, _) = app.register("empty", [20000, 20100]).await;
    let revision = app.revision().await;
    assert_eq!(
        first_frame(&app, &format!("/workers/{empty}/watch"), &empty_token).await,
        format!(
            "event: snapshot\nid: {revision}\ndata: {{\"revision\":{revision},\"routes\":[]}}\n\n"
        )
    );
}

/// A stream not read while many batches name its worker overflows its queue
/// (one batch here); when read again it re-reads the log and carries every
/// event, in order, without a gap or a repeat.
async fn a_stream_that_falls_behind_reads_what_it_missed_from_the_log(b: Backend) {
    let db = TestDb::new(b).await;
    let store = db.store().await;
    let hub = appproxy_coordinator::hub::HubConfig {
        // One change per batch, one batch per queue: the second overflows.
        batch_size: 1,
        stream_queue: 1,
        ..common::hub_config()
    };
    let app = TestApp::builder(b).db(db, store).hub(hub).start().await;
    let (w, table) = connect(&app.url, "w").await;
    let since = table.revision;
    let stream = app
        .hub
        .open(Audience::Worker(w.worker_id), Some(since))
        .await
        .unwrap();
    let mut stream = Box::pin(stream);
    let mut created = Vec::new();
    for _ in 0..10 {
        let mut body = route(Uuid::new_v4(), "jupyter");
        body["worker_id"] = json!(w.worker_id);
        let answer = app.create(body).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
        created.push(answer.body["revision"].as_i64().unwrap());
    }
    let head = app.revision().await;
    wait_for("the hub hands out every change", async || {
        app.hub.handed_out() == Some(head)
    })
    .await;
    let mut seen = Vec::new();
    while seen.len() < created.len() {
        let e = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("an event within the patience")
            .expect("the stream is open");
        if let StreamEvent::Upsert(u) = &e {
            seen.push(u.revision);
        }
    }
    assert_eq!(seen, created, "every route, in order, once");
    assert_eq!(seen, logged_for(&app, w.worker_id, since).await);
    let metrics = app.metrics.encode();
    let resyncs = metrics
        .lines()
        .find_map(|l| l.strip_prefix("appproxy_stream_resyncs_total "))
        .expect("the resync counter is exported");
    assert!(
        resyncs.parse::<u64>().unwrap() >= 1,
        "the stream fell behind and re-read the log: {resyncs}"
    );
}

/// A worker's stream is handed only the batches that name its worker:
/// routes created on another worker are no event for it, and its bookmarks
/// still follow the head (so a worker with nothing to do stays current).
async fn a_quiet_worker_stream_follows_the_head_with_bookmarks(b: Backend) {
    let app = TestApp::start(b).await;
    let (quiet, mut table) = connect(&app.url, "quiet").await;
    let (busy, _) = connect(&app.url, "busy").await;
    let mut stream = quiet.watch(Some(table.revision)).await.unwrap();
    for _ in 0..20 {
        let mut body = route(Uuid::new_v4(), "jupyter");
        body["worker_id"] = json!(busy.worker_id);
        assert_eq!(app.create(body).await.status, StatusCode::CREATED);
    }
    let mut body = route(Uuid::new_v4(), "jupyter");
    body["worker_id"] = json!(quiet.worker_id);
    let mine = app.create(body).await;
    let mine_revision = mine.body["revision"].as_i64().unwrap();
    for _ in 0..5 {
        let mut body = route(Uuid::new_v4(), "jupyter");
        body["worker_id"] = json!(busy.worker_id);
        assert_eq!(app.create(body).await.status, StatusCode::CREATED);
    }
    let head = app.revision().await;
    // Its own route, then bookmarks up to the head; nothing of the other's.
    let mut data = Vec::new();
    while table.revision < head {
        let e = next(&mut stream).await;
        table.apply(&e).unwrap();
        if matches!(e, StreamEvent::Upsert(_) | StreamEvent::Delete(_)) {
            data.push(e.revision());
        }
    }
    assert_eq!(data, vec![mine_revision]);
    assert_eq!(table.routes.len(), 1);
}

/// A sample's value in `url`'s `/metrics` (0 when it is not there yet).
async fn metric(url: &str, sample: &str) -> f64 {
    let text = common::http_client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// `POST /routes` on `url`: status and body.
async fn post_route(url: &str, body: &serde_json::Value) -> (StatusCode, serde_json::Value) {
    let r = common::http_client()
        .post(format!("{url}/routes"))
        .bearer_auth(MANAGER)
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

/// A replica (the real binary) on `db` with `manager` as its manager token.
fn replica(db: &TestDb, dir: &tempfile::TempDir, manager: &str) -> Coordinator {
    let args = [
        "--database-url",
        &db.url,
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--heartbeat-timeout",
        "1h",
    ];
    let envs = [
        ("APPPROXY_MANAGER_TOKEN", manager),
        ("APPPROXY_WORKER_TOKEN", BOOTSTRAP),
    ];
    Coordinator::start(&args, &envs, "http")
}

/// The URL the `leader_peer` row names.
async fn leader_row(pool: &sqlx::PgPool) -> Option<String> {
    sqlx::query_scalar::<_, Option<String>>("SELECT peer_url FROM leader_peer")
        .fetch_optional(pool)
        .await
        .unwrap()
        .flatten()
}

/// Which of two `replicas` leads and which follows, once the follower has
/// read the row (it says so in its log).
async fn leader_and_follower(pool: &sqlx::PgPool, replicas: &[Coordinator]) -> (usize, usize) {
    let leader = wait_for("the leader to say where it takes creates", async || {
        leader_row(pool).await
    })
    .await;
    let l = replicas
        .iter()
        .position(|r| r.url == leader)
        .expect("the row names one of the replicas by its bound address");
    let f = 1 - l;
    let heard = std::fmt::from_fn(|out| {
        write!(out, "the follower to read the row:\n{}", replicas[f].log())
    });
    wait_for(heard, async || {
        replicas[f].log().lines().any(|line| {
            line.contains("sending route creates to the leader") && line.contains(&leader)
        })
    })
    .await;
    (l, f)
}

const FORWARDED: &str = r#"appproxy_create_forwards_total{outcome="answered"}"#;
const UNKNOWN: &str = r#"appproxy_create_forwards_total{outcome="unknown"}"#;
const NOT_SENT: &str = r#"appproxy_create_forwards_total{outcome="not_sent"}"#;
const COMMITTED: &str = "appproxy_create_batch_size_sum";

/// Two replicas (the real binary) on one PostgreSQL: the one that does not
/// lead sends its creates to the leader, whose one writer commits them all,
/// and answers each as it would itself (created, conflict, no such pinned
/// worker); a leader that stops answering costs no create and makes none
/// twice; once it is gone the other replica leads and commits its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_does_not_lead_sends_its_creates_to_the_leader() {
    let db = TestDb::new(Backend::Postgres).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut replicas: Vec<Coordinator> = dirs.iter().map(|d| replica(&db, d, MANAGER)).collect();
    let store = db.store().await;
    let Db::Postgres(pool) = store.db() else {
        unreachable!()
    };
    let row = async || leader_row(pool).await;
    let (l, f) = leader_and_follower(pool, &replicas).await;
    let (leader, follower) = (replicas[l].url.clone(), replicas[f].url.clone());
    let (_w, _) = connect(&follower, "w").await;

    // 40 creates on each replica at once: every one committed by the leader.
    let creates = (0..80).map(|i| {
        let url = if i % 2 == 0 { &leader } else { &follower };
        let body = route(Uuid::new_v4(), "jupyter");
        async move { post_route(url, &body).await }
    });
    let answers = futures::future::join_all(creates).await;
    assert!(
        answers.iter().all(|(s, _)| *s == StatusCode::CREATED),
        "{answers:?}"
    );
    assert_eq!(metric(&follower, FORWARDED).await, 40.0);
    assert_eq!(
        metric(&follower, COMMITTED).await,
        0.0,
        "the follower committed none"
    );
    assert_eq!(
        metric(&leader, COMMITTED).await,
        80.0,
        "the leader committed all"
    );
    // What the follower answered is the route as stored.
    let (_, from_follower) = &answers[1];
    let stored: serde_json::Value = common::http_client()
        .get(format!(
            "{leader}/routes/{}",
            from_follower["id"].as_str().unwrap()
        ))
        .bearer_auth(MANAGER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(&stored, from_follower);

    // A refusal comes back as the leader words it.
    let session = Uuid::new_v4();
    let (status, first) = post_route(&follower, &route(session, "jupyter")).await;
    assert_eq!(status, StatusCode::CREATED);
    let (here, there) = (
        post_route(&follower, &route(session, "jupyter")).await,
        post_route(&leader, &route(session, "jupyter")).await,
    );
    assert_eq!(here.0, StatusCode::CONFLICT);
    assert_eq!(here.1["existing"], first);
    assert_eq!((here.0, &here.1["detail"]), (there.0, &there.1["detail"]));
    let mut pinned = route(Uuid::new_v4(), "jupyter");
    pinned["worker_id"] = json!(Uuid::new_v4());
    let (status, body) = post_route(&follower, &pinned).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(metric(&follower, FORWARDED).await, 43.0);

    // The asking request's trace context goes with its create to the leader
    // (the route's change carries it); a malformed one sent there does not.
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let http = common::http_client();
    let traced: serde_json::Value = http
        .post(format!("{follower}/routes"))
        .bearer_auth(MANAGER)
        .header("traceparent", TRACEPARENT)
        .json(&route(Uuid::new_v4(), "jupyter"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let trace_of = async |id: String| -> Option<String> {
        sqlx::query_scalar("SELECT trace FROM change_log WHERE route_id = $1::uuid")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap()
    };
    let id = traced["id"].as_str().unwrap().to_owned();
    assert_eq!(trace_of(id).await.as_deref(), Some(TRACEPARENT));
    let made_up = Uuid::new_v4();
    let item =
        json!([{"id": made_up, "spec": route(Uuid::new_v4(), "jupyter"), "trace": "00-made-up"}]);
    let answer: serde_json::Value = http
        .post(format!("{leader}/internal/creates"))
        .bearer_auth(MANAGER)
        .json(&item)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer[0]["outcome"], "created", "{answer}");
    assert_eq!(trace_of(made_up.to_string()).await, None);

    // The leader stops answering (SIGSTOP): the follower gives up waiting,
    // finds the route not created there, and commits it itself.
    replicas[l].signal("STOP");
    let (status, during) = post_route(&follower, &route(Uuid::new_v4(), "jupyter")).await;
    replicas[l].signal("CONT");
    assert_eq!(status, StatusCode::CREATED, "{during}");
    assert_eq!(metric(&follower, UNKNOWN).await, 1.0);
    assert_eq!(metric(&follower, COMMITTED).await, 1.0);

    // The leader, resumed, may yet read the request it was sent: it finds
    // the id taken, and there is still one route of that create.
    let count = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM routes")
            .fetch_one(pool)
            .await
            .unwrap()
    };
    // 80 + 1 (the session's) + 2 (traced) + the one made while the leader
    // was stopped.
    assert_eq!(count().await, 84);
    let (status, again) = post_route(&leader, &route(Uuid::new_v4(), "jupyter")).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the leader serves again: {again}"
    );
    assert_eq!(count().await, 85);

    // The leader dies: the follower takes over, and commits its own.
    replicas[l].kill();
    let follower_url = follower.clone();
    wait_for("the follower to lead", async || {
        row().await.as_deref() == Some(follower_url.as_str())
    })
    .await;
    let (status, _) = post_route(&follower, &route(Uuid::new_v4(), "jupyter")).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(count().await, 86);
    assert!(metric(&follower, COMMITTED).await >= 2.0);
}

/// Replicas set up with different manager tokens: the leader refuses the
/// other's batch (401) before creating anything, and the other commits it
/// itself and says why in a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_leader_refuses_is_committed_by_the_replica_that_sent_it() {
    const OTHER: &str = "another-manager-token-of-this-test";
    let db = TestDb::new(Backend::Postgres).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let replicas = [
        replica(&db, &dirs[0], MANAGER),
        replica(&db, &dirs[1], OTHER),
    ];
    let store = db.store().await;
    let Db::Postgres(pool) = store.db() else {
        unreachable!()
    };
    let (_, f) = leader_and_follower(pool, &replicas).await;
    let follower = &replicas[f];
    let token = [MANAGER, OTHER][f];
    let (_w, _) = connect(&follower.url, "w").await;
    let create = async || {
        common::http_client()
            .post(format!("{}/routes", follower.url))
            .bearer_auth(token)
            .json(&route(Uuid::new_v4(), "jupyter"))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(create().await, StatusCode::CREATED);
    assert_eq!(metric(&follower.url, NOT_SENT).await, 1.0);
    assert_eq!(metric(&follower.url, COMMITTED).await, 1.0);
    let log = follower.log();
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains("401")),
        "{log}"
    );
}
