//! The change log: what changed after a revision, consistent snapshots, and
//! compaction of rows no stream needs any more.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::rows::{self, route_columns, worker_select};
use super::sql::{self, Tx};
use super::{Result, Store, StoreError, db_time};
use crate::domain::events::{Change, ChangeKind};
use crate::domain::{Revision, Route, Worker};

type ChangeRow = (
    i64,
    String,
    Option<Uuid>,
    Option<Uuid>,
    Option<Json<serde_json::Value>>,
    DateTime<Utc>,
);

fn decode(row: ChangeRow) -> Result<Change> {
    let (revision, kind, route_id, worker_id, payload, created_at) = row;
    let kind = ChangeKind::parse(&kind).ok_or_else(|| {
        StoreError::Database(sqlx::Error::Decode(
            format!("unknown change kind {kind}").into(),
        ))
    })?;
    let route = match (kind, payload) {
        (ChangeKind::RouteUpsert, Some(Json(v))) => Some(
            serde_json::from_value(v)
                .map_err(|e| StoreError::Database(sqlx::Error::Decode(e.into())))?,
        ),
        _ => None,
    };
    Ok(Change {
        revision,
        kind,
        route_id,
        worker_id,
        route,
        created_at,
    })
}

impl Store {
    /// Change-log rows after `after`, oldest first, at most `limit`; only the
    /// rows of one worker's stream when `worker` is given.
    pub async fn changes_after(
        &self,
        after: Revision,
        worker: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Change>> {
        let mut c = sql::acquire(&self.db).await?;
        let rows: Vec<ChangeRow> = c
            .conn()
            .fetch_all(
                "SELECT revision, kind, route_id, worker_id, payload, created_at FROM change_log \
                 WHERE revision > $1 AND ($2 IS NULL OR worker_id = $2) ORDER BY revision LIMIT $3",
                &[after.into(), worker.into(), i64::from(limit).into()],
            )
            .await?;
        rows.into_iter().map(decode).collect()
    }

    /// `(compacted, head)`: every revision after `compacted` is still in the
    /// log, and `head` is the last one committed.
    pub async fn log_horizon(&self) -> Result<(Revision, Revision)> {
        let mut c = sql::acquire(&self.db).await?;
        Ok(c.conn()
            .fetch_one(
                "SELECT compacted_revision, revision FROM coordinator_state WHERE id = 1",
                &[],
            )
            .await?)
    }

    /// The routes of one worker (or all routes) exactly as of one revision.
    pub async fn snapshot(&self, worker: Option<Uuid>) -> Result<(Revision, Vec<Route>)> {
        let mut tx = Tx::snapshot(&self.db).await?;
        let mut conn = tx.conn();
        let (head,): (i64,) = conn
            .fetch_one("SELECT revision FROM coordinator_state WHERE id = 1", &[])
            .await?;
        // Two statements, so each gets a plan that uses its index; a
        // worker's snapshot needs only that worker.
        let (stored, workers) = match worker {
            Some(w) => (
                rows::routes(
                    &mut conn,
                    concat!(
                        "SELECT ",
                        route_columns!(),
                        " FROM routes WHERE worker_id = $1 ORDER BY id"
                    ),
                    &[w.into()],
                )
                .await?,
                rows::worker(&mut conn, w).await?.into_iter().collect(),
            ),
            None => (
                rows::routes(
                    &mut conn,
                    concat!("SELECT ", route_columns!(), " FROM routes ORDER BY id"),
                    &[],
                )
                .await?,
                rows::workers(&mut conn, worker_select!(), &[]).await?,
            ),
        };
        tx.rollback().await?;
        let by_id: HashMap<Uuid, &Worker> = workers.iter().map(|w| (w.id, w)).collect();
        let routes = stored
            .into_iter()
            .map(|r| {
                let worker = r.worker_id.and_then(|w| by_id.get(&w).copied());
                r.into_route(worker)
            })
            .collect();
        Ok((head, routes))
    }

    /// Drops change-log rows that are both older than `older_than` and not
    /// among the last `keep_last` revisions. Returns how many went.
    pub async fn compact_log(&self, keep_last: u64, older_than: DateTime<Utc>) -> Result<u64> {
        let older_than = db_time(older_than);
        let mut tx = self.write().await?;
        let keep_from = tx
            .head()
            .saturating_sub(i64::try_from(keep_last).unwrap_or(i64::MAX));
        let (cutoff,): (Option<i64>,) = tx
            .conn()
            .fetch_one(
                "SELECT MAX(revision) FROM change_log WHERE revision <= $1 AND created_at < $2",
                &[keep_from.into(), older_than.into()],
            )
            .await?;
        let Some(cutoff) = cutoff else {
            return Ok(0);
        };
        let deleted = tx
            .conn()
            .execute(
                "DELETE FROM change_log WHERE revision <= $1",
                &[cutoff.into()],
            )
            .await?;
        tx.conn()
            .execute(
                "UPDATE coordinator_state SET compacted_revision = $1 WHERE id = 1 AND compacted_revision < $1",
                &[cutoff.into()],
            )
            .await?;
        tx.commit().await?;
        Ok(deleted)
    }
}
