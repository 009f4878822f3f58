//! Sessions end, their circuits go: the Backend.AI Manager's core event bus.
//!
//! The Manager never deletes interactive circuits (upstream collects only
//! idle http ones, so a terminated session's tcp circuits, SSH say, stay
//! for ever: lablup/backend.ai#5302). It does announce the end of every
//! session on its core bus: Redis DB 4, stream `events`, an entry
//! `name=session_terminated source=manager payload={"session_id":…,"reason":…}
//! metadata=…` (as `backend-ai-common`'s `EventProducer.anycast_event`
//! writes it). Upstream's coordinator joins that stream's consumer group
//! `appproxy-coordinator` and handles nothing; here the consumer deletes the
//! session's interactive circuits ([`crate::domain::RouteSpec::is_circuit_of_session`],
//! whatever their protocol) through the store, so the change log carries
//! the deletion and the leader's publisher sends each worker its
//! `appproxy_circuit_removed_event`.
//!
//! **Who consumes.** Every replica, as one consumer each (a name unique to
//! the process) of the shared group: Redis hands each entry to one of them,
//! so cleanup goes on through a change of leader and the replicas share the
//! work; a deletion is one store transaction, safe whoever commits it.
//!
//! **At least once.** An entry is acknowledged (`XACK`) only after its
//! deletion committed; entries of other names are acknowledged and ignored;
//! a malformed one is acknowledged and logged (it would otherwise come back
//! for ever). A failed deletion leaves the entry pending: this consumer reads
//! its own pending entries again (from `0`) before new ones. Entries a dead
//! replica left pending for [`SessionsConfig::claim_idle`] (upstream: 300 s)
//! are taken over with `XAUTOCLAIM`, checked every
//! [`SessionsConfig::claim_interval`] and at start (consumers gone that
//! hold nothing are then removed from the group). A repeat deletes nothing.
//! Redis being down delays this and stops nothing: the loop reconnects with
//! [`Reconnect`]'s backoff; the URL's password is never logged.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use super::bus::Reconnect;
use super::{BackendAi, RedisTarget};
use crate::leader::{Context, stopped};
use crate::secret::redacted_url;

mod stream;

pub use stream::{Entry, GroupConsumer, Meaning, claim_reply, consumers_reply, read_reply};

/// The database of Backend.AI's event streams (`REDIS_STREAM_DB`).
pub const CORE_DB: i64 = 4;
/// The Manager's anycast stream.
pub const STREAM: &str = "events";
/// The consumer group upstream's coordinator joins.
pub const GROUP: &str = "appproxy-coordinator";
/// The event handled here.
pub const SESSION_TERMINATED: &str = "session_terminated";
/// `XAUTOCLAIM` rounds per check (each up to [`SessionsConfig::count`]).
const CLAIM_ROUNDS: usize = 100;
/// The pause after a failed deletion before the entry is tried again.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// How the session consumer reads the core bus.
#[derive(Clone)]
pub struct SessionsConfig {
    /// The Manager's Redis; `None`: the App Proxy's with DB [`CORE_DB`].
    pub core_redis_url: Option<String>,
    pub stream: String,
    pub group: String,
    /// This process's consumer name (unique: see [`consumer_name`]).
    pub consumer: String,
    /// Entries pending this long with another consumer are claimed.
    pub claim_idle: Duration,
    /// How often such entries are looked for.
    pub claim_interval: Duration,
    /// The longest `XREADGROUP … BLOCK`.
    pub block: Duration,
    /// Entries read (or claimed) at a time.
    pub count: usize,
    /// Connecting, and each command beyond its block, give up after this.
    pub redis_timeout: Duration,
}

impl Default for SessionsConfig {
    fn default() -> SessionsConfig {
        SessionsConfig {
            core_redis_url: None,
            stream: STREAM.to_owned(),
            group: GROUP.to_owned(),
            consumer: consumer_name(),
            claim_idle: Duration::from_secs(300),
            claim_interval: Duration::from_secs(60),
            block: Duration::from_secs(5),
            count: 64,
            redis_timeout: Duration::from_secs(5),
        }
    }
}

impl SessionsConfig {
    /// Claims after `idle`, looked for five times as often (at least every
    /// second, at most every minute, as upstream's 60 s for 300 s).
    pub fn with_claim_idle(mut self, idle: Duration) -> SessionsConfig {
        self.claim_idle = idle;
        self.claim_interval = (idle / 5).clamp(Duration::from_secs(1), Duration::from_secs(60));
        self
    }
}

impl std::fmt::Debug for SessionsConfig {
    /// The Redis password stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionsConfig")
            .field(
                "core_redis_url",
                &self.core_redis_url.as_deref().map(redacted_url),
            )
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("claim_idle", &self.claim_idle)
            .field("claim_interval", &self.claim_interval)
            .finish_non_exhaustive()
    }
}

