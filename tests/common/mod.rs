//! Test harness shared by the integration tests: a fresh database per test
//! (a temporary SQLite file, or a PostgreSQL database created and dropped on
//! the server at 127.0.0.1:5432), and the real router served on a free port.
//!
//! Time-based behaviour (heartbeat timeouts, failover grace, expiry, idle
//! routes, Leases) is tested on a manual [`Clock`] the test moves itself:
//! waits poll for a condition with a generous deadline, and no assertion
//! depends on how fast the machine is.

#![allow(dead_code)]

pub mod tls;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appproxy_coordinator::api::{self, AppState};
use appproxy_coordinator::backendai::{self, BackendAi};
use appproxy_coordinator::clock::Clock;
use appproxy_coordinator::health::HealthConfig;
use appproxy_coordinator::hub::{Hub, HubConfig};
use appproxy_coordinator::leader::{Elector, Leadership};
use appproxy_coordinator::secret::BackendAiSecrets;
use appproxy_coordinator::secret::{Secret, Tokens};
use appproxy_coordinator::store::{Db, Store};
use appproxy_coordinator::telemetry::Metrics;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Server and role the PostgreSQL tests create their databases with.
pub fn pg_admin_url() -> String {
    std::env::var("APPPROXY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn pg_url_for(db: &str) -> String {
    let admin = pg_admin_url();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    format!("{base}/{db}")
}

/// A database that exists for one test.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("coordinator.db").display());
                TestDb {
                    backend,
                    url,
                    pg_name: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let name = format!("appproxy_test_{}", Uuid::new_v4().simple());
                let admin = Store::connect(&pg_admin_url(), 1).await.unwrap();
                let Db::Postgres(pool) = admin.db() else {
                    unreachable!()
                };
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(pool)
                    .await
                    .expect("create the test database (is PostgreSQL running on 127.0.0.1:5432?)");
                admin.close().await;
                TestDb {
                    backend,
                    url: pg_url_for(&name),
                    pg_name: Some(name),
                    _dir: None,
                }
            }
        }
    }

    /// A new connection pool on this database, migrated.
    pub async fn store(&self) -> Store {
        let store = Store::connect(&self.url, 8).await.unwrap();
        store.migrate().await.unwrap();
        store
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop runs outside async; use a short-lived runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(admin) = Store::connect(&pg_admin_url(), 1).await {
                    if let Db::Postgres(pool) = admin.db() {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(pool)
                        .await;
                    }
                    admin.close().await;
                }
            });
        })
        .join();
    }
}

/// Short intervals, so tests see bookmarks and polls quickly.
pub fn hub_config() -> HubConfig {
    HubConfig {
        poll_interval: std::time::Duration::from_millis(200),
        bookmark_interval: std::time::Duration::from_millis(300),
        ..HubConfig::default()
    }
}

/// How long a wait for something that must happen may take before the test
/// fails: generous, because a loaded machine is slow, not wrong.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// How often a wait checks its condition again.
const POLL: Duration = Duration::from_millis(25);

/// What a wait's check answers: `true`, or `Some(value)`, once it holds.
pub trait Outcome {
    type Value;
    fn settled(self) -> Option<Self::Value>;
}

