//! Where routes are created: one writer commits every create queued at the
//! moment in one transaction, so concurrent creates share the revision lock
//! and the commit's fsync (as PostgreSQL's group commit would share
//! independent ones), while each request gets its own answer.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use tracing::field::Empty;
use uuid::Uuid;

mod checked;
mod forward;
pub(super) mod insert;

pub use self::forward::{
    FOLLOW_EVERY, FORWARD_PATH, ForwardLabels, ForwardedAnswer, ForwardedCreate, Peers, follow,
};

use self::insert::{PG_LOCKED_INSERT, PG_UNLOCKED_INSERT, unnest_args};
use super::placer_cache::WorkerCache;
use super::rows;
use super::sql::{self, Arg};
use super::{Db, Result, Store, StoreError, db_time};
use crate::domain::placement::PlacementError;
use crate::domain::{Assignment, Revision, Route, RouteSpec, StoredRoute, Worker, validate};

/// Most creates the create writer commits in one transaction.
const BATCH_MAX: usize = 64;

/// A `POST /routes` waiting for the create writer.
pub(super) struct NewRoute {
    id: Uuid,
    spec: RouteSpec,
    now: DateTime<Utc>,
    reply: oneshot::Sender<Result<Route>>,
    /// The caller's span and request id, for the batch's span.
    span: tracing::Span,
    request_id: Option<Arc<str>>,
    /// The caller's trace context, for the route's change.
    trace: Option<String>,
    /// Sent by another replica ([`forward`]): committed here whoever leads.
    here: bool,
}

impl std::fmt::Debug for NewRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewRoute")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Starts the create writer for `store` (a copy without a queue of its own);
/// answers the queue to send creates to. It ends when every sender is dropped.
pub(super) fn spawn(store: Store) -> mpsc::Sender<NewRoute> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(store.write_creates(rx));
    tx
}

impl Store {
    /// Validates `spec`, places it on a worker and stores it as route `id`.
    /// The answer comes after the commit of the batch that carried it (on
    /// the leader, when another replica leads: see [`forward`]).
    pub async fn create_route(
        &self,
        id: Uuid,
        spec: RouteSpec,
        now: DateTime<Utc>,
    ) -> Result<Route> {
        let trace = crate::trace_context::current();
        self.queue_create(id, spec, db_time(now), trace, false)
            .await
    }

    /// [`Store::create_route`], committed by this replica's own writer.
    async fn create_here(
        &self,
        id: Uuid,
        spec: RouteSpec,
        now: DateTime<Utc>,
        trace: Option<String>,
    ) -> Result<Route> {
        self.queue_create(id, spec, now, trace, true).await
    }

