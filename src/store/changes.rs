//! The change log: what changed after a revision, consistent snapshots, and
//! compaction of rows no stream needs any more.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;
use sqlx::types::Json;
use uuid::Uuid;

use super::rows::{self, route_columns, worker_select};
use super::sql::{self, Arg, Tx};
use super::{Result, Store, StoreError, db_time};
use crate::domain::events::{Change, ChangeKind};
use crate::domain::route_json::{self, Placed};
use crate::domain::{Frontend, Protocol, Revision, Route, RouteSpec, StoredRoute, Worker, served};

/// Bytes of route JSON a streamed snapshot writes at a time.
const SNAPSHOT_CHUNK: usize = 64 * 1024;

/// The columns of a [`WireRow`]: the spec itself only where its fragments
/// were not stored.
macro_rules! wire_columns {
    () => {
        "id, worker_id, frontend_port, frontend_subdomain, pending_reason, protocol, spec_wire, \
         CASE WHEN spec_wire IS NULL THEN spec END AS spec, revision, created_at, updated_at"
    };
}

/// A route as a snapshot writes it.
#[derive(sqlx::FromRow)]
struct WireRow {
    id: Uuid,
    worker_id: Option<Uuid>,
    frontend_port: Option<i32>,
    frontend_subdomain: Option<String>,
    pending_reason: Option<String>,
    protocol: String,
    spec_wire: Option<String>,
    spec: Option<Json<RouteSpec>>,
    revision: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl WireRow {
    /// Appends the route's JSON; its worker is looked up in `workers`.
    fn write(self, out: &mut Vec<u8>, workers: &HashMap<Uuid, Worker>) -> Result<()> {
        let worker = self.worker_id.and_then(|id| workers.get(&id));
        let port = self.frontend_port.and_then(|p| u16::try_from(p).ok());
        let protocol = Protocol::ALL
            .into_iter()
            .find(|p| p.as_str() == self.protocol);
        if let (Some(fragments), Some(protocol)) = (&self.spec_wire, protocol) {
            let frontend = match worker {
                Some(w) => {
                    served::frontend_on(w, protocol, port, self.frontend_subdomain.as_deref())
                }
                None => Frontend::UNASSIGNED,
            };
            let placed = Placed {
                id: self.id,
                frontend: &frontend,
                worker_id: self.worker_id,
                status: served::status(self.revision, worker),
                pending_reason: self
                    .pending_reason
                    .as_deref()
                    .filter(|_| self.worker_id.is_none()),
                revision: self.revision,
                created_at: self.created_at,
                updated_at: self.updated_at,
            };
            if route_json::write_route(out, fragments, &placed) {
                return Ok(());
            }
        }
        // Written without its fragments: decode and encode it.
        let spec = match self.spec {
            Some(Json(spec)) => spec,
            None => {
                return Err(StoreError::Database(sqlx::Error::Decode(
                    format!("route {} has neither spec fragments nor a spec", self.id).into(),
                )));
            }
        };
        let stored = StoredRoute {
            id: self.id,
            spec,
            worker_id: self.worker_id,
            port,
            subdomain: self.frontend_subdomain,
            pending_reason: self.pending_reason,
            revision: self.revision,
            created_at: self.created_at,
            updated_at: self.updated_at,
        };
        serde_json::to_writer(&mut *out, &stored.into_route(worker))
            .map_err(|e| StoreError::Database(sqlx::Error::Decode(e.into())))?;
        Ok(())
    }
}

type ChangeRow = (
    i64,
    String,
    Option<Uuid>,
    Option<Uuid>,
    Option<Json<serde_json::Value>>,
    DateTime<Utc>,
    Option<String>,
);

fn decode(row: ChangeRow) -> Result<Change> {
    let (revision, kind, route_id, worker_id, payload, created_at, trace) = row;
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
        trace,
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
                "SELECT revision, kind, route_id, worker_id, payload, created_at, trace FROM change_log \
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

    /// The routes of one worker (or all routes) exactly as of one revision,
    /// as JSON read and written a page at a time: the revision, and a stream
    /// of chunks that together are the routes' JSON separated by commas
    /// (each route byte for byte what serialising it gives, as in
    /// [`Store::snapshot`]). The read holds one connection and one
    /// database snapshot until the stream ends or is dropped; memory stays
    /// at about one chunk whatever the number of routes.
    pub async fn snapshot_json(
        &self,
        worker: Option<Uuid>,
    ) -> Result<(Revision, BoxStream<'static, Result<Vec<u8>>>)> {
        let mut tx = Tx::snapshot(&self.db).await?;
        let mut conn = tx.conn();
        let (head,): (i64,) = conn
            .fetch_one("SELECT revision FROM coordinator_state WHERE id = 1", &[])
            .await?;
        let workers = match worker {
            Some(w) => rows::worker(&mut conn, w).await?.into_iter().collect(),
            None => rows::workers(&mut conn, worker_select!(), &[]).await?,
        };
        let by_id: HashMap<Uuid, Worker> = workers.into_iter().map(|w| (w.id, w)).collect();
        let chunks = async_stream::try_stream! {
            let mut tx = tx;
            {
                let mut conn = tx.conn();
                let (query, args): (&'static str, Vec<Arg>) = match worker {
                    Some(w) => (
                        concat!("SELECT ", wire_columns!(), " FROM routes WHERE worker_id = $1 ORDER BY id"),
                        vec![w.into()],
                    ),
                    None => (concat!("SELECT ", wire_columns!(), " FROM routes ORDER BY id"), Vec::new()),
                };
                let mut rows = conn.fetch::<WireRow>(query, &args);
                let mut chunk = Vec::with_capacity(SNAPSHOT_CHUNK + 4096);
                let mut first = true;
                while let Some(row) = rows.next().await {
                    let row = row?;
                    if !first {
                        chunk.push(b',');
                    }
                    first = false;
                    row.write(&mut chunk, &by_id)?;
                    if chunk.len() >= SNAPSHOT_CHUNK {
                        yield std::mem::replace(&mut chunk, Vec::with_capacity(SNAPSHOT_CHUNK + 4096));
                    }
                }
                if !chunk.is_empty() {
                    yield chunk;
                }
            }
            tx.rollback().await?;
        };
        Ok((head, chunks.boxed()))
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