impl Outcome for bool {
    type Value = ();
    fn settled(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn settled(self) -> Option<T> {
        self
    }
}

/// Polls `check` every 25 ms until it holds (`true`, or `Some(value)`: the
/// value is answered); fails the test, saying `what` it waited for, after
/// [`PATIENCE`]. (`what` is shown only then: it may be a
/// [`std::fmt::from_fn`] that reads a log.)
pub async fn wait_for<O: Outcome>(
    what: impl std::fmt::Display,
    mut check: impl AsyncFnMut() -> O,
) -> O::Value {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await.settled() {
            return value;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{what}: not within {PATIENCE:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`wait_for`] for code that is not async (a child process, a blocking
/// client): blocks the thread between checks.
pub fn wait_for_blocking<O: Outcome>(
    what: impl std::fmt::Display,
    mut check: impl FnMut() -> O,
) -> O::Value {
    let started = Instant::now();
    loop {
        if let Some(value) = check().settled() {
            return value;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{what}: not within {PATIENCE:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// A task a test spawned, aborted when this is dropped: hold it for as long
/// as the task must run (a simulated worker's heartbeats, a server), so no
/// loop outlives its test.
#[must_use = "the task is aborted when this is dropped"]
pub struct Task(tokio::task::JoinHandle<()>);

impl Task {
    pub fn spawn<F>(future: F) -> Task
    where
        F: std::future::Future + Send + 'static,
    {
        Task(tokio::spawn(async move {
            future.await;
        }))
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A manual clock starting now, on a whole millisecond (so every time it
/// shows survives the database's microsecond precision unchanged).
pub fn manual_clock() -> Clock {
    use chrono::SubsecRound;
    Clock::manual(chrono::Utc::now().trunc_subsecs(3))
}

/// An [`Elector`] that counts its attempts, so a test can wait for a
/// replica to have tried (and failed) to lead instead of sleeping.
pub struct Counted<E> {
    pub inner: E,
    pub attempts: Arc<std::sync::atomic::AtomicUsize>,
}

impl<E: Elector> Counted<E> {
    pub fn new(inner: E) -> (Counted<E>, Arc<std::sync::atomic::AtomicUsize>) {
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (
            Counted {
                inner,
                attempts: attempts.clone(),
            },
            attempts,
        )
    }
}

impl<E: Elector> Elector for Counted<E> {
    async fn try_acquire(&mut self) -> anyhow::Result<bool> {
        let result = self.inner.try_acquire().await;
        self.attempts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        result
    }

    async fn release(&mut self) {
        self.inner.release().await;
    }

    fn expiry(&self) -> appproxy_coordinator::leader::Expiry {
        self.inner.expiry()
    }
}

pub const MANAGER: &str = "manager-test-token";
/// Backend.AI's api_secret and jwt_secret in Backend.AI mode.
pub const API_SECRET: &str = "backendai-api-secret-for-tests";
pub const JWT_SECRET: &str = "backendai-jwt-secret-for-tests";
/// The Redis the Backend.AI tests use (its pub/sub and DB 2).
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Backend.AI mode's settings in tests: the secrets above, the local
/// Redis, the default timeouts, token-less `/v2/conf` from loopback.
pub fn backendai_settings() -> backendai::Settings {
    backendai::Settings {
        secrets: BackendAiSecrets {
            api_secret: Secret::new(API_SECRET),
            jwt_secret: Secret::new(JWT_SECRET),
        },
        conf_allowed_networks: vec!["127.0.0.0/8".parse().unwrap()],
        ack_timeout: Duration::from_secs(15),
        idle_timeout: Duration::from_secs(3600),
        conf_token_ttl: Duration::from_secs(600),
        advertised_url: "http://coordinator.test:10200".into(),
        redis_url: REDIS_URL.into(),
        redis_tls: backendai::RedisTls::default(),
    }
}
pub const BOOTSTRAP: &str = "worker-bootstrap-test-token";
/// The status page's read-only token.
pub const VIEWER: &str = "viewer-test-token-for-the-ui";

/// The real router, served on 127.0.0.1:<free port>; made by
/// [`TestApp::builder`] (or [`TestApp::start`] with every default). The
/// server and any health loops stop when the `TestApp` is dropped.
pub struct TestApp {
    pub url: String,
    pub http: Client,
    pub store: Store,
    pub hub: Hub,
    pub metrics: Arc<Metrics>,
    /// The time the API and the health loops read.
    pub clock: Clock,
    /// The health loops' settings, when they run ([`TestAppBuilder::health`]).
    pub health: Option<HealthConfig>,
    /// Backend.AI mode, when on ([`TestAppBuilder::backendai`]).
    pub backendai: Option<Arc<BackendAi>>,
    pub db: Arc<TestDb>,
    /// The server and the health loops.
    _tasks: Vec<Task>,
}

pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Value,
}

impl Answer {
    /// The problem `type` slug, for problem answers.
    pub fn problem(&self) -> &str {
        assert_eq!(
            self.content_type, "application/problem+json",
            "{:?}",
            self.body
        );
        self.body["type"]
            .as_str()
            .and_then(|t| t.strip_prefix("https://appproxy.backend.ai/problems/"))
            .unwrap_or_else(|| panic!("no problem type in {}", self.body))
    }
}

/// How a [`TestApp`] is made. Defaults: a fresh database on the builder's
/// backend, the system clock (a manual one when health loops run), no health
/// loops, native mode, bodies up to 64 KiB (1 MiB in Backend.AI mode), the
/// quick [`hub_config`], and 30 authentication failures a minute.
#[must_use = "a builder does nothing until `start`"]
pub struct TestAppBuilder {
    backend: Backend,
    clock: Option<Clock>,
    health: Option<HealthConfig>,
    backendai: Option<backendai::Settings>,
    max_body: Option<usize>,
    hub: HubConfig,
    db: Option<(Arc<TestDb>, Store)>,
    auth_failures_per_minute: u32,
    ui: bool,
}

impl TestAppBuilder {
    /// The time the API (and the health loops) read.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Runs the leader's health loops with `health`, leading always; on a
    /// manual clock (`app.clock`) that only the test moves, unless
    /// [`clock`](Self::clock) says otherwise.
    pub fn health(mut self, health: HealthConfig) -> Self {
        self.health = Some(health);
        self
    }

    /// Backend.AI mode with `settings` (see [`backendai_settings`]).
    pub fn backendai(mut self, settings: backendai::Settings) -> Self {
        self.backendai = Some(settings);
        self
    }

    /// The largest request body the router reads.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = Some(bytes);
        self
    }

    pub fn hub(mut self, hub: HubConfig) -> Self {
        self.hub = hub;
        self
    }

    /// Serves `store` (a pool on `db`) instead of a fresh database: say a
    /// second replica on another's database.
    pub fn db(mut self, db: impl Into<Arc<TestDb>>, store: Store) -> Self {
        self.db = Some((db.into(), store));
        self
    }

    /// Failed authentications a client may make per minute (0: no limit).
    pub fn auth_failures_per_minute(mut self, n: u32) -> Self {
        self.auth_failures_per_minute = n;
        self
    }

    /// Serves the status page (`/ui`); on unless turned off here.
    pub fn ui(mut self, on: bool) -> Self {
        self.ui = on;
        self
    }

    pub async fn start(self) -> TestApp {
        let (db, store) = match self.db {
            Some(existing) => existing,
            None => {
                let db = TestDb::new(self.backend).await;
                let store = db.store().await;
                (Arc::new(db), store)
            }
        };
        let clock = self.clock.unwrap_or_else(|| match self.health {
            Some(_) => manual_clock(),
            None => Clock::system(),
        });
        let backendai = self
            .backendai
            .map(|settings| Arc::new(BackendAi::new(settings).unwrap()));
        let max_body = self.max_body.unwrap_or(if backendai.is_some() {
            1024 * 1024
        } else {
            64 * 1024
        });
        let metrics = Metrics::new(&store);
        let hub = Hub::start(store.clone(), self.hub, metrics.clone());
        let state = AppState {
            metrics: metrics.clone(),
            store: store.clone(),
            hub: hub.clone(),
            keep_alive: std::time::Duration::from_secs(15),
            batch_size: 100,
            clock: clock.clone(),
            tokens: Arc::new(Tokens {
                manager: Secret::new(MANAGER),
                worker: Secret::new(BOOTSTRAP),
                viewer: Some(Secret::new(VIEWER)),
            }),
            backendai: backendai.clone(),
            auth_limit: Arc::new(api::limit::AuthLimiter::new(
                self.auth_failures_per_minute,
                clock.clone(),
            )),
            ui: self.ui.then(|| {
                Arc::new(api::ui::Ui {
                    board: appproxy_coordinator::status::Board::start(
                        &hub,
                        std::time::Duration::from_secs(5),
                    ),
                    secure: false,
                })
            }),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = api::router(state, max_body);
        let mut tasks = vec![Task::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .await
            .unwrap()
        })];
        if let Some(health) = &self.health {
            tasks.push(Task::spawn(appproxy_coordinator::health::run(
                hub.context(clock.clone(), Leadership::fixed(true)),
                health.clone(),
            )));
        }
        TestApp {
            url: format!("http://{addr}"),
            http: http_client(),
            store,
            hub,
            metrics,
            clock,
            health: self.health,
            backendai,
            db,
            _tasks: tasks,
        }
    }
}

impl TestApp {
    /// A coordinator on `backend`, to be set up further (see [`TestAppBuilder`]).
    pub fn builder(backend: Backend) -> TestAppBuilder {
        TestAppBuilder {
            backend,
            clock: None,
            health: None,
            backendai: None,
            max_body: None,
            hub: hub_config(),
            db: None,
            // The production default.
            auth_failures_per_minute: 30,
            ui: true,
        }
    }

    /// A coordinator with every default: on the system clock, native mode.
    pub async fn start(backend: Backend) -> TestApp {
        TestApp::builder(backend).start().await
    }

    /// A coordinator in Backend.AI mode ([`backendai_settings`]) on a
    /// manual clock.
    pub async fn start_backendai(backend: Backend) -> TestApp {
        TestApp::builder(backend)
            .clock(manual_clock())
            .backendai(backendai_settings())
            .start()
            .await
    }

    /// One pass of the health loops now, at the time `app.clock` shows (the
    /// background loop runs too; this makes sure a pass ran after the last
    /// change of the clock).
    pub async fn health_pass(&self) {
        let health = self.health.as_ref().expect("started with health loops");
        appproxy_coordinator::health::pass(&self.store, &self.metrics, health, &self.clock)
            .await
            .unwrap();
    }

    /// Sends a request with an optional bearer token and JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        answer(req.send().await.unwrap()).await
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Answer {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token)
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        answer(req.send().await.unwrap()).await
    }

    pub async fn manager(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.call(method, path, Some(MANAGER), body).await
    }

    /// Registers a port-mode worker; returns (worker id, its token, the answer body).
    pub async fn register(&self, name: &str, ports: [u16; 2]) -> (Uuid, String, Value) {
        self.register_with(json!({
            "name": name,
            "api_url": "http://127.0.0.1:10201",
            "frontend": {"mode": "port", "host": "proxy.test", "port_range": ports}
        }))
        .await
    }

    pub async fn register_with(&self, body: Value) -> (Uuid, String, Value) {
        let a = self
            .call(
                Method::POST,
                "/workers/register",
                Some(BOOTSTRAP),
                Some(body),
            )
            .await;
        assert!(a.status.is_success(), "{:?}", a.body);
        let id = a.body["worker"]["id"].as_str().unwrap().parse().unwrap();
        let token = a.body["token"].as_str().unwrap().to_owned();
        (id, token, a.body)
    }

    pub async fn create(&self, body: Value) -> Answer {
        self.manager(Method::POST, "/routes", Some(body)).await
    }

    pub async fn revision(&self) -> i64 {
        self.store.current_revision().await.unwrap()
    }

    pub async fn route_count(&self) -> usize {
        let a = self.manager(Method::GET, "/routes?limit=1000", None).await;
        a.body["items"].as_array().unwrap().len()
    }
}

pub fn http_client() -> Client {
    appproxy_coordinator::install_crypto_provider();
    Client::new()
}

async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        content_type,
        body,
    }
}

/// A minimal interactive route body for `session` and `service`.
pub fn route(session: Uuid, service: &str) -> Value {
    json!({
        "session_id": session,
        "service": service,
        "targets": [{"host": "10.0.1.7", "port": 8888}]
    })
}

/// Generates `#[tokio::test]`s running each scenario on SQLite and PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::common::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::common::Backend::Postgres).await })*
        }
    };
}

pub const BIN: &str = env!("CARGO_BIN_EXE_appproxy-coordinator");

/// A running coordinator process and everything it logged.
pub struct Coordinator {
    child: Child,
    log: Arc<Mutex<String>>,
    pub url: String,
}

impl Coordinator {
    pub fn start(args: &[&str], envs: &[(&str, &str)], scheme: &str) -> Coordinator {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        if !args.contains(&"--bind") {
            cmd.args(["--bind", "127.0.0.1:0"]);
        }
        cmd.env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the coordinator");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let waited =
            std::fmt::from_fn(|f| write!(f, "the coordinator to listen:\n{}", log.lock().unwrap()));
        let addr = wait_for_blocking(waited, || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("coordinator exited with {status}:\n{}", log.lock().unwrap());
            }
            log.lock()
                .unwrap()
                .split("listening on ")
                .nth(1)
                .map(|rest| {
                    rest.chars()
                        .take_while(|c| c.is_ascii_digit() || ".:[]".contains(*c))
                        .collect::<String>()
                })
        });
        Coordinator {
            child,
            log,
            url: format!("{scheme}://{addr}"),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status();
        assert!(sent.unwrap().success(), "kill -{signal} {pid}");
    }

    /// SIGKILL: no shutdown of any kind.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status (within the [`PATIENCE`]).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        wait_for_blocking("an exit after SIGTERM", || self.child.try_wait().unwrap())
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Registers a Backend.AI worker straight through the store, as
/// `PUT /api/worker` does: `frontend` holds `frontend_mode` and its
/// `port_range` or `wildcard_domain` (and `wildcard_traffic_port`).
pub async fn register_backendai_worker(
    app: &TestApp,
    authority: &str,
    frontend: Value,
) -> appproxy_coordinator::domain::Worker {
    let mut body = json!({
        "authority": authority, "protocol": "http", "hostname": "127.0.0.1",
        "tls_listen": false, "tls_advertised": false, "api_port": 10201,
        "filtered_apps_only": false, "traefik_last_used_marker_path": null,
        "accepted_traffics": ["interactive", "inference"], "app_filters": []
    });
    body.as_object_mut()
        .unwrap()
        .extend(frontend.as_object().expect("an object").clone());
    let request: backendai::circuit::WorkerRequest = serde_json::from_value(body).unwrap();
    let registration = request.to_registration(1).unwrap();
    app.store
        .register_worker(registration, None, app.clock.now(), |_| [7; 32])
        .await
        .unwrap()
        .worker
}

/// A Redis server of a test's own, on a free port, stopped when dropped:
/// for what must be counted on a server nothing else uses.
pub struct PrivateRedis {
    child: Child,
    port: u16,
    /// One connection of the test's, opened before anything is counted.
    conn: Mutex<redis::Connection>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (Debian package redis-server)");
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let conn = wait_for_blocking(format!("redis-server on {port}"), || {
            client.get_connection().ok()
        });
        PrivateRedis {
            child,
            port,
            conn: Mutex::new(conn),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Connections the server has accepted so far (`INFO stats`).
    pub fn connections_received(&self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query(&mut *self.conn.lock().unwrap())
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("INFO stats has total_connections_received")
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
