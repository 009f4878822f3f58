//! The Backend.AI Manager's core bus against the real Redis: a
//! `session_terminated` entry (as `backend-ai-common` writes it) removes the
//! session's interactive circuits, http and tcp, and nothing else; entries
//! are acknowledged only once handled; what a consumer that died left
//! pending is handled by another after the claim idle time.
//!
//! Each test has a stream of its own in DB 4 (tests run in parallel on one
//! Redis) and deletes it at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use appproxy_coordinator::backendai::bus;
use appproxy_coordinator::backendai::sessions::{self, SessionsConfig};
use appproxy_coordinator::leader::{Context, Leadership};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;
use uuid::Uuid;

use crate::bus::{
    Loops, Subscriber, acknowledger_on, authority, bai_worker, circuit_route, create,
};
use crate::common::{self, Backend, PATIENCE, REDIS_URL, TestApp, wait_for};

crate::on_both_backends!(
    a_terminated_session_loses_its_http_and_tcp_circuits_and_nothing_else,
    an_entry_a_dead_consumer_left_pending_is_handled_by_another_after_the_idle_time,
    an_unreachable_core_bus_stops_nothing,
);

/// The core bus: DB 4 of the test Redis.
fn core() -> redis::Client {
    redis::Client::open(format!("{REDIS_URL}/{}", sessions::CORE_DB)).unwrap()
}

/// A stream of this test's own, read quickly; claims after `claim_idle`.
fn config(stream: &str, claim_idle: Duration) -> SessionsConfig {
    SessionsConfig {
        stream: stream.to_owned(),
        claim_interval: Duration::from_millis(50),
        block: Duration::from_millis(200),
        claim_idle,
        ..SessionsConfig::default()
    }
}

