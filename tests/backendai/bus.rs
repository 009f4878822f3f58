//! The Backend.AI event bus against the real Redis on 127.0.0.1:6379: what
//! the publisher sends (envelope bytes, created / removed on moves, deletes
//! and idle collection), acknowledgements making routes `Active`,
//! re-publishing until acknowledged, and publishing that resumes after a
//! restart and runs on whichever replica leads.
//!
//! Each test names its workers uniquely (tests run in parallel on one Redis)
//! and its subscriber keeps only the events for those names; a task plays
//! the Backend.AI worker where one must acknowledge.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use appproxy_coordinator::backendai::BackendAi;
use appproxy_coordinator::backendai::bus::{self, BusConfig, Envelope};
use appproxy_coordinator::backendai::idle;
use appproxy_coordinator::clock::Clock;
use appproxy_coordinator::leader::{Context, Leadership};
use appproxy_coordinator::store::Store;
use appproxy_coordinator::telemetry::Metrics;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::common::{self, Backend, PATIENCE, REDIS_URL, Task, TestApp, wait_for};

crate::on_both_backends!(
    a_created_event_has_upstream_s_envelope_and_its_ack_makes_the_route_active,
    a_created_event_nobody_acknowledges_is_published_again_until_acknowledged,
    publishing_resumes_after_a_restart_with_only_what_was_not_published,
    the_leader_publishes_changes_committed_on_another_replica,
    a_move_is_removed_on_the_old_worker_and_created_on_the_new,
    idle_interactive_circuits_are_collected_and_removed,
    a_log_compacted_past_the_position_republishes_every_circuit,
    redis_down_delays_publishing_and_stops_nothing,
);

/// Fast loops; time-based decisions still read the app's manual clock. No
/// follow-ups or sweep (tests/backendai/resend.rs turns them on): each event
/// a test expects is the one its change made.
pub(crate) fn fast() -> BusConfig {
    BusConfig {
        poll_interval: Duration::from_millis(50),
        idle_interval: Duration::from_millis(50),
        resend_after: Vec::new(),
        sweep_period: Duration::ZERO,
        ..BusConfig::default()
    }
}

/// The bus loops of one coordinator, stopped by [`Loops::stop`].
pub(crate) struct Loops {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

impl Loops {
    pub(crate) fn start(
        store: &Store,
        bai: &Arc<BackendAi>,
        metrics: &Arc<Metrics>,
        leading: bool,
        clock: &Clock,
    ) -> Loops {
        Loops::start_with(store, bai, metrics, leading, clock, fast())
    }

    /// As [`Loops::start`], paced by `config`.
    pub(crate) fn start_with(
        store: &Store,
        bai: &Arc<BackendAi>,
        metrics: &Arc<Metrics>,
        leading: bool,
        clock: &Clock,
        config: BusConfig,
    ) -> Loops {
        let (stop, stopped) = watch::channel(false);
        let ctx = Context {
            store: store.clone(),
            metrics: metrics.clone(),
            clock: clock.clone(),
            leadership: Leadership::fixed(leading),
            shutdown: stopped,
        };
        let handle = bus::spawn(ctx, bai.clone(), config);
        Loops { stop, handle }
    }

    pub(crate) fn of(app: &TestApp, leading: bool) -> Loops {
        Loops::start(
            &app.store,
            app.backendai.as_ref().unwrap(),
            &app.metrics,
            leading,
            &app.clock,
        )
    }

    /// The leading loops of `app`, paced by `config`.
    pub(crate) fn with(app: &TestApp, config: BusConfig) -> Loops {
        Loops::start_with(
            &app.store,
            app.backendai.as_ref().unwrap(),
            &app.metrics,
            true,
            &app.clock,
            config,
        )
    }

    pub(crate) async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(PATIENCE, self.handle)
            .await
            .expect("the bus loops stop")
            .unwrap();
    }
}

