//! Backend.AI's Redis service discovery: the coordinator registers itself
//! as upstream's does (`service_discovery_ctx` of 26.9.6), so the Manager's
//! Prometheus HTTP-SD, and anything else reading the registry, finds it.
//!
//! **The record** (backend.ai common's `RedisServiceDiscovery`, written by
//! its `ServiceDiscoveryLoop`): in DB 0 of the Manager's Redis (the core
//! bus's, else the App Proxy's; upstream: `core_redis or redis`), the hash
//! `service_discovery.appproxy-coordinator.<id>`, each field a JSON value
//! (`id`, `display_name`, `service_group`, `version`, `endpoint` =
//! `{address, port, protocol, prometheus_address}`, `health_status` =
//! `{registration_time, last_heartbeat}`, `labels`), expiring
//! [`DiscoveryConfig::ttl`] (upstream 180 s) after the last write. `id` is
//! `uuid5(NAMESPACE_DNS, "appproxy-coordinator/<host>:<port>")`
//! (`ServiceMetadata.for_endpoint`): every replica announcing its own
//! address has a record of its own, and a restarted one takes its old
//! record over.
//!
//! **Lifetime.** Written at start and every [`DiscoveryConfig::interval`]
//! (upstream 60 s) on every replica; deleted on a clean shutdown; a
//! replica that dies leaves a record that expires. Redis being down delays
//! it and stops nothing (a failure streak is logged once).

use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

use super::RedisTarget;
use super::bus::Reconnect;
use crate::leader::stopped;

/// The key prefix (`_DEFAULT_PREFIX`).
pub const PREFIX: &str = "service_discovery";
/// Upstream coordinator's service group.
pub const GROUP: &str = "appproxy-coordinator";
/// The database of the registry (`RedisServiceDiscoveryArgs.db_id`).
pub const DB: i64 = 0;

/// How often the record is written and how long it lives.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    pub interval: Duration,
    /// Upstream: 180 s for a 60 s interval.
    pub ttl: Duration,
    pub redis_timeout: Duration,
}

impl DiscoveryConfig {
    /// Refreshed every `interval`, expiring after three.
    pub fn every(interval: Duration) -> DiscoveryConfig {
        DiscoveryConfig {
            interval,
            ttl: interval * 3,
            redis_timeout: Duration::from_secs(5),
        }
    }
}

/// `HOST:PORT` (or `[V6]:PORT`) taken apart.
pub fn host_port(addr: &str) -> anyhow::Result<(String, u16)> {
    let bad = || anyhow::anyhow!("not HOST:PORT");
    let (host, port) = addr.trim().rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    anyhow::ensure!(
        !host.is_empty() && !host.contains(['/', '@', ' ']),
        "not HOST:PORT"
    );
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(bad)?;
    Ok((host.to_owned(), port))
}

/// What this coordinator announces.
#[derive(Clone, Debug, PartialEq)]
pub struct Announcement {
    pub id: Uuid,
    pub display_name: String,
    pub version: String,
    pub host: String,
    pub port: u16,
    /// `http`, or `https` when the coordinator serves TLS.
    pub protocol: &'static str,
    /// Unix seconds.
    pub registration_time: f64,
}

impl Announcement {
    /// The record of `addr` (`HOST:PORT`) for the instance named `instance`.
    pub fn new(
        addr: &str,
        instance: &str,
        tls: bool,
        registration_time: f64,
    ) -> anyhow::Result<Announcement> {
        let (host, port) = host_port(addr)?;
        Ok(Announcement {
            id: Uuid::new_v5(
                &Uuid::NAMESPACE_DNS,
                format!("{GROUP}/{host}:{port}").as_bytes(),
            ),
            display_name: format!("{GROUP}-{instance}"),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            host,
            port,
            protocol: if tls { "https" } else { "http" },
            registration_time,
        })
    }

    /// `service_discovery.appproxy-coordinator.<id>`.
    pub fn key(&self) -> String {
        format!("{PREFIX}.{GROUP}.{}", self.id)
    }

