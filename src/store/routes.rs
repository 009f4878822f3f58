//! Where a route is read, updated and deleted (creates go through
//! `create_writer.rs`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::rows::{self, route_columns};
use super::sql::{self, Arg};
use super::{Page, Result, Store, StoreError, Upserted, db_time};
use crate::domain::events::ChangeKind;
use crate::domain::{Route, RoutePatch, RouteSpec, StoredRoute, Worker, validate};

/// Filters of `GET /routes`.
#[derive(Clone, Debug, Default)]
pub struct RouteFilter {
    pub session_id: Option<Uuid>,
    pub endpoint_id: Option<Uuid>,
    pub worker_id: Option<Uuid>,
    pub service: Option<String>,
}

/// What may not change on an existing route.
fn fixed_fields_differ(current: &RouteSpec, wanted: &RouteSpec) -> bool {
    !current.same_identity(wanted)
        || current.worker_id != wanted.worker_id
        || current.frontend != wanted.frontend
}

impl Store {
    pub async fn get_route(&self, id: Uuid) -> Result<Route> {
        let mut c = sql::acquire(&self.db).await?;
        let stored = rows::route_by_id(&mut c.conn(), id)
            .await?
            .ok_or(StoreError::NotFound)?;
        let worker = rows::worker_of(&mut c.conn(), &stored).await?;
        Ok(stored.into_route(worker.as_ref()))
    }