/// A consumer name no other process has: host, process id and a random part
/// (a restarted process is a new consumer; what its predecessor left
/// pending is claimed like any dead replica's).
pub fn consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "coordinator".to_owned());
    let random = Uuid::new_v4().simple().to_string();
    format!("{GROUP}:{host}:{}:{}", std::process::id(), &random[..8])
}

/// The Manager's Redis (its DB as `url` says, or the App Proxy's Redis
/// with DB [`CORE_DB`]) and the URL to name in logs: `url` with the TLS
/// files when it is `rediss://` or `rediss+sentinel://`; without one, the
/// App Proxy's Redis (its address or sentinels, credentials and TLS).
pub fn core_redis(
    backendai: &BackendAi,
    url: Option<&str>,
) -> anyhow::Result<(RedisTarget, String)> {
    match url {
        Some(url) => {
            let lower = url.to_ascii_lowercase();
            let tls = if [
                "rediss://",
                "valkeys://",
                "rediss+sentinel://",
                "valkeys+sentinel://",
            ]
            .iter()
            .any(|s| lower.starts_with(s))
            {
                backendai.settings.redis_tls.clone()
            } else {
                super::RedisTls::default()
            };
            let target = RedisTarget::open(
                url,
                &tls,
                "backendai_core_redis_url (APPPROXY_BACKENDAI_CORE_REDIS_URL)",
            )?;
            Ok((target, url.to_owned()))
        }
        None => Ok((
            backendai.redis.with_db(CORE_DB),
            backendai.settings.redis_url.clone(),
        )),
    }
}

/// Starts the consumer on this replica until `ctx.shutdown`; fails on an
/// unusable core Redis URL (nothing connects yet).
pub fn spawn(
    ctx: Context,
    backendai: Arc<BackendAi>,
    config: SessionsConfig,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (client, url) = core_redis(&backendai, config.core_redis_url.as_deref())?;
    tracing::debug!(?config, "Backend.AI core bus: consuming session_terminated");
    let consumer = Consumer {
        ctx,
        client,
        url,
        config,
        conn: None,
        reconnect: Reconnect::new("the session consumer (the Manager's core bus)"),
        backlog: true,
        next_claim: Instant::now(),
    };
    Ok(tokio::spawn(consumer.run()))
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The consumer's state between rounds.
struct Consumer {
    ctx: Context,
    client: RedisTarget,
    /// Named (password redacted) when Redis fails.
    url: String,
    config: SessionsConfig,
    conn: Option<redis::aio::MultiplexedConnection>,
    reconnect: Reconnect,
    /// Read this consumer's own pending entries (from `0`) before new ones:
    /// at start and after a failure, until none is left.
    backlog: bool,
    next_claim: Instant,
}

impl Consumer {
    async fn run(mut self) {
        let mut shutdown = self.ctx.shutdown.clone();
        while !*shutdown.borrow() {
            let wait = match self.round(&mut shutdown).await {
                Ok(()) => continue,
                Err(Failure::Redis(e)) => {
                    self.conn = None;
                    self.backlog = true;
                    self.reconnect.failed(&super::redis_error(&e), &self.url)
                }
                Err(Failure::Store(e)) => {
                    self.backlog = true;
                    tracing::warn!(error = %e, "Backend.AI core bus: cannot delete a terminated session's circuits; the entry stays pending and is tried again");
                    STORE_RETRY
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stopped(&mut shutdown) => return,
            }
        }
    }

    /// Connects if need be, claims what dead consumers left when that is
    /// due, then reads (waiting for new entries) and handles what came.
    async fn round(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Failure> {
        let config = &self.config;
        if self.conn.is_none() {
            let mut conn = connect(&self.client, config).await?;
            create_group(&mut conn, config).await?;
            self.conn = Some(conn);
            self.reconnect.succeeded();
        }
        let conn = self.conn.as_mut().expect("connected");
        if Instant::now() >= self.next_claim {
            claim(&self.ctx, config, conn).await?;
            self.next_claim = Instant::now() + config.claim_interval;
        }
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(&config.group)
            .arg(&config.consumer)
            .arg("COUNT")
            .arg(config.count);
        if !self.backlog {
            // BLOCK 0 would wait for ever: at least a millisecond.
            let until_claim = self.next_claim.saturating_duration_since(Instant::now());
            let block = config.block.min(until_claim).max(Duration::from_millis(1));
            read.arg("BLOCK").arg(block.as_millis() as u64);
        }
        let from = if self.backlog { "0" } else { ">" };
        read.arg("STREAMS").arg(&config.stream).arg(from);
        let reply: Value = tokio::select! {
            r = read.query_async(conn) => r?,
            () = stopped(shutdown) => return Ok(()),
        };
        let read = read_reply(&reply);
        if self.backlog && read.is_empty() {
            self.backlog = false;
        }
        for entry in read {
            handle(&self.ctx, config, conn, &entry).await?;
        }
        Ok(())
    }
}

/// A connection whose answers may take a whole `BLOCK` (one per consumer:
/// a blocked read holds its connection).
async fn connect(
    client: &RedisTarget,
    config: &SessionsConfig,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let options = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.redis_timeout))
        .set_response_timeout(Some(config.block + config.redis_timeout));
    client.connect(&options, config.redis_timeout).await
}

/// `XGROUP CREATE <stream> <group> $ MKSTREAM`, unless the group exists.
async fn create_group(
    conn: &mut redis::aio::MultiplexedConnection,
    config: &SessionsConfig,
) -> redis::RedisResult<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&config.stream)
        .arg(&config.group)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// Takes over and handles the entries other consumers left pending for
