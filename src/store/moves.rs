//! Routes leaving their worker: failover and draining move them to other
//! workers (or leave them `Pending`), and pending routes are placed once a
//! worker can take them. Which routes move and how they are re-placed is
//! [`crate::domain::failover`]'s and [`crate::domain::placer`]'s decision.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::placer_cache::Lease;
use super::rows::{self, route_columns, worker_select};
use super::sql::{Arg, Conn};
use super::{Moved, Removal, Result, Store, StoreError, StrandedRoute, db_time, sql};
use crate::domain::events::ChangeKind;
use crate::domain::failover::{self, Fallback, relocation_spec};
use crate::domain::recovery;
use crate::domain::{Assignment, PlacementError, RouteSpec, StoredRoute, Worker, WorkerStatus};

impl Store {
    /// Removes a worker: marks it `Draining` (it takes no new routes), moves its
    /// routes away in batches of `batch` (each one transaction), then deletes
    /// it. Routes that fit nowhere become `Pending`.
    pub async fn delete_worker(&self, id: Uuid, batch: u32, now: DateTime<Utc>) -> Result<Removal> {
        self.set_worker_status(id, WorkerStatus::Draining, now)
            .await?;
        let mut removal = Removal::default();
        loop {
            let moved = self.relocate_routes(id, batch, now).await?;
            if moved.is_empty() {
                break;
            }
            for m in &moved {
                if m.to.is_some() {
                    removal.moved += 1;
                } else {
                    removal.pending += 1;
                }
            }
        }
        let now = db_time(now);
        let mut tx = self.write().await?;
        // Draining workers are never chosen, so nothing new landed on it.
        let deleted = tx
            .conn()
            .execute("DELETE FROM workers WHERE id = $1", &[id.into()])
            .await?;
        if deleted == 0 {
            return Err(StoreError::NotFound);
        }
        let rev = tx.next_revision();
        tx.log(
            rev,
            ChangeKind::WorkerDelete,
            None,
            Some(id),
            Arg::NULL_JSON,
            now,
        );
        tx.commit().await?;
        self.tokens.put(id, None);
        Ok(removal)
    }

