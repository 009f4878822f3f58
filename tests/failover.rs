//! Worker health and failover, driven through the real router with the
//! library's worker client: silent workers lose their routes to healthy ones,
//! exactly once, and nothing ever sits on two workers.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appproxy_coordinator::backendai::circuit::{WorkerRequest, endpoint_url};
use appproxy_coordinator::client::{RoutingTable, WorkerClient};
use appproxy_coordinator::domain::health::Observation;
use appproxy_coordinator::domain::{Route, RouteStatus, WorkerFrontend, WorkerRegistration};
use appproxy_coordinator::health::HealthConfig;
use common::{BOOTSTRAP, Backend, PATIENCE, Task, TestApp, TestDb, route, wait_for};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use reqwest::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

on_both_backends!(
    a_silent_worker_s_routes_move_once_timeout_and_grace_have_passed,
    no_route_is_ever_on_two_workers_across_random_failures,
    routes_that_fit_nowhere_wait_as_pending_until_capacity_appears,
    a_returning_worker_gets_only_what_is_still_its_own,
    expired_routes_are_collected_as_deletes,
    idle_routes_are_collected_unless_re_sent,
    a_backendai_circuit_on_a_lost_port_worker_stays_and_is_served_again_when_it_returns,
    a_backendai_circuit_on_a_lost_wildcard_worker_moves_only_where_its_url_stays,
    failover_moves_a_circuit_exactly_where_the_managers_url_stays,
);

// Times on the app's manual clock, which only the tests move: the real time
// these tests take has no bearing on what they check.
const TIMEOUT: Duration = Duration::from_millis(1000);
const GRACE: Duration = Duration::from_millis(500);
const TICK: Duration = Duration::from_millis(1);

fn health() -> HealthConfig {
    HealthConfig {
        heartbeat_timeout: TIMEOUT,
        failover_grace: GRACE,
        batch_size: 4,
        route_idle_ttl: None,
    }
}

/// A simulated worker: its stream applied to a table, and heartbeats that
/// can be switched off (a hung or partitioned worker) and on again.
struct SimWorker {
    name: String,
    client: WorkerClient,
    table: Arc<Mutex<RoutingTable>>,
    alive: Arc<AtomicBool>,
    /// Held while a heartbeat is on its way.
    beating: Arc<tokio::sync::Mutex<()>>,
    violations: Arc<Mutex<Vec<String>>>,
    /// Its stream and its heartbeats: both end when the worker is dropped.
    _tasks: [Task; 2],
}

