//! What the publisher sends again so that a lost pub/sub message is not a
//! lost route, against the real Redis: a created event re-published within
//! the ack wait (the Manager's call answers 200, not 503), route-updated and
//! removed events followed up in the seconds after their change, the
//! anti-entropy sweep over every circuit and every recent removal (from the
//! database, so a new leader has them), and a worker's fetch of its circuits
//! counted as their delivery.
//!
//! Every loss is made by the test, not by timing: the played worker ignores
//! a created event, or nobody acts on an event at all, and the test checks
//! what comes again on the channel as the manual clock moves.

use std::time::Duration;

use appproxy_coordinator::backendai::bus::{self, BusConfig};
use reqwest::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

use crate::bus::{
    Heard, Loops, Subscriber, acknowledger, authority, bai_worker, circuit_route, create, fast,
    status,
};
use crate::common::{Backend, TestApp, wait_for};
use crate::manager::{bulk_create, endpoint, manager};

crate::on_both_backends!(
    a_lost_created_event_costs_a_re_publish_not_a_503,
    a_route_update_is_sent_again_in_the_seconds_after_its_change,
    a_removal_is_sent_again_unless_another_circuit_took_its_slot,
    the_sweep_sends_every_circuit_and_recent_removal_again_and_a_new_leader_too,
    circuits_a_worker_fetched_count_as_delivered,
);

/// The followed-up events of a test: `after` each change, no sweep.
fn following(after: &[u64]) -> BusConfig {
    BusConfig {
        resend_after: after.iter().map(|s| Duration::from_secs(*s)).collect(),
        ..fast()
    }
}

