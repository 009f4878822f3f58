//! Backend.AI's live data in Redis DB 2 (`REDIS_LIVE_DB`): the workers'
//! last heartbeats, which the coordinator writes (`proxy-worker.last_seen`),
//! and the per-circuit traffic the workers write (`circuit.<id>.requests`,
//! `circuit.<id>.last_access`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::AsyncCommands;
use uuid::Uuid;

use super::RedisTarget;

/// The database Backend.AI keeps live data in.
pub const LIVE_DB: i64 = 2;
/// The hash of the workers' last heartbeats (authority → unix seconds).
pub const LAST_SEEN: &str = "proxy-worker.last_seen";
/// How long [`LAST_SEEN`] lives after the last heartbeat, as upstream sets it.
pub const LAST_SEEN_TTL_SECONDS: i64 = 172_800;
/// The most a live-data read or write may take.
const TIMEOUT: Duration = Duration::from_secs(2);

/// DB 2 of the Redis `bus` (the event bus's, [`super::BackendAi::redis`])
/// is: the same address or sentinels, credentials and TLS settings (CA,
/// client certificate); only the database differs. A target of its own: a
/// `SELECT` on a shared connection would move its other users. Built once
/// ([`super::BackendAi::live`]).
pub fn client(bus: &RedisTarget) -> RedisTarget {
    bus.with_db(LIVE_DB)
}

/// A connection to the Redis `live` (DB 2, from [`client`]) is, through the
/// sentinels with Sentinel.
pub async fn connect(live: &RedisTarget) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    live.connect(&config, TIMEOUT).await
}

async fn timed<T>(
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(TIMEOUT, f).await.unwrap_or_else(|_| {
        Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "redis did not answer in time",
        )))
    })
}

/// Whether the last `last_seen` write failed (a failure streak is logged once).
static LAST_SEEN_FAILING: AtomicBool = AtomicBool::new(false);

/// `HSET proxy-worker.last_seen <authority> <unix ts>` and `EXPIRE 172800`,
/// as upstream's coordinator does on every heartbeat. A failure is logged
/// (at warn, once per streak of failures) and otherwise ignored: the
/// heartbeat itself is the database's business.
pub async fn record_last_seen(client: &RedisTarget, authority: &str, unix_seconds: f64) {
    let result = timed(async {
        let mut c = connect(client).await?;
        redis::pipe()
            .hset(LAST_SEEN, authority, unix_seconds)
            .ignore()
            .expire(LAST_SEEN, LAST_SEEN_TTL_SECONDS)
            .ignore()
            .query_async::<()>(&mut c)
            .await
    })
    .await;
    match result {
        Ok(()) => {
            if LAST_SEEN_FAILING.swap(false, Ordering::Relaxed) {
                tracing::info!("writing proxy-worker.last_seen to Redis works again");
            }
        }
        Err(e) => {
            if !LAST_SEEN_FAILING.swap(true, Ordering::Relaxed) {
                let e = super::redis_error(&e);
                tracing::warn!(error = %e, worker = authority, "cannot write proxy-worker.last_seen to Redis; heartbeats still count");
            }
        }
    }
}

/// What the workers counted for one circuit.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CircuitTraffic {
    /// `circuit.<id>.requests` (0 when absent).
    pub requests: i64,
    /// `circuit.<id>.last_access`, in unix seconds, when present.
    pub last_access: Option<f64>,
}

/// Reads circuit `id`'s traffic counters.
pub async fn circuit_traffic(client: &RedisTarget, id: Uuid) -> redis::RedisResult<CircuitTraffic> {
    timed(async {
        let mut c = connect(client).await?;
        let (requests, last_access): (Option<String>, Option<String>) = c
            .mget(&[
                format!("circuit.{id}.requests"),
                format!("circuit.{id}.last_access"),
            ])
            .await?;
        Ok(CircuitTraffic {
            requests: requests
                .and_then(|r| r.trim().parse::<f64>().ok())
                .map_or(0, |r| r as i64),
            last_access: last_access.and_then(|t| parse_timestamp(&t)),
        })
    })
    .await
}

/// A timestamp as the workers write it: unix seconds (a float), or
/// milliseconds when it is too large to be seconds.
fn parse_timestamp(text: &str) -> Option<f64> {
    let t: f64 = text.trim().parse().ok()?;
    (t.is_finite() && t >= 0.0).then(|| if t > 1e11 { t / 1000.0 } else { t })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_client_keeps_the_address_credentials_and_tls() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["redis.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let tls = super::super::RedisTls {
            ca_file: Some(ca),
            ..Default::default()
        };
        let bus = RedisTarget::direct(
            super::super::redis_client("rediss://:pw@redis.test:6380/0", &tls).unwrap(),
        );
        let live = client(&bus)
            .direct_client()
            .unwrap()
            .get_connection_info()
            .clone();
        assert_eq!(live.redis_settings().db(), LIVE_DB);
        assert_eq!(live.redis_settings().password(), Some("pw"));
        match live.addr() {
            redis::ConnectionAddr::TcpTls {
                host,
                port,
                tls_params,
                ..
            } => {
                assert_eq!((host.as_str(), *port), ("redis.test", 6380));
                assert!(tls_params.is_some(), "the CA is kept");
            }
            other => panic!("not TLS: {other:?}"),
        }
        let plain = client(&RedisTarget::direct(
            redis::Client::open("redis://127.0.0.1:6379/0").unwrap(),
        ));
        assert!(matches!(
            plain.direct_client().unwrap().get_connection_info().addr(),
            redis::ConnectionAddr::Tcp(..)
        ));
    }

    #[test]
    fn timestamps_are_seconds_or_milliseconds() {
        assert_eq!(parse_timestamp("1764000000.25"), Some(1_764_000_000.25));
        assert_eq!(parse_timestamp("1764000000250"), Some(1_764_000_000.25));
        assert_eq!(parse_timestamp("soon"), None);
        assert_eq!(parse_timestamp("-1"), None);
    }
}
