//! `import-backendai` through the real binary: a Backend.AI App Proxy
//! coordinator 26.9.6's database (a scratch PostgreSQL database made from
//! its schema, `tests/fixtures/backendai-26.9.6-schema.sql`, with rows
//! written as upstream writes them) imported into this coordinator's, on
//! SQLite and on PostgreSQL; then read back through the real router's
//! Backend.AI and native APIs. And the way back: `export-backendai` into
//! another scratch database of upstream's schema, compared row by row with
//! the original.

mod common;

use std::process::Output;

use std::time::Duration;

use appproxy_coordinator::backendai::circuit::RouteInfo;
use appproxy_coordinator::backendai::{bus, jwt};
use appproxy_coordinator::domain::WorkerStatus;
use appproxy_coordinator::health::{HealthConfig, pass_watching};
use appproxy_coordinator::takeover::read;
use common::{API_SECRET, Backend, JWT_SECRET, TestApp, TestDb, backendai_settings, manual_clock};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

on_both_backends!(
    imported_workers_and_circuits_read_back_as_upstream_served_them,
    an_installation_upgraded_by_alembic_reads_back_the_same,
    the_managers_calls_on_an_imported_endpoint_work_at_once,
    a_worker_registered_here_under_another_id_is_a_conflict_with_its_circuits,
    an_unknown_schema_revision_is_refused_and_named,
    a_dry_run_writes_nothing_and_a_second_run_changes_nothing,
    routes_of_its_own_are_refused_without_merge_and_clashes_reported_with_it,
    an_imported_alive_worker_gets_a_full_heartbeat_timeout_from_the_start,
    exported_rows_equal_the_imported_ones_field_by_field,
    an_upgraded_installation_round_trips_the_same,
    export_refuses_a_database_not_empty_or_at_an_unknown_revision,
    an_export_dry_run_writes_nothing,
);

/// A new installation's schema (upstream's `schema oneshot`).
const SCHEMA: &str = include_str!("fixtures/backendai-26.9.6-schema.sql");
/// An upgraded installation's (its alembic migrations): other column order,
/// defaults and enum members.
const UPGRADED: &str = include_str!("fixtures/backendai-26.9.6-schema-upgraded.sql");
const PASSWORD: &str = "upstream-password-never-printed";

/// Upstream's database: a scratch PostgreSQL database with upstream's
/// schema (dropped with the [`TestDb`]).
struct Upstream {
    db: TestDb,
    pool: PgPool,
}

impl Upstream {
    async fn new() -> Upstream {
        Upstream::with_schema(SCHEMA).await
    }

    async fn with_schema(schema: &str) -> Upstream {
        let db = TestDb::new(Backend::Postgres).await;
        // Its own connection: the dump empties the search_path.
        let mut load = PgConnection::connect(&db.url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(schema.to_owned()))
            .execute(&mut load)
            .await
            .unwrap();
        load.close().await.unwrap();
        let pool = PgPool::connect(&db.url).await.unwrap();
        Upstream { db, pool }
    }

    /// Its URL with a password (the server trusts any): what the import
    /// must never print.
    fn url(&self) -> String {
        self.db.url.replacen(
            "postgres://postgres@",
            &format!("postgres://postgres:{PASSWORD}@"),
            1,
        )
    }

    async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    async fn port_worker(&self, id: Uuid, authority: &str) {
        self.exec(&format!(
            "INSERT INTO workers (id, authority, frontend_mode, protocol, hostname, tls_listen, \
             tls_advertised, api_port, available_slots, occupied_slots, port_range, nodes, \
             accepted_traffics, filtered_apps_only, status, created_at) VALUES ('{id}', \
             '{authority}', 'PORT', 'HTTP', 'proxy.example.com', false, false, 10201, 96, 0, \
             '{{10205,10300}}', 2, '{{INTERACTIVE,INFERENCE}}', true, 'ALIVE', \
             '2026-01-02T03:04:05.123456Z'); INSERT INTO worker_app_filters (property_name, \
             property_value, worker) VALUES ('session.domain_name', 'research', '{id}')"
        ))
        .await;
    }

