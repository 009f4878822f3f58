//! The real binary: the README tour on the embedded default, restarts,
//! PostgreSQL with `migrate`, HTTPS, TLS to PostgreSQL and Redis (against
//! servers the tests start, with certificates they make), configuration and
//! shutdown.

mod common;

use std::path::Path;
use std::process::Command;

use common::{BIN, Backend, Coordinator, TestDb};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn read_token(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.token")))
        .unwrap()
        .trim()
        .to_owned()
}

async fn post(url: &str, token: &str, body: Value) -> (StatusCode, Value) {
    let r = common::http_client()
        .post(url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

fn worker_body(name: &str) -> Value {
    json!({"name": name, "api_url": "http://127.0.0.1:10201",
           "frontend": {"mode": "port", "host": "127.0.0.1", "port_range": [10205, 10300]}})
}

#[tokio::test]
async fn readme_tour_on_the_embedded_default() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let c = Coordinator::start(&["--data-dir", data.to_str().unwrap()], &[], "http");
    let manager = read_token(&data, "manager");
    let bootstrap = read_token(&data, "worker");
    for name in ["manager.token", "worker.token"] {
        let mode = std::fs::metadata(data.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    assert!(
        data.join("coordinator.db").exists(),
        "embedded SQLite in the data dir"
    );

    let (status, reg) = post(
        &format!("{}/workers/register", c.url),
        &bootstrap,
        worker_body("worker-1"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let worker = reg["worker"]["id"].as_str().unwrap().to_owned();
    let worker_token = reg["token"].as_str().unwrap().to_owned();
    let session = "3f6c9a52-0d61-4a6d-9b59-2f3d6c0a1e11";
    let (status, route) = post(
        &format!("{}/routes", c.url),
        &manager,
        json!({"session_id": session, "service": "jupyter", "targets": [{"host": "10.0.1.7", "port": 8888}],
               "access": {"allowed_client_ips": ["10.0.0.0/8"]}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(route["frontend"]["url"], "http://127.0.0.1:10205");

    let http = common::http_client();
    let found: Value = http
        .get(format!("{}/lookup?worker_id={worker}&port=10205", c.url))
        .bearer_auth(&worker_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["id"], route["id"]);
    let rev = route["revision"].as_i64().unwrap();
    let (status, ack) = post(
        &format!("{}/workers/{worker}/heartbeat", c.url),
        &worker_token,
        json!({"acked_revision": rev}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ack["status"], "Ready");
    let deleted: Value = http
        .delete(format!("{}/sessions/{session}", c.url))
        .bearer_auth(&manager)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(deleted, json!({"deleted": 1}));

    let status = c.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
}

#[tokio::test]
async fn logs_name_token_files_but_never_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let c = Coordinator::start(
        &["--data-dir", data.to_str().unwrap(), "--log-format", "json"],
        &[("RUST_LOG", "debug")],
        "http",
    );
    let manager = read_token(&data, "manager");
    let bootstrap = read_token(&data, "worker");
    let (_, reg) = post(
        &format!("{}/workers/register", c.url),
        &bootstrap,
        worker_body("w"),
    )
    .await;
    let worker_token = reg["token"].as_str().unwrap().to_owned();
    let _ = post(&format!("{}/routes", c.url), &manager, json!({})).await;
    let log = c.log();
    assert!(
        log.contains("manager.token"),
        "the generated file is named:\n{log}"
    );
    for secret in [&manager, &bootstrap, &worker_token] {
        assert!(
            !log.contains(secret.as_str()),
            "a token leaked into the log:\n{log}"
        );
    }
    for line in log.lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
}

#[tokio::test]
async fn a_restarted_coordinator_and_worker_keep_ids_and_routes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--data-dir", data.to_str().unwrap()];
    let c = Coordinator::start(&args, &[], "http");
    let (manager, bootstrap) = (read_token(&data, "manager"), read_token(&data, "worker"));
    let (_, first) = post(
        &format!("{}/workers/register", c.url),
        &bootstrap,
        worker_body("w"),
    )
    .await;
    let (_, route) = post(
        &format!("{}/routes", c.url),
        &manager,
        json!({"session_id": uuid::Uuid::new_v4(), "service": "ssh", "protocol": "tcp", "targets": [{"host": "10.0.1.7", "port": 22}]}),
    )
    .await;
    assert_eq!(route["frontend"]["url"], "tcp://127.0.0.1:10205");
    assert!(c.terminate().success());

    // Restarted with a short heartbeat timeout, and a failover grace long
    // enough that the one worker keeps its routes while it is away.
    let restarted = [
        "--data-dir",
        data.to_str().unwrap(),
        "--heartbeat-timeout",
        "1s",
        "--failover-grace",
        "1h",
    ];
    let c = Coordinator::start(&restarted, &[], "http");
    assert_eq!(
        read_token(&data, "manager"),
        manager,
        "tokens are generated once"
    );
    // The worker lost its token in its restart: with the bootstrap token it
    // gets its name back once its old self is Lost, and not before.
    let again = common::wait_for("the worker's name back", async || {
        let (status, body) = post(
            &format!("{}/workers/register", c.url),
            &bootstrap,
            worker_body("w"),
        )
        .await;
        match status {
            StatusCode::OK => Some(body),
            StatusCode::CONFLICT => None,
            other => panic!("{other}: {body}"),
        }
    })
    .await;
    assert_eq!(again["worker"]["id"], first["worker"]["id"]);
    assert_eq!(again["routes"][0]["id"], route["id"]);
    assert_eq!(again["routes"][0]["frontend"], route["frontend"]);
}

#[tokio::test]
async fn migrate_then_serve_on_postgres() {
    let db = TestDb::new(Backend::Postgres).await;
    let out = Command::new(BIN)
        .args(["migrate", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = Coordinator::start(
        &["--database-url", &db.url, "--no-migrate"],
        &[
            ("APPPROXY_MANAGER_TOKEN", "m-secret-0123456789"),
            ("APPPROXY_WORKER_TOKEN", "w-secret-0123456789"),
        ],
        "http",
    );
    assert!(c.log().contains("\"postgres\""), "{}", c.log());
    let (status, _) = post(
        &format!("{}/workers/register", c.url),
        "w-secret-0123456789",
        worker_body("pg-worker"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let ready = common::http_client()
        .get(format!("{}/readyz", c.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
}

#[tokio::test]
async fn serves_https_with_tls_flags() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let c = Coordinator::start(
        &[
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
        &[],
        "https",
    );
    appproxy_coordinator::install_crypto_provider();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    let url = c.url.replace("127.0.0.1", "localhost");
    let r = client.get(format!("{url}/livez")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let plain = common::http_client()
        .get(format!("{}/livez", c.url.replace("https", "http")))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plain HTTP is not served"
    );
}

#[test]
fn config_prints_the_effective_configuration_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "bind = \"0.0.0.0:7000\"\nmax_connections = 4\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "config",
            "--config",
            file.to_str().unwrap(),
            "--max-connections",
            "8",
        ])
        .env("APPPROXY_MANAGER_TOKEN", "super-secret-manager")
        .env(
            "APPPROXY_DATABASE_URL",
            "postgres://app:db-password@db/appproxy",
        )
        .env("APPPROXY_BIND", "0.0.0.0:7001")
        .env("APPPROXY_HEARTBEAT_TIMEOUT", "3s")
        .env("APPPROXY_FAILOVER_GRACE", "1s 500ms")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let shown: toml::Table = text.parse().unwrap();
    assert_eq!(
        shown["bind"].as_str(),
        Some("0.0.0.0:7001"),
        "environment beats the file"
    );
    assert_eq!(
        shown["max_connections"].as_integer(),
        Some(8),
        "flags beat the file"
    );
    assert_eq!(shown["manager_token"].as_str(), Some("<redacted>"));
    assert_eq!(shown["heartbeat_timeout"].as_str(), Some("3s"));
    assert_eq!(shown["failover_grace"].as_str(), Some("1s 500ms"));
    assert!(
        !text.contains("super-secret-manager") && !text.contains("db-password"),
        "{text}"
    );
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["config", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.toml does not exist"));
    let out = Command::new(BIN)
        .args(["--database-url", "mysql://x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("postgres://"));
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for var in [
        "APPPROXY_BIND",
        "APPPROXY_DATABASE_URL",
        "APPPROXY_DATA_DIR",
        "APPPROXY_MANAGER_TOKEN_FILE",
        "APPPROXY_OTLP_ENDPOINT",
    ] {
        assert!(help.contains(var), "--help documents {var}");
    }
    assert!(help.contains("--otlp-endpoint"), "{help}");
    let out = Command::new(BIN)
        .args(["config", "--otlp-endpoint", "collector:4318"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("otlp_endpoint must be an http://"));
}

#[test]
fn weak_tokens_are_refused_and_tokens_on_the_command_line_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["--data-dir", data, "--bind", "192.0.2.1:6030"])
            .args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let shared = "the-same-token-for-both-0123";
    let out = run(
        &[],
        &[
            ("APPPROXY_MANAGER_TOKEN", shared),
            ("APPPROXY_WORKER_TOKEN", shared),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("manager_token (APPPROXY_MANAGER_TOKEN) equals worker_token"),
        "{err}"
    );
    assert!(
        !err.contains(shared),
        "the token itself is never printed: {err}"
    );
    let out = run(
        &[],
        &[
            ("APPPROXY_MANAGER_TOKEN", "short"),
            ("APPPROXY_WORKER_TOKEN", "worker-token-0123456789"),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16"));
    // Given as a flag, a token is accepted, with a warning naming the flag.
    // (192.0.2.1 is no address of this host, so the process stops right after starting.)
    let out = run(
        &["--manager-token", "manager-token-on-the-command-line"],
        &[("APPPROXY_WORKER_TOKEN", "worker-token-0123456789")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--manager-token") && err.contains("command line"),
        "{err}"
    );
    assert!(!err.contains("manager-token-on-the-command-line"), "{err}");

    // The Backend.AI secrets follow the same rules, against every secret.
    let tokens = [
        ("APPPROXY_MANAGER_TOKEN", "manager-token-0123456789"),
        ("APPPROXY_WORKER_TOKEN", "worker-token-0123456789"),
        ("APPPROXY_REDIS_URL", "redis://127.0.0.1:6379"),
    ];
    let backendai = |api: &'static str, jwt: &'static str| {
        let mut envs = tokens.to_vec();
        envs.push(("APPPROXY_BACKENDAI_API_SECRET", api));
        envs.push(("APPPROXY_BACKENDAI_JWT_SECRET", jwt));
        let out = run(&[], &envs);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let same = "one-secret-for-api-and-jwt-0123";
    let err = backendai(same, same);
    assert!(
        err.contains(
            "backendai_api_secret (APPPROXY_BACKENDAI_API_SECRET) equals backendai_jwt_secret"
        ),
        "{err}"
    );
    assert!(!err.contains(same), "{err}");
    let err = backendai("x", "jwt-secret-0123456789");
    assert!(
        err.contains("backendai_api_secret (APPPROXY_BACKENDAI_API_SECRET) is 1 characters long"),
        "{err}"
    );
    let err = backendai("manager-token-0123456789", "jwt-secret-0123456789");
    assert!(err.contains("equals backendai_api_secret"), "{err}");
}

/// The JSON log lines of `log` that were emitted inside a span of `request_id`
/// (under `spans`, outermost first, as the JSON log writes them).
fn lines_of_request(log: &str, request_id: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|line| {
            line["spans"]
                .as_array()
                .is_some_and(|spans| spans.iter().any(|s| s["request_id"] == request_id))
        })
        .collect()
}

#[tokio::test]
async fn json_log_lines_carry_the_request_id_of_their_request() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let c = Coordinator::start(
        &["--data-dir", data.to_str().unwrap(), "--log-format", "json"],
        &[("RUST_LOG", "debug")],
        "http",
    );
    let (manager, bootstrap) = (read_token(&data, "manager"), read_token(&data, "worker"));
    let (status, _) = post(
        &format!("{}/workers/register", c.url),
        &bootstrap,
        worker_body("w"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let r = common::http_client()
        .post(format!("{}/routes", c.url))
        .bearer_auth(&manager)
        .header("X-Request-Id", "trace-me-42")
        .json(
            &json!({"session_id": uuid::Uuid::new_v4(), "service": "jupyter",
                      "targets": [{"host": "10.0.1.7", "port": 8888}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");

    // The create is committed by the create writer, another task: its lines
    // carry the request's id all the same. Lines reach the log a little
    // after the answer; wait for the last one of the request.
    common::wait_for("the request's last log line", async || {
        lines_of_request(&c.log(), "trace-me-42")
            .iter()
            .any(|l| l["message"] == "request answered")
    })
    .await;
    let log = c.log();
    let lines = lines_of_request(&log, "trace-me-42");
    let answered = lines
        .iter()
        .find(|l| l["message"] == "request answered")
        .unwrap();
    let request = &answered["span"];
    assert_eq!(request["name"], "request", "{answered}");
    assert_eq!(request["method"], "POST", "{answered}");
    assert_eq!(request["route"], "/routes", "{answered}");
    assert_eq!(request["status"], 201, "{answered}");
    assert!(request["latency_ms"].is_number(), "{answered}");

    let in_span = |line: &Value, name: &str| {
        line["spans"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == name))
    };
    let batch = lines
        .iter()
        .find(|l| l["message"] == "create batch done")
        .unwrap_or_else(|| panic!("no line of the create batch carries the id:\n{log}"));
    let batch_span = &batch["span"];
    assert_eq!(batch_span["name"], "create_batch", "{batch}");
    assert_eq!(batch_span["size"], 1, "{batch}");
    assert_eq!(batch_span["request_ids"], "trace-me-42", "{batch}");
    assert!(batch_span["first"].is_number(), "{batch}");
    assert!(
        lines.iter().any(|l| in_span(l, "write_commit")),
        "the commit's lines carry the id:\n{log}"
    );
    // No line of another request does.
    for line in log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        let requests: Vec<&Value> = line["spans"]
            .as_array()
            .map(|s| s.iter().filter(|s| s["name"] == "request").collect())
            .unwrap_or_default();
        if requests.iter().any(|s| s["route"] == "/workers/register") {
            assert_ne!(requests[0]["request_id"], "trace-me-42", "{line}");
        }
    }
}

/// A collector stand-in: records the OTLP/HTTP export requests it gets,
/// until the [`common::Task`] it answers is dropped.
async fn otlp_collector() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>,
    common::Task,
) {
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(async move |headers: HeaderMap, body: Bytes| {
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            sink.lock().unwrap().push((content_type, body.to_vec()));
            StatusCode::OK
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = common::Task::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received, server)
}

#[tokio::test]
async fn spans_are_exported_to_the_otlp_endpoint() {
    let (collector, received, _collector) = otlp_collector().await;
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(
        &[
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--otlp-endpoint",
            &collector,
        ],
        // Export every 100 ms rather than every 5 s: only makes the test quicker.
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
        "http",
    );
    let r = common::http_client()
        .get(format!("{}/readyz", c.url))
        .header("X-Request-Id", "otlp-request-7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let contains = |haystack: &[u8], needle: &str| {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    };
    common::wait_for("the request's span exported", async || {
        received
            .lock()
            .unwrap()
            .iter()
            .any(|(_, body)| contains(body, "otlp-request-7"))
    })
    .await;
    let exports = received.lock().unwrap().clone();
    let (content_type, body) = exports
        .iter()
        .find(|(_, body)| contains(body, "otlp-request-7"))
        .unwrap();
    assert_eq!(content_type, "application/x-protobuf");
    for text in ["appproxy-coordinator", "GET /readyz", "request_id"] {
        assert!(contains(body, text), "{text} not in the exported spans");
    }
    assert!(c.terminate().success());
}

/// One exported span: its name, trace, id and parent (hex).
#[derive(Debug)]
struct ExportedSpan {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// Every span in the OTLP/HTTP protobuf exports a collector received.
fn exported_spans(exports: &[(String, Vec<u8>)]) -> Vec<ExportedSpan> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut out = Vec::new();
    for (_, body) in exports {
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for resource in request.resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    out.push(ExportedSpan {
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                    });
                }
            }
        }
    }
    out
}

/// A Manager's request with a W3C `traceparent` is a span of the Manager's
/// trace; the created event it causes carries that trace on to the worker
/// (our span's child); a worker's acknowledgement in a trace of its own is a
/// span of that trace. All of it as exported over OTLP.
#[tokio::test]
async fn traces_join_the_manager_the_coordinator_and_the_workers() {
    use futures::StreamExt;
    let (collector, received, _collector) = otlp_collector().await;
    let redis = common::PrivateRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(
        &[
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--otlp-endpoint",
            &collector,
        ],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("APPPROXY_REDIS_URL", &redis.url()),
            ("APPPROXY_BACKENDAI_API_SECRET", common::API_SECRET),
            ("APPPROXY_BACKENDAI_JWT_SECRET", common::JWT_SECRET),
        ],
        "http",
    );
    let http = common::http_client();
    let token = ("X-BackendAI-Token", common::API_SECRET);
    let r = http
        .put(format!("{}/api/worker", c.url))
        .header(token.0, token.1)
        .json(&json!({
            "authority": "traced-worker", "protocol": "http", "hostname": "127.0.0.1",
            "tls_listen": false, "tls_advertised": false, "api_port": 10201,
            "frontend_mode": "port", "port_range": [10205, 10300],
            "filtered_apps_only": false, "traefik_last_used_marker_path": null,
            "accepted_traffics": ["interactive", "inference"], "app_filters": []
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());

    // The worker's side of the bus.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("events_all-appproxy").await.unwrap();
    let mut messages = pubsub.into_on_message();
    let mut publisher = client.get_multiplexed_async_connection().await.unwrap();

    let manager_trace = "5b8efff798038103d269b633813fc60c";
    let deployment = uuid::Uuid::new_v4();
    let create = {
        let http = http.clone();
        let url = c.url.clone();
        tokio::spawn(async move {
            http.post(format!("{url}/v2/endpoints/bulk"))
                .header(token.0, token.1)
                .header(
                    "traceparent",
                    format!("00-{manager_trace}-eee19b7ec3c1b174-01"),
                )
                .json(&json!({"endpoints": [{
                    "deployment_id": deployment, "version": "v2", "service_name": "traced",
                    "tags": {"session": {"user_uuid": uuid::Uuid::new_v4(),
                                         "project_id": uuid::Uuid::new_v4(), "domain_name": "default"},
                             "endpoint": {"id": deployment, "runtime_variant": "custom",
                                          "existing_url": null}},
                    "open_to_public": false, "health_check": null}]}))
                .send()
                .await
                .unwrap()
        })
    };
    // The created event, in the Manager's trace, from a span of ours.
    let (circuit, metadata) = loop {
        let m = tokio::time::timeout(common::PATIENCE, messages.next())
            .await
            .expect("a created event")
            .unwrap();
        let envelope: Value = serde_json::from_str(&m.get_payload::<String>().unwrap()).unwrap();
        if envelope["name"] != "appproxy_circuit_created_event" {
            continue;
        }
        let payload: Value = serde_json::from_str(envelope["payload"].as_str().unwrap()).unwrap();
        let metadata: Value = serde_json::from_str(envelope["metadata"].as_str().unwrap()).unwrap();
        break (payload["circuits"][0].clone(), metadata);
    };
    let traceparent = metadata["traceparent"].as_str().expect("a traceparent");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1], manager_trace, "the Manager's trace goes on");
    assert_ne!(parts[2], "eee19b7ec3c1b174", "from a span of ours");

    // The worker acknowledges in a trace of its own.
    let worker_trace = "0af7651916cd43dd8448eb211c80319c";
    let added = json!({
        "name": "appproxy_worker_circuit_added_event", "source": "appproxy-worker",
        "payload": json!({"target_worker_authority": "traced-worker", "circuits": [circuit]}).to_string(),
        "metadata": json!({"request_id": null, "user": null, "triggered_user": null,
                           "traceparent": format!("00-{worker_trace}-b7ad6b7169203331-01")}).to_string(),
    });
    let _: i64 = redis::cmd("PUBLISH")
        .arg("events_all-appproxy")
        .arg(added.to_string())
        .query_async(&mut publisher)
        .await
        .unwrap();
    let answered = create.await.unwrap();
    assert_eq!(answered.status(), StatusCode::OK);

    // Both traces reach the collector: the request's span is the Manager's
    // span's child, the created event named our publish span, in the same
    // trace; the acknowledgement is a span of the worker's trace.
    let spans = || exported_spans(&received.lock().unwrap());
    let find = |name: &str, trace: &str| {
        spans()
            .into_iter()
            .find(|s| s.name == name && s.trace_id == trace)
    };
    common::wait_for("the Manager's trace exported", async || {
        find("POST /v2/endpoints/bulk", manager_trace).is_some()
            && find("publish", manager_trace).is_some()
            && find("circuits_acknowledged", worker_trace).is_some()
    })
    .await;
    let request = find("POST /v2/endpoints/bulk", manager_trace).unwrap();
    assert_eq!(request.parent_span_id, "eee19b7ec3c1b174");
    let publish = find("publish", manager_trace).unwrap();
    assert_eq!(
        publish.span_id, parts[2],
        "the event names the publish span"
    );
    let ack = find("circuits_acknowledged", worker_trace).unwrap();
    assert_eq!(ack.parent_span_id, "b7ad6b7169203331");
    assert!(c.terminate().success());
}

/// Runs the binary with `args` and `envs` to its exit (within the patience).
fn run_to_exit(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    // Killed if the wait fails, so no process outlives the test.
    struct KillOnDrop(Option<std::process::Child>);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Some(child) = self.0.as_mut() {
                let _ = child.kill();
            }
        }
    }
    let mut child = KillOnDrop(Some(cmd.spawn().unwrap()));
    common::wait_for_blocking(format!("{args:?} to exit"), || {
        child.0.as_mut().unwrap().try_wait().unwrap().is_some()
    });
    child.0.take().unwrap().wait_with_output().unwrap()
}

/// PostgreSQL over TLS, against a cluster of the test's own that admits TLS
/// connections only (its pg_hba rejects `hostnossl`), with a server
/// certificate for localhost and 127.0.0.1 signed by a test CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_verifies_the_server_and_refuses_plaintext() {
    use appproxy_coordinator::store::{Db, Store};
    use common::tls::{Pki, TlsPostgres};

    let mut pki = Pki::new();
    let pg = TlsPostgres::start(&pki);
    let ca = pki.ca.to_str().unwrap().to_owned();
    let other_ca = pki.other_ca.to_str().unwrap().to_owned();
    // Trust authentication never asks for it; it must never be logged either.
    let password = "pg-url-password-never-logged";
    let user = format!("postgres:{password}");
    let shown = format!(
        "postgres://postgres:<redacted>@127.0.0.1:{}/postgres",
        pg.port
    );
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // verify-full with the CA: migrations apply; nothing warns of plaintext.
    let verified = pg.url(
        &user,
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let out = run_to_exit(&["migrate", "--database-url", &verified], &[]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), pg.log());
    assert!(!stderr(&out).contains("not encrypted"), "{}", stderr(&out));

    // The coordinator serves on it: a write and a read through its API.
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(
        &[
            "--database-url",
            &verified,
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &[
            ("APPPROXY_MANAGER_TOKEN", "m-secret-0123456789"),
            ("APPPROXY_WORKER_TOKEN", "w-secret-0123456789"),
        ],
        "http",
    );
    let (status, _) = post(
        &format!("{}/workers/register", c.url),
        "w-secret-0123456789",
        worker_body("tls-worker"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, route) = post(
        &format!("{}/routes", c.url),
        "m-secret-0123456789",
        common::route(uuid::Uuid::new_v4(), "jupyter"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{route}");
    let read: Value = common::http_client()
        .get(format!(
            "{}/routes/{}",
            c.url,
            route["id"].as_str().unwrap()
        ))
        .bearer_auth("m-secret-0123456789")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read["id"], route["id"]);
    assert_eq!(read["targets"], route["targets"]);

    // The server says the coordinator's connections are encrypted.
    let store = Store::connect(&verified, 1).await.unwrap();
    let transport = store.transport().await.unwrap().unwrap();
    assert!(transport.encrypted, "{transport:?}");
    assert_eq!(transport.ssl_mode, "verify-full");
    let Db::Postgres(pool) = store.db() else {
        unreachable!()
    };
    let (coordinators, all_ssl): (i64, Option<bool>) = sqlx::query_as(
        "SELECT count(*), bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name = 'appproxy-coordinator' AND a.pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(coordinators > 0, "the coordinator is connected");
    assert_eq!(
        all_ssl,
        Some(true),
        "every connection of the coordinator is TLS"
    );
    store.close().await;
    let log = c.log();
    assert!(!log.contains("not encrypted"), "{log}");
    assert!(!log.contains(password), "{log}");
    assert!(c.terminate().success());

    // A CA that did not sign the server's certificate: refused at start,
    // saying so, naming the database without its password.
    let wrong = pg.url(
        &user,
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={other_ca}"),
    );
    for args in [
        vec!["migrate", "--database-url", &wrong],
        vec![
            "serve",
            "--database-url",
            &wrong,
            "--no-migrate",
            "--bind",
            "127.0.0.1:0",
        ],
    ] {
        let out = run_to_exit(
            &args,
            &[("APPPROXY_DATA_DIR", dir.path().to_str().unwrap())],
        );
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("certificate verification failed")
                && err.contains("not signed by a CA")
                && err.contains("sslrootcert"),
            "{args:?}: {err}"
        );
        assert!(err.contains(&shown), "{args:?} names the database: {err}");
        assert!(!err.contains(password), "{args:?}: {err}");
    }
    // As libpq: `require` with a root certificate verifies against it.
    let out = run_to_exit(
        &[
            "migrate",
            "--database-url",
            &pg.url(
                &user,
                "postgres",
                &format!("sslmode=require&sslrootcert={other_ca}"),
            ),
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("certificate verification failed"),
        "{}",
        stderr(&out)
    );
    // `require` alone encrypts without checking the certificate; `prefer`
    // (sqlx's default) takes the TLS the server offers.
    for mode in ["require", "prefer"] {
        let store = Store::connect(
            &pg.url("postgres", "postgres", &format!("sslmode={mode}")),
            1,
        )
        .await
        .unwrap();
        let transport = store.transport().await.unwrap().unwrap();
        assert!(transport.encrypted, "{mode}: {transport:?}");
        assert!(transport.local && !transport.plaintext_over_network());
        store.close().await;
    }

    // The same from the environment, as the Helm chart passes them:
    // PGSSLMODE and PGSSLROOTCERT, the URL without a query.
    let bare = pg.url(&user, "postgres", "");
    let with_env = |root: &str| {
        run_to_exit(
            &["migrate", "--database-url", &bare],
            &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", root)],
        )
    };
    let out = with_env(&ca);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = with_env(&other_ca);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("certificate verification failed"),
        "{}",
        stderr(&out)
    );
    // A PGSSLMODE that is no sslmode is refused, not taken for prefer.
    let out = run_to_exit(
        &["migrate", "--database-url", &bare],
        &[("PGSSLMODE", "verify_full")],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not an sslmode"),
        "{}",
        stderr(&out)
    );

    // Plaintext is refused by this server.
    let out = run_to_exit(
        &[
            "migrate",
            "--database-url",
            &pg.url(&user, "postgres", "sslmode=disable"),
        ],
        &[],
    );
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("no encryption") && err.contains(&shown),
        "{err}"
    );
    assert!(!err.contains(password), "{err}");

    // A client certificate (sslcert, sslkey) authenticates `certuser`
    // (`cert` in pg_hba); without one it is refused.
    let (cert, key) = pki.client(TlsPostgres::CERT_USER);
    let with_cert = pg.url(
        TlsPostgres::CERT_USER,
        TlsPostgres::CERT_USER,
        &format!(
            "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        ),
    );
    let out = run_to_exit(&["migrate", "--database-url", &with_cert], &[]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), pg.log());
    let without_cert = pg.url(
        TlsPostgres::CERT_USER,
        TlsPostgres::CERT_USER,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let out = run_to_exit(&["migrate", "--database-url", &without_cert], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));
}

/// Backend.AI mode on a Redis that speaks TLS only: a wrong CA is logged by
/// the bus's reconnect loop as a certificate failure (the URL's password
/// redacted) and `/health` says so; the right CA file works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_the_ca_file_and_a_wrong_ca_in_the_log() {
    use common::tls::{Pki, TlsRedis};

    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, "no");
    let url = redis.url();
    let shown = format!("rediss://:<redacted>@127.0.0.1:{}/0", redis.port);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let envs = [
        ("APPPROXY_BACKENDAI_API_SECRET", common::API_SECRET),
        ("APPPROXY_BACKENDAI_JWT_SECRET", common::JWT_SECRET),
        ("APPPROXY_REDIS_URL", url.as_str()),
    ];
    let redis_check = async |c: &Coordinator| -> Value {
        let health: Value = common::http_client()
            .get(format!("{}/health", c.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        health["connectivity"]["connectivity_checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|check| check["service_group"] == "redis")
            .unwrap()
            .clone()
    };

    let other_ca = pki.other_ca.to_str().unwrap();
    let mut wrong_envs = envs.to_vec();
    wrong_envs.push(("APPPROXY_REDIS_CA_FILE", other_ca));
    let c = Coordinator::start(&["--data-dir", data], &wrong_envs, "http");
    common::wait_for("the bus logs the refused certificate", async || {
        c.log().contains("certificate verification failed")
    })
    .await;
    let log = c.log();
    let line = log
        .lines()
        .find(|l| l.contains("certificate verification failed"))
        .unwrap();
    assert!(
        line.contains("cannot use Redis")
            && line.contains("redis_ca_file")
            && line.contains(&shown),
        "{line}"
    );
    assert!(!log.contains(redis.password), "{log}");
    let check = redis_check(&c).await;
    assert_eq!(check["is_healthy"], false, "{check}");
    assert!(
        check["error_message"]
            .as_str()
            .unwrap()
            .contains("certificate verification failed"),
        "{check}"
    );
    drop(c);

    // The right CA, as the flag: healthy, and the bus never complains.
    let c = Coordinator::start(
        &[
            "--data-dir",
            data,
            "--redis-ca-file",
            pki.ca.to_str().unwrap(),
        ],
        &envs,
        "http",
    );
    let check = redis_check(&c).await;
    assert_eq!(check["is_healthy"], true, "{check}\n{}", c.log());
    assert!(!c.log().contains("cannot use Redis"), "{}", c.log());
    assert!(c.terminate().success());

    // TLS settings with a plain redis:// URL are refused at start; a client
    // certificate needs its key.
    let mut plain_envs = envs.to_vec();
    plain_envs.push(("APPPROXY_REDIS_URL", "redis://:pw@127.0.0.1:6379"));
    let out = run_to_exit(
        &[
            "--data-dir",
            data,
            "--bind",
            "127.0.0.1:0",
            "--redis-ca-file",
            pki.ca.to_str().unwrap(),
        ],
        &plain_envs,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("needs a rediss:// URL") && !err.contains(":pw@"),
        "{err}"
    );
    // The TOML keys of the three settings.
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "redis_ca_file = \"/etc/redis-ca/ca.crt\"\nredis_client_cert = \"/c.crt\"\n\
         redis_client_key = \"/c.key\"\n",
    )
    .unwrap();
    let out = run_to_exit(&["config", "--config", file.to_str().unwrap()], &[]);
    let shown: toml::Table = String::from_utf8_lossy(&out.stdout).parse().unwrap();
    assert_eq!(
        shown["redis_ca_file"].as_str(),
        Some("/etc/redis-ca/ca.crt")
    );
    assert_eq!(shown["redis_client_key"].as_str(), Some("/c.key"));
    let out = run_to_exit(&["config", "--redis-client-cert", "/client.crt"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--redis-client-key"));
}

/// The Backend.AI Manager's core bus: a setting of its own, shown with its
/// password redacted; a URL that is no Redis URL stops the start, naming
/// the setting and not the password.
#[test]
fn the_manager_s_core_redis_is_a_setting_whose_password_never_shows() {
    let secret = "core-redis-password";
    let out = run_to_exit(
        &["config", "--backendai-core-claim-idle", "90s"],
        &[(
            "APPPROXY_BACKENDAI_CORE_REDIS_URL",
            "redis://:core-redis-password@core.backendai:6379/4",
        )],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: toml::Table = text.parse().unwrap();
    assert_eq!(
        shown["backendai_core_redis_url"].as_str(),
        Some("redis://:<redacted>@core.backendai:6379/4")
    );
    assert_eq!(shown["backendai_core_claim_idle"].as_str(), Some("1m 30s"));
    assert!(!text.contains(secret), "{text}");
    let defaults: toml::Table = String::from_utf8_lossy(&run_to_exit(&["config"], &[]).stdout)
        .parse()
        .unwrap();
    assert!(!defaults.contains_key("backendai_core_redis_url"));
    assert_eq!(defaults["backendai_core_claim_idle"].as_str(), Some("5m"));

    let dir = tempfile::tempdir().unwrap();
    let out = run_to_exit(
        &[
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--bind",
            "127.0.0.1:0",
        ],
        &[
            ("APPPROXY_BACKENDAI_API_SECRET", common::API_SECRET),
            ("APPPROXY_BACKENDAI_JWT_SECRET", common::JWT_SECRET),
            ("APPPROXY_REDIS_URL", common::REDIS_URL),
            (
                "APPPROXY_BACKENDAI_CORE_REDIS_URL",
                "redis://:core-redis-password@core.backendai:port/4",
            ),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("APPPROXY_BACKENDAI_CORE_REDIS_URL") && !err.contains(secret),
        "{err}"
    );
}

#[test]
fn redis_sentinel_and_service_discovery_settings_are_checked_at_start_without_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let serve = |envs: &[(&str, &str)]| {
        let mut all = vec![
            ("APPPROXY_BACKENDAI_API_SECRET", common::API_SECRET),
            ("APPPROXY_BACKENDAI_JWT_SECRET", common::JWT_SECRET),
        ];
        all.extend_from_slice(envs);
        let out = run_to_exit(&["--data-dir", data, "--bind", "127.0.0.1:0"], &all);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A sentinel URL without a service name: the setting and what is wrong.
    let err = serve(&[(
        "APPPROXY_REDIS_URL",
        "redis+sentinel://:hunter2-redis@127.0.0.1:26379/",
    )]);
    assert!(
        err.contains("redis_url (APPPROXY_REDIS_URL)") && err.contains("no service name"),
        "{err}"
    );
    assert!(!err.contains("hunter2-redis"), "{err}");
    // The core bus's, likewise.
    let err = serve(&[
        ("APPPROXY_REDIS_URL", common::REDIS_URL),
        (
            "APPPROXY_BACKENDAI_CORE_REDIS_URL",
            "redis+sentinel://:hunter2-core@s1:notaport/mymaster",
        ),
    ]);
    assert!(
        err.contains("APPPROXY_BACKENDAI_CORE_REDIS_URL") && err.contains("is not HOST[:PORT]"),
        "{err}"
    );
    assert!(!err.contains("hunter2-core"), "{err}");
    // Separate settings go together.
    let out = run_to_exit(&["config", "--redis-sentinel", "s1:26379"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--redis-service-name"));
    let out = run_to_exit(
        &[
            "config",
            "--redis-sentinel",
            "s1:x",
            "--redis-service-name",
            "m",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("APPPROXY_REDIS_SENTINEL"),
        "{err}"
    );
    // The effective configuration shows the sentinels, never a password.
    let out = run_to_exit(
        &["config"],
        &[(
            "APPPROXY_REDIS_URL",
            "redis+sentinel://:hunter2-redis@s1:26379,s2:26380/mymaster/0?sentinel_password=hunter2-sentinel",
        )],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("s1:26379,s2:26380/mymaster/0"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    // announce_addr: HOST:PORT, and only in Backend.AI mode.
    let out = run_to_exit(&["config", "--announce-addr", "nohost"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("announce_addr (APPPROXY_ANNOUNCE_ADDR)"),
        "{err}"
    );
    let out = run_to_exit(
        &[
            "--data-dir",
            data,
            "--bind",
            "127.0.0.1:0",
            "--announce-addr",
            "127.0.0.1:10200",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs Backend.AI mode"),
        "{err}"
    );
}