/// A unique worker name (authority) for this test.
pub(crate) fn authority(what: &str) -> String {
    format!("bus-{what}-{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// Registers a Backend.AI port-mode worker (as `PUT /api/worker` does);
/// answers its id.
pub(crate) async fn bai_worker(app: &TestApp, name: &str, ports: [u16; 2]) -> Uuid {
    let frontend = json!({"frontend_mode": "port", "port_range": ports});
    common::register_backendai_worker(app, name, frontend)
        .await
        .id
}

/// An interactive Backend.AI route pinned to `worker`.
pub(crate) fn circuit_route(worker: Uuid) -> Value {
    json!({
        "session_id": Uuid::new_v4(),
        "service": "jupyter",
        "targets": [{"host": "10.0.1.7", "port": 8888}],
        "worker_id": worker,
        "circuit": {"user_id": Uuid::new_v4(), "session_ids": []}
    })
}

pub(crate) async fn create(app: &TestApp, body: Value) -> Value {
    let a = app.create(body).await;
    assert!(a.status.is_success(), "{:?}", a.body);
    a.body
}

pub(crate) async fn status(app: &TestApp, id: &str) -> String {
    let a = app
        .manager(Method::GET, &format!("/routes/{id}"), None)
        .await;
    a.body["status"].as_str().unwrap_or_default().to_owned()
}

/// An event heard on the channel: the raw message and its parts.
#[derive(Debug)]
pub(crate) struct Heard {
    pub(crate) raw: String,
    pub(crate) name: String,
    pub(crate) payload: Value,
}

impl Heard {
    pub(crate) fn circuit(&self) -> &Value {
        self.payload
            .get("circuit")
            .unwrap_or(&self.payload["circuits"][0])
    }
}

/// Subscribes to the channel; keeps the coordinator's events for
/// `authorities`.
pub(crate) struct Subscriber {
    rx: mpsc::UnboundedReceiver<Heard>,
    /// Reads the channel until the subscriber is dropped.
    _task: Task,
}

impl Subscriber {
    pub(crate) async fn start(authorities: &[&str]) -> Subscriber {
        Subscriber::on(&redis::Client::open(REDIS_URL).unwrap(), authorities).await
    }

    /// As [`Subscriber::start`], on the Redis `client` points at.
    pub(crate) async fn on(client: &redis::Client, authorities: &[&str]) -> Subscriber {
        let names: Vec<String> = authorities.iter().map(|a| a.to_string()).collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.subscribe(bus::CHANNEL).await.unwrap();
        let task = Task::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(m) = messages.next().await {
                let raw: String = m.get_payload().unwrap();
                let Ok(envelope) = serde_json::from_str::<Envelope>(&raw) else {
                    continue;
                };
                // What workers are told (acknowledgements the coordinator
                // says for a fetch are not).
                if envelope.source != bus::SOURCE || envelope.name == bus::ADDED {
                    continue;
                }
                let payload: Value = serde_json::from_str(&envelope.payload).unwrap();
                let target = payload["target_worker_authority"].as_str().unwrap_or("");
                if !names.iter().any(|n| n == target) {
                    continue;
                }
                let heard = Heard {
                    raw,
                    name: envelope.name,
                    payload,
                };
                if tx.send(heard).is_err() {
                    return;
                }
            }
        });
        Subscriber { rx, _task: task }
    }

    /// The next event if one came already.
    pub(crate) fn try_next(&mut self) -> Option<Heard> {
        self.rx.try_recv().ok()
    }

    pub(crate) async fn next(&mut self) -> Heard {
        tokio::time::timeout(PATIENCE, self.rx.recv())
            .await
            .expect("an event within the patience")
            .expect("the subscriber runs")
    }

    /// The next event, which must be `name` for circuit `id` on `authority`.
    pub(crate) async fn expect(&mut self, name: &str, authority: &str, id: &str) -> Heard {
        let h = self.next().await;
        assert_eq!(
            (
                h.name.as_str(),
                h.payload["target_worker_authority"].as_str(),
                h.circuit()["id"].as_str()
            ),
            (name, Some(authority), Some(id)),
            "{h:?}"
        );
        h
    }
}

