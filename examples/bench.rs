//! The benchmark harness (`make bench`). Drives the release binary over HTTP
//! on loopback against the PostgreSQL at 127.0.0.1:5432 and reports every
//! figure next to a baseline measured in the same run. Prints a table and
//! writes `bench/results.json`. Every load is bounded in count and time.
//!
//! What it measures: route creates (throughput, p50/p99) at 1, 8 and 32
//! concurrent clients beside `pgbench` doing the same number of single-row
//! inserts at the same concurrency on the same database; creates on the
//! embedded SQLite; create-to-event propagation latency with 10, 100 and 1,000
//! connected worker streams; the snapshot of a worker holding 10,000 routes;
//! resident memory with 100,000 routes and 1,000 connected workers; and the
//! time a failover takes beyond its configured timeouts.
//!
//! `--quick` runs every part at a tenth of the size; `--only=create,resync`
//! runs only the named parts (create, propagation, resync, sqlite, memory,
//! failover, replicas2, scale) and leaves `bench/results.json` alone.
//!
//! `replicas2`: creates from 32 clients spread over two coordinators on one
//! database, against the same load on one of them. `scale`: 10,000 workers
//! (1,000 streaming), 1,000,000 routes loaded in SQL; creates, propagation,
//! a manager's page and resume, a failover of 10,000 routes, RSS and the
//! database's size.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appproxy_coordinator::client::{Agent, RoutingTable, WorkerClient};
use appproxy_coordinator::domain::WorkerRegistration;
use appproxy_coordinator::domain::events::StreamEvent;
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

const MANAGER: &str = "bench-manager-token";
const BOOTSTRAP: &str = "bench-worker-token";