impl SimWorker {
    async fn start(app: &TestApp, name: &str, ports: [u16; 2]) -> SimWorker {
        let registration: WorkerRegistration = serde_json::from_value(json!({
            "name": name,
            "api_url": "http://127.0.0.1:10201",
            "frontend": {"mode": "port", "host": name, "port_range": ports}
        }))
        .unwrap();
        let (client, answer) =
            WorkerClient::register(&common::http_client(), &app.url, BOOTSTRAP, &registration)
                .await
                .unwrap();
        let table = Arc::new(Mutex::new(RoutingTable::new(
            answer.revision,
            answer.routes,
        )));
        let alive = Arc::new(AtomicBool::new(true));
        let beating = Arc::new(tokio::sync::Mutex::new(()));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let mut stream = client.watch(Some(answer.revision)).await.unwrap();
        let (t, v) = (table.clone(), violations.clone());
        let streaming = Task::spawn(async move {
            while let Some(Ok(event)) = stream.next().await {
                if let Err(e) = t.lock().unwrap().apply(&event) {
                    v.lock().unwrap().push(e);
                }
            }
        });
        let (c, t, a, b) = (
            client.clone(),
            table.clone(),
            alive.clone(),
            beating.clone(),
        );
        let heartbeats = Task::spawn(async move {
            loop {
                {
                    let _beat = b.lock().await;
                    if a.load(Ordering::SeqCst) {
                        let acked = t.lock().unwrap().revision;
                        let _ = c.heartbeat(acked).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        SimWorker {
            name: name.to_owned(),
            client,
            table,
            alive,
            beating,
            violations,
            _tasks: [streaming, heartbeats],
        }
    }

    fn id(&self) -> Uuid {
        self.client.worker_id
    }

    /// Stops heartbeating; answers once no heartbeat is on its way any more.
    async fn silence(&self) {
        self.alive.store(false, Ordering::SeqCst);
        drop(self.beating.lock().await);
    }

    fn revive(&self) {
        self.alive.store(true, Ordering::SeqCst);
    }

    fn named(&self) -> (String, Uuid) {
        (self.name.clone(), self.id())
    }

    fn routes(&self) -> BTreeMap<Uuid, Option<u16>> {
        self.table
            .lock()
            .unwrap()
            .routes
            .iter()
            .map(|(id, r)| (*id, r.frontend.port))
            .collect()
    }

    fn revision(&self) -> i64 {
        self.table.lock().unwrap().revision
    }
}

/// Moves the app's clock forward by `by`, in steps of at most half the
/// heartbeat timeout, and after each step waits until every worker of `alive`
/// has heartbeated at the new time. So a live worker is never silent for
/// longer than half the timeout on the clock, however slow the machine.
async fn advance(app: &TestApp, by: Duration, alive: &[&SimWorker]) {
    let alive: Vec<(String, Uuid)> = alive.iter().map(|w| (w.name.clone(), w.id())).collect();
    advance_keeping(app, by, &alive).await;
}

/// [`advance`] for workers known by name and id.
async fn advance_keeping(app: &TestApp, by: Duration, alive: &[(String, Uuid)]) {
    let mut left = by;
    while !left.is_zero() {
        let step = left.min(TIMEOUT / 2);
        left -= step;
        let now = app.clock.advance(step);
        for (name, id) in alive {
            wait_for(format!("{name} heartbeats at {now}"), async || {
                app.store.get_worker(*id).await.unwrap().last_heartbeat >= now
            })
            .await;
        }
    }
}

/// Silences `victim` and moves the clock past the heartbeat timeout, then past
/// the failover grace, keeping `others` alive; answers once no route is left
/// on the victim.
async fn fail(app: &TestApp, victim: &SimWorker, others: &[&SimWorker]) {
    victim.silence().await;
    advance(app, TIMEOUT + TICK, others).await;
    wait_for(format!("{} is Lost", victim.name), async || {
        worker_status(app, victim.id()).await == "Lost"
    })
    .await;
    advance(app, GRACE + TICK, others).await;
    wait_for(format!("routes leave {}", victim.name), async || {
        routes_on(app, victim.id()).await.is_empty()
    })
    .await;
}

async fn create_on(app: &TestApp, worker: Uuid) -> Uuid {
    let mut body = route(Uuid::new_v4(), "jupyter");
    body["worker_id"] = json!(worker);
    let r = app.create(body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    r.body["id"].as_str().unwrap().parse().unwrap()
}

async fn worker_status(app: &TestApp, worker: Uuid) -> String {
    app.manager(Method::GET, &format!("/workers/{worker}"), None)
        .await
        .body["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn route_status(app: &TestApp, route: Uuid) -> String {
    app.manager(Method::GET, &format!("/routes/{route}"), None)
        .await
        .body["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The routes the database places on `worker`.
async fn routes_on(app: &TestApp, worker: Uuid) -> HashSet<Uuid> {
    app.manager(Method::GET, &format!("/routes?worker_id={worker}"), None)
        .await
        .body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .parse()
        .unwrap()
}

async fn a_silent_worker_s_routes_move_once_timeout_and_grace_have_passed(b: Backend) {
    let app = TestApp::builder(b).health(health()).start().await;
    let a = SimWorker::start(&app, "a", [20000, 20100]).await;
    let b_worker = SimWorker::start(&app, "b", [30000, 30100]).await;
    let mut ids = HashSet::new();
    for _ in 0..10 {
        ids.insert(create_on(&app, a.id()).await);
    }
    wait_for("a has its routes", async || a.routes().len() == 10).await;

    a.silence().await;
    let last_beat = app.store.get_worker(a.id()).await.unwrap().last_heartbeat;
    assert_eq!(last_beat, app.clock.now(), "the clock has not moved yet");
    let watched: Uuid = *ids.iter().next().unwrap();

    // Silent for exactly the heartbeat timeout: still Ready, nothing moves.
    advance(&app, TIMEOUT, &[&b_worker]).await;
    app.health_pass().await;
    assert_eq!(worker_status(&app, a.id()).await, "Ready");
    assert_eq!(routes_on(&app, a.id()).await, ids);
    assert_ne!(route_status(&app, watched).await, "FailingOver");

    // A moment longer: Lost. What a manager sees: FailingOver while the
    // worker is Lost within its grace, and the routes stay where they are.
    advance(&app, TICK, &[&b_worker]).await;
    wait_for("a is Lost", async || {
        worker_status(&app, a.id()).await == "Lost"
    })
    .await;
    let lost_at = app.store.get_worker(a.id()).await.unwrap().updated_at;
    assert_eq!(
        lost_at,
        last_beat + TIMEOUT + TICK,
        "Lost at the clock's time"
    );
    wait_for("the route shows FailingOver", async || {
        route_status(&app, watched).await == "FailingOver"
    })
    .await;
    advance(&app, GRACE, &[&b_worker]).await;
    app.health_pass().await;
    assert_eq!(
        routes_on(&app, a.id()).await,
        ids,
        "nothing moves within the grace"
    );
    assert_eq!(route_status(&app, watched).await, "FailingOver");
    assert!(b_worker.routes().keys().all(|id| !ids.contains(id)));

    // The grace has passed: every route moves to b.
    advance(&app, TICK, &[&b_worker]).await;
    wait_for("b serves every route of a", async || {
        let on_b: HashSet<Uuid> = b_worker.routes().keys().copied().collect();
        ids.is_subset(&on_b)
    })
    .await;
    assert_eq!(worker_status(&app, a.id()).await, "Lost");
    wait_for("a's stream deletes them", async || a.routes().is_empty()).await;
    assert_eq!(routes_on(&app, b_worker.id()).await, ids);
    let metrics = app.call(Method::GET, "/metrics", None, None).await.body;
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains("appproxy_failover_routes_total{outcome=\"moved\"} 10"),
        "{text}"
    );
    assert!(
        text.contains("appproxy_failover_seconds_count 10"),
        "{text}"
    );
    // Each route was moved after its worker had been silent for the timeout,
    // the grace and the two extra ticks, on the clock.
    let silent = (TIMEOUT + GRACE + 2 * TICK).as_secs_f64();
    let sum = metric(text, "appproxy_failover_seconds_sum");
    assert!(
        (sum - 10.0 * silent).abs() < 1e-6,
        "{sum} for {silent} s each"
    );
    assert!(
        text.contains("appproxy_workers{status=\"Lost\"} 1"),
        "{text}"
    );
    assert!(
        a.violations.lock().unwrap().is_empty() && b_worker.violations.lock().unwrap().is_empty()
    );

    // A heartbeat brings the lost worker back to Ready (with nothing of its old routes).
    a.revive();
    wait_for("a is Ready again", async || {
        worker_status(&app, a.id()).await == "Ready"
    })
    .await;
    assert!(routes_on(&app, a.id()).await.is_empty());
}

/// The seed of a randomised test: `APPPROXY_TEST_SEED` to replay a run, else
/// a fresh one. Printed either way, so a failure can be replayed.
fn seed() -> u64 {
    let seed = match std::env::var("APPPROXY_TEST_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("APPPROXY_TEST_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    };
    eprintln!("seed {seed} (replay with APPPROXY_TEST_SEED={seed})");
    seed
}

async fn no_route_is_ever_on_two_workers_across_random_failures(b: Backend) {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let app = TestApp::builder(b).health(health()).start().await;
    let mut workers = Vec::new();
    for (i, name) in ["w0", "w1", "w2"].iter().enumerate() {
        let base = 20000 + 100 * i as u16;
        workers.push(SimWorker::start(&app, name, [base, base + 7]).await);
    }
    let mut live: Vec<Uuid> = Vec::new();
    for _ in 0..10 {
        let r = app.create(route(Uuid::new_v4(), "jupyter")).await;
        assert_eq!(r.status, StatusCode::CREATED);
        live.push(r.body["id"].as_str().unwrap().parse().unwrap());
    }
    for round in 0..4 {
        let victim = rng.random_range(0..workers.len());
        let others: Vec<&SimWorker> = workers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, w)| w)
            .collect();
        fail(&app, &workers[victim], &others).await;
        // Churn while it is down: one new route, one deleted.
        let r = app.create(route(Uuid::new_v4(), "ssh")).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        live.push(r.body["id"].as_str().unwrap().parse().unwrap());
        let gone = live.remove(rng.random_range(0..live.len()));
        app.manager(Method::DELETE, &format!("/routes/{gone}"), None)
            .await;
        workers[victim].revive();

        let head = app.revision().await;
        wait_for(
            format!("round {round} (seed {seed}): every stream catches up"),
            async || workers.iter().all(|w| w.revision() >= head),
        )
        .await;
        let mut seen = HashSet::new();
        for w in &workers {
            let table = w.routes();
            let ports: HashSet<_> = table.values().collect();
            assert_eq!(
                ports.len(),
                table.len(),
                "round {round} (seed {seed}): a port is shared on {}",
                w.id()
            );
            for id in table.keys() {
                assert!(
                    seen.insert(*id),
                    "round {round} (seed {seed}): route {id} is on two workers"
                );
            }
            let on_db = app
                .manager(Method::GET, &format!("/routes?worker_id={}", w.id()), None)
                .await;
            let db: BTreeMap<Uuid, Option<u16>> = on_db.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["id"].as_str().unwrap().parse().unwrap(),
                        r["frontend"]["port"].as_u64().map(|p| p as u16),
                    )
                })
                .collect();
            assert_eq!(
                table, db,
                "round {round} (seed {seed}): a worker's table differs from the database"
            );
            assert!(
                w.violations.lock().unwrap().is_empty(),
                "{:?}",
                w.violations.lock().unwrap()
            );
        }
        let expected: HashSet<Uuid> = live.iter().copied().collect();
        assert_eq!(
            seen, expected,
            "round {round} (seed {seed}): every live route is served exactly once"
        );
        wait_for(
            format!("round {round} (seed {seed}): the victim is Ready again"),
            async || worker_status(&app, workers[victim].id()).await == "Ready",
        )
        .await;
    }
}

async fn routes_that_fit_nowhere_wait_as_pending_until_capacity_appears(b: Backend) {
    let app = TestApp::builder(b).health(health()).start().await;
    let small = SimWorker::start(&app, "small", [20000, 20001]).await;
    let ids = [
        create_on(&app, small.id()).await,
        create_on(&app, small.id()).await,
    ];
    fail(&app, &small, &[]).await;
    for id in ids {
        let r = app
            .manager(Method::GET, &format!("/routes/{id}"), None)
            .await;
        assert_eq!(r.body["status"], "Pending");
        assert_eq!(r.body["worker_id"], serde_json::Value::Null);
        assert!(
            r.body["pending_reason"]
                .as_str()
                .unwrap()
                .contains("no eligible worker"),
            "{:?}",
            r.body
        );
    }
    // No worker, no placement, however often the loops look.
    app.health_pass().await;
    assert_eq!(route_status(&app, ids[0]).await, "Pending");

    let rescuer = SimWorker::start(&app, "rescuer", [40000, 40010]).await;
    wait_for("pending routes are placed on the new worker", async || {
        rescuer.routes().len() == 2
    })
    .await;
    for id in ids {
        let r = app
            .manager(Method::GET, &format!("/routes/{id}"), None)
            .await;
        assert_eq!(r.body["worker_id"], json!(rescuer.id()));
        assert_eq!(r.body["pending_reason"], serde_json::Value::Null);
    }
}

async fn a_returning_worker_gets_only_what_is_still_its_own(b: Backend) {
    let app = TestApp::builder(b).health(health()).start().await;
    let a = SimWorker::start(&app, "a", [20000, 20100]).await;
    let keeper = create_on(&app, a.id()).await;
    let b_worker = SimWorker::start(&app, "b", [30000, 30100]).await;
    let moved = create_on(&app, a.id()).await;
    wait_for("a has both", async || a.routes().len() == 2).await;
    fail(&app, &a, &[&b_worker]).await;
    wait_for("b takes them", async || b_worker.routes().len() == 2).await;
    // A new route lands on b while a is away.
    let fresh = create_on(&app, b_worker.id()).await;

    // a restarts: registration by name answers its current routes — none of the moved ones.
    let again = app
        .call(
            Method::POST,
            "/workers/register",
            Some(BOOTSTRAP),
            Some(json!({"name": "a", "api_url": "http://127.0.0.1:10201", "frontend": {"mode": "port", "host": "a", "port_range": [20000, 20100]}})),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["worker"]["id"], json!(a.id()));
    assert_eq!(again.body["worker"]["status"], "Ready");
    assert_eq!(again.body["routes"], json!([]));
    wait_for("b has the fresh route", async || {
        b_worker.routes().contains_key(&fresh)
    })
    .await;
    let on_b: HashSet<Uuid> = b_worker.routes().keys().copied().collect();
    assert_eq!(on_b, HashSet::from([keeper, moved, fresh]));
}

async fn expired_routes_are_collected_as_deletes(b: Backend) {
    let app = TestApp::builder(b).health(health()).start().await;
    let w = SimWorker::start(&app, "w", [20000, 20100]).await;
    let lifetime = Duration::from_millis(800);
    let mut body = route(Uuid::new_v4(), "jupyter");
    body["expires_at"] = json!((app.clock.now() + lifetime).to_rfc3339());
    let expiring = app.create(body).await;
    assert_eq!(expiring.status, StatusCode::CREATED, "{:?}", expiring.body);
    let keep = create_on(&app, w.id()).await;
    let id: Uuid = expiring.body["id"].as_str().unwrap().parse().unwrap();
    wait_for("the worker has both", async || w.routes().len() == 2).await;

    // At its expiry time exactly, the route is still there.
    advance(&app, lifetime, &[&w]).await;
    app.health_pass().await;
    let still = app
        .manager(Method::GET, &format!("/routes/{id}"), None)
        .await;
    assert_eq!(still.status, StatusCode::OK, "not expired yet");
    // Past it, the route goes, as a delete on the worker's stream.
    advance(&app, TICK, &[&w]).await;
    wait_for("the expired route is deleted from the stream", async || {
        !w.routes().contains_key(&id)
    })
    .await;
    assert!(w.routes().contains_key(&keep));
    let gone = app
        .manager(Method::GET, &format!("/routes/{id}"), None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_replica_leads_and_another_takes_over() {
    use appproxy_coordinator::leader::{self, AdvisoryLock};
    use appproxy_coordinator::store::Db;
    use common::Counted;
    let db = TestDb::new(Backend::Postgres).await;
    let stores = [db.store().await, db.store().await];
    let mut replicas = Vec::new();
    let mut attempts = Vec::new();
    let mut stops = Vec::new();
    for store in &stores {
        let Db::Postgres(pool) = store.db() else {
            unreachable!()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(Some(stop));
        let (elector, tries) = Counted::new(AdvisoryLock::new(pool.clone()));
        attempts.push(tries);
        replicas.push(leader::spawn(
            elector,
            Duration::from_millis(100),
            async move {
                let _ = stopped.await;
            },
        ));
    }
    let tries = |i: usize| attempts[i].load(Ordering::SeqCst);
    let leading = || -> Vec<usize> { (0..2).filter(|i| replicas[*i].is_leader()).collect() };
    let mut first = None;
    wait_for("one replica leads", async || {
        let now = leading();
        assert!(now.len() <= 1, "two leaders at once");
        first = now.first().copied();
        first.is_some()
    })
    .await;
    let first = first.unwrap();
    let other = 1 - first;
    // Both keep trying (renewing, competing); the same one keeps leading.
    let since = [tries(0), tries(1)];
    wait_for("both replicas try three more times", async || {
        assert_eq!(
            leading(),
            [first],
            "one replica leads, and it keeps leading"
        );
        tries(0) >= since[0] + 3 && tries(1) >= since[1] + 3
    })
    .await;
    assert_eq!(leading(), [first]);

    stops[first].take().unwrap().send(()).unwrap();
    let mut waiting = replicas[other].clone();
    tokio::time::timeout(common::PATIENCE, waiting.acquired())
        .await
        .expect("the other replica takes over once the leader released");
    assert!(!replicas[first].is_leader());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_dies_without_releasing_is_replaced() {
    use appproxy_coordinator::leader::{AdvisoryLock, Elector};
    use appproxy_coordinator::store::Db;
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    let Db::Postgres(pool) = store.db() else {
        unreachable!()
    };
    let mut dying = AdvisoryLock::new(pool.clone());
    let mut waiting = AdvisoryLock::new(pool.clone());
    assert!(dying.try_acquire().await.unwrap());
    assert!(dying.try_acquire().await.unwrap(), "renewal keeps it");
    assert!(!waiting.try_acquire().await.unwrap());
    drop(dying); // no release: the process is gone, its session closes
    wait_for("the lock is freed by the closed session", async || {
        waiting.try_acquire().await.unwrap()
    })
    .await;
}

async fn idle_routes_are_collected_unless_re_sent(b: Backend) {
    let idle_ttl = Duration::from_millis(800);
    let app = TestApp::builder(b)
        .health(HealthConfig {
            route_idle_ttl: Some(idle_ttl),
            ..health()
        })
        .start()
        .await;
    let w = SimWorker::start(&app, "w", [20000, 20100]).await;
    let forgotten = create_on(&app, w.id()).await;
    let kept_id = Uuid::now_v7();
    let mut kept = route(Uuid::new_v4(), "jupyter");
    kept["worker_id"] = json!(w.id());
    let put = app
        .manager(
            Method::PUT,
            &format!("/routes/{kept_id}"),
            Some(kept.clone()),
        )
        .await;
    assert_eq!(put.status, StatusCode::CREATED);
    wait_for("the worker has both", async || w.routes().len() == 2).await;
    let revision = app.revision().await;
    let re_send = async || {
        let again = app
            .manager(
                Method::PUT,
                &format!("/routes/{kept_id}"),
                Some(kept.clone()),
            )
            .await;
        assert_eq!(again.status, StatusCode::OK);
    };

    // The manager re-sends one of them, unchanged, every half TTL on the clock.
    advance(&app, idle_ttl / 2, &[&w]).await;
    re_send().await;
    advance(&app, idle_ttl / 2, &[&w]).await;
    re_send().await;
    // Idle for exactly the TTL: not collected yet.
    app.health_pass().await;
    assert_eq!(w.routes().len(), 2);
    let still = app
        .manager(Method::GET, &format!("/routes/{forgotten}"), None)
        .await;
    assert_eq!(still.status, StatusCode::OK, "idle for the TTL, not longer");

    // Longer than the TTL: collected.
    advance(&app, TICK, &[&w]).await;
    wait_for("the idle route is collected", async || {
        !w.routes().contains_key(&forgotten)
    })
    .await;
    // The re-sent route is not idle, and stays as long as it is re-sent.
    for _ in 0..3 {
        advance(&app, idle_ttl / 2, &[&w]).await;
        re_send().await;
    }
    app.health_pass().await;
    assert!(
        w.routes().contains_key(&kept_id),
        "a re-sent route is not idle"
    );
    assert_eq!(
        app.revision().await,
        revision + 1,
        "re-sending changed nothing; the collection is one delete"
    );
    let gone = app
        .manager(Method::GET, &format!("/routes/{forgotten}"), None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    // Left alone, it is collected too.
    advance(&app, idle_ttl + TICK, &[&w]).await;
    wait_for(
        "the route nobody re-sends any more is collected",
        async || !w.routes().contains_key(&kept_id),
    )
    .await;
}

/// A Backend.AI worker: registered as `PUT /api/worker` registers it (with
/// `backendai` set), heartbeating through the store as its `PATCH` does, and
/// acknowledging every revision (it learns its circuits over Redis, which
/// these tests leave out).
struct BaiWorker {
    name: String,
    id: Uuid,
    alive: Arc<AtomicBool>,
    beating: Arc<tokio::sync::Mutex<()>>,
    /// Its heartbeats: they end when the worker is dropped.
    _heartbeats: Task,
}

impl BaiWorker {
    async fn start(
        app: &TestApp,
        name: &str,
        hostname: &str,
        frontend: serde_json::Value,
    ) -> BaiWorker {
        BaiWorker::start_tls(app, name, hostname, false, frontend).await
    }

    async fn start_tls(
        app: &TestApp,
        name: &str,
        hostname: &str,
        tls: bool,
        frontend: serde_json::Value,
    ) -> BaiWorker {
        let mut request = json!({
            "authority": name, "protocol": "http", "hostname": hostname,
            "tls_listen": tls, "tls_advertised": false, "api_port": 10201,
            "filtered_apps_only": false, "traefik_last_used_marker_path": null,
            "accepted_traffics": ["interactive", "inference"], "app_filters": []
        });
        request
            .as_object_mut()
            .unwrap()
            .extend(frontend.as_object().unwrap().clone());
        let request: WorkerRequest = serde_json::from_value(request).unwrap();
        let registration = request.to_registration(1).unwrap();
        assert!(registration.backendai.is_some());
        let registered = app
            .store
            .register_worker(registration, None, app.clock.now(), |_| [7; 32])
            .await
            .unwrap();
        let id = registered.worker.id;
        let alive = Arc::new(AtomicBool::new(true));
        let beating = Arc::new(tokio::sync::Mutex::new(()));
        let (store, clock, a, b) = (
            app.store.clone(),
            app.clock.clone(),
            alive.clone(),
            beating.clone(),
        );
        let heartbeats = Task::spawn(async move {
            loop {
                {
                    let _beat = b.lock().await;
                    if a.load(Ordering::SeqCst) {
                        let now = clock.now();
                        // The database may be gone.
                        let Ok(acked) = store.current_revision().await else {
                            return;
                        };
                        if store.heartbeat(id, acked, now).await.is_ok() {
                            let _ = appproxy_coordinator::health::observe(
                                &store,
                                id,
                                Observation::Heartbeat,
                                now,
                            )
                            .await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        BaiWorker {
            name: name.to_owned(),
            id,
            alive,
            beating,
            _heartbeats: heartbeats,
        }
    }

    fn named(&self) -> (String, Uuid) {
        (self.name.clone(), self.id)
    }

    async fn silence(&self) {
        self.alive.store(false, Ordering::SeqCst);
        drop(self.beating.lock().await);
    }

    fn revive(&self) {
        self.alive.store(true, Ordering::SeqCst);
    }
}

/// A Backend.AI circuit created through the native API, pinned to `worker`.
async fn create_circuit(app: &TestApp, worker: Uuid, subdomain: Option<&str>) -> Uuid {
    let mut body = json!({
        "app_mode": "inference", "endpoint_id": Uuid::new_v4(), "service": "llm",
        "targets": [], "worker_id": worker,
        "circuit": {"user_id": Uuid::new_v4(), "runtime_variant": "vllm"}
    });
    if let Some(s) = subdomain {
        body["frontend"] = json!({"subdomain": s});
    }
    let r = app.create(body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    r.body["id"].as_str().unwrap().parse().unwrap()
}

/// The route as served, and the URL the Backend.AI Manager stored for it.
async fn circuit_url(app: &TestApp, id: Uuid) -> (Route, Option<String>) {
    let r = app
        .manager(Method::GET, &format!("/routes/{id}"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let route: Route = serde_json::from_value(r.body).unwrap();
    let worker = app
        .store
        .get_worker(route.worker_id.unwrap())
        .await
        .unwrap();
    let url = endpoint_url(&route, &worker);
    (route, url)
}

/// Silences `victim` and moves the clock past the heartbeat timeout and the
/// failover grace, keeping `alive` heartbeating; answers once a pass has run.
async fn lose(app: &TestApp, victim: &BaiWorker, alive: &[(String, Uuid)]) {
    victim.silence().await;
    advance_keeping(app, TIMEOUT + TICK, alive).await;
    wait_for(format!("{} is Lost", victim.name), async || {
        worker_status(app, victim.id).await == "Lost"
    })
    .await;
    advance_keeping(app, GRACE + TICK, alive).await;
    app.health_pass().await;
}

async fn metrics_text(app: &TestApp) -> String {
    let metrics = app.call(Method::GET, "/metrics", None, None).await.body;
    metrics.as_str().unwrap().to_owned()
}

async fn a_backendai_circuit_on_a_lost_port_worker_stays_and_is_served_again_when_it_returns(
    b: Backend,
) {
    let app = TestApp::builder(b).health(health()).start().await;
    let bai = BaiWorker::start(
        &app,
        "bai-a",
        "proxy-a.example",
        json!({"frontend_mode": "port", "port_range": [20000, 20100]}),
    )
    .await;
    let native_worker = SimWorker::start(&app, "b", [30000, 30100]).await;
    let circuit = create_circuit(&app, bai.id, None).await;
    let native = create_on(&app, bai.id).await;
    let (before, url) = circuit_url(&app, circuit).await;
    assert_eq!(url.as_deref(), Some("http://proxy-a.example:20000/"));

    lose(&app, &bai, &[native_worker.named()]).await;
    // The native route moves as before; the circuit stays, with its URL.
    wait_for("the native route moves to b", async || {
        native_worker.routes().contains_key(&native)
    })
    .await;
    assert_eq!(routes_on(&app, bai.id).await, HashSet::from([circuit]));
    let (during, url_during) = circuit_url(&app, circuit).await;
    assert_eq!(url_during, url);
    assert_eq!(during.status, RouteStatus::FailingOver);
    assert_eq!(during.revision, before.revision, "staying is no change");

    // Reported: the store query, the log counter once, the gauge.
    let stranded = app.store.stranded_routes().await.unwrap();
    assert_eq!(stranded.len(), 1);
    assert_eq!(
        (stranded[0].route.id, stranded[0].worker.id),
        (circuit, bai.id)
    );
    assert!(
        stranded[0].reason.contains("http://proxy-a.example:20000")
            && stranded[0].reason.contains("worker bai-a is lost"),
        "{}",
        stranded[0].reason
    );
    // More passes try nothing again: the worker holds only a stranded circuit.
    for _ in 0..3 {
        advance_keeping(&app, TICK, &[native_worker.named()]).await;
        app.health_pass().await;
    }
    assert!(
        app.store
            .lost_workers_with_routes()
            .await
            .unwrap()
            .is_empty()
    );
    let text = metrics_text(&app).await;
    assert!(
        text.contains("appproxy_failover_routes_total{outcome=\"stranded\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("appproxy_failover_routes_total{outcome=\"moved\"} 1\n"),
        "{text}"
    );
    assert_eq!(metric(&text, "appproxy_stranded_routes"), 1.0);

    // The worker comes back: the circuit is served again, at the same URL.
    bai.revive();
    wait_for("bai-a is Ready again", async || {
        worker_status(&app, bai.id).await == "Ready"
    })
    .await;
    wait_for("the circuit is Active again", async || {
        route_status(&app, circuit).await == "Active"
    })
    .await;
    let (after, url_after) = circuit_url(&app, circuit).await;
    assert_eq!(url_after, url);
    assert_eq!(after.worker_id, Some(bai.id));
    assert!(app.store.stranded_routes().await.unwrap().is_empty());
    assert_eq!(
        metric(&metrics_text(&app).await, "appproxy_stranded_routes"),
        0.0
    );

    // Lost once more, it is reported once more.
    lose(&app, &bai, &[native_worker.named()]).await;
    wait_for("stranded again", async || {
        app.store.stranded_routes().await.unwrap().len() == 1
    })
    .await;
    assert!(
        metrics_text(&app)
            .await
            .contains("appproxy_failover_routes_total{outcome=\"stranded\"} 2\n")
    );
    assert_eq!(routes_on(&app, bai.id).await, HashSet::from([circuit]));
}

async fn a_backendai_circuit_on_a_lost_wildcard_worker_moves_only_where_its_url_stays(b: Backend) {
    let app = TestApp::builder(b).health(health()).start().await;
    let wildcard = |domain: &str| {
        json!({"frontend_mode": "wildcard", "wildcard_domain": format!(".{domain}"),
               "wildcard_traffic_port": 80})
    };
    let w1 = BaiWorker::start(&app, "w1", "w1.example", wildcard("apps.example")).await;
    let w2 = BaiWorker::start(&app, "w2", "w2.example", wildcard("apps.example")).await;
    let w3 = BaiWorker::start(&app, "w3", "w3.example", wildcard("other.example")).await;
    let circuit = create_circuit(&app, w1.id, Some("llm")).await;
    let (before, url) = circuit_url(&app, circuit).await;
    assert_eq!(url.as_deref(), Some("http://llm.apps.example/"));
    assert_eq!(before.frontend.subdomain.as_deref(), Some("llm"));

    // w1 is lost: the circuit moves to w2 (same domain), never to w3.
    lose(&app, &w1, &[w2.named(), w3.named()]).await;
    wait_for("the circuit moves to w2", async || {
        routes_on(&app, w2.id).await.contains(&circuit)
    })
    .await;
    let (moved, url_moved) = circuit_url(&app, circuit).await;
    assert_eq!(moved.worker_id, Some(w2.id));
    assert_eq!(moved.frontend.subdomain.as_deref(), Some("llm"));
    assert_eq!(url_moved, url);
    assert!(routes_on(&app, w3.id).await.is_empty());
    assert!(app.store.stranded_routes().await.unwrap().is_empty());

    // w2 is lost too, and only another domain is left: it stays on w2.
    lose(&app, &w2, &[w3.named()]).await;
    wait_for("the circuit is stranded on w2", async || {
        app.store.stranded_routes().await.unwrap().len() == 1
    })
    .await;
    assert_eq!(routes_on(&app, w2.id).await, HashSet::from([circuit]));
    assert!(routes_on(&app, w3.id).await.is_empty());
    let (stays, url_stays) = circuit_url(&app, circuit).await;
    assert_eq!(url_stays, url);
    assert_eq!(stays.status, RouteStatus::FailingOver);

    // A new worker of the same domain appears: the circuit moves there, same URL.
    let w4 = BaiWorker::start(&app, "w4", "w4.example", wildcard("apps.example")).await;
    wait_for("the circuit moves to w4", async || {
        routes_on(&app, w4.id).await.contains(&circuit)
    })
    .await;
    let (rescued, url_rescued) = circuit_url(&app, circuit).await;
    assert_eq!(rescued.frontend.subdomain.as_deref(), Some("llm"));
    assert_eq!(url_rescued, url);
    assert!(app.store.stranded_routes().await.unwrap().is_empty());
    assert!(routes_on(&app, w3.id).await.is_empty());
}

/// An elector that always wins and records when it was released.
struct Recorded(Arc<std::sync::atomic::AtomicBool>);

impl appproxy_coordinator::leader::Elector for Recorded {
    async fn try_acquire(&mut self) -> anyhow::Result<bool> {
        Ok(true)
    }
    async fn release(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A shutdown that comes while a leader-only pass runs releases leadership
/// only once that pass is over, for both forms of leader work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_pass_releases_leadership_after_the_pass() {
    use std::sync::atomic::Ordering;
    for continuous in [false, true] {
        let app = TestApp::start(Backend::Sqlite).await;
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let leadership = appproxy_coordinator::leader::spawn(
            Recorded(released.clone()),
            Duration::from_millis(10),
            async move {
                let _ = stop_rx.await;
            },
        );
        let ctx = app.hub.context(app.clock.clone(), leadership.clone());
        // The pass starts, says so, and ends when the test lets it.
        let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(1);
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let pass_gate = gate.clone();
        let work = tokio::spawn(async move {
            let state = (started_tx, pass_gate);
            if continuous {
                ctx.while_leading("test task", state, |(started, gate), _stop| {
                    Box::pin(async move {
                        let _ = started.send(()).await;
                        let _ = gate.acquire().await.unwrap();
                        Ok(())
                    })
                })
                .await
            } else {
                ctx.every(
                    "test pass",
                    Duration::from_millis(10),
                    state,
                    |(started, gate)| {
                        Box::pin(async move {
                            let _ = started.send(()).await;
                            let _ = gate.acquire().await.unwrap();
                        })
                    },
                )
                .await
            }
        });
        started.recv().await.expect("a pass started");
        stop_tx.send(()).unwrap();
        // Leadership ends for the shutdown at once…
        let mut lost = leadership.clone();
        tokio::time::timeout(PATIENCE, lost.lost()).await.unwrap();
        assert!(leadership.shutting_down());
        // …but while the pass runs nothing is released: the leader task
        // waits for the pass's guard, however long the test waits here.
        for _ in 0..20 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(!released.load(Ordering::SeqCst), "released during a pass");
        }
        gate.add_permits(1);
        wait_for("the release after the pass", async || {
            released.load(Ordering::SeqCst)
        })
        .await;
        app.hub.shutdown();
        tokio::time::timeout(PATIENCE, work).await.unwrap().unwrap();
    }
}

/// Failover moves a Backend.AI circuit off its lost worker exactly when the
/// other worker gives it the URL the Manager was answered (the same string),
/// for port and wildcard workers, with and without TLS, whatever the
/// spelling of the host; otherwise it stays.
async fn failover_moves_a_circuit_exactly_where_the_managers_url_stays(b: Backend) {
    let port = |range: [u16; 2]| json!({"frontend_mode": "port", "port_range": range});
    let wild = |domain: &str, traffic: u16| json!({"frontend_mode": "wildcard", "wildcard_domain": domain, "wildcard_traffic_port": traffic});
    // (the lost worker: hostname, tls, frontend), (the other one: …)
    type Side = (&'static str, bool, serde_json::Value);
    let cases: Vec<(Side, Side)> = vec![
        (
            ("proxy.example", false, port([20000, 20100])),
            ("PROXY.Example", false, port([20000, 20100])),
        ),
        (
            ("proxy.example", false, port([20000, 20100])),
            ("proxy.example.", false, port([20000, 20100])),
        ),
        (
            ("proxy.example", false, port([20000, 20100])),
            ("proxy.example", true, port([20000, 20100])),
        ),
        (
            ("proxy.example", false, port([20000, 20100])),
            ("proxy.example", false, port([20050, 20100])),
        ),
        (
            ("proxy.example", true, port([443, 443])),
            ("Proxy.Example", true, port([443, 443])),
        ),
        (
            ("h", false, wild(".apps.example", 80)),
            ("h", false, wild(".APPS.example", 80)),
        ),
        (
            ("h", false, wild(".apps.example", 80)),
            ("h", false, wild(".apps.example.", 80)),
        ),
        (
            ("h", false, wild(".apps.example", 80)),
            ("h", false, wild(".apps.example", 8080)),
        ),
        (
            ("h", false, wild(".apps.example", 443)),
            ("h", true, wild(".apps.example", 443)),
        ),
        (
            ("h", true, wild(".apps.example", 443)),
            ("h", true, wild(".Apps.Example", 443)),
        ),
    ];
    let mut moved_any = (false, false);
    for (i, ((from_host, from_tls, from_front), (to_host, to_tls, to_front))) in
        cases.into_iter().enumerate()
    {
        let app = TestApp::builder(b).health(health()).start().await;
        let wildcard = from_front["frontend_mode"] == "wildcard";
        let lost = BaiWorker::start_tls(&app, "bai-lost", from_host, from_tls, from_front).await;
        let other = BaiWorker::start_tls(&app, "bai-other", to_host, to_tls, to_front).await;
        let circuit = create_circuit(&app, lost.id, wildcard.then_some("llm-1")).await;
        let (before, managers_url) = circuit_url(&app, circuit).await;
        let other_worker = app.store.get_worker(other.id).await.unwrap();
        // Only a port the other worker's range holds is a place there.
        let fits = match (&other_worker.frontend, before.frontend.port) {
            (WorkerFrontend::Port { port_range, .. }, Some(p)) => {
                (port_range[0]..=port_range[1]).contains(&p)
            }
            _ => true,
        };
        let url_there = endpoint_url(&before, &other_worker).filter(|_| fits);
        lose(&app, &lost, &[other.named()]).await;
        let (after, url_after) = circuit_url(&app, circuit).await;
        let moved = after.worker_id == Some(other.id);
        assert_eq!(
            moved,
            url_there == managers_url,
            "case {i}: {managers_url:?} on the lost worker, {url_there:?} on the other"
        );
        assert_eq!(url_after, managers_url, "case {i}: the URL never changes");
        if moved {
            moved_any.0 = true;
        } else {
            moved_any.1 = true;
        }
    }
    assert_eq!(moved_any, (true, true), "both outcomes were seen");
}
