//! Worker health and failover, driven through the real router with the
//! library's worker client: silent workers lose their routes to healthy ones,
//! exactly once, and nothing ever sits on two workers.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appproxy_coordinator::client::{RoutingTable, WorkerClient};
use appproxy_coordinator::domain::WorkerRegistration;
use appproxy_coordinator::health::HealthConfig;
use common::{BOOTSTRAP, Backend, TestApp, TestDb, route};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use reqwest::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

on_both_backends!(
    a_silent_worker_s_routes_reach_another_worker_within_the_timeouts,
    no_route_is_ever_on_two_workers_across_random_failures,
    routes_that_fit_nowhere_wait_as_pending_until_capacity_appears,
    a_returning_worker_gets_only_what_is_still_its_own,
    expired_routes_are_collected_as_deletes,
    idle_routes_are_collected_unless_re_sent,
);

const TIMEOUT: Duration = Duration::from_millis(1000);
const GRACE: Duration = Duration::from_millis(500);

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
    client: WorkerClient,
    table: Arc<Mutex<RoutingTable>>,
    alive: Arc<AtomicBool>,
    violations: Arc<Mutex<Vec<String>>>,
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
        let violations = Arc::new(Mutex::new(Vec::new()));
        let mut stream = client.watch(Some(answer.revision)).await.unwrap();
        let (t, v) = (table.clone(), violations.clone());
        tokio::spawn(async move {
            while let Some(Ok(event)) = stream.next().await {
                if let Err(e) = t.lock().unwrap().apply(&event) {
                    v.lock().unwrap().push(e);
                }
            }
        });
        let (c, t, a) = (client.clone(), table.clone(), alive.clone());
        tokio::spawn(async move {
            loop {
                if a.load(Ordering::SeqCst) {
                    let acked = t.lock().unwrap().revision;
                    let _ = c.heartbeat(acked).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        SimWorker {
            client,
            table,
            alive,
            violations,
        }
    }

    fn id(&self) -> Uuid {
        self.client.worker_id
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

async fn wait_for(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
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

async fn a_silent_worker_s_routes_reach_another_worker_within_the_timeouts(b: Backend) {
    let app = TestApp::start_with_health(b, health()).await;
    let a = SimWorker::start(&app, "a", [20000, 20100]).await;
    let b_worker = SimWorker::start(&app, "b", [30000, 30100]).await;
    let mut ids = HashSet::new();
    for _ in 0..10 {
        ids.insert(create_on(&app, a.id()).await);
    }
    wait_for("a has its routes", Duration::from_secs(5), async || {
        a.routes().len() == 10
    })
    .await;

    a.alive.store(false, Ordering::SeqCst);
    let silenced = Instant::now();
    let watched: Uuid = *ids.iter().next().unwrap();
    // What a manager sees: Propagating/Active, then FailingOver while the
    // worker is Lost within its grace, then the route on its new worker.
    wait_for(
        "the route shows FailingOver",
        TIMEOUT + GRACE + Duration::from_secs(2),
        async || {
            app.manager(Method::GET, &format!("/routes/{watched}"), None)
                .await
                .body["status"]
                == "FailingOver"
        },
    )
    .await;
    wait_for(
        "b serves every route of a",
        TIMEOUT + GRACE + Duration::from_secs(3),
        async || {
            let on_b: HashSet<Uuid> = b_worker.routes().keys().copied().collect();
            ids.is_subset(&on_b)
        },
    )
    .await;
    let took = silenced.elapsed();
    assert!(
        took <= TIMEOUT + GRACE + Duration::from_secs(1),
        "failover took {took:?}"
    );
    assert_eq!(worker_status(&app, a.id()).await, "Lost");
    wait_for(
        "a's stream deletes them",
        Duration::from_secs(5),
        async || a.routes().is_empty(),
    )
    .await;
    let listed = app
        .manager(
            Method::GET,
            &format!("/routes?worker_id={}", b_worker.id()),
            None,
        )
        .await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 10);
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
    assert!(
        text.contains("appproxy_workers{status=\"Lost\"} 1"),
        "{text}"
    );
    assert!(
        a.violations.lock().unwrap().is_empty() && b_worker.violations.lock().unwrap().is_empty()
    );

    // A heartbeat brings the lost worker back to Ready (with nothing of its old routes).
    a.alive.store(true, Ordering::SeqCst);
    wait_for("a is Ready again", Duration::from_secs(5), async || {
        worker_status(&app, a.id()).await == "Ready"
    })
    .await;
}

async fn no_route_is_ever_on_two_workers_across_random_failures(b: Backend) {
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let app = TestApp::start_with_health(b, health()).await;
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
        workers[victim].alive.store(false, Ordering::SeqCst);
        let victim_id = workers[victim].id();
        wait_for(
            &format!("round {round}: routes leave the victim"),
            Duration::from_secs(8),
            async || {
                let on = app
                    .manager(Method::GET, &format!("/routes?worker_id={victim_id}"), None)
                    .await;
                on.body["items"].as_array().unwrap().is_empty()
            },
        )
        .await;
        // Churn while it is down: one new route, one deleted.
        let r = app.create(route(Uuid::new_v4(), "ssh")).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        live.push(r.body["id"].as_str().unwrap().parse().unwrap());
        let gone = live.remove(rng.random_range(0..live.len()));
        app.manager(Method::DELETE, &format!("/routes/{gone}"), None)
            .await;
        workers[victim].alive.store(true, Ordering::SeqCst);

        let head = app.revision().await;
        wait_for(
            &format!("round {round}: every stream catches up"),
            Duration::from_secs(8),
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
    }
}

async fn routes_that_fit_nowhere_wait_as_pending_until_capacity_appears(b: Backend) {
    let app = TestApp::start_with_health(b, health()).await;
    let small = SimWorker::start(&app, "small", [20000, 20001]).await;
    let ids = [
        create_on(&app, small.id()).await,
        create_on(&app, small.id()).await,
    ];
    small.alive.store(false, Ordering::SeqCst);
    wait_for(
        "the routes become Pending",
        Duration::from_secs(8),
        async || {
            let r = app
                .manager(Method::GET, &format!("/routes/{}", ids[0]), None)
                .await;
            r.body["status"] == "Pending"
        },
    )
    .await;
    let r = app
        .manager(Method::GET, &format!("/routes/{}", ids[1]), None)
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

    let rescuer = SimWorker::start(&app, "rescuer", [40000, 40010]).await;
    wait_for(
        "pending routes are placed on the new worker",
        Duration::from_secs(8),
        async || rescuer.routes().len() == 2,
    )
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
    let app = TestApp::start_with_health(b, health()).await;
    let a = SimWorker::start(&app, "a", [20000, 20100]).await;
    let keeper = create_on(&app, a.id()).await;
    let b_worker = SimWorker::start(&app, "b", [30000, 30100]).await;
    let moved = create_on(&app, a.id()).await;
    wait_for("a has both", Duration::from_secs(5), async || {
        a.routes().len() == 2
    })
    .await;
    a.alive.store(false, Ordering::SeqCst);
    wait_for("b takes them", Duration::from_secs(8), async || {
        b_worker.routes().len() == 2
    })
    .await;
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
    let on_b: HashSet<Uuid> = b_worker.routes().keys().copied().collect();
    assert_eq!(on_b, HashSet::from([keeper, moved, fresh]));
}

async fn expired_routes_are_collected_as_deletes(b: Backend) {
    let app = TestApp::start_with_health(b, health()).await;
    let w = SimWorker::start(&app, "w", [20000, 20100]).await;
    let mut body = route(Uuid::new_v4(), "jupyter");
    body["expires_at"] =
        json!((chrono::Utc::now() + chrono::Duration::milliseconds(600)).to_rfc3339());
    let expiring = app.create(body).await;
    let keep = create_on(&app, w.id()).await;
    let id: Uuid = expiring.body["id"].as_str().unwrap().parse().unwrap();
    wait_for("the worker has both", Duration::from_secs(5), async || {
        w.routes().len() == 2
    })
    .await;
    wait_for(
        "the expired route is deleted from the stream",
        Duration::from_secs(5),
        async || !w.routes().contains_key(&id),
    )
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
    let db = TestDb::new(Backend::Postgres).await;
    let stores = [db.store().await, db.store().await];
    let mut replicas = Vec::new();
    let mut stops = Vec::new();
    for store in &stores {
        let Db::Postgres(pool) = store.db() else {
            unreachable!()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(Some(stop));
        replicas.push(leader::spawn(
            AdvisoryLock::new(pool.clone()),
            Duration::from_millis(100),
            async move {
                let _ = stopped.await;
            },
        ));
    }
    let started = Instant::now();
    let mut leaders_seen = HashSet::new();
    while started.elapsed() < Duration::from_millis(800) {
        let leading: Vec<usize> = (0..2).filter(|i| replicas[*i].is_leader()).collect();
        assert!(leading.len() <= 1, "two leaders at once");
        leaders_seen.extend(leading);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        leaders_seen.len(),
        1,
        "one replica leads, and it keeps leading"
    );
    let first = *leaders_seen.iter().next().unwrap();
    let other = 1 - first;
    stops[first].take().unwrap().send(()).unwrap();
    let mut waiting = replicas[other].clone();
    tokio::time::timeout(Duration::from_secs(2), waiting.acquired())
        .await
        .expect("the other replica takes over within a few renew intervals");
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
    let started = Instant::now();
    while !waiting.try_acquire().await.unwrap() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the lock was not freed by the closed session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn idle_routes_are_collected_unless_re_sent(b: Backend) {
    let idle_ttl = Duration::from_millis(800);
    let app = TestApp::start_with_health(
        b,
        HealthConfig {
            route_idle_ttl: Some(idle_ttl),
            ..health()
        },
    )
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
    wait_for("the worker has both", Duration::from_secs(5), async || {
        w.routes().len() == 2
    })
    .await;
    let revision = app.revision().await;
    // The manager keeps re-sending one of them, unchanged.
    let started = Instant::now();
    while started.elapsed() < idle_ttl * 2 {
        let again = app
            .manager(
                Method::PUT,
                &format!("/routes/{kept_id}"),
                Some(kept.clone()),
            )
            .await;
        assert_eq!(again.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for(
        "the idle route is collected",
        Duration::from_secs(5),
        async || !w.routes().contains_key(&forgotten),
    )
    .await;
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
}
