//! Backend.AI service discovery against the real Redis: the record as
//! backend.ai common's `RedisServiceDiscovery` writes it (key, JSON fields,
//! expiry), refreshed, and deleted at shutdown. (backend.ai common's own
//! reader reads it in `scripts/e2e_backendai_discovery.py`.)

use std::time::Duration;

use appproxy_coordinator::backendai::RedisTarget;
use appproxy_coordinator::backendai::discovery::{self, Announcement, DiscoveryConfig};
use serde_json::{Value, json};

use crate::common::{REDIS_URL, wait_for};

#[tokio::test]
async fn the_record_is_written_refreshed_and_removed_as_upstreams() {
    // A port no other test announces: the key is this test's alone.
    let port = 40_000 + (std::process::id() % 20_000) as u16;
    let addr = format!("10.9.8.7:{port}");
    let announcement = Announcement::new(&addr, "i-test", false, 1_764_000_000.25).unwrap();
    let key = announcement.key();
    let redis = RedisTarget::direct(redis::Client::open(REDIS_URL).unwrap()).with_db(discovery::DB);
    let mut conn = redis::Client::open(format!("{REDIS_URL}/0"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let config = DiscoveryConfig {
        interval: Duration::from_millis(200),
        ttl: Duration::from_secs(3),
        redis_timeout: Duration::from_secs(5),
    };
    let task = discovery::spawn(redis, announcement.clone(), config, stopped);

    let read = async |conn: &mut redis::aio::MultiplexedConnection| {
        let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap();
        fields
            .into_iter()
            .map(|(k, v)| (k, serde_json::from_str::<Value>(&v).unwrap()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let first = wait_for("the record", async || {
        let r = read(&mut conn).await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(
        key,
        format!(
            "service_discovery.appproxy-coordinator.{}",
            uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_DNS,
                format!("appproxy-coordinator/{addr}").as_bytes()
            )
        )
    );
    let mut names: Vec<_> = first.keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "display_name",
            "endpoint",
            "health_status",
            "id",
            "labels",
            "service_group",
            "version"
        ]
    );
    assert_eq!(first["id"], json!(announcement.id.to_string()));
    assert_eq!(first["service_group"], "appproxy-coordinator");
    assert_eq!(first["display_name"], "appproxy-coordinator-i-test");
    assert_eq!(
        first["endpoint"],
        json!({"address": "10.9.8.7", "port": port, "protocol": "http",
               "prometheus_address": addr})
    );
    assert_eq!(
        first["health_status"]["registration_time"],
        1_764_000_000.25
    );
    assert_eq!(first["labels"], json!({}));
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=3).contains(&ttl), "TTL {ttl}");

    // Refreshed: the heartbeat advances, the registration time stays.
    let beat = first["health_status"]["last_heartbeat"].as_f64().unwrap();
    wait_for("a later heartbeat", async || {
        let r = read(&mut conn).await;
        r["health_status"]["last_heartbeat"].as_f64().unwrap() > beat
            && r["health_status"]["registration_time"] == 1_764_000_000.25
    })
    .await;

    // A clean shutdown removes it.
    stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the record is gone after shutdown");
}
