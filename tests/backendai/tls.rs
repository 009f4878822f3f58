//! The Backend.AI event bus, the workers' live data (DB 2), idle collection
//! and `/health` over TLS: a `rediss://` URL and a CA file, against a Redis
//! server each test starts that speaks only TLS ([`TlsRedis`]), with
//! certificates the test makes. The flow is the one `bus.rs` runs against
//! the plain Redis, with the same helpers.

use std::time::Duration;

use appproxy_coordinator::backendai::{self, RedisTarget, RedisTls, bus, live};
use reqwest::Method;

use crate::bus::{
    Loops, Subscriber, acknowledger_on, authority, bai_worker, circuit_route, create, status,
};
use crate::common::tls::{Pki, TlsRedis};
use crate::common::{self, Backend, PATIENCE, TestApp, manual_clock, wait_for};

/// Backend.AI mode on `redis` (its rediss:// URL) trusting `tls`.
fn settings(redis: &TlsRedis, tls: RedisTls) -> backendai::Settings {
    backendai::Settings {
        redis_url: redis.url(),
        redis_tls: tls,
        ..common::backendai_settings()
    }
}

fn trusting(ca: &std::path::Path) -> RedisTls {
    RedisTls {
        ca_file: Some(ca.to_owned()),
        ..RedisTls::default()
    }
}

