//! Worker health, failover and cleanup: the loops the leader runs.
//!
//! Health observations (heartbeats, timeouts, pod readiness) enter through
//! [`observe`], a worker's heartbeat through [`heartbeat`]; the rules live in
//! `domain::health`. Failover is decided here: a worker `Lost` for longer
//! than the grace period has its routes re-placed
//! (by the same placement rules as new routes, in batches, one transaction
//! each); routes that fit nowhere wait as `Pending` and are placed as soon as
//! a worker can take them. A Backend.AI circuit whose URL would change stays
//! on its lost worker instead (`domain::failover` decides; reported once per
//! route, and handed back when a worker keeps its URL).
//!
//! The time of day comes from a [`Clock`]: every timeout, grace and TTL is
//! measured against it. A worker's heartbeat deadline counts from the later
//! of its last heartbeat and the moment this process began leading
//! (`domain::health::silence_cutoff`): a worker is never `Lost` merely
//! because no coordinator ran for a while (a restart, or the switch from
//! Backend.AI's coordinator, whose workers' last heartbeats went to it).

use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::Instrument;
use uuid::Uuid;

use crate::clock::Clock;
use crate::domain::failover;
use crate::domain::health::{Observation, silence_cutoff, statuses_that_time_out};
use crate::domain::{Revision, WorkerStatus};
use crate::leader::Context;
use crate::store::{Moved, Store, StoreError};
use crate::telemetry::{Metrics, OutcomeLabels};

/// Applies one observation about a worker, made at `now` (by the rules of
/// `domain::health`, as one compare-and-set in the store). Returns the new
/// status if it changed.
pub async fn observe(
    store: &Store,
    worker_id: Uuid,
    observation: Observation,
    now: DateTime<Utc>,
) -> Result<Option<WorkerStatus>, StoreError> {
    let Some(change) = store.observe_worker(worker_id, observation, now).await? else {
        return Ok(None);
    };
    let worker = &change.worker;
    tracing::info!(worker = %worker_id, name = %worker.name, from = change.from.as_str(), to = worker.status.as_str(), ?observation, "worker status changed");
    Ok(Some(worker.status))
}

/// A worker's heartbeat at `now`: records it with the revision the worker
/// acknowledged ([`Store::heartbeat`]), then applies it as an
/// [`Observation::Heartbeat`] (a `Lost` worker comes back). Answers the
/// worker's status after both and the current revision. Every heartbeat,
/// native or Backend.AI, goes through here.
pub async fn heartbeat(
    store: &Store,
    worker_id: Uuid,
    acked_revision: Revision,
    now: DateTime<Utc>,
) -> Result<(WorkerStatus, Revision), StoreError> {
    let (mut status, revision) = store.heartbeat(worker_id, acked_revision, now).await?;
    if let Some(next) = observe(store, worker_id, Observation::Heartbeat, now).await? {
        status = next;
    }
    Ok((status, revision))
}

/// Timeouts and batch size of the health loops.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// A worker silent this long is `Lost`.
    pub heartbeat_timeout: Duration,
    /// A `Lost` worker keeps its routes this long before they move.
    pub failover_grace: Duration,
    /// Routes moved, placed or collected per transaction.
    pub batch_size: u32,
    /// Routes nobody created or re-sent for this long are collected; `None`: never.
    pub route_idle_ttl: Option<Duration>,
}