fn admin_url() -> String {
    std::env::var("APPPROXY_BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A scratch PostgreSQL database, dropped at the end.
struct Database {
    name: String,
}

impl Database {
    fn create(tag: &str) -> Database {
        let name = format!("appproxy_bench_{tag}_{}", std::process::id());
        psql("postgres", &format!("DROP DATABASE IF EXISTS {name}"));
        psql("postgres", &format!("CREATE DATABASE {name}"));
        Database { name }
    }
    fn url(&self) -> String {
        let admin = admin_url();
        format!("{}/{}", admin.rsplit_once('/').unwrap().0, self.name)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(db: &str, sql: &str) -> String {
    let admin = admin_url();
    let url = format!("{}/{db}", admin.rsplit_once('/').unwrap().0);
    let out = Command::new("psql")
        .args([url.as_str(), "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The release coordinator: `APPPROXY_COORDINATOR_BIN`, else the one built
/// beside this harness (`<target>/release/examples/bench` →
/// `<target>/release/appproxy-coordinator`, whatever `CARGO_TARGET_DIR` is).
fn coordinator_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("APPPROXY_COORDINATOR_BIN") {
        return bin.into();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("appproxy-coordinator")))
        .filter(|bin| bin.exists())
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/appproxy-coordinator")
        })
}

/// The release coordinator as a child process.
struct Coordinator {
    child: Child,
    url: String,
}

impl Coordinator {
    fn start(args: &[&str]) -> Coordinator {
        let bin = coordinator_bin();
        let mut child = Command::new(&bin)
            .args(args)
            .args(["--bind", "127.0.0.1:0", "--log-format", "text"])
            .env("APPPROXY_MANAGER_TOKEN", MANAGER)
            .env("APPPROXY_WORKER_TOKEN", BOOTSTRAP)
            .env("RUST_LOG", "warn,appproxy_coordinator::server=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start {}: {e} (run `cargo build --release` first)",
                    bin.display()
                )
            });
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || ".:".contains(*c))
                        .collect();
                    let _ = tx.send(addr);
                } else if line.contains("ERROR") {
                    eprintln!("coordinator: {line}");
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the coordinator starts");
        Coordinator {
            child,
            url: format!("http://{addr}"),
        }
    }

    fn rss_mb(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http() -> reqwest::Client {
    appproxy_coordinator::install_crypto_provider();
    reqwest::Client::builder()
        .pool_max_idle_per_host(2048)
        .build()
        .unwrap()
}

fn registration(name: &str, ports: [u16; 2]) -> WorkerRegistration {
    serde_json::from_value(json!({
        "name": name,
        "api_url": "http://127.0.0.1:1",
        "frontend": {"mode": "port", "host": "127.0.0.1", "port_range": ports}
    }))
    .unwrap()
}

async fn register(
    http: &reqwest::Client,
    url: &str,
    name: &str,
    ports: [u16; 2],
) -> (WorkerClient, i64) {
    let (client, answer) = WorkerClient::register(http, url, BOOTSTRAP, &registration(name, ports))
        .await
        .unwrap();
    (client, answer.revision)
}

fn route_body(worker: Option<Uuid>) -> Value {
    json!({
        "session_id": Uuid::new_v4(),
        "service": "jupyter",
        "targets": [{"host": "10.0.1.7", "port": 8888}],
        "worker_id": worker,
    })
}

async fn create(http: &reqwest::Client, url: &str, body: &Value) -> Value {
    let r = http
        .post(format!("{url}/routes"))
        .bearer_auth(MANAGER)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "create failed: {status} {v}");
    v
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Load {
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `total` creates from `concurrency` clients; throughput and latency.
async fn create_load(url: &str, concurrency: usize, total: usize) -> Load {
    create_load_over(&[url.to_owned()], concurrency, total).await
}

/// The median of several turns of one load: its throughput and its p99 each
/// the median of the turns' (p50 likewise).
fn median_load(turns: Vec<Load>) -> Load {
    let median = |f: fn(&Load) -> f64| {
        let mut v: Vec<f64> = turns.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Load {
        throughput: median(|l| l.throughput),
        p50_ms: median(|l| l.p50_ms),
        p99_ms: median(|l| l.p99_ms),
    }
}

/// CPU time, in clock ticks, of the machine's parts during a load: the
/// coordinator, this harness (its HTTP clients), PostgreSQL's processes,
/// pgbench, and the machine's idle time (all cores).
#[derive(Clone, Copy, Default)]
struct Cpu {
    coordinator: u64,
    harness: u64,
    postgres: u64,
    pgbench: u64,
    idle: u64,
    total: u64,
}

/// A `/proc/<pid>/stat` line's process name, its own CPU ticks (utime +
/// stime) and those of its children that ended and were waited for (cutime
/// + cstime).
fn proc_ticks(stat: &str) -> Option<(&str, u64, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    let own = tick(11)? + tick(12)?;
    let children = tick(13)? + tick(14)?;
    Some((&stat[open + 1..close], own, children))
}

impl Cpu {
    /// The counters now; `coordinator` is its process id.
    fn now(coordinator: u32) -> Cpu {
        let mut cpu = Cpu::default();
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        if let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) {
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            cpu.total = v.iter().take(8).sum();
            cpu.idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        }
        let me = std::process::id();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((name, ticks, ended)) = proc_ticks(&stat) else {
                continue;
            };
            if pid == coordinator {
                cpu.coordinator += ticks;
            } else if pid == me {
                // pgbench (and psql) run as this harness's children and are
                // waited for: their time is in its children's ticks.
                cpu.harness += ticks;
                cpu.pgbench += ended;
            } else if name == "postgres" {
                // Backends that ended are in the postmaster's children's ticks.
                cpu.postgres += ticks + ended;
            }
        }
        cpu
    }

    /// Shares of the machine (1.0 = every core) between `self` and `later`.
    fn shares(self, later: Cpu) -> Value {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        let share = |a: u64, b: u64| (b.saturating_sub(a) as f64 / total * 1000.0).round() / 1000.0;
        json!({
            "coordinator": share(self.coordinator, later.coordinator),
            "harness": share(self.harness, later.harness),
            "postgres": share(self.postgres, later.postgres),
            "pgbench": share(self.pgbench, later.pgbench),
            "idle": share(self.idle, later.idle),
        })
    }
}

/// `total` creates from `concurrency` clients spread evenly over `urls`
/// (client `i` talks to `urls[i % urls.len()]`).
async fn create_load_over(urls: &[String], concurrency: usize, total: usize) -> Load {
    create_load_by_url(urls, concurrency, total).await.0
}

/// [`create_load_over`], with the latencies of each URL's clients apart
/// (their `throughput` is the whole run's).
async fn create_load_by_url(
    urls: &[String],
    concurrency: usize,
    total: usize,
) -> (Load, Vec<Load>) {
    let http = http();
    let per = total / concurrency;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let http = http.clone();
            let url = urls[i % urls.len()].clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for _ in 0..per {
                    let t = Instant::now();
                    create(&http, &url, &route_body(None)).await;
                    lat.push(ms(t.elapsed()));
                }
                lat
            })
        })
        .collect();
    let mut by_url: Vec<Vec<f64>> = vec![Vec::new(); urls.len()];
    for (i, t) in tasks.into_iter().enumerate() {
        by_url[i % urls.len()].extend(t.await.unwrap());
    }
    let wall = started.elapsed().as_secs_f64();
    let load = |mut lat: Vec<f64>| {
        lat.sort_by(f64::total_cmp);
        Load {
            throughput: total as f64 / wall,
            p50_ms: percentile(&lat, 0.5),
            p99_ms: percentile(&lat, 0.99),
        }
    };
    let all = load(by_url.concat());
    let all = Load {
        throughput: by_url.iter().map(Vec::len).sum::<usize>() as f64 / wall,
        ..all
    };
    (all, by_url.into_iter().map(load).collect())
}

