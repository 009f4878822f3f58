//! Route and worker rows: their columns, how they decode into domain types,
//! and the reads and writes every part of the store shares.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::Result;
use super::sql::{Arg, Conn};
use crate::domain::placement::{Assignment, PlacementError, Used};
use crate::domain::placer::{Placer, Step};
use crate::domain::{RouteSpec, StoredRoute, Worker, WorkerRegistration, WorkerStatus, route_json};

/// The columns of a [`RouteRow`], for `SELECT`s.
macro_rules! route_columns {
    () => {
        "id, worker_id, frontend_port, frontend_subdomain, pending_reason, spec, revision, created_at, updated_at"
    };
}
pub(crate) use route_columns;

/// `SELECT … FROM workers w` giving [`WorkerRow`]s; add a `WHERE`.
macro_rules! worker_select {
    () => {
        "SELECT w.id, w.spec, w.status, w.last_heartbeat, w.acked_revision, w.created_at, w.updated_at, \
         w.route_count, \
         (SELECT revision FROM coordinator_state WHERE id = 1) - w.acked_revision AS revision_lag FROM workers w"
    };
}
pub(crate) use worker_select;

#[derive(sqlx::FromRow)]
pub struct RouteRow {
    id: Uuid,
    worker_id: Option<Uuid>,
    frontend_port: Option<i32>,
    frontend_subdomain: Option<String>,
    pending_reason: Option<String>,
    spec: Json<RouteSpec>,
    revision: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<RouteRow> for StoredRoute {
    fn from(r: RouteRow) -> StoredRoute {
        StoredRoute {
            id: r.id,
            spec: r.spec.0,
            worker_id: r.worker_id,
            port: r.frontend_port.and_then(|p| u16::try_from(p).ok()),
            subdomain: r.frontend_subdomain,
            pending_reason: r.pending_reason,
            revision: r.revision,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

#[derive(sqlx::FromRow)]
pub struct WorkerRow {
    id: Uuid,
    spec: Json<WorkerRegistration>,
    status: String,
    last_heartbeat: DateTime<Utc>,
    acked_revision: i64,
    revision_lag: i64,
    route_count: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<WorkerRow> for Worker {
    fn from(r: WorkerRow) -> Worker {
        Worker::from_parts(
            r.id,
            r.spec.0,
            // The column has a CHECK constraint listing exactly these values.
            WorkerStatus::parse(&r.status).unwrap_or(WorkerStatus::NotReady),
            r.last_heartbeat,
            r.acked_revision,
            r.revision_lag.max(0),
            u64::try_from(r.route_count).unwrap_or_default(),
            r.created_at,
            r.updated_at,
        )
    }
}

/// Routes selected by `sql` (which selects [`route_columns!`]).
pub async fn routes(
    conn: &mut Conn<'_>,
    sql: &'static str,
    args: &[Arg],
) -> Result<Vec<StoredRoute>> {
    let rows: Vec<RouteRow> = conn.fetch_all(sql, args).await?;
    Ok(rows.into_iter().map(StoredRoute::from).collect())
}

/// The route selected by `sql`, if any.
pub async fn route(
    conn: &mut Conn<'_>,
    sql: &'static str,
    args: &[Arg],
) -> Result<Option<StoredRoute>> {
    let row: Option<RouteRow> = conn.fetch_optional(sql, args).await?;
    Ok(row.map(StoredRoute::from))
}

/// Route `id`.
pub async fn route_by_id(conn: &mut Conn<'_>, id: Uuid) -> Result<Option<StoredRoute>> {
    route(
        conn,
        concat!("SELECT ", route_columns!(), " FROM routes WHERE id = $1"),
        &[id.into()],
    )
    .await
}

/// Workers selected by `sql` (a [`worker_select!`] plus conditions).
pub async fn workers(
    conn: &mut Conn<'_>,
    sql: impl sqlx::SqlSafeStr,
    args: &[Arg],
) -> Result<Vec<Worker>> {
    let rows: Vec<WorkerRow> = conn.fetch_all(sql, args).await?;
    Ok(rows.into_iter().map(Worker::from).collect())
}

/// The workers among `ids` (those that exist).
pub async fn workers_by_id(conn: &mut Conn<'_>, ids: &[Uuid]) -> Result<Vec<Worker>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let query = format!(
        "{} WHERE w.id IN ({})",
        worker_select!(),
        super::sql::list(ids.len(), 1)
    );
    let args: Vec<Arg> = ids.iter().map(|&id| id.into()).collect();
    workers(conn, sqlx::AssertSqlSafe(query), &args).await
}

/// Worker `id`.
pub async fn worker(conn: &mut Conn<'_>, id: Uuid) -> Result<Option<Worker>> {
    let row: Option<WorkerRow> = conn
        .fetch_optional(concat!(worker_select!(), " WHERE w.id = $1"), &[id.into()])
        .await?;
    Ok(row.map(Worker::from))
}

/// The worker a stored route sits on, if it has one.
pub async fn worker_of(conn: &mut Conn<'_>, route: &StoredRoute) -> Result<Option<Worker>> {
    match route.worker_id {
        Some(id) => worker(conn, id).await,
        None => Ok(None),
    }
}

/// The frontends taken on one worker.
pub async fn used(conn: &mut Conn<'_>, worker_id: Uuid) -> Result<Used> {
    Ok(used_of(conn, &[worker_id])
        .await?
        .remove(&worker_id)
        .unwrap_or_default())
}

/// Workers' taken frontends read together when the placer asks for one.
const USED_AHEAD: usize = 64;

/// The frontends taken on each of `ids` (every one of them in the answer).
pub async fn used_of(conn: &mut Conn<'_>, ids: &[Uuid]) -> Result<HashMap<Uuid, Used>> {
    let mut out: HashMap<Uuid, Used> = ids.iter().map(|&id| (id, Used::default())).collect();
    if ids.is_empty() {
        return Ok(out);
    }
    // Each half reads its own partial unique index.
    let n = ids.len();
    let query = format!(
        "SELECT worker_id, frontend_port, NULL AS frontend_subdomain FROM routes \
         WHERE worker_id IN ({}) AND frontend_port IS NOT NULL \
         UNION ALL SELECT worker_id, NULL, frontend_subdomain FROM routes \
         WHERE worker_id IN ({}) AND frontend_subdomain IS NOT NULL",
        super::sql::list(n, 1),
        super::sql::list(n, n + 1)
    );
    let args: Vec<Arg> = ids.iter().chain(ids).map(|&id| id.into()).collect();
    let rows: Vec<(Uuid, Option<i32>, Option<String>)> =
        conn.fetch_all(sqlx::AssertSqlSafe(query), &args).await?;
    for (worker, port, sub) in rows {
        let used = out.entry(worker).or_default();
        used.ports.extend(port.and_then(|p| u16::try_from(p).ok()));
        used.subdomains.extend(sub);
    }
    Ok(out)
}

/// Places `spec` with `placer`, reading a worker's taken frontends when the
/// placer needs them (with those of the next few candidates, in one query).
/// The outer `Result` is the database's, the inner one placement's.
pub async fn place(
    conn: &mut Conn<'_>,
    placer: &mut Placer,
    spec: &RouteSpec,
) -> Result<Result<(Worker, Assignment), PlacementError>> {
    loop {
        match placer.place(spec) {
            Ok(Step::NeedUsed(id)) => {
                let ids = placer.unknown_ahead(id, USED_AHEAD);
                for (id, taken) in used_of(conn, &ids).await? {
                    placer.know_used(id, taken);
                }
            }
            Ok(Step::Placed(worker, assignment)) => return Ok(Ok((*worker, assignment))),
            Err(e) => return Ok(Err(e)),
        }
    }
}

/// The values [`update_route`] and [`update_routes`] write, in the order of
/// [`UPDATED_COLUMNS`].
fn updated_values(r: &StoredRoute) -> [Arg; 10] {
    [
        r.id.into(),
        r.worker_id.into(),
        r.port.into(),
        r.subdomain.as_deref().into(),
        Arg::json(&r.spec),
        r.spec.expires_at.into(),
        r.revision.into(),
        r.updated_at.into(),
        r.pending_reason.as_deref().into(),
        Arg::Text(Some(route_json::spec_fragments(&r.spec))),
    ]
}

/// The columns [`updated_values`] gives (`id` first, the key).
const UPDATED_COLUMNS: [&str; 10] = [
    "id",
    "worker_id",
    "frontend_port",
    "frontend_subdomain",
    "spec",
    "expires_at",
    "revision",
    "updated_at",
    "pending_reason",
    "spec_wire",
];

/// Routes [`update_routes`] writes per statement on PostgreSQL.
const UPDATES_PER_STATEMENT: usize = 500;

/// Writes where a route sits and its spec.
pub async fn update_route(conn: &mut Conn<'_>, r: &StoredRoute) -> Result<()> {
    conn.execute(
        "UPDATE routes SET worker_id = $2, frontend_port = $3, frontend_subdomain = $4, spec = $5, \
         expires_at = $6, revision = $7, updated_at = $8, pending_reason = $9, spec_wire = $10 WHERE id = $1",
        &updated_values(r),
    )
    .await?;
    Ok(())
}

/// Writes where each of `routes` sits and its spec: on PostgreSQL one
/// statement per [`UPDATES_PER_STATEMENT`] routes, on SQLite (in process,
/// no round trips) one each.
pub async fn update_routes(conn: &mut Conn<'_>, routes: &[StoredRoute]) -> Result<()> {
    if matches!(conn, Conn::Sqlite(_)) {
        for r in routes {
            update_route(conn, r).await?;
        }
        return Ok(());
    }
    let set = UPDATED_COLUMNS[1..]
        .iter()
        .map(|c| format!("{c} = v.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    for chunk in routes.chunks(UPDATES_PER_STATEMENT) {
        let query = format!(
            "UPDATE routes AS r SET {set} FROM (VALUES {}) AS v ({}) WHERE r.id = v.id",
            super::sql::values(chunk.len(), UPDATED_COLUMNS.len(), 1),
            UPDATED_COLUMNS.join(", ")
        );
        let args: Vec<Arg> = chunk.iter().flat_map(updated_values).collect();
        conn.execute(sqlx::AssertSqlSafe(query), &args).await?;
    }
    Ok(())
}