impl HealthConfig {
    /// How often the loops look: a fraction of the shortest timeout.
    pub fn tick(&self) -> Duration {
        let shortest = self
            .heartbeat_timeout
            .min(self.failover_grace.max(Duration::from_millis(100)));
        (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

/// The leader's loops: liveness sweep, failover, placing pending routes and
/// collecting expired ones, a pass every [`HealthConfig::tick`] while this
/// process leads (through [`Context::every`]), at the time `ctx.clock` shows.
/// Heartbeat deadlines count from the first pass at the earliest
/// ([`pass_watching`]).
pub async fn run(ctx: Context, config: HealthConfig) {
    let tick = config.tick();
    let state = (ctx.clone(), config, None);
    ctx.every("health", tick, state, |(ctx, config, since)| {
        Box::pin(async move {
            let started = *since.get_or_insert_with(|| ctx.clock.now());
            let result =
                pass_watching(&ctx.store, &ctx.metrics, config, &ctx.clock, Some(started)).await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "health pass failed; retrying");
            }
        })
    })
    .await;
}

/// One pass of every loop, at the time `clock` shows, with plain heartbeat
/// deadlines (one timeout after each worker's last heartbeat).
pub async fn pass(
    store: &Store,
    metrics: &Metrics,
    config: &HealthConfig,
    clock: &Clock,
) -> Result<(), StoreError> {
    pass_watching(store, metrics, config, clock, None).await
}

/// One pass of every loop, at the time `clock` shows, by a leader that began
/// watching the workers at `watching_since`: nobody is silent until one
/// heartbeat timeout after it.
pub async fn pass_watching(
    store: &Store,
    metrics: &Metrics,
    config: &HealthConfig,
    clock: &Clock,
    watching_since: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    let timeout = chrono::Duration::from_std(config.heartbeat_timeout).unwrap_or_default();
    if let Some(cutoff) = silence_cutoff(clock.now(), timeout, watching_since) {
        for worker in store
            .silent_workers(&statuses_that_time_out(), cutoff)
            .await?
        {
            observe(store, worker, Observation::HeartbeatTimeout, clock.now()).await?;
        }
    }
    release_stranded(store).await?;
    let now = clock.now();
    let due = store
        .lost_workers_with_routes()
        .await?
        .into_iter()
        .filter(|w| failover::is_due(w, now, config.failover_grace));
    for worker in due {
        // One span for the worker's failover, one (in the store) per batch.
        let span = tracing::info_span!("failover", worker = %worker.id, name = %worker.name);
        async {
            loop {
                let moved = store
                    .relocate_routes(worker.id, config.batch_size, clock.now())
                    .await?;
                if moved.is_empty() {
                    return Ok::<_, StoreError>(());
                }
                let silent_for = (clock.now() - worker.last_heartbeat)
                    .to_std()
                    .unwrap_or_default();
                for m in &moved {
                    record_move(metrics, m, &worker.name, Some(silent_for));
                }
            }
        }
        .instrument(span)
        .await?;
    }
    for m in store.place_pending(config.batch_size, clock.now()).await? {
        record_move(metrics, &m, "", None);
    }
    let idle_before = config
        .route_idle_ttl
        .map(|ttl| clock.now() - chrono::Duration::from_std(ttl).unwrap_or_default());
    loop {
        let expired = store
            .delete_expired(clock.now(), idle_before, config.batch_size)
            .await?;
        for id in &expired {
            tracing::info!(route = %id, "expired or idle route collected");
        }
        metrics.expired.inc_by(expired.len() as u64);
        if expired.len() < config.batch_size as usize {
            break;
        }
    }
    Ok(())
}

/// Hands stranded circuits back to failover once a ready worker would serve
/// them at the same URL (say a new wildcard worker of the same domain). Reads
/// nothing more than the stranded circuits and the workers, and only while
/// there are any: a stranded circuit costs no placement per pass.
async fn release_stranded(store: &Store) -> Result<(), StoreError> {
    let stranded = store.stranded_routes().await?;
    if stranded.is_empty() {
        return Ok(());
    }
    let workers = store.list_workers().await?;
    let movable: Vec<Uuid> = stranded
        .iter()
        .filter(|s| failover::stranded(&s.route, &s.worker, &workers).is_none())
        .map(|s| s.route.id)
        .collect();
    store.unmark_stranded(&movable).await
}

fn record_move(metrics: &Metrics, m: &Moved, from_name: &str, silent_for: Option<Duration>) {
    if m.stranded {
        // Once per route: a stranded circuit is not selected again while its
        // worker stays lost.
        tracing::warn!(route = %m.route_id, from = ?m.from, worker = from_name, reason = m.reason.as_deref().unwrap_or(""), "Backend.AI circuit stays on its lost worker: a move would change its URL");
        metrics
            .failovers
            .get_or_create(&OutcomeLabels {
                outcome: "stranded",
            })
            .inc();
        return;
    }
    match (m.from, m.to) {
        (Some(from), Some(to)) => {
            tracing::info!(route = %m.route_id, %from, worker = from_name, %to, "route failed over");
            metrics
                .failovers
                .get_or_create(&OutcomeLabels { outcome: "moved" })
                .inc();
            if let Some(d) = silent_for {
                metrics.failover_seconds.observe(d.as_secs_f64());
            }
        }
        (Some(from), None) => {
            tracing::warn!(route = %m.route_id, %from, worker = from_name, reason = m.reason.as_deref().unwrap_or(""), "route pending: no worker can take it");
            metrics
                .failovers
                .get_or_create(&OutcomeLabels { outcome: "pending" })
                .inc();
        }
        (None, Some(to)) => {
            tracing::info!(route = %m.route_id, %to, "pending route placed");
            metrics
                .failovers
                .get_or_create(&OutcomeLabels { outcome: "placed" })
                .inc();
        }
        (None, None) => {}
    }
}