/// pgbench: `total` single-row inserts from `concurrency` clients, same database.
fn pgbench_baseline(db: &Database, concurrency: usize, total: usize) -> f64 {
    psql(
        &db.name,
        "CREATE TABLE IF NOT EXISTS bench_insert (id BIGSERIAL PRIMARY KEY, payload JSONB NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    );
    pgbench_tps(
        db,
        "INSERT INTO bench_insert (payload) VALUES ('{\"service\": \"jupyter\", \"targets\": [{\"host\": \"10.0.1.7\", \"port\": 8888}]}');\n",
        concurrency,
        total / concurrency,
    )
}

/// `pgbench` running `script` (one transaction) `transactions` times from
/// each of `concurrency` clients on `db`: transactions per second.
fn pgbench_tps(db: &Database, script: &str, concurrency: usize, transactions: usize) -> f64 {
    let file = std::env::temp_dir().join(format!("appproxy-bench-{}.sql", std::process::id()));
    std::fs::write(&file, script).unwrap();
    let out = Command::new("pgbench")
        .args([
            "-n",
            "-c",
            &concurrency.to_string(),
            "-j",
            &concurrency.min(2).to_string(),
            "-t",
            &transactions.to_string(),
            "-f",
            file.to_str().unwrap(),
            &db.url(),
        ])
        .output()
        .expect("pgbench");
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .expect("pgbench prints tps")
}

/// Create-to-event latency with `workers` connected streams.
async fn propagation(url: &str, workers: usize, samples: usize) -> (f64, f64) {
    let http = http();
    let arrivals: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let mut clients = Vec::new();
    for i in 0..workers {
        let (client, rev) =
            register(&http, url, &format!("prop-{workers}-{i}"), [10000, 60000]).await;
        let mut stream = client.watch(Some(rev)).await.unwrap();
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Some(Ok(e)) = stream.next().await {
                if let StreamEvent::Upsert(u) = e {
                    arrivals.lock().unwrap().insert(u.route.id, Instant::now());
                }
            }
        });
        clients.push(client);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        let worker = clients[i % clients.len()].worker_id;
        let sent = Instant::now();
        let v = create(&http, url, &route_body(Some(worker))).await;
        let id: Uuid = v["id"].as_str().unwrap().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(at) = arrivals.lock().unwrap().get(&id) {
                lat.push(ms(at.duration_since(sent)));
                break;
            }
            assert!(Instant::now() < deadline, "event for {id} never arrived");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    lat.sort_by(f64::total_cmp);
    (percentile(&lat, 0.5), percentile(&lat, 0.99))
}

/// Median time to serve the snapshot of a worker holding `routes` routes,
/// and to receive and parse it with the worker client.
async fn resync(url: &str, routes: usize) -> (f64, f64) {
    let http = http();
    let (client, _) = register(&http, url, "resync", [1, 65535]).await;
    let bodies: Vec<Value> = (0..routes)
        .map(|_| route_body(Some(client.worker_id)))
        .collect();
    futures::stream::iter(bodies)
        .for_each_concurrent(32, |b| {
            let http = http.clone();
            async move {
                create(&http, url, &b).await;
            }
        })
        .await;
    // Served: from the request until the last byte of the snapshot event.
    let token = client.token().expose().to_owned();
    let mut served = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let response = http
            .get(format!("{url}/workers/{}/watch", client.worker_id))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let mut body = response.bytes_stream();
        let mut tail: Vec<u8> = Vec::new();
        let mut bytes = 0usize;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.unwrap();
            bytes += chunk.len();
            tail.extend_from_slice(&chunk);
            if tail.windows(2).any(|w| w == b"\n\n") {
                break;
            }
            let keep = tail.len().saturating_sub(1);
            tail.drain(..keep);
        }
        served.push(ms(t.elapsed()));
        assert!(bytes > routes * 100, "a whole snapshot: {bytes} bytes");
    }
    served.sort_by(f64::total_cmp);
    // Applied: the worker client receiving and parsing it into its table.
    let client = WorkerClient::new(&http, url, client.worker_id, &token);
    let mut applied = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let mut stream = client.watch(None).await.unwrap();
        match stream.next().await {
            Some(Ok(StreamEvent::Snapshot(s))) => assert_eq!(s.routes.len(), routes),
            other => panic!("expected a snapshot, got {other:?}"),
        }
        applied.push(ms(t.elapsed()));
    }
    applied.sort_by(f64::total_cmp);
    (percentile(&served, 0.5), percentile(&applied, 0.5))
}