/// A Backend.AI worker played by the test ([`acknowledger`]), until dropped.
pub(crate) struct Acknowledger {
    acked: Arc<AtomicUsize>,
    _task: Task,
}

impl Acknowledger {
    /// How many created events it acknowledged so far.
    pub(crate) fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }
}

/// Plays a Backend.AI worker named `authority`: answers each created event
/// for it with an added event carrying the same payload, except the first
/// `ignore` ones, until the answer is dropped.
pub(crate) async fn acknowledger(authority: &str, ignore: usize) -> Acknowledger {
    acknowledger_on(&redis::Client::open(REDIS_URL).unwrap(), authority, ignore).await
}

/// As [`acknowledger`], on the Redis `client` points at.
pub(crate) async fn acknowledger_on(
    client: &redis::Client,
    authority: &str,
    ignore: usize,
) -> Acknowledger {
    let acked = Arc::new(AtomicUsize::new(0));
    let count = acked.clone();
    let name = authority.to_owned();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(bus::CHANNEL).await.unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let task = Task::spawn(async move {
        let mut seen = 0;
        let mut messages = pubsub.into_on_message();
        while let Some(m) = messages.next().await {
            let raw: String = m.get_payload().unwrap();
            let Ok(e) = serde_json::from_str::<Envelope>(&raw) else {
                continue;
            };
            let payload: Value = serde_json::from_str(&e.payload).unwrap_or_default();
            if e.name != bus::CREATED || payload["target_worker_authority"] != name.as_str() {
                continue;
            }
            seen += 1;
            if seen <= ignore {
                continue;
            }
            let added = json!({"name": bus::ADDED, "source": "appproxy-worker",
                "payload": e.payload, "metadata": bus::METADATA});
            let _: i64 = redis::cmd("PUBLISH")
                .arg(bus::CHANNEL)
                .arg(added.to_string())
                .query_async(&mut conn)
                .await
                .unwrap();
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    Acknowledger { acked, _task: task }
}

async fn a_created_event_has_upstream_s_envelope_and_its_ack_makes_the_route_active(
    backend: Backend,
) {
    let app = TestApp::start_backendai(backend).await;
    let name = authority("envelope");
    let worker = bai_worker(&app, &name, [10205, 10210]).await;
    let mut events = Subscriber::start(&[&name]).await;
    let _worker = acknowledger(&name, 0).await;
    let loops = Loops::of(&app, true);

    let acks = app.backendai.as_ref().unwrap().acks.subscribe();
    let route = create(&app, circuit_route(worker)).await;
    let id = route["id"].as_str().unwrap();
    let heard = events.expect(bus::CREATED, &name, id).await;

    // The envelope: four string fields, payload and metadata JSON strings.
    let wire: Value = serde_json::from_str(&heard.raw).unwrap();
    let keys: Vec<&str> = wire
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 4, "{wire}");
    for k in ["name", "source", "payload", "metadata"] {
        assert!(wire[k].is_string(), "{k} in {wire}");
    }
    assert_eq!(wire["source"], "appproxy-coordinator");
    assert_eq!(wire["metadata"], bus::METADATA);
    assert_eq!(heard.payload["target_worker_authority"], name.as_str());
    let circuits = heard.payload["circuits"].as_array().unwrap();
    assert_eq!(circuits.len(), 1);
    let c = &circuits[0];
    for field in [
        "id",
        "app",
        "protocol",
        "worker",
        "app_mode",
        "frontend_mode",
        "envs",
        "arguments",
        "open_to_public",
        "allowed_client_ips",
        "port",
        "subdomain",
        "user_id",
        "endpoint_id",
        "runtime_variant",
        "route_info",
        "session_ids",
        "created_at",
        "updated_at",
    ] {
        assert!(c.get(field).is_some(), "{field} missing in {c}");
    }
    assert_eq!(c["worker"], worker.to_string());
    assert_eq!(c["frontend_mode"], "port");
    assert_eq!(c["port"], route["frontend"]["port"]);
    assert!(c["port"].is_u64(), "{c}");
    assert_eq!(c["subdomain"], Value::Null);
    assert_eq!(c["app_mode"], "interactive");
    assert_eq!(c["route_info"][0]["kernel_port"], 8888);
    assert_eq!(c["session_ids"], json!([route["session_id"]]));

    // The worker's ack reaches this replica's waiters and makes the route Active.
    let id_uuid: Uuid = id.parse().unwrap();
    assert!(acks.wait(&[id_uuid], PATIENCE).await.is_empty());
    wait_for("the acknowledged route is Active", async || {
        status(&app, id).await == "Active"
    })
    .await;

    // A change of targets is a route update; a delete is a removal.
    let patched = app
        .manager(
            Method::PATCH,
            &format!("/routes/{id}"),
            Some(json!({"targets": [{"host": "10.0.1.8", "port": 9999}]})),
        )
        .await;
    assert!(patched.status.is_success(), "{:?}", patched.body);
    let updated = events.expect(bus::ROUTE_UPDATED, &name, id).await;
    assert_eq!(updated.payload["routes"][0]["kernel_port"], 9999);
    assert_eq!(
        updated.payload["circuit"]["route_info"][0]["kernel_port"],
        9999
    );
    wait_for("an update needs no ack to be Active", async || {
        status(&app, id).await == "Active"
    })
    .await;
    let deleted = app
        .manager(Method::DELETE, &format!("/routes/{id}"), None)
        .await;
    assert!(deleted.status.is_success());
    let removed = events.expect(bus::REMOVED, &name, id).await;
    assert_eq!(removed.circuit()["port"], route["frontend"]["port"]);
    loops.stop().await;
}

async fn a_created_event_nobody_acknowledges_is_published_again_until_acknowledged(
    backend: Backend,
) {
    let app = TestApp::start_backendai(backend).await;
    let name = authority("retry");
    let worker = bai_worker(&app, &name, [10205, 10210]).await;
    let mut events = Subscriber::start(&[&name]).await;
    // The worker misses the first two created events.
    let acked = acknowledger(&name, 2).await;
    let loops = Loops::of(&app, true);
    let first_wait = fast().first_republish;
    let timeout = app.backendai.as_ref().unwrap().settings.ack_timeout;

    let route = create(&app, circuit_route(worker)).await;
    let id = route["id"].as_str().unwrap();
    let first = events.expect(bus::CREATED, &name, id).await;
    assert_eq!(status(&app, id).await, "Propagating");

    // Half a second later (on the clock the publisher reads; well inside the
    // ack wait) it comes again…
    app.clock.advance(first_wait);
    let second = events.expect(bus::CREATED, &name, id).await;
    assert_eq!(second.payload, first.payload);
    // …then after twice as long, and this time the worker answers.
    app.clock.advance(first_wait * 2);
    events.expect(bus::CREATED, &name, id).await;
    wait_for("the third publication is acknowledged", async || {
        acked.acked() == 1
    })
    .await;
    wait_for("the route is Active", async || {
        status(&app, id).await == "Active"
    })
    .await;
    let metrics = app.metrics.encode();
    assert!(
        metrics.contains("appproxy_backendai_bus_republished_total 2"),
        "{metrics}"
    );

    // Acknowledged: no more re-publishing, however long it stays quiet. The
    // next event this worker hears is the removal.
    app.clock.advance(timeout * 100);
    let next = create(&app, circuit_route(worker)).await;
    let next_id = next["id"].as_str().unwrap();
    // The new route's created event is ignored by nobody now: acknowledged.
    events.expect(bus::CREATED, &name, next_id).await;
    app.manager(Method::DELETE, &format!("/routes/{id}"), None)
        .await;
    events.expect(bus::REMOVED, &name, id).await;
    loops.stop().await;
}

async fn publishing_resumes_after_a_restart_with_only_what_was_not_published(backend: Backend) {
    let app = TestApp::start_backendai(backend).await;
    let name = authority("restart");
    let worker = bai_worker(&app, &name, [10205, 10210]).await;
    let mut events = Subscriber::start(&[&name]).await;
    let _worker = acknowledger(&name, 0).await;

    let loops = Loops::of(&app, true);
    let one = create(&app, circuit_route(worker)).await;
    let one_id = one["id"].as_str().unwrap();
    events.expect(bus::CREATED, &name, one_id).await;
    wait_for("the first route is Active", async || {
        status(&app, one_id).await == "Active"
    })
    .await;
    loops.stop().await;

    // While no publisher runs: a create and a delete.
    let two = create(&app, circuit_route(worker)).await;
    let two_id = two["id"].as_str().unwrap();
    app.manager(Method::DELETE, &format!("/routes/{one_id}"), None)
        .await;
    assert_eq!(status(&app, two_id).await, "Propagating");

    // A new coordinator on the same database, with new state in memory.
    let bai = Arc::new(BackendAi::new(common::backendai_settings()).unwrap());
    let metrics = Metrics::new(&app.store);
    let loops = Loops::start(&app.store, &bai, &metrics, true, &app.clock);
    events.expect(bus::CREATED, &name, two_id).await;
    let removed = events.expect(bus::REMOVED, &name, one_id).await;
    assert_eq!(removed.circuit()["port"], one["frontend"]["port"]);
    wait_for("the second route is Active", async || {
        status(&app, two_id).await == "Active"
    })
    .await;
    // And on it goes.
    let three = create(&app, circuit_route(worker)).await;
    events
        .expect(bus::CREATED, &name, three["id"].as_str().unwrap())
        .await;
    loops.stop().await;
}

async fn the_leader_publishes_changes_committed_on_another_replica(backend: Backend) {
    let app = TestApp::start_backendai(backend).await;
    let name = authority("replica");
    let worker = bai_worker(&app, &name, [10205, 10210]).await;
    let mut events = Subscriber::start(&[&name]).await;
    let _worker = acknowledger(&name, 0).await;
    // This replica (serving the API) does not lead; a second one, on its
    // own pool of the same database, does.
    let follower = Loops::of(&app, false);
    let store = app.db.store().await;
    let bai = Arc::new(BackendAi::new(common::backendai_settings()).unwrap());
    let metrics = Metrics::new(&store);
    let leader = Loops::start(&store, &bai, &metrics, true, &app.clock);

    let acks = app.backendai.as_ref().unwrap().acks.subscribe();
    let route = create(&app, circuit_route(worker)).await;
    let id = route["id"].as_str().unwrap();
    events.expect(bus::CREATED, &name, id).await;
    // The follower heard the ack (its waiters would answer) and the
    // leader recorded it.
    assert!(acks.wait(&[id.parse().unwrap()], PATIENCE).await.is_empty());
    wait_for("the route is Active", async || {
        status(&app, id).await == "Active"
    })
    .await;
    // Published once: the next event is the next change's.
    app.manager(Method::DELETE, &format!("/routes/{id}"), None)
        .await;
    events.expect(bus::REMOVED, &name, id).await;
    leader.stop().await;
    follower.stop().await;
    store.close().await;
}

async fn a_move_is_removed_on_the_old_worker_and_created_on_the_new(backend: Backend) {
    let app = TestApp::start_backendai(backend).await;
    let (a_name, b_name) = (authority("old"), authority("new"));
    let a = bai_worker(&app, &a_name, [10205, 10210]).await;
    let mut events = Subscriber::start(&[&a_name, &b_name]).await;
    let _a = acknowledger(&a_name, 0).await;
    let _b = acknowledger(&b_name, 0).await;
    let loops = Loops::of(&app, true);

    // A native route (no circuit) on a Backend.AI worker is published too.
    let route = create(
        &app,
        json!({"session_id": Uuid::new_v4(), "service": "vscode",
               "targets": [{"host": "10.0.1.9", "port": 8080}]}),
    )
    .await;
    let id = route["id"].as_str().unwrap();
    let created = events.expect(bus::CREATED, &a_name, id).await;
    let b = bai_worker(&app, &b_name, [10305, 10310]).await;

    // Worker A is lost; its routes move (as failover does).
    app.store
        .set_worker_status(
            a,
            appproxy_coordinator::domain::WorkerStatus::Lost,
            app.clock.now(),
        )
        .await
        .unwrap();
    let moved = app
        .store
        .relocate_routes(a, 100, app.clock.now())
        .await
        .unwrap();
    assert_eq!(moved[0].to, Some(b));

    let removed = events.expect(bus::REMOVED, &a_name, id).await;
    assert_eq!(removed.circuit(), created.circuit());
    let recreated = events.expect(bus::CREATED, &b_name, id).await;
    assert_eq!(recreated.circuit()["worker"], b.to_string());
    let port = recreated.circuit()["port"].as_u64().unwrap();
    assert!((10305..=10310).contains(&port), "{port}");
    wait_for("the moved route is Active on B", async || {
        status(&app, id).await == "Active"
    })
    .await;
    loops.stop().await;
}

async fn idle_interactive_circuits_are_collected_and_removed(backend: Backend) {
    let app = TestApp::start_backendai(backend).await;
    let name = authority("idle");
    let worker = bai_worker(&app, &name, [10205, 10215]).await;
    let mut events = Subscriber::start(&[&name]).await;
    let _worker = acknowledger(&name, 0).await;
    let idle_timeout = app.backendai.as_ref().unwrap().settings.idle_timeout;
    let t0 = app.clock.now();

    let used = create(&app, circuit_route(worker)).await;
    let unused = create(&app, circuit_route(worker)).await;
    let stale = create(&app, circuit_route(worker)).await;
    let mut inference = circuit_route(worker);
    inference["app_mode"] = "inference".into();
    inference["endpoint_id"] = Uuid::new_v4().to_string().into();
    inference["session_id"] = Value::Null;
    let inference = create(&app, inference).await;
    // On a worker that does not report traffic in Redis.
    let (native_worker, _, _) = app.register(&authority("native"), [10305, 10310]).await;
    let native = create(&app, circuit_route(native_worker)).await;
    let id = |r: &Value| r["id"].as_str().unwrap().to_owned();

    // Recent traffic (seconds, as a float), old traffic (milliseconds), none.
    let live = {
        let info = redis::Client::open(REDIS_URL).unwrap();
        let info = info.get_connection_info().clone();
        let settings = info.redis_settings().clone().set_db(idle::LIVE_DB);
        redis::Client::open(info.set_redis_settings(settings)).unwrap()
    };
    let mut conn = live.get_multiplexed_async_connection().await.unwrap();
    let recent = t0 + chrono::Duration::from_std(idle_timeout).unwrap();
    let keys = [
        idle::last_access_key(id(&used).parse().unwrap()),
        idle::last_access_key(id(&stale).parse().unwrap()),
    ];
    let _: () = redis::cmd("SET")
        .arg(&keys[0])
        .arg(format!("{}.5", recent.timestamp()))
        .arg("EX")
        .arg(600)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&keys[1])
        .arg((t0 - chrono::Duration::seconds(60)).timestamp_millis())
        .arg("EX")
        .arg(600)
        .query_async(&mut conn)
        .await
        .unwrap();

    let loops = Loops::of(&app, true);
    for r in [&used, &unused, &stale, &inference] {
        events.expect(bus::CREATED, &name, &id(r)).await;
    }
    // Acknowledged first: the clock jump below re-publishes what is not.
    for r in [&used, &unused, &stale, &inference] {
        wait_for("the route is Active", async || {
            status(&app, &id(r)).await == "Active"
        })
        .await;
    }
    // Past the idle timeout for the unused and the stale circuit, not for
    // the recently used one; inference circuits are never collected.
    app.clock.advance(idle_timeout + Duration::from_secs(1));
    let mut removed = [events.next().await, events.next().await];
    removed.sort_by_key(|h| h.circuit()["id"].as_str().unwrap().to_owned());
    let mut expected = [id(&unused), id(&stale)];
    expected.sort();
    for (h, want) in removed.iter().zip(&expected) {
        assert_eq!(h.name, bus::REMOVED);
        assert_eq!(h.circuit()["id"].as_str().unwrap(), want);
    }
    for kept in [&used, &inference] {
        wait_for("a circuit not idle stays", async || {
            status(&app, &id(kept)).await == "Active"
        })
        .await;
    }
    let gone = app
        .manager(Method::GET, &format!("/routes/{}", id(&unused)), None)
        .await;
    assert_eq!(gone.status, reqwest::StatusCode::NOT_FOUND);
    assert!(
        app.metrics
            .encode()
            .contains("appproxy_backendai_idle_collected_total 2")
    );
    loops.stop().await;
    // One more pass: nothing else is idle (the native worker's route is
    // not judged by Redis keys its worker never writes).
    let bai = app.backendai.as_ref().unwrap();
    let collected = idle::collect(&app.store, &mut conn, bai, &app.metrics, &app.clock)
        .await
        .unwrap();
    assert_eq!(collected, 0);
    let kept = app
        .manager(Method::GET, &format!("/routes/{}", id(&native)), None)
        .await;
    assert_eq!(kept.status, reqwest::StatusCode::OK);
    let _: () = redis::cmd("DEL")
        .arg(&keys[..])
        .query_async(&mut conn)
        .await
        .unwrap();
}

async fn a_log_compacted_past_the_position_republishes_every_circuit(backend: Backend) {
    let app = TestApp::start_backendai(backend).await;
    let name = authority("compacted");
    let worker = bai_worker(&app, &name, [10205, 10210]).await;
    let mut events = Subscriber::start(&[&name]).await;
    let _worker = acknowledger(&name, 0).await;
    let loops = Loops::of(&app, true);
    let one = create(&app, circuit_route(worker)).await;
    let one_id = one["id"].as_str().unwrap();
    events.expect(bus::CREATED, &name, one_id).await;
    wait_for("the first route is Active", async || {
        status(&app, one_id).await == "Active"
    })
    .await;
    loops.stop().await;

    // Unpublished changes, then compaction of every row of the log.
    let two = create(&app, circuit_route(worker)).await;
    let two_id = two["id"].as_str().unwrap();
    app.manager(Method::DELETE, &format!("/routes/{one_id}"), None)
        .await;
    let dropped = app
        .store
        .compact_log(0, app.clock.now() + chrono::Duration::days(1))
        .await
        .unwrap();
    assert!(dropped > 0);

    // The circuit that is gone is removed, then every circuit is created.
    let loops = Loops::of(&app, true);
    let removed = events.expect(bus::REMOVED, &name, one_id).await;
    assert_eq!(removed.circuit()["port"], one["frontend"]["port"]);
    events.expect(bus::CREATED, &name, two_id).await;
    wait_for("the second route is Active", async || {
        status(&app, two_id).await == "Active"
    })
    .await;
    loops.stop().await;
}

async fn redis_down_delays_publishing_and_stops_nothing(backend: Backend) {
    let app = TestApp::start_backendai(backend).await;
    let name = authority("down");
    let worker = bai_worker(&app, &name, [10205, 10210]).await;
    let mut events = Subscriber::start(&[&name]).await;
    let _worker = acknowledger(&name, 0).await;
    // Nothing listens on port 1.
    let mut settings = common::backendai_settings();
    settings.redis_url = "redis://:secret@127.0.0.1:1".into();
    let unreachable = Arc::new(BackendAi::new(settings).unwrap());
    let loops = Loops::start(&app.store, &unreachable, &app.metrics, true, &app.clock);

    // The API keeps serving; the route waits for its publication.
    let route = create(&app, circuit_route(worker)).await;
    let id = route["id"].as_str().unwrap();
    assert_eq!(status(&app, id).await, "Propagating");
    loops.stop().await;

    // Redis back (here: the reachable one): what waited is published. (It
    // may be published before this replica's listener has subscribed: then
    // the acknowledgement is lost, and a re-publish, as the clock moves on,
    // brings another.)
    let loops = Loops::of(&app, true);
    events.expect(bus::CREATED, &name, id).await;
    wait_for("the route is Active", async || {
        app.clock.advance(Duration::from_secs(1));
        status(&app, id).await == "Active"
    })
    .await;
    loops.stop().await;
}