    async fn queue_create(
        &self,
        id: Uuid,
        spec: RouteSpec,
        now: DateTime<Utc>,
        trace: Option<String>,
        here: bool,
    ) -> Result<Route> {
        validate::route_spec(&spec, now)?;
        let (reply, answer) = oneshot::channel();
        let request = NewRoute {
            id,
            spec,
            now,
            reply,
            span: tracing::Span::current(),
            request_id: crate::request_id::current(),
            trace,
            here,
        };
        let Some(queue) = &self.creates else {
            return self.create_one(request).await;
        };
        if let Err(mpsc::error::SendError(request)) = queue.send(request).await {
            // The writer is gone (its runtime is shutting down).
            return self.create_one(request).await;
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the create writer stopped before answering".to_owned(),
            ))
        })
    }

    async fn create_one(&self, request: NewRoute) -> Result<Route> {
        let mut answers = self
            .create_routes(std::slice::from_ref(&request), &mut WorkerCache::default())
            .await?;
        answers.pop().unwrap_or(Err(StoreError::NotFound))
    }

    /// The create writer: takes whatever creates are queued (up to
    /// [`BATCH_MAX`]) and commits them together; while another replica
    /// leads, sends them to it instead ([`forward`]), up to
    /// [`forward::IN_FLIGHT`] batches at a time.
    async fn write_creates(self, mut queue: mpsc::Receiver<NewRoute>) {
        let mut batch = Vec::with_capacity(BATCH_MAX);
        let mut cache = WorkerCache::default();
        let in_flight = Arc::new(tokio::sync::Semaphore::new(forward::IN_FLIGHT));
        loop {
            // While another replica leads, a free slot first: what queues
            // while every slot is taken goes in the next batch, whole.
            let slot = match self.forward_target() {
                Some(_) => in_flight.clone().acquire_owned().await.ok(),
                None => None,
            };
            if queue.recv_many(&mut batch, BATCH_MAX).await == 0 {
                return;
            }
            let mut requests: Vec<NewRoute> = std::mem::take(&mut batch);
            if let Some((peers, leader)) = self.forward_target() {
                let (here, away): (Vec<_>, Vec<_>) = requests.into_iter().partition(|r| r.here);
                requests = here;
                if !away.is_empty() {
                    let slot = match slot {
                        Some(slot) => Some(slot),
                        None => in_flight.clone().acquire_owned().await.ok(),
                    };
                    let store = self.clone();
                    tokio::spawn(async move {
                        store.forward_batch(&peers, &leader, away).await;
                        drop(slot);
                    });
                }
                if requests.is_empty() {
                    continue;
                }
            }
            self.create_batches.observe(requests.len() as f64);
            let span = batch_span(&requests);
            let answers = self
                .commit_batch(&requests, &mut cache)
                .instrument(span.clone())
                .await;
            reply(requests, answers, &span);
        }
    }

    /// Commits `requests` together; if something in them breaks the
    /// transaction, each on its own. One answer per request, in order.
    async fn commit_batch(
        &self,
        requests: &[NewRoute],
        cache: &mut WorkerCache,
    ) -> Vec<Result<Route>> {
        match self.create_routes(requests, cache).await {
            Ok(answers) => answers,
            Err(e) if e.is_unavailable() || requests.len() == 1 => {
                let message = e.to_string();
                let mut first = Some(e);
                requests
                    .iter()
                    .map(|_| {
                        Err(first
                            .take()
                            .unwrap_or_else(|| StoreError::Unavailable(message.clone())))
                    })
                    .collect()
            }
            // Something in the batch broke the transaction: give each
            // request its own, so one cannot fail the others.
            Err(e) => {
                tracing::warn!(error = %e, size = requests.len(), "create batch failed; retrying its creates one by one");
                let mut answers = Vec::with_capacity(requests.len());
                for r in requests {
                    let one = self.create_routes(std::slice::from_ref(r), cache).await;
                    answers.push(match one {
                        Ok(mut one) => one.pop().unwrap_or(Err(StoreError::NotFound)),
                        Err(e) => Err(e),
                    });
                }
                answers
            }
        }
    }

    /// Creates `requests` in one transaction: one revision lock, one commit,
    /// consecutive revisions in request order. Each request gets its own
    /// answer: one that conflicts (with a stored route or an earlier request of
    /// the batch) or fits nowhere does not fail the others. `Err` only when
    /// the transaction itself fails, and then nothing was created.
    ///
    /// On PostgreSQL a batch first goes optimistically: placed without
    /// reading which ids and keys are taken, and written with its change-log
    /// rows and the new revision in one statement whose route insert skips
    /// any row a unique index refuses. When every route went in (the usual
    /// case) that is the whole batch: four round trips (begin, lock, write,
    /// commit). When one did not, nothing is kept and the batch goes again
    /// the checked way, which words each conflict.
    async fn create_routes(
        &self,
        requests: &[NewRoute],
        cache: &mut WorkerCache,
    ) -> Result<Vec<Result<Route>>> {
        if matches!(self.db, Db::Postgres(_)) {
            if let Some(batch) = self.prepare_unlocked(requests, cache).await? {
                match write_unlocked(&self.db, batch.query, batch.args).await {
                    Ok(true) => {
                        self.published(batch.last);
                        return Ok(batch.answers);
                    }
                    Ok(false) => cache.not_written(batch.head, batch.touched),
                    Err(e) => {
                        cache.not_written(batch.head, batch.touched);
                        return Err(e);
                    }
                }
            }
            if let Some(answers) = self.create_routes_at_once(requests, cache).await? {
                return Ok(answers);
            }
        }
        self.create_routes_checked(requests, cache).await
    }

    /// The optimistic create without a transaction of its own (PostgreSQL),
    /// when the writer's placer is current as of the revision it last
    /// committed (or sent): placed outside any lock, into one statement
    /// ([`write_unlocked`]) that is its own transaction — it takes the
    /// revision lock by moving the revision on only if it is still the one
    /// the placer knows (so no other write came in between and what was
    /// placed holds), and inserts the routes and their change-log rows only
    /// then. One round trip and one commit per batch, and nothing of it under
    /// the lock but that statement. `None` when the placer is not known
    /// current or a route conflicts within the batch or fits nowhere (the
    /// locked way words those). The cache takes the batch as written; if it
    /// was not, say so with [`WorkerCache::not_written`].
    async fn prepare_unlocked(
        &self,
        requests: &[NewRoute],
        cache: &mut WorkerCache,
    ) -> Result<Option<Unlocked>> {
        let Some((head, mut lease)) = cache.lease_current() else {
            return Ok(None);
        };
        let mut c = sql::acquire(&self.db).await?;
        let mut created: Vec<(StoredRoute, Route)> = Vec::new();
        // Each created route's change carries its request's trace context.
        let mut traces: Vec<Option<String>> = Vec::new();
        let mut answers = Vec::with_capacity(requests.len());
        let mut last = head;
        for request in requests {
            let spec = &request.spec;
            let key = spec.key();
            if created
                .iter()
                .any(|(s, _)| s.id == request.id || s.spec.key() == key)
            {
                return Ok(None);
            }
            let (worker, assignment) =
                match rows::place(&mut c.conn(), &mut lease.placer, spec).await? {
                    Ok(placed) => placed,
                    // Refusals are not checked against the head by the
                    // write below: the locked way gives them.
                    Err(_) => return Ok(None),
                };
            lease.touched.push(worker.id);
            last += 1;
            let placed = placed_route(request, &worker, &assignment, last);
            answers.push(Ok(placed.1.clone()));
            created.push(placed);
            traces.push(request.trace.clone());
        }
        let args = unnest_args(head, last, &created, traces);
        let query = PG_UNLOCKED_INSERT.as_str();
        let touched = std::mem::take(&mut lease.touched);
        lease.committed(last);
        Ok(Some(Unlocked {
            query,
            args,
            answers,
            head,
            last,
            touched,
        }))
    }

    /// The optimistic create (PostgreSQL): `None` when a route of the batch
    /// conflicts, and then nothing was written.
    async fn create_routes_at_once(
        &self,
        requests: &[NewRoute],
        cache: &mut WorkerCache,
    ) -> Result<Option<Vec<Result<Route>>>> {
        let mut tx = self.write().await?;
        let mut lease = cache.lease(&mut tx).await?;
        let mut created: Vec<(StoredRoute, Route)> = Vec::new();
        // Each created route's change carries its request's trace context.
        let mut traces: Vec<Option<String>> = Vec::new();
        let mut answers = Vec::with_capacity(requests.len());
        for request in requests {
            let spec = &request.spec;
            let key = spec.key();
            if created
                .iter()
                .any(|(s, _)| s.id == request.id || s.spec.key() == key)
            {
                // A conflict inside the batch: the checked way words it.
                tx.rollback().await?;
                return Ok(None);
            }
            let (worker, assignment) =
                match rows::place(&mut tx.conn(), &mut lease.placer, spec).await? {
                    Ok(placed) => placed,
                    Err(PlacementError::PortTaken(_)) => {
                        tx.rollback().await?;
                        return Ok(None);
                    }
                    Err(e) => {
                        answers.push(Err(e.into()));
                        continue;
                    }
                };
            lease.touched.push(worker.id);
            let placed = placed_route(request, &worker, &assignment, tx.next_revision());
            answers.push(Ok(placed.1.clone()));
            created.push(placed);
            traces.push(request.trace.clone());
        }
        if created.is_empty() {
            let head = tx.head();
            tx.rollback().await?;
            lease.committed(head);
            return Ok(Some(answers));
        }
        let last = created.last().map_or(tx.head(), |(r, _)| r.revision);
        let args = unnest_args(tx.head(), last, &created, traces);
        // The transaction holds the revision lock, so the guard always holds.
        let (inserted, _): (i64, i64) = tx
            .conn()
            .fetch_one(PG_LOCKED_INSERT.as_str(), &args)
            .await?;
        if usize::try_from(inserted).ok() != Some(created.len()) {
            tx.rollback().await?;
            return Ok(None);
        }
        let revision = tx.commit_written(last).await?;
        lease.committed(revision);
        Ok(Some(answers))
    }
}