    /// Routes matching `filter`, `limit` at a time, after `cursor` (a route id).
    pub async fn list_routes(
        &self,
        filter: &RouteFilter,
        limit: u32,
        cursor: Option<Uuid>,
    ) -> Result<Page> {
        let limit = limit.clamp(1, 1000);
        let mut c = sql::acquire(&self.db).await?;
        let mut stored = rows::routes(
            &mut c.conn(),
            concat!(
                "SELECT ",
                route_columns!(),
                " FROM routes WHERE ($1 IS NULL OR session_id = $1) AND ($2 IS NULL OR endpoint_id = $2) \
                 AND ($3 IS NULL OR worker_id = $3) AND ($4 IS NULL OR service = $4) \
                 AND ($5 IS NULL OR id > $5) ORDER BY id LIMIT $6"
            ),
            &[
                filter.session_id.into(),
                filter.endpoint_id.into(),
                filter.worker_id.into(),
                filter.service.as_deref().into(),
                cursor.into(),
                (i64::from(limit) + 1).into(),
            ],
        )
        .await?;
        let next_cursor = if stored.len() > limit as usize {
            stored.truncate(limit as usize);
            stored.last().map(|r| r.id)
        } else {
            None
        };
        // Only the page's own workers, however many are registered.
        let mut ids: Vec<Uuid> = stored.iter().filter_map(|r| r.worker_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let workers = rows::workers_by_id(&mut c.conn(), &ids).await?;
        let by_id: HashMap<Uuid, &Worker> = workers.iter().map(|w| (w.id, w)).collect();
        let items = stored
            .into_iter()
            .map(|r| {
                let worker = r.worker_id.and_then(|w| by_id.get(&w).copied());
                r.into_route(worker)
            })
            .collect();
        Ok(Page { items, next_cursor })
    }

    /// Resolves a worker's frontend (a port or a subdomain) to its route.
    pub async fn lookup(
        &self,
        worker_id: Uuid,
        port: Option<u16>,
        subdomain: Option<&str>,
    ) -> Result<Route> {
        let mut c = sql::acquire(&self.db).await?;
        let stored = match (port, subdomain) {
            (Some(port), _) => {
                rows::route(
                    &mut c.conn(),
                    concat!(
                        "SELECT ",
                        route_columns!(),
                        " FROM routes WHERE worker_id = $1 AND frontend_port = $2"
                    ),
                    &[worker_id.into(), port.into()],
                )
                .await?
            }
            (None, Some(sub)) => {
                rows::route(
                    &mut c.conn(),
                    concat!(
                        "SELECT ",
                        route_columns!(),
                        " FROM routes WHERE worker_id = $1 AND frontend_subdomain = $2"
                    ),
                    &[worker_id.into(), sub.into()],
                )
                .await?
            }
            (None, None) => None,
        }
        .ok_or(StoreError::NotFound)?;
        let worker = rows::worker(&mut c.conn(), worker_id).await?;
        Ok(stored.into_route(worker.as_ref()))
    }

    /// `PUT /routes/{id}`: creates the route, or updates what may change on an
    /// existing one; identity, protocol, pin and frontend request cannot change.
    pub async fn upsert_route(
        &self,
        id: Uuid,
        spec: RouteSpec,
        now: DateTime<Utc>,
    ) -> Result<Upserted> {
        let now = db_time(now);
        validate::route_spec(&spec, now)?;
        // Update in place if the route exists, else create; a PUT that loses a
        // race to create the same id finds it on the second pass.
        for first_pass in [true, false] {
            if let Some(updated) = self.update_route(id, &spec, now).await? {
                return Ok(updated);
            }
            match self.create_route(id, spec.clone(), now).await {
                Ok(route) => return Ok(Upserted::Created(route)),
                Err(StoreError::Conflict { existing: None, .. }) if first_pass => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict {
            message: format!("route {id} was created and deleted concurrently; retry"),
            existing: None,
        })
    }

    /// The update half of [`Store::upsert_route`]; `None` if route `id` does not exist.
    async fn update_route(
        &self,
        id: Uuid,
        spec: &RouteSpec,
        now: DateTime<Utc>,
    ) -> Result<Option<Upserted>> {
        // Most PUTs of a new id create it: find that out without the lock.
        let mut c = sql::acquire(&self.db).await?;
        if rows::route_by_id(&mut c.conn(), id).await?.is_none() {
            return Ok(None);
        }
        drop(c);
        let mut tx = self.write().await?;
        let Some(mut current) = rows::route_by_id(&mut tx.conn(), id).await? else {
            return Ok(None);
        };
        let worker = rows::worker_of(&mut tx.conn(), &current).await?;
        if fixed_fields_differ(&current.spec, spec) {
            return Err(StoreError::Conflict {
                message: format!(
                    "route {id} exists with a different identity, protocol, worker pin or frontend; \
                     delete it first to change those"
                ),
                existing: Some(Box::new(current.into_route(worker.as_ref()))),
            });
        }
        if current.spec.mutable_fields_equal(spec) {
            // Re-sending a route unchanged keeps it from going idle; it is
            // not a change, so no revision and no event.
            tx.conn()
                .execute(
                    "UPDATE routes SET updated_at = $2 WHERE id = $1",
                    &[id.into(), now.into()],
                )
                .await?;
            tx.commit().await?;
            current.updated_at = now;
            return Ok(Some(Upserted::Unchanged(
                current.into_route(worker.as_ref()),
            )));
        }
        current.spec = spec.clone();
        let route = self
            .write_spec(&mut tx, current, worker.as_ref(), now)
            .await?;
        tx.commit().await?;
        Ok(Some(Upserted::Updated(route)))
    }

    /// `PATCH /routes/{id}`.
    pub async fn patch_route(
        &self,
        id: Uuid,
        patch: RoutePatch,
        now: DateTime<Utc>,
    ) -> Result<Route> {
        let now = db_time(now);
        let mut tx = self.write().await?;
        let mut current = rows::route_by_id(&mut tx.conn(), id)
            .await?
            .ok_or(StoreError::NotFound)?;
        let worker = rows::worker_of(&mut tx.conn(), &current).await?;
        let spec = current.spec.patched(patch);
        // An expiry already set in the past may stay; a new one must be in the future.
        let check_now = if spec.expires_at == current.spec.expires_at {
            DateTime::<Utc>::MIN_UTC
        } else {
            now
        };
        validate::route_spec(&spec, check_now)?;
        if current.spec.mutable_fields_equal(&spec) {
            return Ok(current.into_route(worker.as_ref()));
        }
        current.spec = spec;
        let route = self
            .write_spec(&mut tx, current, worker.as_ref(), now)
            .await?;
        tx.commit().await?;
        Ok(route)
    }

    /// Stores `route`'s changed spec at the next revision and logs it.
    pub(super) async fn write_spec(
        &self,
        tx: &mut super::tx::WriteTx<'_>,
        mut route: StoredRoute,
        worker: Option<&Worker>,
        now: DateTime<Utc>,
    ) -> Result<Route> {
        route.revision = tx.next_revision();
        route.updated_at = now;
        rows::update_route(&mut tx.conn(), &route).await?;
        let (revision, id, worker_id) = (route.revision, route.id, route.worker_id);
        let served = route.into_route(worker);
        tx.log(
            revision,
            ChangeKind::RouteUpsert,
            Some(id),
            worker_id,
            Arg::json(&served),
            now,
        );
        Ok(served)
    }

    /// Deletes one route; `NotFound` if it does not exist.
    pub async fn delete_route(&self, id: Uuid, now: DateTime<Utc>) -> Result<()> {
        let now = db_time(now);
        let mut tx = self.write().await?;
        let deleted: Option<(Option<Uuid>,)> = tx
            .conn()
            .fetch_optional(
                "DELETE FROM routes WHERE id = $1 RETURNING worker_id",
                &[id.into()],
            )
            .await?;
        let (worker_id,) = deleted.ok_or(StoreError::NotFound)?;
        tx.log_route_deleted(id, worker_id, now);
        tx.commit().await?;
        Ok(())
    }

    /// Deletes every interactive route of a session in one transaction.
    pub async fn delete_session(&self, session_id: Uuid, now: DateTime<Utc>) -> Result<u64> {
        let now = db_time(now);
        let mut tx = self.write().await?;
        let deleted: Vec<(Uuid, Option<Uuid>)> = tx
            .conn()
            .fetch_all(
                "DELETE FROM routes WHERE app_mode = 'interactive' AND session_id = $1 RETURNING id, worker_id",
                &[session_id.into()],
            )
            .await?;
        if deleted.is_empty() {
            return Ok(0);
        }
        for (route_id, worker_id) in &deleted {
            tx.log_route_deleted(*route_id, *worker_id, now);
        }
        tx.commit().await?;
        Ok(deleted.len() as u64)
    }

    /// Deletes up to `limit` routes whose `expires_at` has passed or, when
    /// `idle_before` is given, that nobody created or re-sent since then, in
    /// one transaction. Returns their ids.
    pub async fn delete_expired(
        &self,
        now: DateTime<Utc>,
        idle_before: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<Uuid>> {
        let now = db_time(now);
        let idle_before = idle_before.map(db_time);
        let mut tx = self.write().await?;
        let expired: Vec<(Uuid, Option<Uuid>)> = tx
            .conn()
            .fetch_all(
                "SELECT id, worker_id FROM routes WHERE (expires_at IS NOT NULL AND expires_at < $1) \
                 OR ($3 IS NOT NULL AND updated_at < $3) ORDER BY id LIMIT $2",
                &[now.into(), i64::from(limit).into(), idle_before.into()],
            )
            .await?;
        if expired.is_empty() {
            return Ok(Vec::new());
        }
        for (route_id, worker_id) in &expired {
            tx.conn()
                .execute("DELETE FROM routes WHERE id = $1", &[(*route_id).into()])
                .await?;
            tx.log_route_deleted(*route_id, *worker_id, now);
        }
        tx.commit().await?;
        Ok(expired.into_iter().map(|(id, _)| id).collect())
    }
}