fn resent(app: &TestApp, event: &str, why: &str) -> u64 {
    let metrics = app.metrics.encode();
    let key = format!("appproxy_backendai_bus_resent_total{{event=\"{event}\",why=\"{why}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Waits until the metric counted `n` re-sends of `event` for `why` (it is
/// counted just after the send a subscriber hears).
async fn counted(app: &TestApp, event: &str, why: &str, n: u64) {
    wait_for(format!("{n} re-sends of {event} ({why})"), async || {
        resent(app, event, why) == n
    })
    .await;
}

/// A circuit as a worker acts on it (without the time of its last write).
fn served(h: &Heard) -> serde_json::Value {
    let mut c = h.circuit().clone();
    c.as_object_mut().unwrap().remove("updated_at");
    c
}

async fn a_lost_created_event_costs_a_re_publish_not_a_503(backend: Backend) {
    let app = TestApp::start_backendai(backend).await;
    let name = authority("lost-created");
    bai_worker(&app, &name, [10205, 10210]).await;
    let mut events = Subscriber::start(&[&name]).await;
    // The worker misses the first created event (its subscriber was away).
    let _worker = acknowledger(&name, 1).await;
    let loops = Loops::with(&app, fast());

    let deployment = Uuid::new_v4();
    let (answer, ()) = tokio::join!(
        bulk_create(&app, vec![endpoint(deployment, "lost", None)]),
        async {
            let first = events.next().await;
            assert_eq!(first.name, bus::CREATED);
            // Half a second on, well inside the 15 s the call waits.
            app.clock.advance(fast().first_republish);
            let again = events.next().await;
            assert_eq!(again.name, bus::CREATED);
            assert_eq!(again.payload, first.payload);
        }
    );
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(
        answer.body["endpoints"][0]["url"],
        "http://127.0.0.1:10205/"
    );
    counted(&app, bus::CREATED, "ack_wait", 1).await;
    loops.stop().await;
}

async fn a_route_update_is_sent_again_in_the_seconds_after_its_change(backend: Backend) {
    let app = TestApp::start_backendai(backend).await;
    let name = authority("follow-update");
    let worker = bai_worker(&app, &name, [10205, 10210]).await;
    let mut events = Subscriber::start(&[&name]).await;
    let _worker = acknowledger(&name, 0).await;
    let loops = Loops::with(&app, following(&[1, 3]));

    let route = create(&app, circuit_route(worker)).await;
    let id = route["id"].as_str().unwrap();
    events.expect(bus::CREATED, &name, id).await;
    wait_for("Active", async || status(&app, id).await == "Active").await;
    let patched = app
        .manager(
            Method::PATCH,
            &format!("/routes/{id}"),
            Some(json!({"targets": [{"host": "10.0.1.8", "port": 9999}]})),
        )
        .await;
    assert!(patched.status.is_success(), "{:?}", patched.body);
    let update = events.expect(bus::ROUTE_UPDATED, &name, id).await;
    assert_eq!(update.payload["routes"][0]["kernel_port"], 9999);

    // A worker that missed it hears the same state 1 s and 3 s later…
    app.clock.advance(Duration::from_secs(1));
    let again = events.expect(bus::ROUTE_UPDATED, &name, id).await;
    assert_eq!(served(&again), served(&update));
    assert_eq!(again.payload["routes"], update.payload["routes"]);
    app.clock.advance(Duration::from_secs(2));
    events.expect(bus::ROUTE_UPDATED, &name, id).await;
    counted(&app, bus::ROUTE_UPDATED, "after_change", 2).await;

    // …and no more: the next event on the channel is the next change's.
    app.clock.advance(Duration::from_secs(60));
    let next = create(&app, circuit_route(worker)).await;
    events
        .expect(bus::CREATED, &name, next["id"].as_str().unwrap())
        .await;
    counted(&app, bus::ROUTE_UPDATED, "after_change", 2).await;
    loops.stop().await;
}

async fn a_removal_is_sent_again_unless_another_circuit_took_its_slot(backend: Backend) {
    let app = TestApp::start_backendai(backend).await;
    let name = authority("follow-removal");
    // One port: a new circuit takes the slot the removed one held.
    let worker = bai_worker(&app, &name, [10205, 10205]).await;
    let mut events = Subscriber::start(&[&name]).await;
    let _worker = acknowledger(&name, 0).await;
    let loops = Loops::with(&app, following(&[1, 3]));

    let a = create(&app, circuit_route(worker)).await;
    let a_id = a["id"].as_str().unwrap();
    events.expect(bus::CREATED, &name, a_id).await;
    wait_for("Active", async || status(&app, a_id).await == "Active").await;
    let deleted = app
        .manager(Method::DELETE, &format!("/routes/{a_id}"), None)
        .await;
    assert!(deleted.status.is_success());
    let removed = events.expect(bus::REMOVED, &name, a_id).await;

    // 1 s later the slot is free: the removal comes again.
    app.clock.advance(Duration::from_secs(1));
    let again = events.expect(bus::REMOVED, &name, a_id).await;
    assert_eq!(again.payload, removed.payload);

    // Now another circuit holds port 10205: removing "10205" again would
    // take it down, so the 3 s follow-up is not sent.
    let b = create(&app, circuit_route(worker)).await;
    let b_id = b["id"].as_str().unwrap();
    assert_eq!(b["frontend"]["port"], a["frontend"]["port"]);
    events.expect(bus::CREATED, &name, b_id).await;
    wait_for("Active", async || status(&app, b_id).await == "Active").await;
    app.clock.advance(Duration::from_secs(2));
    for port in [9001, 9002] {
        let patched = app
            .manager(
                Method::PATCH,
                &format!("/routes/{b_id}"),
                Some(json!({"targets": [{"host": "10.0.1.8", "port": port}]})),
            )
            .await;
        assert!(patched.status.is_success(), "{:?}", patched.body);
        // Each PATCH's pass also ran the due follow-ups: none is a removal.
        let h = events.expect(bus::ROUTE_UPDATED, &name, b_id).await;
        assert_eq!(h.payload["routes"][0]["kernel_port"], port);
    }
    counted(&app, bus::REMOVED, "after_change", 1).await;
    loops.stop().await;
}

async fn the_sweep_sends_every_circuit_and_recent_removal_again_and_a_new_leader_too(
    backend: Backend,
) {
    let app = TestApp::start_backendai(backend).await;
    let name = authority("sweep");
    let worker = bai_worker(&app, &name, [10205, 10210]).await;
    let mut events = Subscriber::start(&[&name]).await;
    let _worker = acknowledger(&name, 0).await;
    let config = BusConfig {
        sweep_period: Duration::from_secs(10),
        ..fast()
    };
    // These loops publish and record the acknowledgements; the sweep is
    // watched on the next leader's.
    let loops = Loops::with(&app, fast());

    let mut live = Vec::new();
    for _ in 0..2 {
        let r = create(&app, circuit_route(worker)).await;
        let id = r["id"].as_str().unwrap().to_owned();
        events.expect(bus::CREATED, &name, &id).await;
        wait_for("Active", async || status(&app, &id).await == "Active").await;
        live.push(id);
    }
    let gone = create(&app, circuit_route(worker)).await;
    let gone_id = gone["id"].as_str().unwrap().to_owned();
    events.expect(bus::CREATED, &name, &gone_id).await;
    wait_for("Active", async || status(&app, &gone_id).await == "Active").await;
    app.manager(Method::DELETE, &format!("/routes/{gone_id}"), None)
        .await;
    events.expect(bus::REMOVED, &name, &gone_id).await;

    let mut expected: Vec<(String, String)> = live
        .iter()
        .map(|id| (bus::ROUTE_UPDATED.to_owned(), id.clone()))
        .chain([(bus::REMOVED.to_owned(), gone_id.clone())])
        .collect();
    expected.sort();

    // A new leader starts a sweep over what the database holds: the live
    // circuits and the removal, which no publisher of its own remembers.
    loops.stop().await;
    let loops = Loops::with(&app, config);
    assert_eq!(sweep(&app, &mut events, 3).await, expected);
    counted(&app, bus::ROUTE_UPDATED, "sweep", 2).await;
    counted(&app, bus::REMOVED, "sweep", 1).await;
    // And the next period, each once again.
    assert_eq!(sweep(&app, &mut events, 3).await, expected);
    loops.stop().await;
}

/// Moves the clock on half a second at a time until `n` events came; they
/// are answered as (event, circuit id), sorted.
async fn sweep(app: &TestApp, events: &mut Subscriber, n: usize) -> Vec<(String, String)> {
    let mut heard = Vec::new();
    wait_for(format!("{n} swept events"), async || {
        app.clock.advance(Duration::from_millis(500));
        while let Some(h) = events.try_next() {
            heard.push((
                h.name.clone(),
                h.circuit()["id"].as_str().unwrap().to_owned(),
            ));
        }
        heard.len() >= n
    })
    .await;
    heard.sort();
    heard
}

async fn circuits_a_worker_fetched_count_as_delivered(backend: Backend) {
    let app = TestApp::start_backendai(backend).await;
    let name = authority("fetched");
    let worker = bai_worker(&app, &name, [10205, 10210]).await;
    let mut events = Subscriber::start(&[&name]).await;
    // Nobody acknowledges the created event: the worker was restarting.
    let loops = Loops::of(&app, true);
    let route = create(&app, circuit_route(worker)).await;
    let id = route["id"].as_str().unwrap();
    events.expect(bus::CREATED, &name, id).await;
    assert_eq!(status(&app, id).await, "Propagating");

    // At its boot the worker reads its circuits, and registers each.
    let fetched = manager(
        &app,
        Method::GET,
        &format!("/api/worker/{worker}/circuits"),
        None,
    )
    .await;
    assert_eq!(fetched.status, StatusCode::OK, "{:?}", fetched.body);
    assert_eq!(fetched.body["circuits"][0]["id"], id);
    wait_for("the fetched route is Active", async || {
        status(&app, id).await == "Active"
    })
    .await;
    // Delivered: no re-publish however long it stays quiet.
    app.clock.advance(Duration::from_secs(600));
    let next = create(&app, circuit_route(worker)).await;
    events
        .expect(bus::CREATED, &name, next["id"].as_str().unwrap())
        .await;
    loops.stop().await;
}