    /// Moves up to `limit` routes off worker `from` in one transaction: each
    /// gets a `delete` on `from`'s stream and an `upsert` on its new worker's,
    /// or becomes `Pending` (with the reason) if no worker can take it. Where a
    /// route may go is [`crate::domain::failover::relocation`]'s decision: a
    /// Backend.AI circuit whose URL would change stays on a `Lost` worker,
    /// marked stranded (no revision, no event; answered with `stranded`), and
    /// is not selected again while it is marked.
    #[tracing::instrument(
        name = "failover_batch",
        skip_all,
        fields(worker = %from, limit, moved = tracing::field::Empty, pending = tracing::field::Empty, stranded = tracing::field::Empty)
    )]
    pub async fn relocate_routes(
        &self,
        from: Uuid,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<Moved>> {
        let now = db_time(now);
        let mut cache = self.relocations.lock().await;
        let mut tx = self.write().await?;
        let Some(from_worker) = rows::worker(&mut tx.conn(), from).await? else {
            return Ok(Vec::new());
        };
        if !matches!(
            from_worker.status,
            WorkerStatus::Lost | WorkerStatus::Draining
        ) {
            // It came back since it was found lost: its routes stay.
            return Ok(Vec::new());
        }
        let sql = if from_worker.status == WorkerStatus::Lost {
            concat!(
                "SELECT ",
                route_columns!(),
                " FROM routes WHERE worker_id = $1 AND stranded_reason IS NULL ORDER BY id LIMIT $2"
            )
        } else {
            concat!(
                "SELECT ",
                route_columns!(),
                " FROM routes WHERE worker_id = $1 ORDER BY id LIMIT $2"
            )
        };
        let routes =
            rows::routes(&mut tx.conn(), sql, &[from.into(), i64::from(limit).into()]).await?;
        if routes.is_empty() {
            return Ok(Vec::new());
        }
        // The workers as of this transaction, without reading them all
        // again for every batch of one failover.
        let mut lease = cache.lease(&mut tx).await?;
        let mut moved = Vec::with_capacity(routes.len());
        let mut updated = Vec::with_capacity(routes.len());
        for mut r in routes {
            let relocation = failover::relocation(&r, &from_worker, lease.placer.workers());
            let kept = keep_url(&mut tx.conn(), &mut lease, &relocation.same_url).await?;
            let spec = match (kept.is_some(), relocation.otherwise) {
                (true, _) => None,
                (false, Fallback::Replace(spec)) => Some(*spec),
                (false, Fallback::Stay(why)) => {
                    moved.push(strand(&mut tx.conn(), r.id, from, why.message).await?);
                    continue;
                }
            };
            tx.log_route_deleted(r.id, Some(from), now);
            r.revision = tx.next_revision();
            r.updated_at = now;
            let placed = match (kept, spec) {
                (Some(placed), _) => Ok(placed),
                (None, Some(spec)) => rows::place(&mut tx.conn(), &mut lease.placer, &spec).await?,
                (None, None) => unreachable!("a route is kept, re-placed or stays"),
            };
            let target = seat(&mut r, placed);
            if let Some(worker) = &target {
                lease.touched.push(worker.id);
            }
            moved.push(Moved {
                route_id: r.id,
                from: Some(from),
                to: r.worker_id,
                reason: r.pending_reason.clone(),
                stranded: false,
            });
            tx.log(
                r.revision,
                ChangeKind::RouteUpsert,
                Some(r.id),
                r.worker_id,
                Arg::json(&r.to_route(target.as_ref())),
                now,
            );
            updated.push(r);
        }
        // Where every moved route now sits, in one statement (a route's
        // new frontend is on another worker, so no row waits for another's).
        rows::update_routes(&mut tx.conn(), &updated).await?;
        let revision = tx.commit().await?;
        lease.committed(revision);
        let stranded = moved.iter().filter(|m| m.stranded).count();
        let pending = moved.iter().filter(|m| m.to.is_none()).count() - stranded;
        let span = tracing::Span::current();
        span.record("moved", moved.len() - pending - stranded);
        span.record("pending", pending);
        span.record("stranded", stranded);
        Ok(moved)
    }

    /// Moves Backend.AI circuit `id` off its `Lost` worker because the Manager
    /// re-syncs its endpoint ([`crate::domain::recovery::resync`]): to a
    /// worker that keeps its URL where one can take it, else wherever
    /// placement puts a new circuit (a new URL). Like a failover move, a
    /// `delete` for the old worker and an `upsert` for the new one, in one
    /// transaction; the stranded mark goes. Answers the move, or `None` when
    /// the circuit stays: its worker is not `Lost` (any more), or no `Ready`
    /// worker can take it (it keeps waiting for its worker, URL unchanged).
    #[tracing::instrument(name = "resync_move", skip_all, fields(route = %id))]
    pub async fn resync_circuit(&self, id: Uuid, now: DateTime<Utc>) -> Result<Option<Moved>> {
        let now = db_time(now);
        let mut cache = self.relocations.lock().await;
        let mut tx = self.write().await?;
        let Some(mut r) = rows::route_by_id(&mut tx.conn(), id).await? else {
            return Err(StoreError::NotFound);
        };
        let Some(from) = r.worker_id else {
            return Ok(None);
        };
        let Some(from_worker) = rows::worker(&mut tx.conn(), from).await? else {
            return Ok(None);
        };
        let mut lease = cache.lease(&mut tx).await?;
        let Some(relocation) = recovery::resync(&r, &from_worker, lease.placer.workers()) else {
            return Ok(None);
        };
        let placed = match keep_url(&mut tx.conn(), &mut lease, &relocation.same_url).await? {
            Some(kept) => kept,
            None => {
                let Fallback::Replace(spec) = relocation.otherwise else {
                    return Ok(None);
                };
                match rows::place(&mut tx.conn(), &mut lease.placer, &spec).await? {
                    Ok(placed) => placed,
                    Err(why) => {
                        tracing::warn!(route = %id, worker = %from_worker.name, error = %why,
                            "a re-synced circuit stays on its lost worker: no ready worker can take it");
                        return Ok(None);
                    }
                }
            }
        };
        tx.log_route_deleted(r.id, Some(from), now);
        r.revision = tx.next_revision();
        r.updated_at = now;
        let target = seat(&mut r, Ok(placed));
        if let Some(worker) = &target {
            lease.touched.push(worker.id);
        }
        tx.log(
            r.revision,
            ChangeKind::RouteUpsert,
            Some(r.id),
            r.worker_id,
            Arg::json(&r.to_route(target.as_ref())),
            now,
        );
        rows::update_route(&mut tx.conn(), &r).await?;
        tx.conn()
            .execute(
                "UPDATE routes SET stranded_reason = NULL WHERE id = $1",
                &[id.into()],
            )
            .await?;
        let revision = tx.commit().await?;
        lease.committed(revision);
        tracing::info!(route = %id, from = %from_worker.name,
            to = %target.as_ref().map_or("", |w| w.name.as_str()),
            "circuit moved off its lost worker for the Manager's re-sync");
        Ok(Some(Moved {
            route_id: id,
            from: Some(from),
            to: r.worker_id,
            reason: None,
            stranded: false,
        }))
    }

    /// The Backend.AI circuits that stay on their `Lost` worker because a move
    /// would change their URL (see [`crate::domain::failover`]): each with its
    /// worker and why, oldest route first. A circuit is here from the first
    /// failover pass after its worker's grace period until the worker comes
    /// back or the circuit moves or is deleted. For `/health/status` and
    /// operators; one indexed query.
    pub async fn stranded_routes(&self) -> Result<Vec<StrandedRoute>> {
        let mut c = sql::acquire(&self.db).await?;
        let routes = rows::routes(
            &mut c.conn(),
            concat!(
                "SELECT ",
                route_columns!(),
                " FROM routes WHERE stranded_reason IS NOT NULL \
                 AND worker_id IN (SELECT id FROM workers WHERE status = 'Lost') ORDER BY id"
            ),
            &[],
        )
        .await?;
        if routes.is_empty() {
            return Ok(Vec::new());
        }
        let reasons: Vec<(Uuid, String)> = c
            .conn()
            .fetch_all(
                "SELECT id, stranded_reason FROM routes WHERE stranded_reason IS NOT NULL",
                &[],
            )
            .await?;
        let reasons: HashMap<Uuid, String> = reasons.into_iter().collect();
        let workers: HashMap<Uuid, Worker> = rows::workers(
            &mut c.conn(),
            concat!(worker_select!(), " WHERE w.status = 'Lost'"),
            &[],
        )
        .await?
        .into_iter()
        .map(|w| (w.id, w))
        .collect();
        Ok(routes
            .into_iter()
            .filter_map(|r| {
                let worker = workers.get(&r.worker_id?)?.clone();
                let reason = reasons.get(&r.id)?.clone();
                Some(StrandedRoute {
                    route: r.into_route(Some(&worker)),
                    worker,
                    reason,
                })
            })
            .collect())
    }

    /// Clears the stranded mark of `routes` (a worker that keeps their URL
    /// has appeared), so the next failover pass considers them again.
    /// (Marks also go when their worker leaves `Lost`, see
    /// [`clear_stranded`].)
    pub async fn unmark_stranded(&self, routes: &[Uuid]) -> Result<()> {
        if routes.is_empty() {
            return Ok(());
        }
        let mut tx = self.write().await?;
        for id in routes {
            tx.conn()
                .execute(
                    "UPDATE routes SET stranded_reason = NULL WHERE id = $1",
                    &[(*id).into()],
                )
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Places up to `limit` `Pending` routes on workers that can now take
    /// them, in one transaction. Routes that still fit nowhere keep waiting.
    #[tracing::instrument(level = "debug", skip_all, fields(limit, placed = tracing::field::Empty))]
    pub async fn place_pending(&self, limit: u32, now: DateTime<Utc>) -> Result<Vec<Moved>> {
        let now = db_time(now);
        let mut cache = self.relocations.lock().await;
        let mut tx = self.write().await?;
        let pending = rows::routes(
            &mut tx.conn(),
            concat!(
                "SELECT ",
                route_columns!(),
                " FROM routes WHERE worker_id IS NULL ORDER BY id LIMIT $1"
            ),
            &[i64::from(limit).into()],
        )
        .await?;
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let mut lease = cache.lease(&mut tx).await?;
        let mut placed = Vec::new();
        let mut updated = Vec::new();
        for mut r in pending {
            let spec = relocation_spec(&r.spec, r.spec.frontend.subdomain.clone().as_deref());
            match rows::place(&mut tx.conn(), &mut lease.placer, &spec).await? {
                Ok((worker, assignment)) => {
                    lease.touched.push(worker.id);
                    r.worker_id = Some(worker.id);
                    r.port = assignment.port();
                    r.subdomain = assignment.subdomain().map(str::to_owned);
                    r.pending_reason = None;
                    r.revision = tx.next_revision();
                    r.updated_at = now;
                    placed.push(Moved {
                        route_id: r.id,
                        from: None,
                        to: Some(worker.id),
                        reason: None,
                        stranded: false,
                    });
                    tx.log(
                        r.revision,
                        ChangeKind::RouteUpsert,
                        Some(r.id),
                        Some(worker.id),
                        Arg::json(&r.to_route(Some(&worker))),
                        now,
                    );
                    updated.push(r);
                }
                Err(e) => {
                    let reason = e.to_string();
                    if r.pending_reason.as_deref() != Some(reason.as_str()) {
                        // The reason is status, not spec: no revision, no event.
                        tx.conn()
                            .execute(
                                "UPDATE routes SET pending_reason = $2 WHERE id = $1",
                                &[r.id.into(), reason.as_str().into()],
                            )
                            .await?;
                    }
                }
            }
        }
        rows::update_routes(&mut tx.conn(), &updated).await?;
        let revision = tx.commit().await?;
        lease.committed(revision);
        tracing::Span::current().record("placed", placed.len());
        Ok(placed)
    }
}

/// Clears the stranded marks of `worker`'s routes: it is no longer `Lost`
/// (it came back, or is being removed), so they are no longer stranded.
pub(super) async fn clear_stranded(conn: &mut Conn<'_>, worker: Uuid) -> Result<()> {
    conn.execute(
        "UPDATE routes SET stranded_reason = NULL WHERE worker_id = $1 AND stranded_reason IS NOT NULL",
        &[worker.into()],
    )
    .await?;
    Ok(())
}

/// The first of `same_url` (each pinned to a worker that would serve the
/// route at the URL it has) whose exact frontend is free and placed there;
/// `None` when none is.
async fn keep_url(
    conn: &mut Conn<'_>,
    lease: &mut Lease<'_>,
    same_url: &[RouteSpec],
) -> Result<Option<(Worker, Assignment)>> {
    for pinned in same_url {
        let to = pinned.worker_id.expect("pinned to a worker");
        if lease.placer.used(to).is_none() {
            let used = rows::used(conn, to).await?;
            lease.placer.know_used(to, used);
        }
        if !lease
            .placer
            .used(to)
            .is_some_and(|used| failover::frontend_free(pinned, used))
        {
            continue;
        }
        if let Ok(placed) = rows::place(conn, &mut lease.placer, pinned).await? {
            lease.touched.push(placed.0.id);
            if failover::is_exact(pinned, &placed.1) {
                return Ok(Some(placed));
            }
        }
    }
    Ok(None)
}

/// Marks route `id` stranded on its lost worker `from`, for `why`: it stays,
/// with no revision and no event, and is not selected again while marked.
async fn strand(conn: &mut Conn<'_>, id: Uuid, from: Uuid, why: String) -> Result<Moved> {
    conn.execute(
        "UPDATE routes SET stranded_reason = $2 WHERE id = $1",
        &[id.into(), why.as_str().into()],
    )
    .await?;
    Ok(Moved {
        route_id: id,
        from: Some(from),
        to: None,
        reason: Some(why),
        stranded: true,
    })
}

/// Seats `route` where placement put it, or makes it `Pending` with why not;
/// answers its new worker.
fn seat(
    route: &mut StoredRoute,
    placed: std::result::Result<(Worker, Assignment), PlacementError>,
) -> Option<Worker> {
    match placed {
        Ok((worker, assignment)) => {
            route.worker_id = Some(worker.id);
            route.port = assignment.port();
            route.subdomain = assignment.subdomain().map(str::to_owned);
            route.pending_reason = None;
            Some(worker)
        }
        Err(e) => {
            route.worker_id = None;
            route.port = None;
            route.subdomain = None;
            route.pending_reason = Some(e.to_string());
            None
        }
    }
}