/// One replica's session consumer, stopped by [`Consumer::stop`].
struct Consumer {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

impl Consumer {
    fn start(app: &TestApp, config: SessionsConfig) -> Consumer {
        let (stop, stopped) = watch::channel(false);
        let ctx = Context {
            store: app.store.clone(),
            metrics: app.metrics.clone(),
            clock: app.clock.clone(),
            // Not leading: every replica consumes.
            leadership: Leadership::fixed(false),
            shutdown: stopped,
        };
        let bai = Arc::clone(app.backendai.as_ref().unwrap());
        let handle = sessions::spawn(ctx, bai, config).unwrap();
        Consumer { stop, handle }
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(PATIENCE, self.handle)
            .await
            .expect("the consumer stops")
            .unwrap();
    }
}

/// `XADD <stream> * name … source manager payload … metadata …`, byte for
/// byte what `EventProducer.anycast_event` writes (shared/BACKENDAI.md §4.6).
async fn xadd(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    name: &str,
    payload: &str,
) -> String {
    redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("name")
        .arg(name)
        .arg("source")
        .arg("manager")
        .arg("payload")
        .arg(payload)
        .arg("metadata")
        .arg(bus::METADATA)
        .query_async(conn)
        .await
        .unwrap()
}

fn terminated(session: Uuid) -> String {
    format!(r#"{{"session_id":"{session}","reason":"user-requested"}}"#)
}

/// Entries delivered to the group and not acknowledged: (id, consumer).
async fn pending(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<(String, String)> {
    let rows: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(sessions::GROUP)
        .arg("-")
        .arg("+")
        .arg(100)
        .query_async(conn)
        .await
        .unwrap();
    rows.into_iter()
        .map(|(id, consumer, _, _)| (id, consumer))
        .collect()
}

/// Waits until the consumer has created its group on `stream`.
async fn group_exists(conn: &mut redis::aio::MultiplexedConnection, stream: &str) {
    wait_for("the consumer group", async || {
        let groups: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut conn.clone())
            .await;
        groups.is_ok_and(|g| !g.is_empty())
    })
    .await;
}

async fn exists(app: &TestApp, id: &str) -> bool {
    let a = app
        .manager(Method::GET, &format!("/routes/{id}"), None)
        .await;
    assert!(
        matches!(a.status, StatusCode::OK | StatusCode::NOT_FOUND),
        "{:?}",
        a.body
    );
    a.status == StatusCode::OK
}

/// An interactive circuit of `session` for `service` over `protocol`, on `worker`.
fn session_circuit(worker: Uuid, session: Uuid, service: &str, protocol: &str) -> Value {
    let mut body = circuit_route(worker);
    body["session_id"] = session.to_string().into();
    body["service"] = service.into();
    body["protocol"] = protocol.into();
    body["circuit"]["session_ids"] = json!([session]);
    body
}

/// A Backend.AI port-mode worker serving tcp circuits (a worker serves one
/// protocol).
async fn tcp_worker(app: &TestApp, name: &str, ports: [u16; 2]) -> Uuid {
    let frontend = json!({"frontend_mode": "port", "port_range": ports, "protocol": "tcp"});
    common::register_backendai_worker(app, name, frontend)
        .await
        .id
}

fn id(route: &Value) -> String {
    route["id"].as_str().unwrap().to_owned()
}

fn metric(app: &TestApp, name: &str) -> String {
    let text = app.metrics.encode();
    text.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .to_owned()
}

async fn a_terminated_session_loses_its_http_and_tcp_circuits_and_nothing_else(backend: Backend) {
    let app = TestApp::start_backendai(backend).await;
    let (name, tcp_name) = (authority("sessions"), authority("sessions-tcp"));
    let worker = bai_worker(&app, &name, [10205, 10220]).await;
    let tcp_worker = tcp_worker(&app, &tcp_name, [10305, 10320]).await;
    let redis = redis::Client::open(REDIS_URL).unwrap();
    let mut events = Subscriber::on(&redis, &[&name, &tcp_name]).await;
    let _worker = acknowledger_on(&redis, &name, 0).await;
    let _tcp_worker = acknowledger_on(&redis, &tcp_name, 0).await;
    let loops = Loops::of(&app, true);

    let (ended, other) = (Uuid::new_v4(), Uuid::new_v4());
    let http = create(&app, session_circuit(worker, ended, "jupyter", "http")).await;
    let tcp = create(&app, session_circuit(tcp_worker, ended, "sshd", "tcp")).await;
    let others = create(&app, session_circuit(worker, other, "jupyter", "http")).await;
    let mut inference = circuit_route(worker);
    inference["app_mode"] = "inference".into();
    inference["endpoint_id"] = Uuid::new_v4().to_string().into();
    inference["session_id"] = Value::Null;
    inference["circuit"]["session_ids"] = json!([ended]);
    let inference = create(&app, inference).await;
    // A native route with the same session id (no circuit fields): not the
    // Backend.AI Manager's to remove.
    let native = create(&app, common::route(ended, "vscode")).await;
    for r in [&http, &tcp, &others, &inference, &native] {
        let on = if r == &tcp { &tcp_name } else { &name };
        events.expect(bus::CREATED, on, &id(r)).await;
    }

    let stream = format!("test-events-{}", Uuid::new_v4().simple());
    let mut conn = core().get_multiplexed_async_connection().await.unwrap();
    let consumer = Consumer::start(&app, config(&stream, Duration::from_secs(3600)));
    group_exists(&mut conn, &stream).await;
    // Another event and a malformed one first: acknowledged, ignored.
    let started = format!(r#"{{"session_id":"{ended}","creation_id":"c"}}"#);
    for (name, payload) in [
        ("session_started", started),
        (sessions::SESSION_TERMINATED, "{not json".to_owned()),
        (sessions::SESSION_TERMINATED, terminated(ended)),
    ] {
        xadd(&mut conn, &stream, name, &payload).await;
    }

    let mut removed = [events.next().await, events.next().await];
    removed.sort_by_key(|h| h.circuit()["id"].as_str().unwrap().to_owned());
    let mut expected = [(id(&http), &name), (id(&tcp), &tcp_name)];
    expected.sort();
    for (heard, (want, on)) in removed.iter().zip(&expected) {
        assert_eq!(heard.name, bus::REMOVED, "{heard:?}");
        assert_eq!(heard.payload["target_worker_authority"], on.as_str());
        assert_eq!(heard.circuit()["id"].as_str(), Some(want.as_str()));
    }
    for gone in [&http, &tcp] {
        assert!(!exists(&app, &id(gone)).await, "{gone}");
    }
    for kept in [&others, &inference, &native] {
        assert!(exists(&app, &id(kept)).await, "{kept}");
    }
    wait_for("every entry acknowledged", async || {
        pending(&mut conn.clone(), &stream).await.is_empty()
    })
    .await;
    assert!(metric(&app, "appproxy_backendai_sessions_terminated_total").ends_with(" 1"));
    assert!(metric(&app, "appproxy_backendai_session_circuits_removed_total").ends_with(" 2"));

    // Delivered again (at least once): nothing more goes.
    xadd(
        &mut conn,
        &stream,
        sessions::SESSION_TERMINATED,
        &terminated(ended),
    )
    .await;
    wait_for("the repeat handled", async || {
        metric(&app, "appproxy_backendai_sessions_terminated_total").ends_with(" 2")
    })
    .await;
    assert!(metric(&app, "appproxy_backendai_session_circuits_removed_total").ends_with(" 2"));
    for kept in [&others, &inference, &native] {
        assert!(exists(&app, &id(kept)).await, "{kept}");
    }
    consumer.stop().await;
    loops.stop().await;
    let _: i64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
}

async fn an_entry_a_dead_consumer_left_pending_is_handled_by_another_after_the_idle_time(
    backend: Backend,
) {
    let app = TestApp::start_backendai(backend).await;
    let worker = bai_worker(&app, &authority("claims"), [10205, 10220]).await;
    let tcp_worker = tcp_worker(&app, &authority("claims-tcp"), [10305, 10320]).await;
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let first_circuits = [
        create(&app, session_circuit(worker, first, "jupyter", "http")).await,
        create(&app, session_circuit(tcp_worker, first, "sshd", "tcp")).await,
    ];
    let second_circuit = create(&app, session_circuit(worker, second, "jupyter", "http")).await;

    // A replica joined the group, received the first session's entry and
    // died before acknowledging it.
    let stream = format!("test-events-{}", Uuid::new_v4().simple());
    let mut conn = core().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(sessions::GROUP)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    let entry = xadd(
        &mut conn,
        &stream,
        sessions::SESSION_TERMINATED,
        &terminated(first),
    )
    .await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(sessions::GROUP)
        .arg("dead-replica")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();

    // A live replica that claims only after an hour handles new entries
    // (having looked for idle ones first) and leaves the dead one's alone.
    let patient = Consumer::start(&app, config(&stream, Duration::from_secs(3600)));
    xadd(
        &mut conn,
        &stream,
        sessions::SESSION_TERMINATED,
        &terminated(second),
    )
    .await;
    wait_for("the second session's circuit gone", async || {
        !exists(&app, &id(&second_circuit)).await
    })
    .await;
    for c in &first_circuits {
        assert!(
            exists(&app, &id(c)).await,
            "not claimed before the idle time"
        );
    }
    assert_eq!(
        pending(&mut conn, &stream).await,
        [(entry.clone(), "dead-replica".to_owned())]
    );

    // Past the idle time (here: any), another replica takes the entry over.
    patient.stop().await;
    let other = Consumer::start(&app, config(&stream, Duration::ZERO));
    for c in &first_circuits {
        wait_for("the first session's circuits gone", async || {
            !exists(&app, &id(c)).await
        })
        .await;
    }
    wait_for("the claimed entry acknowledged", async || {
        pending(&mut conn.clone(), &stream).await.is_empty()
    })
    .await;
    assert!(metric(&app, "appproxy_backendai_sessions_terminated_total").ends_with(" 2"));
    assert!(metric(&app, "appproxy_backendai_session_circuits_removed_total").ends_with(" 3"));
    other.stop().await;
    let _: i64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
}

async fn an_unreachable_core_bus_stops_nothing(backend: Backend) {
    let app = TestApp::start_backendai(backend).await;
    let worker = bai_worker(&app, &authority("unreachable"), [10205, 10220]).await;
    // A "Redis" that hangs up on every connection, counting them.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let _hang_up = common::Task::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    let consumer = Consumer::start(
        &app,
        SessionsConfig {
            core_redis_url: Some(format!("redis://:core-secret@127.0.0.1:{port}/4")),
            ..config("events", Duration::from_secs(3600))
        },
    );
    // It tries again after each failure (with a backoff) instead of ending,
    // and the API keeps serving meanwhile; it stops on shutdown.
    wait_for("three attempts", async || {
        attempts.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert!(
        !consumer.handle.is_finished(),
        "the consumer keeps retrying"
    );
    let route = create(
        &app,
        session_circuit(worker, Uuid::new_v4(), "jupyter", "http"),
    )
    .await;
    assert!(exists(&app, &id(&route)).await);
    consumer.stop().await;
}
