//! The leader's publisher: follows the change log and publishes what
//! Backend.AI workers must hear ([`super::bus::plan`]), records their
//! acknowledgements, and re-publishes created events until acknowledged.
//!
//! **State.** The publisher's position (the last revision published) and,
//! per route on a Backend.AI worker, the circuit as last published (with its
//! worker's authority, the revision of its created event and whether the
//! worker acknowledged it) are stored (`crate::store::BusState`). A pass
//! publishes, then writes everything it changed — the position, the
//! circuits, the removals, the acknowledgements heard since the last pass
//! and the workers' acknowledged revisions — in one transaction: one write
//! per pass, however many changes and acknowledgements it covers, so the
//! publisher takes little from the creates' writer. A new leader loads them
//! and resumes. A moved or deleted route therefore finds
//! the worker that held it, and the exact circuit it was told about, in that
//! table: the change log's delete rows carry no route, and its upserts are
//! compacted after an hour, while a removal must name the port or subdomain
//! the worker holds (it removes by slot, not by id). A table also survives
//! restarts between a change and its publication, where a map rebuilt from a
//! snapshot would have lost the routes deleted in between.
//!
//! If the log was compacted past the position, the publisher republishes
//! from a snapshot: removed events for circuits no longer where they were,
//! then a created event for every route on a Backend.AI worker (workers
//! overwrite idempotently).
//!
//! **Acknowledged revisions.** A route is `Active` when its worker's
//! `acked_revision` reaches the route's revision. For a Backend.AI worker the
//! publisher sets it to one less than the oldest created event still waiting
//! for its acknowledgement, or to its position when none waits: route-updated
//! and removed events have no acknowledgement, so they count as delivered once
//! published.
//!
//! **At least once.** Events are published before the position is stored; a
//! publisher that dies in between publishes them again, in the same order
//! (a repeated removal is followed by the creation that came after it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use uuid::Uuid;

mod resend;
mod retries;
mod snapshot;

use retries::Retry;

use super::BackendAi;
use super::bus::{self, Ack, BusConfig, Event, Placed, Reconnect};
use super::circuit::Circuit;
use crate::clock::Clock;
use crate::domain::events::{Change, ChangeKind};
use crate::domain::{Revision, Route, Worker};
use crate::leader::{Context, Stop};
use crate::store::{BusCircuit, BusRemoval, BusWrite, Store};
use crate::telemetry::Metrics;

/// What the publisher keeps from one leadership to the next.
struct Standing {
    ctx: Context,
    backendai: Arc<BackendAi>,
    config: BusConfig,
    acks: mpsc::Receiver<Vec<Ack>>,
    commits: watch::Receiver<Revision>,
    reconnect: Reconnect,
}

/// Publishes while this process leads (through [`Context::while_leading`]),
/// until shutdown. Acknowledgements heard while not leading are the
/// leader's to record: the listener drops them when this queue is full.
pub async fn run(
    ctx: Context,
    backendai: Arc<BackendAi>,
    config: BusConfig,
    acks: mpsc::Receiver<Vec<Ack>>,
) {
    let standing = Standing {
        commits: ctx.store.commits(),
        ctx: ctx.clone(),
        backendai,
        config,
        acks,
        reconnect: Reconnect::new("the publisher"),
    };
    ctx.while_leading("Backend.AI publisher", standing, |standing, stop| {
        Box::pin(lead(standing, stop))
    })
    .await;
}

/// Publishes until `stop`: loads what the last leader stored, publishes
/// from there, and loads again whenever what is stored moved under it.
async fn lead(s: &mut Standing, mut stop: Stop) -> anyhow::Result<()> {
    loop {
        let publisher = loop {
            let loaded = Publisher::load(
                &s.ctx.store,
                &s.backendai,
                &s.ctx.metrics,
                &s.ctx.clock,
                &s.config,
            )
            .await;
            match loaded {
                Ok(p) => break p,
                Err(e) => {
                    tracing::warn!(error = %e, "Backend.AI bus: cannot load the publisher's state; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(s.config.poll_interval) => {}
                        () = &mut stop => return Ok(()),
                    }
                }
            }
        };
        if publish(
            publisher,
            &mut s.commits,
            &mut s.acks,
            &mut s.reconnect,
            &mut stop,
        )
        .await
        {
            return Ok(());
        }
    }
}

