//! The status page's data over HTTP on both backends: `/ui/events` sends the
//! state at once and again after each change, and a failover shows as the
//! page shows it — the worker Lost, its routes on the other worker, the move
//! among the recent events. (`make e2e-ui` drives the page itself in
//! Chromium; `tests/auth/ui.rs` is who may see it.)

use std::time::{Duration, Instant};

use appproxy_coordinator::health::HealthConfig;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{PATIENCE, TestApp, VIEWER, route};
use crate::on_both_backends;

on_both_backends!(
    the_events_stream_sends_the_state_at_once_and_after_each_change,
    a_failover_shows_on_the_page_with_its_moves_among_the_recent_events,
    a_route_no_worker_can_take_shows_as_pending_with_its_reason,
);

/// The `state` events of an open `/ui/events` stream.
struct States {
    body: futures::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buffer: String,
}

impl States {
    async fn open(app: &TestApp) -> States {
        let r = app
            .http
            .get(format!("{}/ui/events", app.url))
            .bearer_auth(VIEWER)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        States {
            body: r.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next `state` event's data.
    async fn next(&mut self) -> Value {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if block.lines().any(|l| l == "event: state") {
                    let data: String = block
                        .lines()
                        .filter_map(|l| l.strip_prefix("data: "))
                        .collect();
                    return serde_json::from_str(&data).unwrap();
                }
                continue;
            }
            let chunk = tokio::time::timeout(PATIENCE, self.body.next())
                .await
                .expect("a state within the patience")
                .expect("the stream goes on")
                .unwrap();
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Reads states until one satisfies `check`.
    async fn until(&mut self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let state = self.next().await;
            if check(&state) {
                return state;
            }
            assert!(started.elapsed() < PATIENCE, "{what}: last state {state}");
        }
    }
}

fn worker_status<'a>(state: &'a Value, name: &str) -> Option<&'a str> {
    state["workers"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == name)
        .and_then(|w| w["status"].as_str())
}

async fn the_events_stream_sends_the_state_at_once_and_after_each_change(
    b: crate::common::Backend,
) {
    let app = TestApp::start(b).await;
    let mut states = States::open(&app).await;
    let first = states.next().await;
    assert_eq!(first["workers"], json!([]));
    assert_eq!(first["routes"], json!([]));
    let (id, _, _) = app.register("w1", [20000, 20100]).await;
    states
        .until("w1 registered", |s| worker_status(s, "w1") == Some("Ready"))
        .await;
    let created = app.create(route(Uuid::new_v4(), "jupyter")).await;
    let route_id = created.body["id"].clone();
    let state = states
        .until("the route", |s| {
            s["routes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["id"] == route_id)
        })
        .await;
    let shown = &state["routes"][0];
    assert_eq!(shown["worker_id"], json!(id));
    assert_eq!(shown["url"], created.body["frontend"]["url"]);
    assert_eq!(shown["service"], "jupyter");
    assert_eq!(state["workers"][0]["routes"], 1);
    // What the page reads is what /ui/state answers.
    let now = app.call(Method::GET, "/ui/state", Some(VIEWER), None).await;
    assert_eq!(now.body["routes"], state["routes"]);
}

const TIMEOUT: Duration = Duration::from_secs(10);
const GRACE: Duration = Duration::from_secs(2);

async fn a_failover_shows_on_the_page_with_its_moves_among_the_recent_events(
    b: crate::common::Backend,
) {
    let app = TestApp::builder(b)
        .health(HealthConfig {
            heartbeat_timeout: TIMEOUT,
            failover_grace: GRACE,
            batch_size: 4,
            route_idle_ttl: None,
        })
        .start()
        .await;
    let (a, _, _) = app.register("a", [20000, 20100]).await;
    let (b_id, b_token, _) = app.register("b", [30000, 30100]).await;
    let mut moved = Vec::new();
    for _ in 0..3 {
        let mut body = route(Uuid::new_v4(), "jupyter");
        body["worker_id"] = json!(a);
        let r = app.create(body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        moved.push(r.body["id"].clone());
    }
    let mut states = States::open(&app).await;
    states
        .until("three routes on a", |s| {
            s["routes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["worker_id"] == json!(a))
                .count()
                == 3
        })
        .await;
    // a stops heartbeating; b goes on.
    for wait in [TIMEOUT, GRACE] {
        app.clock.advance(wait + Duration::from_secs(1));
        let beat = app
            .call(
                Method::POST,
                &format!("/workers/{b_id}/heartbeat"),
                Some(&b_token),
                Some(json!({"acked_revision": 0})),
            )
            .await;
        assert_eq!(beat.status, StatusCode::OK);
        app.health_pass().await;
    }
    let state = states
        .until("a Lost, its routes on b, the moves told", |s| {
            let routes = s["routes"].as_array().unwrap();
            worker_status(s, "a") == Some("Lost")
                && routes.iter().all(|r| r["worker_id"] == json!(b_id))
                && s["recent"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|e| e["kind"] == "failover")
                    .count()
                    == 3
        })
        .await;
    for id in &moved {
        let id = id.as_str().unwrap();
        assert!(
            state["recent"].as_array().unwrap().iter().any(|e| {
                e["route_id"] == id
                    && e["text"]
                        .as_str()
                        .unwrap()
                        .contains("from a to b (its worker is Lost)")
            }),
            "{id} in {}",
            state["recent"]
        );
    }
    assert!(
        state["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "worker" && e["text"] == "worker a is Lost (was Ready)"),
        "{}",
        state["recent"]
    );
}

/// A lost worker's route that no other worker can take waits: the page
/// lists it without a worker or URL, with the reason, and tells the move.
async fn a_route_no_worker_can_take_shows_as_pending_with_its_reason(b: crate::common::Backend) {
    let app = TestApp::builder(b)
        .health(HealthConfig {
            heartbeat_timeout: TIMEOUT,
            failover_grace: GRACE,
            batch_size: 4,
            route_idle_ttl: None,
        })
        .start()
        .await;
    app.register("only", [20000, 20100]).await;
    let created = app.create(route(Uuid::new_v4(), "jupyter")).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    for wait in [TIMEOUT, GRACE] {
        app.clock.advance(wait + Duration::from_secs(1));
        app.health_pass().await;
    }
    let mut states = States::open(&app).await;
    let state = states
        .until("the route Pending", |s| {
            s["routes"][0]["status"] == "Pending"
        })
        .await;
    let shown = &state["routes"][0];
    assert_eq!(shown["id"], created.body["id"]);
    assert_eq!(shown["worker_id"], Value::Null);
    assert_eq!(shown["url"], Value::Null);
    assert!(shown["pending_reason"].is_string(), "{shown}");
    let told = state["recent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "pending")
        .unwrap_or_else(|| panic!("no pending event in {}", state["recent"]));
    assert_eq!(told["route_id"], created.body["id"]);
    assert!(
        told["text"]
            .as_str()
            .unwrap()
            .contains("left only (its worker is Lost) and waits"),
        "{told}"
    );
    assert_eq!(state["stranded"], json!([]));
}