/// RSS of a coordinator holding `routes` routes across `workers` connected workers.
async fn memory(db: &Database, routes: usize, workers: usize) -> f64 {
    let coordinator =
        Coordinator::start(&["--database-url", &db.url(), "--bookmark-interval", "30s"]);
    let url = coordinator.url.clone();
    let http = http();
    let mut clients = Vec::new();
    for i in 0..workers {
        clients.push(
            register(&http, &url, &format!("mem-{i}"), [10000, 60000])
                .await
                .0,
        );
    }
    // Bulk-load the routes in SQL (the API path is measured above); each
    // worker gets routes/workers of them on consecutive ports.
    let per = routes / workers;
    psql(
        &db.name,
        &format!(
            "INSERT INTO routes (id, app_mode, session_id, service, protocol, worker_id, frontend_port, spec, revision, created_at, updated_at) \
             SELECT gen_random_uuid(), 'interactive', s.sid, 'jupyter', 'http', w.id, 10000 + (n / {workers}), \
                    jsonb_build_object('session_id', s.sid, 'service', 'jupyter', 'targets', jsonb_build_array(jsonb_build_object('host', '10.0.1.7', 'port', 8888))), \
                    1, now(), now() \
             FROM generate_series(0, {routes} - 1) AS n \
             CROSS JOIN LATERAL (SELECT gen_random_uuid() AS sid, n AS row) s \
             JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM workers) w ON w.k = n % {workers}"
        ),
    );
    let mut streams = Vec::new();
    for c in &clients {
        let mut s = c.watch(None).await.unwrap();
        match s.next().await {
            Some(Ok(StreamEvent::Snapshot(snap))) => assert_eq!(snap.routes.len(), per),
            other => panic!("expected a snapshot, got {other:?}"),
        }
        streams.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = coordinator.rss_mb();
    drop(streams);
    rss
}

/// Seconds a failover takes beyond heartbeat_timeout + failover_grace.
async fn failover(db: &Database, timeout: Duration, grace: Duration, routes: usize) -> f64 {
    let timeout_s = format!("{}ms", timeout.as_millis());
    let grace_s = format!("{}ms", grace.as_millis());
    let coordinator = Coordinator::start(&[
        "--database-url",
        &db.url(),
        "--heartbeat-timeout",
        &timeout_s,
        "--failover-grace",
        &grace_s,
    ]);
    let url = coordinator.url.clone();
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let (tx_a, mut rx_a) = tokio::sync::watch::channel(RoutingTable::default());
    let (tx_b, mut rx_b) = tokio::sync::watch::channel(RoutingTable::default());
    let mut agent_a = Agent::new(&url, BOOTSTRAP, registration("doomed", [10000, 20000]));
    agent_a.heartbeat_interval = Duration::from_millis(200);
    let mut agent_b = Agent::new(&url, BOOTSTRAP, registration("heir", [30000, 40000]));
    agent_b.heartbeat_interval = Duration::from_millis(200);
    tokio::spawn(agent_a.run(tx_a, async move {
        let _ = stopped_a.await;
    }));
    tokio::spawn(agent_b.run(tx_b, std::future::pending()));
    rx_a.wait_for(|t| t.revision > 0).await.unwrap();
    rx_b.wait_for(|t| t.revision > 0).await.unwrap();
    let http = http();
    let workers: Value = http
        .get(format!("{url}/workers"))
        .bearer_auth(MANAGER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let doomed: Uuid = workers["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "doomed")
        .and_then(|w| w["id"].as_str())
        .unwrap()
        .parse()
        .unwrap();
    for _ in 0..routes {
        create(&http, &url, &route_body(Some(doomed))).await;
    }
    rx_a.wait_for(|t| t.routes.len() == routes).await.unwrap();
    stop_a.send(()).unwrap(); // the worker dies: no more heartbeats
    let died = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(120),
        rx_b.wait_for(|t| t.routes.len() == routes),
    )
    .await
    .expect("routes reach the other worker")
    .unwrap();
    (died.elapsed().as_secs_f64() - (timeout + grace).as_secs_f64()).max(0.0)
}

/// Sizes of the `scale` part.
struct ScaleSize {
    workers: usize,
    streaming: usize,
    routes: usize,
    failover_routes: usize,
    creates: usize,
}

/// What the `scale` part measured.
#[derive(Default)]
struct ScaleResult {
    small: Option<Load>,
    create: Option<Load>,
    /// PostgreSQL alone doing the same inserts (rows/s): on the small
    /// database and on the large one.
    small_pg: f64,
    pg: f64,
    propagation_p99_ms: f64,
    routes_page_ms: f64,
    watch_resume_ms: f64,
    failover_beyond_s: f64,
    rss_mb: f64,
    pg_size_mb: f64,
    load_s: f64,
}

/// Sets up `db` for [`pg_insert_rows`]: copies of `routes` and `change_log`
/// (columns, checks, indexes), holding a copy of every route when
/// `copy_routes`, and the workers numbered from 0.
fn pg_insert_setup(db: &str, copy_routes: bool) {
    psql(
        db,
        "CREATE TABLE bench_routes (LIKE routes INCLUDING ALL); \
         CREATE TABLE bench_log (LIKE change_log INCLUDING ALL); \
         CREATE SEQUENCE bench_seq; \
         CREATE TABLE bench_workers AS SELECT (row_number() OVER (ORDER BY id) - 1)::int AS k, id FROM workers; \
         CREATE UNIQUE INDEX ON bench_workers (k)",
    );
    if copy_routes {
        psql(db, "INSERT INTO bench_routes SELECT * FROM routes");
    }
    psql(
        db,
        "VACUUM (ANALYZE) bench_routes, bench_log, bench_workers",
    );
}

/// PostgreSQL alone doing what a create batch does to the database, rows per
/// second: one client, `batch` routes per statement, each on another of the
/// database's workers, with their change-log rows, into the copies
/// [`pg_insert_setup`] made (route ids ascending as the coordinator's are;
/// session ids random). The baseline of the scale part's create ratio.
fn pg_insert_rows(db: &Database, rows: usize, batch: usize) -> f64 {
    let script = format!(
        "WITH n AS (SELECT nextval('bench_seq') AS n, gen_random_uuid() AS sid FROM generate_series(1, {batch})), \
             ins AS (INSERT INTO bench_routes (id, app_mode, session_id, service, protocol, worker_id, frontend_port, spec, revision, created_at, updated_at) \
               SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, 'interactive', sid, 'jupyter', 'http', w.id, 20000 + n % 45000, \
                      jsonb_build_object('session_id', sid, 'service', 'jupyter', 'targets', jsonb_build_array(jsonb_build_object('host', '10.0.1.7', 'port', 8888))), \
                      n, now(), now() \
               FROM n JOIN bench_workers w ON w.k = (n * 7919) % (SELECT count(*) FROM bench_workers) \
               RETURNING id, worker_id, revision, spec) \
             INSERT INTO bench_log (revision, kind, route_id, worker_id, payload, created_at) \
               SELECT revision, 'route_upsert', id, worker_id, spec, now() FROM ins;\n"
    );
    pgbench_tps(db, &script, 1, rows / batch) * batch as f64
}

/// Milliseconds of one manager GET.
async fn get_ms(http: &reqwest::Client, url: &str) -> (f64, Value) {
    let t = Instant::now();
    let r = http.get(url).bearer_auth(MANAGER).send().await.unwrap();
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    let v: Value = r.json().await.unwrap();
    (ms(t.elapsed()), v)
}

/// A large installation: `size.workers` registered (`size.streaming` of them
/// with open watch streams, the rest idle), `size.routes` routes loaded in
/// SQL, then creates, propagation, a manager's page and resume, a failover
/// of `size.failover_routes` off one worker, memory and database size.
async fn scale_part(size: &ScaleSize) -> ScaleResult {
    let mut out = ScaleResult::default();
    // The small case of the same run, for the create throughput's ratio: a
    // coordinator with 4 workers on a database of its own, measured in turns
    // with the large installation (below), so both see the same machine.
    let small_db = Database::create("scale_small");
    let small = Coordinator::start(&[
        "--database-url",
        &small_db.url(),
        "--heartbeat-timeout",
        "1h",
    ]);
    {
        let http = http();
        for i in 0..4 {
            register(&http, &small.url, &format!("w{i}"), [1, 65535]).await;
        }
        create_load(&small.url, 32, 64).await;
    }
    pg_insert_setup(&small_db.name, false);
    let db = Database::create("scale");
    let (timeout, grace) = (Duration::from_secs(2), Duration::from_secs(1));
    let loaded = Instant::now();
    // Register the streaming workers through the API (they need tokens),
    // with a first coordinator; the rest of the installation goes in in SQL.
    let mut streaming = Vec::new();
    {
        let c = Coordinator::start(&["--database-url", &db.url(), "--heartbeat-timeout", "1h"]);
        let http = http();
        let clients: Vec<WorkerClient> = futures::stream::iter(0..size.streaming)
            .map(|i| {
                let (http, url) = (http.clone(), c.url.clone());
                async move {
                    register(&http, &url, &format!("stream-{i:05}"), [10000, 60000])
                        .await
                        .0
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        streaming.extend(clients);
    }
    let idle = size.workers - size.streaming;
    // Idle workers: copies of a registered one's registration. Their (and the
    // streaming workers') heartbeats are set a day ahead, so with the short
    // timeouts below only the worker that is made to die is ever lost.
    psql(
        &db.name,
        &format!(
            "INSERT INTO workers (id, name, spec, status, token_hash, last_heartbeat, acked_revision, created_at, updated_at) \
             SELECT gen_random_uuid(), 'idle-' || lpad(n::text, 6, '0'), \
                    jsonb_set(t.spec, '{{name}}', to_jsonb('idle-' || lpad(n::text, 6, '0'))), \
                    'Ready', '\\x00'::bytea, now() + interval '1 day', 0, now(), now() \
             FROM generate_series(1, {idle}) AS n, (SELECT spec FROM workers LIMIT 1) AS t; \
             UPDATE workers SET last_heartbeat = now() + interval '1 day'"
        ),
    );
    // Routes: spread over every worker, consecutive ports from 10000 on each.
    let workers = size.workers;
    psql(
        &db.name,
        &format!(
            "INSERT INTO routes (id, app_mode, session_id, service, protocol, worker_id, frontend_port, spec, revision, created_at, updated_at) \
             SELECT gen_random_uuid(), 'interactive', s.sid, 'jupyter', 'http', w.id, 10000 + (n / {workers}), \
                    jsonb_build_object('session_id', s.sid, 'service', 'jupyter', 'targets', jsonb_build_array(jsonb_build_object('host', '10.0.1.7', 'port', 8888))), \
                    1, now(), now() \
             FROM generate_series(0, {routes} - 1) AS n \
             CROSS JOIN LATERAL (SELECT gen_random_uuid() AS sid, n AS row) s \
             JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM workers) w ON w.k = n % {workers}",
            routes = size.routes
        ),
    );
    // What autovacuum does to a live installation's tables (statistics, and
    // the visibility map that lets index-only scans skip the heap).
    psql(&db.name, "VACUUM (ANALYZE)");
    out.load_s = loaded.elapsed().as_secs_f64();
    pg_insert_setup(&db.name, true);
    // A coordinator started on the installation, with short liveness timeouts.
    let timeout_s = format!("{}ms", timeout.as_millis());
    let grace_s = format!("{}ms", grace.as_millis());
    let c = Coordinator::start(&[
        "--database-url",
        &db.url(),
        "--heartbeat-timeout",
        &timeout_s,
        "--failover-grace",
        &grace_s,
        "--bookmark-interval",
        "30s",
    ]);
    let url = c.url.clone();
    let http = http();
    // The streaming workers open their streams and take their snapshots.
    let arrivals: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let mut ids = Vec::new();
    for w in &streaming {
        let w = WorkerClient::new(&http, &url, w.worker_id, w.token().expose());
        let mut stream = w.watch(None).await.unwrap();
        match stream.next().await {
            Some(Ok(StreamEvent::Snapshot(_))) => {}
            other => panic!("expected a snapshot, got {other:?}"),
        }
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Some(Ok(e)) = stream.next().await {
                if let StreamEvent::Upsert(u) = e {
                    arrivals.lock().unwrap().insert(u.route.id, Instant::now());
                }
            }
        });
        ids.push(w.worker_id);
    }
    // Creates against the whole installation and the small case, in turns:
    // the median of three turns each.
    create_load(&url, 32, 64).await;
    let (mut small_turns, mut large_turns) = (Vec::new(), Vec::new());
    // And PostgreSQL alone doing the same inserts on each, in the same turns.
    let (mut small_pg, mut large_pg) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        small_turns.push(create_load(&small.url, 32, size.creates).await);
        large_turns.push(create_load(&url, 32, size.creates).await);
        small_pg.push(pg_insert_rows(&small_db, size.creates, 16));
        large_pg.push(pg_insert_rows(&db, size.creates, 16));
    }
    drop(small);
    out.small = Some(median_load(small_turns));
    out.create = Some(median_load(large_turns));
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (out.small_pg, out.pg) = (median(small_pg), median(large_pg));
    psql(
        &db.name,
        "DROP TABLE bench_routes, bench_log, bench_workers",
    );
    // Propagation to one of the streaming workers.
    let mut lat = Vec::new();
    for i in 0..300.min(size.streaming * 3) {
        let worker = ids[(i * 7) % ids.len()];
        let sent = Instant::now();
        let v = create(&http, &url, &route_body(Some(worker))).await;
        let id: Uuid = v["id"].as_str().unwrap().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(at) = arrivals.lock().unwrap().get(&id) {
                lat.push(ms(at.duration_since(sent)));
                break;
            }
            assert!(Instant::now() < deadline, "event for {id} never arrived");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    lat.sort_by(f64::total_cmp);
    out.propagation_p99_ms = percentile(&lat, 0.99);
    // A manager's page (the first, and one deep in), and a watch resumed 100
    // revisions back, to its last event.
    let (first_ms, page) = get_ms(&http, &format!("{url}/routes?limit=100")).await;
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (deep_ms, _) = get_ms(&http, &format!("{url}/routes?limit=100&cursor={cursor}")).await;
    out.routes_page_ms = first_ms.max(deep_ms);
    let head: i64 = psql(&db.name, "SELECT revision FROM coordinator_state")
        .parse()
        .unwrap();
    let t = Instant::now();
    let response = http
        .get(format!("{url}/routes/watch?since={}", head - 100))
        .bearer_auth(MANAGER)
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let last = format!("id: {head}\n");
    while !text.contains(&last) {
        let chunk = body.next().await.expect("resume events").unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    out.watch_resume_ms = ms(t.elapsed());
    drop(body);
    out.rss_mb = c.rss_mb();
    // Failover: a worker agent holding `failover_routes` routes dies.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (tx, mut rx) = tokio::sync::watch::channel(RoutingTable::default());
    let mut agent = Agent::new(&url, BOOTSTRAP, registration("doomed", [1, 65535]));
    agent.heartbeat_interval = Duration::from_millis(200);
    tokio::spawn(agent.run(tx, async move {
        let _ = stopped.await;
    }));
    rx.wait_for(|t| t.revision > 0).await.unwrap();
    let doomed: Uuid = psql(&db.name, "SELECT id FROM workers WHERE name = 'doomed'")
        .parse()
        .unwrap();
    let bodies: Vec<Value> = (0..size.failover_routes)
        .map(|_| route_body(Some(doomed)))
        .collect();
    futures::stream::iter(bodies)
        .for_each_concurrent(32, |b| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                create(&http, &url, &b).await;
            }
        })
        .await;
    let n = size.failover_routes;
    tokio::time::timeout(
        Duration::from_secs(60),
        rx.wait_for(|t| t.routes.len() == n),
    )
    .await
    .expect("the doomed worker receives its routes")
    .unwrap();
    stop.send(()).unwrap();
    let died = Instant::now();
    let left = format!(
        "SELECT COUNT(*) FROM routes WHERE worker_id = '{doomed}' OR (worker_id IS NULL AND id IN \
         (SELECT route_id FROM change_log WHERE worker_id = '{doomed}'))"
    );
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if psql(&db.name, &left) == "0" {
            break;
        }
        assert!(
            died.elapsed() < Duration::from_secs(300),
            "failover never finished"
        );
    }
    out.failover_beyond_s =
        (died.elapsed().as_secs_f64() - (timeout + grace).as_secs_f64()).max(0.0);
    out.rss_mb = out.rss_mb.max(c.rss_mb());
    out.pg_size_mb = psql(&db.name, "SELECT pg_database_size(current_database())")
        .parse::<f64>()
        .unwrap()
        / 1048576.0;
    out
}

/// Creates from 32 clients on the leader alone, then spread over both
/// replicas of the same database (the other sending its creates to the
/// leader): (one, two, the latencies on the leader and on the other).
async fn replicas2(total: usize) -> (Load, Load, Vec<Load>) {
    let db = Database::create("replicas2");
    let a = Coordinator::start(&["--database-url", &db.url(), "--heartbeat-timeout", "1h"]);
    let b = Coordinator::start(&["--database-url", &db.url(), "--heartbeat-timeout", "1h"]);
    let http = http();
    for i in 0..4 {
        register(&http, &a.url, &format!("w{i}"), [1, 65535]).await;
    }
    let started = std::time::Instant::now();
    let leader = loop {
        let url = psql(
            &db.name,
            "SELECT coalesce(max(peer_url), '') FROM leader_peer",
        );
        if !url.is_empty() {
            break url;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no replica leads"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let follower = if leader == a.url { &b.url } else { &a.url };
    // The follower sends its creates on once it has read who leads.
    while forwarded(&http, follower).await == 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the follower never forwards"
        );
        create_load_over(std::slice::from_ref(follower), 1, 1).await;
    }
    let both = [leader.clone(), follower.clone()];
    create_load_over(&both, 32, 128).await;
    let one = create_load_over(&both[..1], 32, total).await;
    let (two, by_replica) = create_load_by_url(&both, 32, total).await;
    (one, two, by_replica)
}

/// Creates `url` sent to the leader and had answered.
async fn forwarded(http: &reqwest::Client, url: &str) -> f64 {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(r#"appproxy_create_forwards_total{outcome="answered"}"#)?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Prints a result as soon as it is measured, and keeps it for the summary.
fn report(table: &mut Vec<String>, line: String) {
    eprintln!("{line}");
    table.push(line);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let only: Option<Vec<String>> = std::env::args()
        .find_map(|a| a.strip_prefix("--only=").map(str::to_owned))
        .map(|list| list.split(',').map(str::to_owned).collect());
    let runs = |part: &str| only.as_ref().is_none_or(|o| o.iter().any(|p| p == part));
    let mut results = serde_json::Map::new();
    let mut table = Vec::new();

    // Route creates on PostgreSQL against pgbench on the same database.
    let db = Database::create("create");
    // The simulated workers do not heartbeat; liveness is measured separately.
    let coordinator =
        Coordinator::start(&["--database-url", &db.url(), "--heartbeat-timeout", "1h"]);
    let http = http();
    for i in 0..4 {
        register(&http, &coordinator.url, &format!("w{i}"), [1, 65535]).await;
    }
    let mut create_results = serde_json::Map::new();
    for (label, c, total) in [
        ("c1", 1, 1000 / scale),
        ("c8", 8, 4000 / scale),
        ("c32", 32, 8000 / scale),
    ] {
        if !runs("create") {
            break;
        }
        create_load(&coordinator.url, c, 64.min(total)).await; // warm up connections
        let before = Cpu::now(coordinator.child.id());
        let load = create_load(&coordinator.url, c, total).await;
        let during = Cpu::now(coordinator.child.id());
        let baseline = pgbench_baseline(&db, c, total);
        let after = Cpu::now(coordinator.child.id());
        let cpu = before.shares(during);
        let cpu_baseline = during.shares(after);
        let ratio = load.throughput / baseline;
        report(
            &mut table,
            format!(
                "create {label:<4} {:>8.0} routes/s  p50 {:>6.2} ms  p99 {:>6.2} ms   pgbench {:>8.0} inserts/s   ratio {:.2}\n  \
                 CPU (share of all cores) creates: coordinator {} harness {} postgres {} idle {}; pgbench: pgbench {} postgres {} idle {}",
                load.throughput,
                load.p50_ms,
                load.p99_ms,
                baseline,
                ratio,
                cpu["coordinator"],
                cpu["harness"],
                cpu["postgres"],
                cpu["idle"],
                cpu_baseline["pgbench"],
                cpu_baseline["postgres"],
                cpu_baseline["idle"],
            ),
        );
        create_results.insert(
            label.into(),
            json!({"throughput": load.throughput, "p50_ms": load.p50_ms, "p99_ms": load.p99_ms, "baseline_tps": baseline, "ratio": ratio, "requests": total,
                "cpu": cpu, "baseline_cpu": cpu_baseline}),
        );
    }
    results.insert("create".into(), create_results.into());

    // Propagation with 10, 100 and 1,000 connected streams.
    let mut prop = serde_json::Map::new();
    for (label, workers) in [("w10", 10), ("w100", 100), ("w1000", 1000)] {
        if !runs("propagation") {
            break;
        }
        let (p50, p99) = propagation(&coordinator.url, workers, 300 / scale).await;
        report(
            &mut table,
            format!("propagation {label:<6} p50 {p50:>6.2} ms  p99 {p99:>6.2} ms"),
        );
        prop.insert(label.into(), json!({"p50_ms": p50, "p99_ms": p99}));
    }
    results.insert("propagation".into(), prop.into());

    if runs("resync") {
        let (resync_ms, applied_ms) = resync(&coordinator.url, 10_000 / scale).await;
        report(
            &mut table,
            format!(
                "resync of {} routes  served in {resync_ms:.1} ms, received and parsed by the client in {applied_ms:.1} ms (medians)",
                10_000 / scale
            ),
        );
        results.insert(
            "resync".into(),
            json!({"routes10000_ms": resync_ms, "client_apply_ms": applied_ms}),
        );
    }
    drop(coordinator);
    drop(db);

    if runs("sqlite") {
        // Creates on the embedded SQLite.
        let dir =
            std::env::temp_dir().join(format!("appproxy-bench-sqlite-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sqlite = Coordinator::start(&[
            "--data-dir",
            dir.to_str().unwrap(),
            "--heartbeat-timeout",
            "1h",
        ]);
        register(&http, &sqlite.url, "w", [1, 65535]).await;
        create_load(&sqlite.url, 32, 64).await;
        let load = create_load(&sqlite.url, 32, 4000 / scale).await;
        report(
            &mut table,
            format!(
                "create sqlite c32 {:>8.0} routes/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
                load.throughput, load.p50_ms, load.p99_ms
            ),
        );
        results.insert("create_sqlite".into(), json!({"c32": {"throughput": load.throughput, "p50_ms": load.p50_ms, "p99_ms": load.p99_ms}}));
        drop(sqlite);
        let _ = std::fs::remove_dir_all(&dir);
    }
    if runs("memory") {
        // Memory with 100,000 routes and 1,000 connected workers.
        let db = Database::create("memory");
        let rss = memory(&db, 100_000 / scale, 1000 / scale).await;
        report(
            &mut table,
            format!(
                "memory  {rss:.1} MB RSS with {} routes and {} workers streaming",
                100_000 / scale,
                1000 / scale
            ),
        );
        results.insert(
            "memory".into(),
            json!({"rss_mb": rss, "routes": 100_000 / scale, "workers": 1000 / scale}),
        );
        drop(db);
    }
    if runs("failover") {
        // Failover beyond its timeouts.
        let db = Database::create("failover");
        let (timeout, grace) = (Duration::from_secs(2), Duration::from_secs(1));
        let beyond = failover(&db, timeout, grace, 100).await;
        report(
            &mut table,
            format!(
                "failover of 100 routes  {beyond:.2} s beyond heartbeat_timeout {}s + failover_grace {}s",
                timeout.as_secs(),
                grace.as_secs()
            ),
        );
        results.insert(
            "failover".into(),
            json!({"seconds_beyond_timeouts": beyond, "heartbeat_timeout_s": timeout.as_secs_f64(), "failover_grace_s": grace.as_secs_f64(), "routes": 100}),
        );
        drop(db);
    }
    if runs("replicas2") {
        let (one, two, by_replica) = replicas2(8000 / scale).await;
        let (direct, forwarded) = (&by_replica[0], &by_replica[1]);
        report(
            &mut table,
            format!(
                "replicas2 c32  {:>8.0} routes/s over two replicas (p99 {:.2} ms) against {:>8.0} on one (p99 {:.2} ms): ratio {:.2}\n  \
                 p50 {:.2} ms on the leader, {:.2} ms on the other (sent on to the leader); p99 {:.2} and {:.2} ms",
                two.throughput,
                two.p99_ms,
                one.throughput,
                one.p99_ms,
                two.throughput / one.throughput,
                direct.p50_ms,
                forwarded.p50_ms,
                direct.p99_ms,
                forwarded.p99_ms,
            ),
        );
        results.insert(
            "replicas2".into(),
            json!({"create": {"throughput": two.throughput, "p50_ms": two.p50_ms, "p99_ms": two.p99_ms,
                "one_replica_throughput": one.throughput, "one_replica_p99_ms": one.p99_ms,
                "ratio": two.throughput / one.throughput, "requests": 8000 / scale,
                "leader_p50_ms": direct.p50_ms, "leader_p99_ms": direct.p99_ms,
                "forwarded_p50_ms": forwarded.p50_ms, "forwarded_p99_ms": forwarded.p99_ms}}),
        );
    }
    if runs("scale") {
        let size = ScaleSize {
            workers: 10_000 / scale,
            streaming: 1000 / scale,
            routes: 1_000_000 / scale,
            failover_routes: 10_000 / scale,
            creates: 8000 / scale,
        };
        let r = scale_part(&size).await;
        let (small, create) = (r.small.unwrap(), r.create.unwrap());
        report(
            &mut table,
            format!(
                "scale {} workers ({} streaming), {} routes loaded in {:.0} s:\n  \
                 create c32 {:>8.0} routes/s p99 {:.2} ms against {:>8.0} p99 {:.2} ms with 4 workers (ratio {:.2})\n  \
                 PostgreSQL alone, the same inserts in batches of 16: {:>8.0} rows/s against {:>8.0} (ratio {:.2})\n  \
                 propagation p99 {:.2} ms, GET /routes page {:.1} ms, /routes/watch resume of 100 revisions {:.1} ms\n  \
                 failover of {} routes {:.2} s beyond the timeouts, RSS {:.1} MB, PostgreSQL {:.0} MB",
                size.workers,
                size.streaming,
                size.routes,
                r.load_s,
                create.throughput,
                create.p99_ms,
                small.throughput,
                small.p99_ms,
                create.throughput / small.throughput,
                r.pg,
                r.small_pg,
                r.pg / r.small_pg,
                r.propagation_p99_ms,
                r.routes_page_ms,
                r.watch_resume_ms,
                size.failover_routes,
                r.failover_beyond_s,
                r.rss_mb,
                r.pg_size_mb
            ),
        );
        results.insert(
            "scale".into(),
            json!({
                "workers": size.workers,
                "streaming_workers": size.streaming,
                "routes": size.routes,
                "create": {"throughput": create.throughput, "p50_ms": create.p50_ms, "p99_ms": create.p99_ms,
                    "small_throughput": small.throughput, "small_p99_ms": small.p99_ms,
                    "ratio": create.throughput / small.throughput, "requests": size.creates, "turns": 3,
                    "pg_rows_per_s": r.pg, "small_pg_rows_per_s": r.small_pg, "pg_ratio": r.pg / r.small_pg},
                "propagation": {"p99_ms": r.propagation_p99_ms},
                "routes_page_ms": r.routes_page_ms,
                "watch_resume_ms": r.watch_resume_ms,
                "failover": {"seconds_beyond_timeouts": r.failover_beyond_s, "routes": size.failover_routes,
                    "heartbeat_timeout_s": 2.0, "failover_grace_s": 1.0},
                "rss_mb": r.rss_mb,
                "pg_size_mb": r.pg_size_mb,
            }),
        );
    }
    results.insert(
        "machine".into(),
        json!({"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "quick": quick}),
    );
    println!("\n{}", table.join("\n"));
    if only.is_some() {
        return;
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/results.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&Value::Object(results)).unwrap(),
    )
    .unwrap();
    println!("\nwrote {}", out.display());
}
