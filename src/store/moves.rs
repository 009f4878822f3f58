//! Routes leaving their worker: failover and draining move them to other
//! workers (or leave them `Pending`), and pending routes are placed once a
//! worker can take them. Which routes move and how they are re-placed is
//! [`crate::domain::failover`]'s and [`crate::domain::placer`]'s decision.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::rows::{self, route_columns, worker_select};
use super::sql::Arg;
use super::{Moved, Removal, Result, Store, StoreError, db_time};
use crate::domain::WorkerStatus;
use crate::domain::events::ChangeKind;
use crate::domain::failover::relocation_spec;
use crate::domain::placer::Placer;

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
    /// or becomes `Pending` (with the reason) if no worker can take it.
    #[tracing::instrument(
        name = "failover_batch",
        skip_all,
        fields(worker = %from, limit, moved = tracing::field::Empty, pending = tracing::field::Empty)
    )]
    pub async fn relocate_routes(
        &self,
        from: Uuid,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<Moved>> {
        let now = db_time(now);
        let mut tx = self.write().await?;
        let routes = rows::routes(
            &mut tx.conn(),
            concat!(
                "SELECT ",
                route_columns!(),
                " FROM routes WHERE worker_id = $1 ORDER BY id LIMIT $2"
            ),
            &[from.into(), i64::from(limit).into()],
        )
        .await?;
        if routes.is_empty() {
            return Ok(Vec::new());
        }
        let others = rows::workers(
            &mut tx.conn(),
            concat!(worker_select!(), " WHERE w.id <> $1"),
            &[from.into()],
        )
        .await?;
        let mut placer = Placer::new(others, HashMap::new());
        let mut moved = Vec::with_capacity(routes.len());
        for mut r in routes {
            let rev = tx.log_route_deleted(r.id, Some(from), now);
            // Free the old frontend before taking a new one.
            let preferred = r.subdomain.take();
            r.worker_id = None;
            r.port = None;
            r.revision = rev;
            r.updated_at = now;
            rows::update_route(&mut tx.conn(), &r).await?;
            r.revision = tx.next_revision();
            let spec = relocation_spec(&r.spec, preferred.as_deref());
            let target = match rows::place(&mut tx.conn(), &mut placer, &spec).await? {
                Ok((worker, assignment)) => {
                    r.worker_id = Some(worker.id);
                    r.port = assignment.port();
                    r.subdomain = assignment.subdomain().map(str::to_owned);
                    r.pending_reason = None;
                    Some(worker)
                }
                Err(e) => {
                    r.pending_reason = Some(e.to_string());
                    None
                }
            };
            rows::update_route(&mut tx.conn(), &r).await?;
            moved.push(Moved {
                route_id: r.id,
                from: Some(from),
                to: r.worker_id,
                reason: r.pending_reason.clone(),
            });
            let (revision, id, worker_id) = (r.revision, r.id, r.worker_id);
            let route = r.into_route(target.as_ref());
            tx.log(
                revision,
                ChangeKind::RouteUpsert,
                Some(id),
                worker_id,
                Arg::json(&route),
                now,
            );
        }
        tx.commit().await?;
        let pending = moved.iter().filter(|m| m.to.is_none()).count();
        let span = tracing::Span::current();
        span.record("moved", moved.len() - pending);
        span.record("pending", pending);
        Ok(moved)
    }

    /// Places up to `limit` `Pending` routes on workers that can now take
    /// them, in one transaction. Routes that still fit nowhere keep waiting.
    #[tracing::instrument(level = "debug", skip_all, fields(limit, placed = tracing::field::Empty))]
    pub async fn place_pending(&self, limit: u32, now: DateTime<Utc>) -> Result<Vec<Moved>> {
        let now = db_time(now);
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
        let workers = rows::workers(&mut tx.conn(), worker_select!(), &[]).await?;
        let mut placer = Placer::new(workers, HashMap::new());
        let mut placed = Vec::new();
        for mut r in pending {
            let spec = relocation_spec(&r.spec, r.spec.frontend.subdomain.clone().as_deref());
            match rows::place(&mut tx.conn(), &mut placer, &spec).await? {
                Ok((worker, assignment)) => {
                    r.worker_id = Some(worker.id);
                    r.port = assignment.port();
                    r.subdomain = assignment.subdomain().map(str::to_owned);
                    r.pending_reason = None;
                    r.revision = tx.next_revision();
                    r.updated_at = now;
                    rows::update_route(&mut tx.conn(), &r).await?;
                    placed.push(Moved {
                        route_id: r.id,
                        from: None,
                        to: Some(worker.id),
                        reason: None,
                    });
                    let (revision, id) = (r.revision, r.id);
                    let route = r.into_route(Some(&worker));
                    tx.log(
                        revision,
                        ChangeKind::RouteUpsert,
                        Some(id),
                        Some(worker.id),
                        Arg::json(&route),
                        now,
                    );
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
        tx.commit().await?;
        tracing::Span::current().record("placed", placed.len());
        Ok(placed)
    }
}