/// The Redis check of `GET /health`: (healthy, error message).
async fn redis_health(app: &TestApp) -> (bool, String) {
    let a = app.call(Method::GET, "/health", None, None).await;
    assert_eq!(a.status, reqwest::StatusCode::OK, "{:?}", a.body);
    let checks = a.body["connectivity"]["connectivity_checks"]
        .as_array()
        .unwrap_or_else(|| panic!("no checks in {}", a.body));
    let redis = checks
        .iter()
        .find(|c| c["service_group"] == "redis")
        .unwrap_or_else(|| panic!("no redis check in {}", a.body));
    (
        redis["is_healthy"].as_bool().unwrap(),
        redis["error_message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_live_data_idle_collection_and_health_work_over_rediss() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, "no");
    let app = TestApp::builder(Backend::Sqlite)
        .clock(manual_clock())
        .backendai(settings(&redis, trusting(&pki.ca)))
        .start()
        .await;
    let bai = app.backendai.clone().unwrap();
    // The test's own clients (the subscriber, the worker acknowledging)
    // also reach the server over TLS: it has no plaintext port.
    let client = backendai::redis_client(&redis.url(), &trusting(&pki.ca)).unwrap();

    let (healthy, error) = redis_health(&app).await;
    assert!(healthy, "Redis over TLS is healthy: {error}");

    // A created event published by the coordinator is heard; the worker's
    // acknowledgement, published over TLS, makes the route Active.
    let name = authority("tls");
    let worker = bai_worker(&app, &name, [10205, 10210]).await;
    let mut events = Subscriber::on(&client, &[&name]).await;
    let acked = acknowledger_on(&client, &name, 0).await;
    let loops = Loops::of(&app, true);
    let acks = bai.acks.subscribe();
    let route = create(&app, circuit_route(worker)).await;
    let id = route["id"].as_str().unwrap().to_owned();
    let heard = events.expect(bus::CREATED, &name, &id).await;
    assert_eq!(heard.circuit()["port"], route["frontend"]["port"]);
    assert!(acks.wait(&[id.parse().unwrap()], PATIENCE).await.is_empty());
    wait_for("the route acknowledged over TLS is Active", async || {
        status(&app, &id).await == "Active"
    })
    .await;
    assert_eq!(acked.acked(), 1);

    // The live data in DB 2, through the client derived from the bus's
    // (it keeps the TLS settings): what a worker counted is read, a
    // heartbeat's last_seen is written.
    let mut db2 = live::connect(&live::client(&RedisTarget::direct(client.clone())))
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("circuit.{id}.requests"))
        .arg(7)
        .query_async(&mut db2)
        .await
        .unwrap();
    let traffic = live::circuit_traffic(&bai.live, id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!((traffic.requests, traffic.last_access), (7, None));
    live::record_last_seen(&bai.live, &name, 1_764_000_000.5).await;
    let seen: Option<String> = redis::cmd("HGET")
        .arg(live::LAST_SEEN)
        .arg(&name)
        .query_async(&mut db2)
        .await
        .unwrap();
    assert_eq!(seen.as_deref(), Some("1764000000.5"));

    // Idle collection reads DB 2 over TLS: no last access, created longer
    // than the idle timeout ago, so the circuit is collected and removed.
    app.clock
        .advance(bai.settings.idle_timeout + Duration::from_secs(1));
    events.expect(bus::REMOVED, &name, &id).await;
    let gone = app
        .manager(Method::GET, &format!("/routes/{id}"), None)
        .await;
    assert_eq!(gone.status, reqwest::StatusCode::NOT_FOUND);
    loops.stop().await;
    let _: () = redis::cmd("DEL")
        .arg(format!("circuit.{id}.requests"))
        .arg(live::LAST_SEEN)
        .query_async(&mut db2)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_makes_health_report_redis_unhealthy_with_a_certificate_error() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki, "no");
    // A CA that did not sign the server's certificate.
    let app = TestApp::builder(Backend::Sqlite)
        .clock(manual_clock())
        .backendai(settings(&redis, trusting(&pki.other_ca)))
        .start()
        .await;
    let (healthy, error) = redis_health(&app).await;
    assert!(!healthy, "a server the CA did not sign is not healthy");
    assert!(
        error.contains("certificate verification failed")
            && error.contains("not signed by a CA")
            && error.contains("redis_ca_file"),
        "{error}"
    );
    assert!(!error.contains(redis.password), "{error}");
    let a = app.call(Method::GET, "/health/readyz", None, None).await;
    assert_eq!(a.status, reqwest::StatusCode::SERVICE_UNAVAILABLE);

    // Without a CA file the public roots are used: they did not sign it either.
    let public = TestApp::builder(Backend::Sqlite)
        .clock(manual_clock())
        .backendai(settings(&redis, RedisTls::default()))
        .start()
        .await;
    let (healthy, error) = redis_health(&public).await;
    assert!(!healthy);
    assert!(error.contains("certificate verification failed"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_requiring_client_certificates_gets_the_configured_one() {
    let mut pki = Pki::new();
    let redis = TlsRedis::start(&pki, "yes");
    let (cert, key) = pki.client("appproxy-coordinator");

    let without = TestApp::builder(Backend::Sqlite)
        .clock(manual_clock())
        .backendai(settings(&redis, trusting(&pki.ca)))
        .start()
        .await;
    let (healthy, error) = redis_health(&without).await;
    assert!(!healthy, "no client certificate, no connection");
    assert!(error.contains("client certificate"), "{error}");

    let tls = RedisTls {
        ca_file: Some(pki.ca.clone()),
        client_cert: Some(cert),
        client_key: Some(key),
    };
    let with = TestApp::builder(Backend::Sqlite)
        .clock(manual_clock())
        .backendai(settings(&redis, tls.clone()))
        .start()
        .await;
    let (healthy, error) = redis_health(&with).await;
    assert!(healthy, "{error}\n{}", redis.log());
    // The derived DB 2 client presents it too.
    let bai = with.backendai.as_ref().unwrap();
    let traffic = live::circuit_traffic(&bai.live, uuid::Uuid::new_v4())
        .await
        .unwrap();
    assert_eq!(traffic.requests, 0);
}

#[test]
fn tls_files_with_a_plain_url_unusable_files_and_insecure_tls_are_refused() {
    let pki = Pki::new();
    let err = backendai::redis_client("redis://:pw@127.0.0.1:6379", &trusting(&pki.ca))
        .unwrap_err()
        .to_string();
    assert!(err.contains("rediss://"), "{err}");
    assert!(!err.contains(":pw@"), "{err}");
    let not_pem = pki.dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let err = backendai::redis_client("rediss://127.0.0.1:6379", &trusting(&not_pem))
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds no PEM certificate"), "{err}");
    let half = RedisTls {
        client_cert: Some(pki.server_cert.clone()),
        ..RedisTls::default()
    };
    let err = backendai::redis_client("rediss://127.0.0.1:6379", &half)
        .unwrap_err()
        .to_string();
    assert!(err.contains("given together"), "{err}");
    let err = backendai::redis_client(
        "rediss://:pw@127.0.0.1:6379/#insecure",
        &RedisTls::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("#insecure") && !err.contains(":pw@"), "{err}");
}