/// Passes on every commit, acknowledgement and poll; answers `true` once
/// `stop` resolved, `false` when what is stored must be loaded again.
async fn publish(
    mut publisher: Publisher<'_>,
    commits: &mut watch::Receiver<Revision>,
    acks: &mut mpsc::Receiver<Vec<Ack>>,
    reconnect: &mut Reconnect,
    stop: &mut Stop,
) -> bool {
    let url = publisher.backendai.settings.redis_url.clone();
    let poll = publisher.config.poll_interval;
    // A deadline, not a sleep restarted on every acknowledgement: a steady
    // stream of them must not hold passes off.
    let mut next_pass = tokio::time::Instant::now();
    // When the next pass that reads the change log is due at the latest.
    let mut next_read = next_pass;
    let mut backing_off = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next_pass) => {}
            _ = commits.changed(), if !backing_off => next_read = tokio::time::Instant::now(),
            a = acks.recv() => match a {
                // Recorded in memory and stored by a pass soon after, with
                // whatever else it writes: under load, acknowledgements ride
                // on the passes the commits make; alone, they wait at most
                // ACK_FLUSH.
                Some(mut a) => {
                    // Whatever else came meanwhile is recorded with it.
                    while let Ok(more) = acks.try_recv() {
                        a.extend(more);
                        if a.len() >= 1024 {
                            break;
                        }
                    }
                    publisher.acknowledged(a);
                    if !backing_off {
                        next_pass = next_pass.min(tokio::time::Instant::now() + ACK_FLUSH);
                    }
                    continue;
                }
                None => return true,
            },
            () = &mut *stop => return true,
        }
        let now = tokio::time::Instant::now();
        // A pass only to store acknowledgements reads the log only if
        // something was committed since it was last read.
        let read = now >= next_read || *commits.borrow() > publisher.position;
        let mut wait = poll;
        backing_off = false;
        match publisher.pass(read).await {
            Ok(()) => reconnect.succeeded(),
            Err(Failure::Redis(e)) => {
                publisher.conn = None;
                wait = reconnect.failed(&super::redis_error(&e), &url).max(poll);
                backing_off = true;
            }
            Err(Failure::Store(e)) => {
                tracing::warn!(error = %e, "Backend.AI bus: the publisher cannot read or write the database; retrying");
            }
        }
        next_pass = tokio::time::Instant::now() + wait;
        if read {
            next_read = next_pass;
        }
        if publisher.stale {
            return false;
        }
    }
}

/// How long an acknowledgement heard between passes waits to be stored
/// (its route to become `Active`) at most; the Manager's call it answers
/// does not wait for that.
const ACK_FLUSH: std::time::Duration = std::time::Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

struct Publisher<'a> {
    store: &'a Store,
    backendai: &'a BackendAi,
    metrics: &'a Metrics,
    clock: &'a Clock,
    config: &'a BusConfig,
    conn: Option<redis::aio::MultiplexedConnection>,
    /// Every change up to here has been published.
    position: Revision,
    /// The position as stored; what is in `unstored` brings it to `position`.
    stored: Revision,
    /// What was published or heard since the last write.
    unstored: BusWrite,
    circuits: HashMap<Uuid, BusCircuit>,
    retries: HashMap<Uuid, Retry>,
    workers: HashMap<Uuid, Worker>,
    /// The acked revision last written per worker.
    acked: HashMap<Uuid, Revision>,
    /// Workers named by changes that no longer exist (deleted since): not
    /// looked up again.
    unknown: HashSet<Uuid>,
    /// Route-updated and removed events to send again soon.
    follow: resend::FollowUps,
    /// The anti-entropy sweep under way.
    swept: Option<resend::Sweep>,
    /// What is in memory may differ from what is stored: load again.
    stale: bool,
}

