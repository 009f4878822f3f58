//! Idle collection of interactive Backend.AI circuits, on the leader.
//!
//! The Manager never deletes interactive circuits; upstream collects the
//! interactive http ones nobody used for `unused_circuit_collection_timeout`.
//! Workers write `circuit.<id>.last_access` (a unix timestamp) in Redis DB 2
//! on every proxied request. A circuit (a route with Backend.AI's circuit
//! fields, on a Backend.AI worker: only those report traffic there) is idle
//! for now − last access, or now − its creation while no key exists; past
//! [`super::Settings::idle_timeout`] its route is deleted through the store,
//! so the deletion is logged like any other and the publisher sends the
//! removed event. Inference and tcp circuits are never collected (as
//! upstream). A route changed since it was read (re-sent, moved) is kept.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use super::BackendAi;
use super::bus::{BusConfig, Reconnect};
use crate::clock::Clock;
use crate::domain::StoredRoute;
use crate::leader::Context;
use crate::store::Store;
use crate::telemetry::Metrics;

/// Keys read per `MGET`.
const MGET_BATCH: usize = 256;

/// Workers' live data: `circuit.<id>.last_access` and friends.
pub use super::live::LIVE_DB;

/// The key a worker writes on each request through circuit `id`.
pub fn last_access_key(id: uuid::Uuid) -> String {
    format!("circuit.{id}.last_access")
}

/// A `last_access` value as a time: seconds since the epoch (as upstream's
/// `time.time()`, possibly fractional) or milliseconds (recognised by their
/// size: 10^11 seconds is beyond the year 5000).
pub fn parse_last_access(value: &str) -> Option<DateTime<Utc>> {
    let v: f64 = value.trim().parse().ok()?;
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    let millis = if v >= 1e11 { v } else { v * 1000.0 };
    Utc.timestamp_millis_opt(millis as i64).single()
}

/// What idle collection keeps between passes: its Redis connection.
struct Collector {
    ctx: Context,
    backendai: Arc<BackendAi>,
    live: super::RedisTarget,
    conn: Option<redis::aio::MultiplexedConnection>,
    reconnect: Reconnect,
    timeout: std::time::Duration,
}

/// Collects idle circuits every [`BusConfig::idle_interval`] while this
/// process leads (through [`Context::every`]), until shutdown.
pub async fn run(ctx: Context, backendai: Arc<BackendAi>, config: BusConfig) {
    let collector = Collector {
        ctx: ctx.clone(),
        live: backendai.live.clone(),
        backendai,
        conn: None,
        reconnect: Reconnect::new("idle collection"),
        timeout: config.redis_timeout,
    };
    ctx.every(
        "Backend.AI idle collection",
        config.idle_interval,
        collector,
        |c| Box::pin(c.pass()),
    )
    .await;
}

impl Collector {
    async fn pass(&mut self) {
        let url = &self.backendai.settings.redis_url;
        if self.conn.is_none() {
            match super::bus::connect(&self.live, self.timeout).await {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    // The next pass (an interval later) tries again.
                    self.reconnect.failed(&super::redis_error(&e), url);
                    return;
                }
            }
        }
        let conn = self.conn.as_mut().expect("connected");
        let ctx = &self.ctx;
        match collect(&ctx.store, conn, &self.backendai, &ctx.metrics, &ctx.clock).await {
            Ok(_) => self.reconnect.succeeded(),
            Err(Failure::Redis(e)) => {
                self.conn = None;
                self.reconnect.failed(&super::redis_error(&e), url);
            }
            Err(Failure::Store(e)) => {
                tracing::warn!(error = %e, "Backend.AI idle collection cannot read or write the database; retrying");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// One pass at the time `clock` shows; answers how many circuits went.
pub async fn collect(
    store: &Store,
    live: &mut redis::aio::MultiplexedConnection,
    backendai: &BackendAi,
    metrics: &Metrics,
    clock: &Clock,
) -> Result<usize, Failure> {
    // Only Backend.AI workers report traffic in Redis: a route elsewhere
    // would look idle however busy it is.
    let reporting: HashSet<Uuid> = store
        .list_workers()
        .await?
        .into_iter()
        .filter(|w| w.backendai.is_some())
        .map(|w| w.id)
        .collect();
    let routes: Vec<StoredRoute> = store
        .interactive_http_routes()
        .await?
        .into_iter()
        .filter(|r| r.spec.circuit.is_some())
        .filter(|r| r.worker_id.is_some_and(|w| reporting.contains(&w)))
        .collect();
    let timeout = chrono::Duration::from_std(backendai.settings.idle_timeout).unwrap_or_default();
    let mut collected = 0;
    for chunk in routes.chunks(MGET_BATCH) {
        let keys: Vec<String> = chunk.iter().map(|r| last_access_key(r.id)).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(live).await?;
        let now = clock.now();
        for (route, value) in chunk.iter().zip(values) {
            let last = value
                .as_deref()
                .and_then(parse_last_access)
                .unwrap_or(route.created_at);
            if now - last <= timeout {
                continue;
            }
            // Deleted only if unchanged since it was read (not re-sent).
            if store.delete_route_at(route.id, route.revision, now).await? {
                collected += 1;
                metrics.backendai_idle_collected.inc();
                tracing::info!(route = %route.id, idle_s = (now - last).num_seconds(), "Backend.AI bus: idle interactive circuit collected");
            }
        }
    }
    Ok(collected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_access_reads_seconds_and_milliseconds() {
        let t = Utc.timestamp_millis_opt(1_764_400_000_250).unwrap();
        assert_eq!(parse_last_access("1764400000.25"), Some(t));
        assert_eq!(parse_last_access("1764400000250"), Some(t));
        assert_eq!(
            parse_last_access("1764400000"),
            Some(Utc.timestamp_opt(1_764_400_000, 0).unwrap())
        );
        assert_eq!(parse_last_access("soon"), None);
        assert_eq!(parse_last_access("-1"), None);
    }
}