/// [`SessionsConfig::claim_idle`].
async fn claim(
    ctx: &Context,
    config: &SessionsConfig,
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<(), Failure> {
    let mut cursor = "0-0".to_owned();
    for _ in 0..CLAIM_ROUNDS {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&config.stream)
            .arg(&config.group)
            .arg(&config.consumer)
            .arg(config.claim_idle.as_millis() as u64)
            .arg(&cursor)
            .arg("COUNT")
            .arg(config.count)
            .query_async(conn)
            .await?;
        let (next, claimed) = claim_reply(&reply);
        if !claimed.is_empty() {
            tracing::info!(
                entries = claimed.len(),
                "Backend.AI core bus: claimed entries another consumer left unacknowledged"
            );
        }
        for entry in &claimed {
            handle(ctx, config, conn, entry).await?;
        }
        if next == "0-0" {
            break;
        }
        cursor = next;
    }
    forget_dead_consumers(config, conn).await
}

/// Removes from the group the consumers that hold nothing and have not
/// read for [`SessionsConfig::claim_idle`]: replicas gone (each process is a
/// new consumer), which would otherwise pile up. A live one removed by
/// mistake is added again by its next read.
async fn forget_dead_consumers(
    config: &SessionsConfig,
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<(), Failure> {
    let reply: Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&config.stream)
        .arg(&config.group)
        .query_async(conn)
        .await?;
    let idle_ms = i64::try_from(config.claim_idle.as_millis()).unwrap_or(i64::MAX);
    for c in consumers_reply(&reply) {
        if c.name != config.consumer && c.pending == 0 && c.idle_ms > idle_ms {
            let _removed: i64 = redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&config.stream)
                .arg(&config.group)
                .arg(&c.name)
                .query_async(conn)
                .await?;
            tracing::debug!(consumer = %c.name, "Backend.AI core bus: forgot a consumer gone");
        }
    }
    Ok(())
}

/// Does what `entry` asks, then acknowledges it.
async fn handle(
    ctx: &Context,
    config: &SessionsConfig,
    conn: &mut redis::aio::MultiplexedConnection,
    entry: &Entry,
) -> Result<(), Failure> {
    match entry.meaning() {
        Meaning::Terminated(session) => {
            // Part of the Manager's trace when it said which; the removed
            // events published for its circuits carry it on.
            let span = tracing::info_span!(
                "session_terminated",
                %session,
                entry = %entry.id,
                "otel.kind" = "consumer",
            );
            let removed = crate::trace_context::within(
                span,
                entry.traceparent().as_deref(),
                ctx.store.delete_session_circuits(session, ctx.clock.now()),
            )
            .await?;
            ctx.metrics.backendai_sessions_terminated.inc();
            ctx.metrics
                .backendai_session_circuits_removed
                .inc_by(removed.len() as u64);
            if removed.is_empty() {
                tracing::debug!(%session, "Backend.AI core bus: session terminated; it had no circuit");
            } else {
                tracing::info!(%session, circuits = removed.len(), "Backend.AI core bus: session terminated; its circuits removed");
            }
        }
        Meaning::Other => {}
        Meaning::Gone => {
            tracing::debug!(entry = %entry.id, "Backend.AI core bus: a pending entry is no longer in the stream; acknowledged");
        }
        Meaning::Malformed(why) => {
            tracing::warn!(entry = %entry.id, stream = %config.stream, %why, "Backend.AI core bus: malformed session_terminated entry; acknowledged and ignored");
        }
    }
    let _acked: i64 = redis::cmd("XACK")
        .arg(&config.stream)
        .arg(&config.group)
        .arg(&entry.id)
        .query_async(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_looked_for_five_times_per_idle_time_within_bounds() {
        let c = SessionsConfig::default().with_claim_idle(Duration::from_secs(300));
        assert_eq!(c.claim_interval, Duration::from_secs(60));
        let c = SessionsConfig::default().with_claim_idle(Duration::from_secs(2));
        assert_eq!(c.claim_interval, Duration::from_secs(1));
        let c = SessionsConfig::default().with_claim_idle(Duration::from_secs(3600));
        assert_eq!(c.claim_interval, Duration::from_secs(60));
        assert_ne!(consumer_name(), consumer_name());
    }

    #[test]
    fn the_core_url_s_password_is_not_shown() {
        let c = SessionsConfig {
            core_redis_url: Some("redis://:hunter2-secret@core:6379/4".into()),
            ..SessionsConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("core:6379/4"), "{shown}");
    }
}