    async fn wildcard_worker(&self, id: Uuid, authority: &str) {
        self.exec(&format!(
            "INSERT INTO workers (id, authority, frontend_mode, protocol, hostname, tls_listen, \
             tls_advertised, api_port, available_slots, occupied_slots, wildcard_domain, \
             wildcard_traffic_port, nodes, accepted_traffics, filtered_apps_only, status) VALUES \
             ('{id}', '{authority}', 'WILDCARD_DOMAIN', 'HTTP', 'wild.example.com', false, false, \
             10202, -1, 0, '.apps.example.com', 8080, 1, '{{INTERACTIVE}}', false, 'ALIVE')"
        ))
        .await;
    }

    /// An inference circuit on `worker` at `port`, its endpoint with a
    /// health check.
    async fn inference(&self, id: Uuid, worker: Uuid, port: u16, endpoint: Uuid) {
        let route_info = json!([{"route_id": Uuid::new_v4(), "session_id": Uuid::new_v4(),
            "session_name": null, "kernel_host": "10.0.0.5", "kernel_port": 8000,
            "protocol": "http", "traffic_ratio": 0.5}]);
        self.exec(&format!(
            "INSERT INTO circuits (id, app, protocol, worker, app_mode, frontend_mode, port, envs, \
             open_to_public, user_id, endpoint_id, runtime_variant, session_ids, route_info, \
             created_at, updated_at) VALUES ('{id}', 'model', 'HTTP', '{worker}', 'INFERENCE', \
             'PORT', {port}, '{{}}', true, '{user}', '{endpoint}', 'vllm', '{{}}', '{route_info}', \
             '2026-02-03T04:05:06.654321Z', '2026-02-03T04:05:06.654321Z'); \
             INSERT INTO endpoints (id, health_check_enabled, health_check_config) VALUES \
             ('{endpoint}', true, '{{\"path\": \"/health\", \"interval\": 10}}')",
            user = Uuid::new_v4(),
        ))
        .await;
    }

    /// An interactive app of `session` on wildcard `worker` at `subdomain`,
    /// and the conf token it was opened with.
    async fn interactive(&self, id: Uuid, worker: Uuid, subdomain: &str, session: Uuid) {
        let route_info = json!([{"session_id": session, "kernel_host": "10.0.0.9",
            "kernel_port": 8888, "protocol": "http", "traffic_ratio": 1.0}]);
        self.exec(&format!(
            "INSERT INTO circuits (id, app, protocol, worker, app_mode, frontend_mode, subdomain, \
             envs, arguments, open_to_public, allowed_client_ips, user_id, session_ids, \
             route_info) VALUES ('{id}', 'jupyter', 'HTTP', '{worker}', 'INTERACTIVE', \
             'WILDCARD_DOMAIN', '{subdomain}', '{{\"TZ\": \"UTC\"}}', '--no-browser', false, \
             '10.0.0.0/8', '{user}', '{{{session}}}', '{route_info}'); INSERT INTO tokens (id, \
             kernel_host, kernel_port, session_id, user_uuid, group_id, access_key, domain_name) \
             VALUES ('{token}', '10.0.0.9', 8888, '{session}', '{user}', '{group}', 'AKTEST', \
             'default')",
            user = Uuid::new_v4(),
            token = Uuid::new_v4(),
            group = Uuid::new_v4(),
        ))
        .await;
    }
}