impl<'a> Publisher<'a> {
    async fn load(
        store: &'a Store,
        backendai: &'a BackendAi,
        metrics: &'a Metrics,
        clock: &'a Clock,
        config: &'a BusConfig,
    ) -> Result<Publisher<'a>, crate::store::StoreError> {
        let state = store.bus_state().await?;
        let mut p = Publisher {
            store,
            backendai,
            metrics,
            clock,
            config,
            conn: None,
            position: state.position,
            stored: state.position,
            unstored: BusWrite::default(),
            circuits: HashMap::new(),
            retries: HashMap::new(),
            workers: HashMap::new(),
            acked: HashMap::new(),
            unknown: HashSet::new(),
            follow: resend::FollowUps::default(),
            swept: None,
            stale: false,
        };
        // Created events the last leader published and no ack came for: the
        // first re-publish comes soon.
        let now = clock.now();
        for c in state.circuits {
            if !c.acked {
                p.wait_for_ack(c.route_id, now);
            }
            p.circuits.insert(c.route_id, c);
        }
        p.refresh_workers().await?;
        tracing::info!(
            position = p.position,
            circuits = p.circuits.len(),
            "Backend.AI bus: publishing from the change log"
        );
        Ok(p)
    }

    async fn refresh_workers(&mut self) -> Result<(), crate::store::StoreError> {
        self.workers = self
            .store
            .list_workers()
            .await?
            .into_iter()
            .map(|w| (w.id, w))
            .collect();
        Ok(())
    }

    async fn conn(&mut self) -> redis::RedisResult<&mut redis::aio::MultiplexedConnection> {
        if self.conn.is_none() {
            let conn = bus::connect(&self.backendai.redis, self.config.redis_timeout).await?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    async fn send(&mut self, event: &Event) -> redis::RedisResult<()> {
        self.send_traced(event, None).await
    }

    /// Publishes `event` in the trace `traceparent` names.
    async fn send_traced(
        &mut self,
        event: &Event,
        traceparent: Option<String>,
    ) -> redis::RedisResult<()> {
        let conn = self.conn().await?;
        bus::publish(conn, event, traceparent).await?;
        self.metrics
            .backendai_events
            .get_or_create(&crate::telemetry::EventLabels { event: event.name })
            .inc();
        tracing::debug!(event = event.name, worker = %event.authority, "Backend.AI bus: published");
        Ok(())
    }

    /// Publishes what changed since the position (when `read`), re-publishes
    /// what is due and moves acknowledged revisions forward; then stores all
    /// of it in one write (also what was published before a failure).
    async fn pass(&mut self, read: bool) -> Result<(), Failure> {
        let published = self.publish_all(read).await;
        self.acked_revisions();
        let stored = self.store_unstored().await;
        published?;
        stored
    }

    async fn publish_all(&mut self, read: bool) -> Result<(), Failure> {
        if read {
            self.publish_log().await?;
        }
        self.republish_due().await?;
        self.follow_up().await?;
        self.sweep().await?;
        Ok(())
    }

    /// Publishes what the change log holds after the position.
    async fn publish_log(&mut self) -> Result<(), Failure> {
        let (compacted, _) = self.store.log_horizon().await?;
        if self.position < compacted {
            self.republish_all().await?;
        }
        loop {
            let changes = self
                .store
                .changes_after(self.position, None, self.config.batch)
                .await?;
            if changes.is_empty() {
                break;
            }
            let full = changes.len() >= self.config.batch as usize;
            self.publish_changes(changes).await?;
            if self.stale || !full {
                break;
            }
        }
        Ok(())
    }

    /// The circuit `route` has now, if it is on a Backend.AI worker.
    async fn placed(
        &mut self,
        route: &Route,
        worker: Option<Uuid>,
    ) -> Result<Option<Placed>, crate::store::StoreError> {
        let Some(worker_id) = worker else {
            return Ok(None);
        };
        if !self.workers.contains_key(&worker_id) && !self.unknown.contains(&worker_id) {
            self.refresh_workers().await?;
            if !self.workers.contains_key(&worker_id) {
                self.unknown.insert(worker_id);
            }
        }
        // A worker deleted since: the route moved away later in the log.
        Ok(self
            .workers
            .get(&worker_id)
            .filter(|w| w.backendai.is_some())
            .map(|w| Placed {
                worker_id,
                authority: w.name.clone(),
                circuit: serde_json::to_value(Circuit::of(route, w)).expect("circuits serialise"),
            }))
    }

    async fn publish_changes(&mut self, changes: Vec<Change>) -> Result<(), Failure> {
        let mut to = self.position;
        let mut write = std::mem::take(&mut self.unstored);
        let mut failed = None;
        for change in changes {
            let (route_id, new) = match (change.kind, &change.route, change.route_id) {
                (ChangeKind::RouteUpsert, Some(route), _) => {
                    (route.id, self.placed(route, change.worker_id).await?)
                }
                (ChangeKind::RouteDelete, _, Some(id)) => (id, None),
                _ => {
                    to = change.revision;
                    continue;
                }
            };
            let old = self.circuits.get(&route_id);
            let events = bus::plan(old, new.as_ref());
            // Follow-ups count from before the send (a worker may act on it
            // at once).
            let sent_at = self.clock.now();
            if let Err(e) = self.send_change(&change, route_id, &events).await {
                failed = Some(e);
                break;
            }
            if failed.is_some() {
                break;
            }
            to = change.revision;
            self.follow_events(route_id, change.revision, &events, sent_at, &mut write);
            let created = events.iter().any(|e| e.name == bus::CREATED);
            match new {
                Some(n) => {
                    let previous = self.circuits.get(&route_id);
                    let c = BusCircuit {
                        route_id,
                        worker_id: n.worker_id,
                        authority: n.authority,
                        circuit: n.circuit,
                        revision: if created {
                            change.revision
                        } else {
                            previous.map_or(change.revision, |p| p.revision)
                        },
                        acked: !created && previous.is_some_and(|p| p.acked),
                    };
                    if created {
                        self.wait_for_ack(route_id, sent_at);
                    }
                    if !events.is_empty() {
                        write.removed.retain(|id| *id != route_id);
                        write.put.retain(|p| p.route_id != route_id);
                        write.put.push(c.clone());
                    }
                    self.circuits.insert(route_id, c);
                }
                None => {
                    if self.circuits.remove(&route_id).is_some() {
                        self.retries.remove(&route_id);
                        write.put.retain(|p| p.route_id != route_id);
                        write.removed.push(route_id);
                    }
                }
            }
        }
        self.unstored = write;
        self.position = to;
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Publishes the events of one change in a `publish` span that is part
    /// of the change's trace (the request or message that made it); the
    /// events carry that span on to the worker (or, when spans are not
    /// exported, the change's own trace context).
    async fn send_change(
        &mut self,
        change: &Change,
        route_id: Uuid,
        events: &[Event],
    ) -> redis::RedisResult<()> {
        use tracing::Instrument;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        if events.is_empty() {
            return Ok(());
        }
        let span = tracing::info_span!(
            "publish",
            circuit = %route_id,
            revision = change.revision,
            events = events.len(),
            "otel.kind" = "producer",
        );
        crate::trace_context::adopt(&span, change.trace.as_deref());
        let carried =
            crate::trace_context::format(&span.context()).or_else(|| change.trace.clone());
        async {
            for event in events {
                self.send_traced(event, carried.clone()).await?;
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Schedules the follow-ups of the route-updated and removed events just
    /// published for a change, and keeps its removals for the sweep.
    fn follow_events(
        &mut self,
        route_id: Uuid,
        revision: Revision,
        events: &[Event],
        sent_at: chrono::DateTime<chrono::Utc>,
        write: &mut BusWrite,
    ) {
        for event in events {
            match event.name {
                bus::ROUTE_UPDATED => self.follow_update(route_id, sent_at),
                bus::REMOVED => {
                    let removal = BusRemoval {
                        route_id,
                        revision,
                        authority: event.authority.clone(),
                        circuit: event.payload["circuits"][0].clone(),
                        removed_at: sent_at,
                    };
                    write.removals.push(removal.clone());
                    self.follow_removal(removal);
                }
                _ => {}
            }
        }
    }

    /// Stores what was published and heard since the last write, if there
    /// is anything, in one transaction.
    async fn store_unstored(&mut self) -> Result<(), Failure> {
        let write = std::mem::take(&mut self.unstored);
        if self.position == self.stored && write.is_empty() {
            return Ok(());
        }
        match self
            .store
            .bus_advance(self.stored, self.position, &write)
            .await
        {
            Ok(true) => {
                self.stored = self.position;
                for (worker, revision) in &write.acked_revisions {
                    self.acked.insert(*worker, *revision);
                }
                Ok(())
            }
            Ok(false) => {
                tracing::warn!("Backend.AI bus: another publisher moved the position; reloading");
                self.stale = true;
                Ok(())
            }
            Err(e) => {
                self.stale = true;
                Err(e.into())
            }
        }
    }
}