    /// The hash's fields, each value JSON, as of `last_heartbeat`.
    pub fn fields(&self, last_heartbeat: f64) -> Vec<(&'static str, String)> {
        let address = format!("{}:{}", self.host, self.port);
        [
            ("id", json!(self.id)),
            ("display_name", json!(self.display_name)),
            ("service_group", json!(GROUP)),
            ("version", json!(self.version)),
            (
                "endpoint",
                json!({"address": self.host, "port": self.port, "protocol": self.protocol,
                       "prometheus_address": address}),
            ),
            (
                "health_status",
                json!({"registration_time": self.registration_time,
                       "last_heartbeat": last_heartbeat}),
            ),
            ("labels", json!({})),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
    }
}

/// The instance name upstream uses by default: `i-<hostname>`.
pub fn instance_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "coordinator".to_owned());
    format!("i-{host}")
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Keeps `announcement` registered in `redis` (DB [`DB`] of the Manager's
/// Redis) until `shutdown` turns true, then deletes it.
pub fn spawn(
    redis: RedisTarget,
    announcement: Announcement,
    config: DiscoveryConfig,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tracing::info!(key = %announcement.key(), address = %format!("{}:{}", announcement.host, announcement.port),
            "registering in Backend.AI service discovery");
        let mut reconnect = Reconnect::new("service discovery");
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        loop {
            let written = tokio::select! {
                r = write(&redis, &mut conn, &announcement, &config) => r,
                () = stopped(&mut shutdown) => break,
            };
            match written {
                Ok(()) => reconnect.succeeded(),
                Err(e) => {
                    conn = None;
                    reconnect.failed(&super::redis_error(&e), "the Manager's Redis");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(config.interval) => {}
                () = stopped(&mut shutdown) => break,
            }
        }
        let deleted = async {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => conn.insert(super::bus::connect(&redis, config.redis_timeout).await?),
            };
            redis::cmd("DEL")
                .arg(announcement.key())
                .query_async::<i64>(c)
                .await
        };
        match tokio::time::timeout(config.redis_timeout, deleted).await {
            Ok(Ok(_)) => {
                tracing::info!(key = %announcement.key(), "removed from Backend.AI service discovery")
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %super::redis_error(&e), "cannot remove the service discovery record; it expires by itself")
            }
            Err(_) => tracing::warn!(
                "cannot remove the service discovery record in time; it expires by itself"
            ),
        }
    })
}

/// `HSET` of every field and `EXPIRE`, in one transaction.
async fn write(
    redis: &RedisTarget,
    conn: &mut Option<redis::aio::MultiplexedConnection>,
    announcement: &Announcement,
    config: &DiscoveryConfig,
) -> redis::RedisResult<()> {
    let c = match conn.as_mut() {
        Some(c) => c,
        None => conn.insert(super::bus::connect(redis, config.redis_timeout).await?),
    };
    let key = announcement.key();
    redis::pipe()
        .atomic()
        .hset_multiple(&key, &announcement.fields(unix_now()))
        .ignore()
        .expire(&key, config.ttl.as_secs().max(1) as i64)
        .ignore()
        .query_async::<()>(c)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_keyed_and_shaped_as_upstreams() {
        let a = Announcement::new("10.0.0.5:10200", "i-coord-0", false, 1_764_000_000.5).unwrap();
        // uuid.uuid5(uuid.NAMESPACE_DNS, "appproxy-coordinator/10.0.0.5:10200")
        assert_eq!(
            a.key(),
            "service_discovery.appproxy-coordinator.fec350f5-02be-5059-9e84-30f13954b97f"
        );
        let fields: std::collections::HashMap<_, _> =
            a.fields(1_764_000_060.0).into_iter().collect();
        let field = |k: &str| serde_json::from_str::<serde_json::Value>(&fields[k]).unwrap();
        assert_eq!(field("service_group"), "appproxy-coordinator");
        assert_eq!(field("display_name"), "appproxy-coordinator-i-coord-0");
        assert_eq!(
            field("endpoint"),
            json!({"address": "10.0.0.5", "port": 10200, "protocol": "http",
                   "prometheus_address": "10.0.0.5:10200"})
        );
        assert_eq!(field("health_status")["last_heartbeat"], 1_764_000_060.0);
        assert_eq!(field("labels"), json!({}));
        assert!(Announcement::new("nohost", "i", false, 0.0).is_err());
        assert!(Announcement::new("h:0", "i", false, 0.0).is_err());
        assert_eq!(
            Announcement::new("[::1]:80", "i", true, 0.0)
                .unwrap()
                .protocol,
            "https"
        );
    }
}