/// Runs `import-backendai --from <upstream> [extra]` into `target`.
async fn import(upstream: &Upstream, target: &TestDb, extra: &[&str]) -> Output {
    let mut args = vec![
        "import-backendai".to_owned(),
        "--from".to_owned(),
        upstream.url(),
        "--database-url".to_owned(),
        target.url.clone(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    run(args, None).await
}

/// Runs `export-backendai [extra]` from `source` into `upstream`, its URL
/// (with the password) in `APPPROXY_EXPORT_TO`.
async fn export(source: &TestDb, upstream: &Upstream, extra: &[&str]) -> Output {
    let mut args = vec![
        "export-backendai".to_owned(),
        "--database-url".to_owned(),
        source.url.clone(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    run(args, Some(upstream.url())).await
}

/// The binary with `args` (and `APPPROXY_EXPORT_TO=to`); checks that no
/// password was printed.
async fn run(args: Vec<String>, to: Option<String>) -> Output {
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(common::BIN);
        cmd.args(&args).env_remove("RUST_LOG");
        match to {
            Some(to) => cmd.env("APPPROXY_EXPORT_TO", to),
            None => cmd.env_remove("APPPROXY_EXPORT_TO"),
        };
        cmd.output().unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = texts(&out);
    assert!(
        !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
        "the password was printed:\n{stdout}\n{stderr}"
    );
    out
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn succeeded(out: &Output) -> String {
    let (stdout, stderr) = texts(out);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    stdout
}

/// The coordinator on `target`, in Backend.AI mode.
async fn serve(target: TestDb) -> TestApp {
    let store = target.store().await;
    TestApp::builder(target.backend)
        .db(target, store)
        .clock(manual_clock())
        .backendai(backendai_settings())
        .start()
        .await
}

async fn bai(app: &TestApp, method: Method, path: &str) -> (StatusCode, Value) {
    bai_with(app, method, path, None).await
}

/// `X-BackendAI-Token: <api_secret>`, as the Manager and the workers send it.
async fn bai_with(
    app: &TestApp,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = app
        .http
        .request(method, format!("{}{path}", app.url))
        .header("x-backendai-token", API_SECRET);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let r = req.send().await.unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

async fn route(app: &TestApp, id: Uuid) -> Value {
    let a = app
        .manager(Method::GET, &format!("/routes/{id}"), None)
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    a.body
}

async fn imported_workers_and_circuits_read_back_as_upstream_served_them(b: Backend) {
    read_back(b, Upstream::new().await).await;
}

async fn an_installation_upgraded_by_alembic_reads_back_the_same(b: Backend) {
    read_back(b, Upstream::with_schema(UPGRADED).await).await;
}

async fn read_back(b: Backend, upstream: Upstream) {
    let (port_worker, wild_worker) = (Uuid::new_v4(), Uuid::new_v4());
    let (model, jupyter, endpoint, session) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    upstream.port_worker(port_worker, "worker-port").await;
    upstream.wildcard_worker(wild_worker, "worker-wild").await;
    upstream
        .inference(model, port_worker, 10207, endpoint)
        .await;
    upstream
        .interactive(jupyter, wild_worker, "s1-jupyter", session)
        .await;
    let target = TestDb::new(b).await;
    let stdout = succeeded(&import(&upstream, &target, &[]).await);
    for line in [
        "alembic revision a1b2c3d4e5f6: 2 workers, 2 circuits, 1 endpoints, 1 tokens",
        "workers: 2 new, 0 already here, 0 in conflict, 0 refused",
        "circuits: 2 new, 0 already here, 0 in conflict, 0 refused",
        "tokens: 1 new, 0 already here",
        "imported in one transaction",
    ] {
        assert!(stdout.contains(line), "{line:?} in\n{stdout}");
    }
    let app = serve(target).await;

    workers_read_back(&app, port_worker, wild_worker).await;

    // The circuits: the same ids, workers, slots and fields.
    let (status, c) = bai(&app, Method::GET, &format!("/api/circuit/{model}")).await;
    assert_eq!(status, StatusCode::OK, "{c}");
    assert_eq!(
        (c["worker"].clone(), c["port"].clone()),
        (json!(port_worker), json!(10207))
    );
    assert_eq!(
        (c["app"].clone(), c["app_mode"].clone()),
        (json!("model"), json!("inference"))
    );
    assert_eq!(
        (c["endpoint_id"].clone(), c["runtime_variant"].clone()),
        (json!(endpoint), json!("vllm"))
    );
    assert_eq!(c["route_info"][0]["kernel_host"], "10.0.0.5");
    assert_eq!(c["route_info"][0]["traffic_ratio"], 0.5);
    assert_eq!(c["open_to_public"], true);
    assert_eq!(c["created_at"], "2026-02-03T04:05:06.654321Z");
    assert_eq!(c["status"], "active");
    let (_, c) = bai(&app, Method::GET, &format!("/api/circuit/{jupyter}")).await;
    assert_eq!(
        (c["worker"].clone(), c["subdomain"].clone()),
        (json!(wild_worker), json!("s1-jupyter"))
    );
    assert_eq!(
        (c["frontend_mode"].clone(), c["port"].clone()),
        (json!("wildcard"), Value::Null)
    );
    assert_eq!(c["session_ids"], json!([session]));
    assert_eq!(
        (c["arguments"].clone(), c["envs"].clone()),
        (json!("--no-browser"), json!({"TZ": "UTC"}))
    );
    assert_eq!(c["allowed_client_ips"], "10.0.0.0/8");

    // The URLs are upstream's: http://<hostname>:<port>, and
    // http://<subdomain><wildcard domain>:<traffic port> (not 80).
    let r = route(&app, model).await;
    assert_eq!(r["frontend"]["url"], "http://proxy.example.com:10207");
    assert_eq!(r["status"], "Active");
    let r = route(&app, jupyter).await;
    assert_eq!(
        r["frontend"]["url"],
        "http://s1-jupyter.apps.example.com:8080"
    );
    let listed = app.manager(Method::GET, "/routes", None).await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 2);

    published_as_served(&app).await;

    // A worker that keeps running heartbeats with the id upstream gave it.
    let (status, body) = bai(&app, Method::PATCH, &format!("/api/worker/{port_worker}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// The workers' API answers the imported workers with the same ids, as
/// upstream described them.
async fn workers_read_back(app: &TestApp, port_worker: Uuid, wild_worker: Uuid) {
    let (status, body) = bai(app, Method::GET, &format!("/api/worker/{port_worker}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["authority"], "worker-port");
    assert_eq!(body["frontend_mode"], "port");
    assert_eq!(body["port_range"], json!([10205, 10300]));
    assert_eq!(
        (body["nodes"].clone(), body["filtered_apps_only"].clone()),
        (json!(2), json!(true))
    );
    assert_eq!(
        body["accepted_traffics"],
        json!(["interactive", "inference"])
    );
    assert_eq!(body["created_at"], "2026-01-02T03:04:05.123456Z");
    assert_eq!(body["occupied_slots"], 1);
    let (_, body) = bai(app, Method::GET, &format!("/api/worker/{wild_worker}")).await;
    assert_eq!(body["wildcard_domain"], ".apps.example.com");
    assert_eq!(body["wildcard_traffic_port"], 8080);
    let (_, all) = bai(app, Method::GET, "/api/worker").await;
    assert_eq!(all["workers"].as_array().unwrap().len(), 2);
}

/// The workers hold their circuits already: the bus state records each as
/// published and acknowledged, as the publisher would write it, so the
/// publisher has nothing to send for them.
async fn published_as_served(app: &TestApp) {
    let state = app.store.bus_state().await.unwrap();
    assert_eq!(state.circuits.len(), 2);
    for published in &state.circuits {
        let (_, mut served) = bai(
            app,
            Method::GET,
            &format!("/api/circuit/{}", published.route_id),
        )
        .await;
        served.as_object_mut().unwrap().remove("status");
        assert_eq!(published.circuit, served);
        assert!(published.acked, "{}", published.route_id);
        let now = bus::Placed {
            worker_id: published.worker_id,
            authority: published.authority.clone(),
            circuit: served,
        };
        assert_eq!(bus::plan(Some(published), Some(&now)), vec![]);
    }
}

async fn the_managers_calls_on_an_imported_endpoint_work_at_once(b: Backend) {
    let upstream = Upstream::new().await;
    let (worker, model, endpoint) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    upstream.port_worker(worker, "worker-port").await;
    upstream.inference(model, worker, 10207, endpoint).await;
    let target = TestDb::new(b).await;
    succeeded(&import(&upstream, &target, &[]).await);
    let app = serve(target).await;

    // The endpoint token names the imported circuit at upstream's URL.
    let user = Uuid::new_v4();
    let (status, body) = bai_with(
        &app,
        Method::POST,
        &format!("/v2/endpoints/{endpoint}/token"),
        Some(json!({"user_uuid": user, "exp": 1_893_456_000})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = jwt::decode(body["token"].as_str().unwrap(), JWT_SECRET, 0).unwrap();
    assert_eq!(claims["id"], json!(model));
    assert_eq!(claims["worker"], json!(worker));
    assert_eq!(claims["app_url"], "http://proxy.example.com:10207");
    // And the Manager deletes it like any other.
    let (status, body) = bai(&app, Method::DELETE, &format!("/v2/endpoints/{endpoint}")).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"success": true})));
    let gone = app
        .manager(Method::GET, &format!("/routes/{model}"), None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}

async fn a_worker_registered_here_under_another_id_is_a_conflict_with_its_circuits(b: Backend) {
    let upstream = Upstream::new().await;
    let (worker, model) = (Uuid::new_v4(), Uuid::new_v4());
    upstream.port_worker(worker, "worker-port").await;
    upstream
        .inference(model, worker, 10207, Uuid::new_v4())
        .await;
    let app = serve(TestDb::new(b).await).await;
    let here = common::register_backendai_worker(
        &app,
        "worker-port",
        json!({"frontend_mode": "port", "port_range": [10205, 10300]}),
    )
    .await;
    let stdout = succeeded(&import(&upstream, &app.db, &[]).await);
    for line in [
        format!(
            "conflict worker {worker}: authority \"worker-port\" is worker {} here",
            here.id
        ),
        format!("conflict route {model}: its worker {worker} is not imported"),
        "workers: 0 new, 0 already here, 1 in conflict".to_owned(),
        "circuits: 0 new, 0 already here, 1 in conflict".to_owned(),
    ] {
        assert!(stdout.contains(&line), "{line:?} in\n{stdout}");
    }
    let (status, _) = bai(&app, Method::GET, &format!("/api/worker/{worker}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let listed = app.manager(Method::GET, "/routes", None).await;
    assert_eq!(listed.body["items"], json!([]));
}

async fn an_unknown_schema_revision_is_refused_and_named(b: Backend) {
    let upstream = Upstream::new().await;
    upstream.port_worker(Uuid::new_v4(), "worker-port").await;
    upstream
        .exec("UPDATE alembic_version SET version_num = 'fedcba987654'")
        .await;
    let target = TestDb::new(b).await;
    let out = import(&upstream, &target, &[]).await;
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("alembic revision fedcba987654"), "{stderr}");
    let app = serve(target).await;
    let (_, all) = bai(&app, Method::GET, "/api/worker").await;
    assert_eq!(all["workers"], json!([]));
    assert_eq!(app.revision().await, 0);
}

async fn a_dry_run_writes_nothing_and_a_second_run_changes_nothing(b: Backend) {
    let upstream = Upstream::new().await;
    let worker = Uuid::new_v4();
    upstream.port_worker(worker, "worker-port").await;
    upstream
        .inference(Uuid::new_v4(), worker, 10207, Uuid::new_v4())
        .await;
    let target = TestDb::new(b).await;
    let stdout = succeeded(&import(&upstream, &target, &["--dry-run"]).await);
    assert!(stdout.contains("circuits: 1 new"), "{stdout}");
    assert!(stdout.contains("dry run: nothing written"), "{stdout}");
    let store = target.store().await;
    assert_eq!(store.current_revision().await.unwrap(), 0);
    assert!(store.list_workers().await.unwrap().is_empty());

    succeeded(&import(&upstream, &target, &[]).await);
    let revision = store.current_revision().await.unwrap();
    assert_eq!(revision, 2, "one worker and one route");
    let stdout = succeeded(&import(&upstream, &target, &[]).await);
    assert!(
        stdout.contains("circuits: 0 new, 1 already here"),
        "{stdout}"
    );
    assert!(stdout.contains("nothing to import"), "{stdout}");
    assert_eq!(store.current_revision().await.unwrap(), revision);
    store.close().await;
}

async fn routes_of_its_own_are_refused_without_merge_and_clashes_reported_with_it(b: Backend) {
    let upstream = Upstream::new().await;
    let worker = Uuid::new_v4();
    upstream.port_worker(worker, "worker-port").await;
    // Not dedicated: it takes this coordinator's own routes too.
    upstream
        .exec("UPDATE workers SET filtered_apps_only = false")
        .await;
    upstream
        .inference(Uuid::new_v4(), worker, 10207, Uuid::new_v4())
        .await;
    let target = TestDb::new(b).await;
    succeeded(&import(&upstream, &target, &[]).await);
    let app = serve(target).await;
    // A route of this coordinator's own on the imported worker, at 10208.
    let own = app
        .create(json!({"session_id": Uuid::new_v4(), "service": "own",
                       "targets": [{"host": "10.0.0.1", "port": 80}],
                       "worker_id": worker, "frontend": {"port": 10208}}))
        .await;
    assert_eq!(own.status, StatusCode::CREATED, "{}", own.body);
    // Upstream has another circuit at 10208, and one more elsewhere.
    let (clashing, other) = (Uuid::new_v4(), Uuid::new_v4());
    upstream
        .inference(clashing, worker, 10208, Uuid::new_v4())
        .await;
    upstream
        .inference(other, worker, 10209, Uuid::new_v4())
        .await;
    let before = app.revision().await;

    let out = import(&upstream, &app.db, &[]).await;
    let (_, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("holds 1 routes") && stderr.contains("--merge"),
        "{stderr}"
    );
    assert_eq!(app.revision().await, before, "nothing written");

    let stdout = succeeded(&import(&upstream, &app.db, &["--merge"]).await);
    let conflict = format!(
        "conflict route {clashing}: port 10208 of worker {worker} is route {}'s",
        own.body["id"].as_str().unwrap()
    );
    assert!(stdout.contains(&conflict), "{conflict:?} in\n{stdout}");
    assert!(
        stdout.contains("circuits: 1 new, 1 already here, 1 in conflict"),
        "{stdout}"
    );
    let kept = route(&app, own.body["id"].as_str().unwrap().parse().unwrap()).await;
    assert_eq!(
        (kept["service"].clone(), kept["frontend"]["port"].clone()),
        (json!("own"), json!(10208))
    );
    let gone = app
        .manager(Method::GET, &format!("/routes/{clashing}"), None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(route(&app, other).await["frontend"]["port"], 10209);
}

async fn an_imported_alive_worker_gets_a_full_heartbeat_timeout_from_the_start(b: Backend) {
    let upstream = Upstream::new().await;
    let worker = Uuid::new_v4();
    upstream.port_worker(worker, "worker-port").await;
    upstream
        .inference(Uuid::new_v4(), worker, 10207, Uuid::new_v4())
        .await;
    let target = TestDb::new(b).await;
    succeeded(&import(&upstream, &target, &[]).await);
    let app = serve(target).await;
    let status = |app: &TestApp| {
        let store = app.store.clone();
        async move {
            let w = store.list_workers().await.unwrap();
            w.iter().find(|w| w.id == worker).unwrap().status
        }
    };
    let health = HealthConfig {
        heartbeat_timeout: Duration::from_secs(30),
        failover_grace: Duration::from_secs(10),
        batch_size: 100,
        route_idle_ttl: None,
    };
    // Our coordinator starts an hour after the import: the worker's last
    // heartbeat (the import's time) is far older than the timeout, yet it
    // could not have reached anyone meanwhile.
    app.clock.advance(Duration::from_secs(3600));
    let started = app.clock.now();
    pass_watching(&app.store, &app.metrics, &health, &app.clock, Some(started))
        .await
        .unwrap();
    assert_eq!(status(&app).await, WorkerStatus::Ready);
    app.clock.advance(Duration::from_secs(30));
    pass_watching(&app.store, &app.metrics, &health, &app.clock, Some(started))
        .await
        .unwrap();
    assert_eq!(status(&app).await, WorkerStatus::Ready, "a full timeout");
    // Past one timeout from the start without a heartbeat: it is Lost.
    app.clock.advance(Duration::from_secs(1));
    pass_watching(&app.store, &app.metrics, &health, &app.clock, Some(started))
        .await
        .unwrap();
    assert_eq!(status(&app).await, WorkerStatus::Lost);
}

/// Upstream's rows as its coordinator reads them back: `route_info` as its
/// `list[RouteInfo]` (it ignores keys it does not know and fills absent
/// ones with their defaults).
fn as_upstream_reads(mut u: read::Upstream) -> (read::Upstream, Vec<Vec<RouteInfo>>) {
    let infos = u
        .circuits
        .iter_mut()
        .map(|c| {
            let info = serde_json::from_value(c.route_info.0.clone()).unwrap();
            c.route_info.0 = Value::Null;
            info
        })
        .collect();
    (u, infos)
}

async fn exported_rows_equal_the_imported_ones_field_by_field(b: Backend) {
    round_trip(b, SCHEMA).await;
}

/// From and back into the schema upstream's alembic migrations leave (its
/// `proxyprotocol` without `PREOPEN`, `VNC`, `RDP`; other column order).
async fn an_upgraded_installation_round_trips_the_same(b: Backend) {
    round_trip(b, UPGRADED).await;
}

async fn round_trip(b: Backend, schema: &str) {
    let upstream = Upstream::with_schema(schema).await;
    let (port_worker, wild_worker) = (Uuid::new_v4(), Uuid::new_v4());
    upstream.port_worker(port_worker, "worker-port").await;
    upstream.wildcard_worker(wild_worker, "worker-wild").await;
    // Not dedicated: it takes a native route below as well.
    upstream
        .exec(&format!(
            "UPDATE workers SET filtered_apps_only = false WHERE id = '{port_worker}'"
        ))
        .await;
    upstream
        .inference(Uuid::new_v4(), port_worker, 10207, Uuid::new_v4())
        .await;
    upstream
        .interactive(Uuid::new_v4(), wild_worker, "s1-jupyter", Uuid::new_v4())
        .await;
    let target = TestDb::new(b).await;
    succeeded(&import(&upstream, &target, &[]).await);
    let app = serve(target).await;
    let native = app
        .create(json!({"session_id": Uuid::new_v4(), "service": "native",
                       "targets": [{"host": "10.0.0.1", "port": 80}],
                       "worker_id": port_worker, "frontend": {"port": 10208}}))
        .await;
    assert_eq!(native.status, StatusCode::CREATED, "{}", native.body);

    let back = Upstream::with_schema(schema).await;
    let stdout = succeeded(&export(&app.db, &back, &[]).await);
    for line in [
        "this coordinator: 2 workers, 3 routes, 1 conf tokens in use",
        "not exported: 1 native routes and 0 native workers",
        "at alembic revision a1b2c3d4e5f6 in one transaction: 2 workers, 1 app filters, \
         2 circuits, 1 endpoints, 1 conf tokens",
    ] {
        assert!(stdout.contains(line), "{line:?} in\n{stdout}");
    }
    let original = read::read(&upstream.pool).await.unwrap();
    let exported = read::read(&back.pool).await.unwrap();
    let (original, original_info) = as_upstream_reads(original);
    let (exported, exported_info) = as_upstream_reads(exported);
    assert_eq!(exported.workers, original.workers);
    assert_eq!(exported.circuits, original.circuits);
    assert_eq!(exported_info, original_info);
    assert_eq!(exported.endpoints, original.endpoints);
    assert_eq!(exported.tokens, original.tokens);
    // The slot counters as upstream keeps them: the native route is not one.
    let slots: Vec<(String, i32, i32)> = sqlx::query_as(
        "SELECT authority, available_slots, occupied_slots FROM workers ORDER BY authority",
    )
    .fetch_all(&back.pool)
    .await
    .unwrap();
    assert_eq!(
        slots,
        vec![
            ("worker-port".to_owned(), 96, 1),
            ("worker-wild".to_owned(), -1, 1)
        ]
    );
}

async fn export_refuses_a_database_not_empty_or_at_an_unknown_revision(b: Backend) {
    let upstream = Upstream::new().await;
    let worker = Uuid::new_v4();
    upstream.port_worker(worker, "worker-port").await;
    upstream
        .inference(Uuid::new_v4(), worker, 10207, Uuid::new_v4())
        .await;
    let target = TestDb::new(b).await;
    succeeded(&import(&upstream, &target, &[]).await);

    // Into a live upstream database (the one imported from): refused.
    let out = export(&target, &upstream, &[]).await;
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("is not empty (1 workers, 1 worker_app_filters, 1 circuits, 1 endpoints)")
            && stderr.contains("nothing written"),
        "{stderr}"
    );
    let count = |pool: PgPool| async move {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM circuits")
            .fetch_one(&pool)
            .await
            .unwrap();
        n
    };
    assert_eq!(count(upstream.pool.clone()).await, 1);

    // Into an empty database at a revision this coordinator does not know.
    let other = Upstream::new().await;
    other
        .exec("UPDATE alembic_version SET version_num = 'fedcba987654'")
        .await;
    let out = export(&target, &other, &[]).await;
    let (_, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("alembic revision fedcba987654"), "{stderr}");
    assert_eq!(count(other.pool.clone()).await, 0);
}

async fn an_export_dry_run_writes_nothing(b: Backend) {
    let upstream = Upstream::new().await;
    let worker = Uuid::new_v4();
    upstream.port_worker(worker, "worker-port").await;
    upstream
        .inference(Uuid::new_v4(), worker, 10207, Uuid::new_v4())
        .await;
    let target = TestDb::new(b).await;
    succeeded(&import(&upstream, &target, &[]).await);
    let back = Upstream::new().await;
    let stdout = succeeded(&export(&target, &back, &["--dry-run"]).await);
    assert!(
        stdout.contains("dry run: 1 workers, 1 app filters, 1 circuits, 1 endpoints, 0 conf tokens would be written"),
        "{stdout}"
    );
    let exported = read::read(&back.pool).await.unwrap();
    assert_eq!(
        (
            exported.workers.len(),
            exported.circuits.len(),
            exported.endpoints.len()
        ),
        (0, 0, 0)
    );
    // And the real one after it writes them.
    succeeded(&export(&target, &back, &[]).await);
    let exported = read::read(&back.pool).await.unwrap();
    assert_eq!(
        (
            exported.workers.len(),
            exported.circuits.len(),
            exported.endpoints.len()
        ),
        (1, 1, 1)
    );
}