/// A batch placed for the unlocked write ([`Store::prepare_unlocked`]): its
/// statement, the answers it gives once written, the revisions it moves the
/// head from and to, and the workers it placed on.
struct Unlocked {
    query: &'static str,
    args: Vec<Arg>,
    answers: Vec<Result<Route>>,
    head: Revision,
    last: Revision,
    touched: Vec<Uuid>,
}

/// Runs an unlocked batch's statement: `true` when it was written, `false`
/// when nothing was (the head had moved, or a unique index or a reference
/// refused a route).
async fn write_unlocked(db: &Db, query: &'static str, args: Vec<Arg>) -> Result<bool> {
    let mut c = sql::acquire(db).await?;
    let written: sqlx::Result<(i64, i64, i64)> = c.conn().fetch_one(query, &args).await;
    match written {
        Ok((saved, _, _)) => Ok(saved == 1),
        Err(sqlx::Error::Database(e)) if e.code().is_some_and(|c| c.starts_with("23")) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Sends each request its answer, and records the batch's revisions.
fn reply(requests: Vec<NewRoute>, answers: Vec<Result<Route>>, span: &tracing::Span) {
    let revisions = answers.iter().filter_map(|a| a.as_ref().ok());
    if let Some(first) = revisions.clone().map(|r| r.revision).min() {
        span.record("first", first);
    }
    if let Some(last) = revisions.map(|r| r.revision).max() {
        span.record("last", last);
    }
    span.in_scope(|| {
        let created = answers.iter().filter(|a| a.is_ok()).count();
        tracing::debug!(created, "create batch done");
    });
    for (request, answer) in requests.into_iter().zip(answers) {
        // The caller may have gone; the route exists all the same.
        let _ = request.reply.send(answer);
    }
}

/// The span of a batch: its size, the ids of the requests it serves, and the
/// revisions it committed (`first..=last`, recorded after the commit). A
/// batch of one is part of its request's trace; a larger one starts its own
/// and follows from each request's span.
fn batch_span(requests: &[NewRoute]) -> tracing::Span {
    let ids: Vec<&str> = requests
        .iter()
        .filter_map(|r| r.request_id.as_deref())
        .collect();
    let ids = ids.join(",");
    let size = requests.len();
    match requests {
        [one] => {
            tracing::info_span!(parent: &one.span, "create_batch", size, request_ids = ids, first = Empty, last = Empty)
        }
        _ => {
            let span = tracing::info_span!(parent: None, "create_batch", size, request_ids = ids, first = Empty, last = Empty);
            for r in requests {
                span.follows_from(&r.span);
            }
            span
        }
    }
}

/// Route `request`, placed on `worker` at `assignment` as of `revision`:
/// as stored, and as answered.
fn placed_route(
    request: &NewRoute,
    worker: &Worker,
    assignment: &Assignment,
    revision: Revision,
) -> (StoredRoute, Route) {
    let route = StoredRoute {
        id: request.id,
        worker_id: Some(worker.id),
        port: assignment.port(),
        subdomain: assignment.subdomain().map(str::to_owned),
        pending_reason: None,
        spec: request.spec.clone(),
        revision,
        created_at: request.now,
        updated_at: request.now,
    };
    let wire = route.to_route(Some(worker));
    (route, wire)
}
