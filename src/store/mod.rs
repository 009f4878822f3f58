//! Persistence: one interface, two backends (PostgreSQL in production, an
//! embedded SQLite file by default). All SQL lives in this file.
//!
//! Every write transaction first locks the single `coordinator_state` row, so
//! writes are serialised and the change-log revisions they append are committed
//! in order: a reader that has seen revision N has seen everything before N.
//! Each route or worker mutation appends its change-log row in the **same**
//! transaction as the mutation itself.
//!
//! Because writes are serialised, route creates — the hot path — do not each
//! take the lock: they queue for one create writer that commits whatever is
//! queued in one transaction, giving each request its own answer
//! (`Store::create_routes`). Concurrent creates thus share the lock and the
//! commit's fsync, as PostgreSQL's group commit would share independent ones.
//!
//! Both backends run the very same SQL text (`$N` placeholders work in SQLite
//! too); [`with_db!`] expands a body once per backend so each arm is compiled
//! against its own driver types.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::histogram::Histogram;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::{ConnectOptions, Database, Transaction};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::domain::events::{Change, ChangeKind};
use crate::domain::placement::{self, Assignment, PlacementError, Used};
use crate::domain::{
    Revision, Route, RoutePatch, RouteSpec, RouteStatus, StoredRoute, ValidationError, Worker,
    WorkerRegistration, WorkerStatus, validate,
};

static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");
static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// The database behind the coordinator.
#[derive(Clone, Debug)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// The store: a database plus a signal of the last revision this process
/// committed (the hub wakes on it; other replicas learn through NOTIFY).
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    committed: Arc<watch::Sender<Revision>>,
    /// SQLite has one writer at a time; writers queue here, in order, instead
    /// of spinning on SQLITE_BUSY. (PostgreSQL queues on the revision row.)
    sqlite_writer: Arc<tokio::sync::Mutex<()>>,
    /// Route creates queue here for the create writer, which commits
    /// everything queued in one transaction (see `Store::create_routes`).
    /// `None` in the writer's own copy.
    creates: Option<mpsc::Sender<NewRoute>>,
    /// How many creates each of the writer's transactions committed.
    create_batches: Histogram,
}

/// Most creates the create writer commits in one transaction.
const CREATE_BATCH_MAX: usize = 64;

/// The frontends taken on each worker as of `revision`, kept by the create
/// writer between batches. Every change to a route's placement takes a new
/// revision, so the cache holds while the revision is still the one the
/// writer itself committed; any other write in between empties it.
#[derive(Debug, Default)]
struct UsedCache {
    revision: Revision,
    workers: HashMap<Uuid, Used>,
}

/// A `POST /routes` waiting for the create writer.
struct NewRoute {
    id: Uuid,
    spec: RouteSpec,
    now: DateTime<Utc>,
    reply: oneshot::Sender<Result<Route>>,
}

impl std::fmt::Debug for NewRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewRoute")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// PostgreSQL channel a commit notifies, with its revision as the payload.
pub const NOTIFY_CHANNEL: &str = "appproxy_changes";

/// What can go wrong in the store, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("{message}")]
    Conflict {
        message: String,
        existing: Option<Box<Route>>,
    },
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database failed a transaction that carried this request with others.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// The database cannot be reached right now (as opposed to a bug or bad data).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
            || matches!(
                self,
                StoreError::Database(
                    sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Io(_)
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::Protocol(_)
                        | sqlx::Error::WorkerCrashed
                )
            )
            || matches!(self, StoreError::Database(sqlx::Error::Database(e))
            if e.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Filters of `GET /routes`.
#[derive(Clone, Debug, Default)]
pub struct RouteFilter {
    pub session_id: Option<Uuid>,
    pub endpoint_id: Option<Uuid>,
    pub worker_id: Option<Uuid>,
    pub service: Option<String>,
}

/// One page of routes, ordered by id.
#[derive(Clone, Debug)]
pub struct Page {
    pub items: Vec<Route>,
    pub next_cursor: Option<Uuid>,
}

/// The result of a (re-)registration.
#[derive(Clone, Debug)]
pub struct Registered {
    pub worker: Worker,
    pub created: bool,
    pub revision: Revision,
    pub routes: Vec<Route>,
}

/// The result of `PUT /routes/{id}`.
#[derive(Clone, Debug)]
pub enum Upserted {
    Created(Route),
    Updated(Route),
    Unchanged(Route),
}

/// A route that left its worker (`from`), or left `Pending`; `to` is `None`
/// when it found no place, with the `reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moved {
    pub route_id: Uuid,
    pub from: Option<Uuid>,
    pub to: Option<Uuid>,
    pub reason: Option<String>,
}

/// What `DELETE /workers/{id}` did with the worker's routes.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub struct Removal {
    pub moved: u64,
    pub pending: u64,
}

/// Route and worker counts by status, for metrics.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub routes: HashMap<RouteStatus, i64>,
    pub workers: HashMap<WorkerStatus, i64>,
}

/// Expands `$body` once per backend with `$pool` bound to the concrete pool.
macro_rules! with_db {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Db::Postgres($pool) => $body,
            Db::Sqlite($pool) => $body,
        }
    };
}

/// Where the two backends differ.
trait Dialect {
    type Db: Database;
    /// A write transaction. SQLite must take its write lock up front
    /// (`BEGIN IMMEDIATE`), or two readers upgrading at once deadlock.
    async fn begin_write(&self) -> Result<Transaction<'static, Self::Db>, sqlx::Error>;
    /// A read-only transaction whose statements all see one snapshot.
    async fn begin_snapshot(&self) -> Result<Transaction<'static, Self::Db>, sqlx::Error>;
    /// The statement that records a transaction's last revision and, on
    /// PostgreSQL, queues a NOTIFY that other replicas receive at commit.
    fn save_revision_sql(&self) -> &'static str;
}

impl Dialect for PgPool {
    type Db = sqlx::Postgres;
    async fn begin_write(&self) -> Result<Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.begin().await
    }
    async fn begin_snapshot(&self) -> Result<Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
    }
    fn save_revision_sql(&self) -> &'static str {
        "WITH saved AS (UPDATE coordinator_state SET revision = $1::bigint WHERE id = 1) \
         SELECT pg_notify('appproxy_changes', $1::bigint::text)"
    }
}

impl Dialect for SqlitePool {
    type Db = sqlx::Sqlite;
    async fn begin_write(&self) -> Result<Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
    async fn begin_snapshot(&self) -> Result<Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin().await
    }
    fn save_revision_sql(&self) -> &'static str {
        "UPDATE coordinator_state SET revision = $1 WHERE id = 1"
    }
}

macro_rules! route_columns {
    () => {
        "id, worker_id, frontend_port, frontend_subdomain, pending_reason, spec, revision, created_at, updated_at"
    };
}

macro_rules! worker_select {
    () => {
        "SELECT w.id, w.spec, w.status, w.last_heartbeat, w.acked_revision, w.created_at, w.updated_at, \
         w.route_count, \
         (SELECT revision FROM coordinator_state WHERE id = 1) - w.acked_revision AS revision_lag FROM workers w"
    };
}

#[derive(sqlx::FromRow)]
struct RouteRow {
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
struct WorkerRow {
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

/// Locks the revision counter for this transaction; returns its value.
macro_rules! lock_revision {
    ($tx:ident) => {
        sqlx::query_scalar::<_, i64>(
            "UPDATE coordinator_state SET revision = revision WHERE id = 1 RETURNING revision",
        )
        .fetch_one(&mut *$tx)
        .await?
    };
}

/// Records the last revision this transaction used and, on PostgreSQL,
/// queues a NOTIFY that other replicas receive when it commits.
macro_rules! save_revision {
    ($pool:ident, $tx:ident, $rev:expr) => {{
        sqlx::query($pool.save_revision_sql())
            .bind($rev)
            .execute(&mut *$tx)
            .await?;
    }};
}

/// Commits and tells this process's hub.
macro_rules! commit {
    ($self:ident, $tx:ident, $rev:expr) => {{
        $tx.commit().await?;
        $self.published($rev);
    }};
}

/// Appends one change-log row.
macro_rules! log_change {
    ($tx:ident, $rev:expr, $kind:expr, route: $route_id:expr, worker: $worker_id:expr, payload: $payload:expr, $now:expr) => {
        sqlx::query(
            "INSERT INTO change_log (revision, kind, route_id, worker_id, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind($rev)
        .bind($kind)
        .bind($route_id)
        .bind($worker_id)
        .bind($payload)
        .bind($now)
        .execute(&mut *$tx)
        .await?
    };
}

macro_rules! fetch_workers {
    ($ex:expr) => {
        sqlx::query_as::<_, WorkerRow>(worker_select!())
            .fetch_all($ex)
            .await?
            .into_iter()
            .map(Worker::from)
            .collect::<Vec<Worker>>()
    };
}

macro_rules! fetch_worker {
    ($ex:expr, $id:expr) => {
        sqlx::query_as::<_, WorkerRow>(concat!(worker_select!(), " WHERE w.id = $1"))
            .bind($id)
            .fetch_optional($ex)
            .await?
            .map(Worker::from)
    };
}

macro_rules! fetch_route {
    ($ex:expr, $where:literal, $($bind:expr),+) => {{
        let query = sqlx::query_as::<_, RouteRow>(concat!("SELECT ", route_columns!(), " FROM routes WHERE ", $where));
        $(let query = query.bind($bind);)+
        query.fetch_optional($ex).await?.map(StoredRoute::from)
    }};
}

macro_rules! fetch_routes {
    ($ex:expr, $where:literal $(, $bind:expr)*) => {{
        let query = sqlx::query_as::<_, RouteRow>(concat!("SELECT ", route_columns!(), " FROM routes WHERE ", $where));
        $(let query = query.bind($bind);)*
        query.fetch_all($ex).await?.into_iter().map(StoredRoute::from).collect::<Vec<StoredRoute>>()
    }};
}

macro_rules! fetch_used {
    ($ex:expr, $worker_id:expr) => {{
        let rows: Vec<(Option<i32>, Option<String>)> = sqlx::query_as(
            "SELECT frontend_port, frontend_subdomain FROM routes WHERE worker_id = $1",
        )
        .bind($worker_id)
        .fetch_all($ex)
        .await?;
        let mut used = Used::default();
        for (port, sub) in rows {
            used.ports.extend(port.and_then(|p| u16::try_from(p).ok()));
            used.subdomains.extend(sub);
        }
        used
    }};
}

/// Chooses a worker and frontend for `$spec` among `$workers`, inside `$tx`,
/// and records the choice: the frontend in `$used` (each worker's taken
/// frontends, read once per worker and then kept current in memory) and one
/// more route on the worker. Returns the chosen worker and frontend.
macro_rules! place {
    ($tx:ident, $workers:expr, $used:expr, $spec:expr) => {{
        let workers: &mut Vec<Worker> = $workers;
        let used: &mut HashMap<Uuid, Used> = $used;
        let mut outcome: Result<(Uuid, Assignment), PlacementError> = Err(
            PlacementError::NoEligibleWorker("every eligible worker is full".to_owned()),
        );
        match placement::rank(workers, $spec) {
            Err(e) => outcome = Err(e),
            Ok(ranked) => {
                for w in ranked {
                    if let std::collections::hash_map::Entry::Vacant(slot) = used.entry(w.id) {
                        slot.insert(fetch_used!(&mut *$tx, w.id));
                    }
                    match placement::allocate(w, $spec, &used[&w.id]) {
                        Ok(Some(a)) => {
                            outcome = Ok((w.id, a));
                            break;
                        }
                        Ok(None) => {}
                        Err(e) => outcome = Err(e),
                    }
                }
            }
        }
        outcome.map(|(id, assignment)| {
            let taken = used.entry(id).or_default();
            taken.ports.extend(assignment.port());
            taken
                .subdomains
                .extend(assignment.subdomain().map(str::to_owned));
            let worker = workers
                .iter_mut()
                .find(|w| w.id == id)
                .expect("placed on a candidate");
            worker.route_count += 1;
            (worker.clone(), assignment)
        })
    }};
}

macro_rules! update_route {
    ($tx:ident, $r:expr) => {{
        let r: &StoredRoute = $r;
        sqlx::query(
            "UPDATE routes SET worker_id = $2, frontend_port = $3, frontend_subdomain = $4, spec = $5, \
             expires_at = $6, revision = $7, updated_at = $8, pending_reason = $9 WHERE id = $1",
        )
        .bind(r.id)
        .bind(r.worker_id)
        .bind(r.port.map(i32::from))
        .bind(r.subdomain.as_deref())
        .bind(Json(&r.spec))
        .bind(r.spec.expires_at)
        .bind(r.revision)
        .bind(r.updated_at)
        .bind(r.pending_reason.as_deref())
        .execute(&mut *$tx)
        .await?
    }};
}

fn conflict_message(spec: &RouteSpec) -> String {
    match spec.key() {
        crate::domain::RouteKey::Interactive {
            session_id,
            service,
        } => format!("session {session_id} already has a {service} route"),
        crate::domain::RouteKey::Inference { endpoint_id } => {
            format!("endpoint {endpoint_id} already has a route")
        }
    }
}

/// A route spec relaxed for moving to another worker: no pin, no fixed port
/// (ports belong to a worker's host); a subdomain stays a preference.
fn relocation_spec(spec: &RouteSpec, current_subdomain: Option<&str>) -> RouteSpec {
    let mut s = spec.clone();
    s.worker_id = None;
    s.frontend.port = None;
    if let Some(sub) = current_subdomain {
        s.frontend.subdomain = Some(sub.to_owned());
    }
    s
}

impl Store {
    /// A store on `db`, with its create writer running on the current runtime.
    fn new(db: Db) -> Store {
        let writer = Store {
            db,
            committed: Arc::new(watch::channel(0).0),
            sqlite_writer: Arc::default(),
            creates: None,
            create_batches: Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
        };
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(writer.clone().write_creates(rx));
        Store {
            creates: Some(tx),
            ..writer
        }
    }

    /// The create writer: takes whatever creates are queued (up to
    /// [`CREATE_BATCH_MAX`]) and commits them together, so that concurrent
    /// creates share one revision lock and one commit instead of queueing on
    /// the lock one transaction at a time. Ends when every other copy of the
    /// store is dropped.
    async fn write_creates(self, mut queue: mpsc::Receiver<NewRoute>) {
        let mut batch = Vec::with_capacity(CREATE_BATCH_MAX);
        let mut cache = UsedCache::default();
        while queue.recv_many(&mut batch, CREATE_BATCH_MAX).await > 0 {
            let requests: Vec<NewRoute> = std::mem::take(&mut batch);
            self.create_batches.observe(requests.len() as f64);
            let answers = match self.create_routes(&requests, &mut cache).await {
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
                    for r in &requests {
                        answers.push(
                            match self
                                .create_routes(std::slice::from_ref(r), &mut cache)
                                .await
                            {
                                Ok(mut one) => one.pop().unwrap_or(Err(StoreError::NotFound)),
                                Err(e) => Err(e),
                            },
                        );
                    }
                    answers
                }
            };
            for (request, answer) in requests.into_iter().zip(answers) {
                // The caller may have gone; the route exists all the same.
                let _ = request.reply.send(answer);
            }
        }
    }

    /// Held for the whole of a write transaction on SQLite; nothing on PostgreSQL.
    async fn write_gate(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.db {
            Db::Sqlite(_) => Some(self.sqlite_writer.lock().await),
            Db::Postgres(_) => None,
        }
    }

    /// Sizes of the create writer's batches, for `/metrics`.
    pub fn create_batch_sizes(&self) -> Histogram {
        self.create_batches.clone()
    }

    /// The database, for the hub's listener and for tests.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The last revision this process committed; changes on every commit.
    pub fn commits(&self) -> watch::Receiver<Revision> {
        self.committed.subscribe()
    }

    fn published(&self, revision: Revision) {
        self.committed.send_if_modified(|last| {
            let newer = revision > *last;
            if newer {
                *last = revision;
            }
            newer
        });
    }

    /// Connects to `database_url` (`postgres://…`, `sqlite://…`).
    pub async fn connect(database_url: &str, max_connections: u32) -> Result<Store> {
        if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(database_url)?
                .application_name("appproxy-coordinator")
                .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options);
            Ok(Store::new(Db::Postgres(pool)))
        } else if database_url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(database_url)?;
            Store::open_sqlite(options, max_connections).await
        } else {
            Err(StoreError::Invalid(ValidationError {
                field: "database_url".into(),
                message: "must start with postgres://, postgresql:// or sqlite:".into(),
            }))
        }
    }

    /// Opens (creating if needed) the embedded database file at `path`.
    pub async fn open_sqlite_file(path: &Path, max_connections: u32) -> Result<Store> {
        Store::open_sqlite(SqliteConnectOptions::new().filename(path), max_connections).await
    }

    async fn open_sqlite(options: SqliteConnectOptions, max_connections: u32) -> Result<Store> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        Ok(Store::new(Db::Sqlite(pool)))
    }

    pub fn backend(&self) -> &'static str {
        match self.db {
            Db::Postgres(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }

    /// Applies the checked-in migrations for this backend.
    pub async fn migrate(&self) -> Result<()> {
        match &self.db {
            Db::Postgres(pool) => PG_MIGRATOR.run(pool).await?,
            Db::Sqlite(pool) => SQLITE_MIGRATOR.run(pool).await?,
        }
        Ok(())
    }

    /// Answers when the database does.
    pub async fn ping(&self) -> Result<()> {
        with_db!(&self.db, pool => {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }

    pub async fn close(&self) {
        with_db!(&self.db, pool => pool.close().await)
    }

    /// The revision of the last committed change.
    pub async fn current_revision(&self) -> Result<Revision> {
        Ok(with_db!(&self.db, pool => {
            sqlx::query_scalar::<_, i64>("SELECT revision FROM coordinator_state WHERE id = 1")
                .fetch_one(pool)
                .await?
        }))
    }

    // ---- change log ----------------------------------------------------------

    /// Change-log rows after `after`, oldest first, at most `limit`; only the
    /// rows of one worker's stream when `worker` is given.
    pub async fn changes_after(
        &self,
        after: Revision,
        worker: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Change>> {
        type Row = (
            i64,
            String,
            Option<Uuid>,
            Option<Uuid>,
            Option<Json<serde_json::Value>>,
            DateTime<Utc>,
        );
        let rows: Vec<Row> = with_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT revision, kind, route_id, worker_id, payload, created_at FROM change_log \
                 WHERE revision > $1 AND ($2 IS NULL OR worker_id = $2) ORDER BY revision LIMIT $3",
            )
            .bind(after)
            .bind(worker)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(
                |(revision, kind, route_id, worker_id, payload, created_at)| {
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
                },
            )
            .collect()
    }

    /// `(compacted, head)`: every revision after `compacted` is still in the
    /// log, and `head` is the last one committed.
    pub async fn log_horizon(&self) -> Result<(Revision, Revision)> {
        Ok(with_db!(&self.db, pool => {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT compacted_revision, revision FROM coordinator_state WHERE id = 1",
            )
            .fetch_one(pool)
            .await?
        }))
    }

    /// The routes of one worker (or all routes) exactly as of one revision.
    pub async fn snapshot(&self, worker: Option<Uuid>) -> Result<(Revision, Vec<Route>)> {
        with_db!(&self.db, pool => {
            let mut tx = pool.begin_snapshot().await?;
            let head: i64 = sqlx::query_scalar("SELECT revision FROM coordinator_state WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
            // Two statements, so each gets a plan that uses its index.
            let stored = match worker {
                Some(w) => fetch_routes!(&mut *tx, "worker_id = $1 ORDER BY id", w),
                None => fetch_routes!(&mut *tx, "TRUE ORDER BY id"),
            };
            // A worker's snapshot needs only that worker.
            let workers = match worker {
                Some(w) => fetch_worker!(&mut *tx, w).into_iter().collect(),
                None => fetch_workers!(&mut *tx),
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
        })
    }

    /// Drops change-log rows that are both older than `older_than` and not
    /// among the last `keep_last` revisions. Returns how many went.
    pub async fn compact_log(&self, keep_last: u64, older_than: DateTime<Utc>) -> Result<u64> {
        let older_than = db_time(older_than);
        with_db!(&self.db, pool => {
            let _gate = self.write_gate().await;
            let mut tx = pool.begin_write().await?;
            let head = lock_revision!(tx);
            let keep_from = head.saturating_sub(i64::try_from(keep_last).unwrap_or(i64::MAX));
            let cutoff: Option<i64> = sqlx::query_scalar(
                "SELECT MAX(revision) FROM change_log WHERE revision <= $1 AND created_at < $2",
            )
            .bind(keep_from)
            .bind(older_than)
            .fetch_one(&mut *tx)
            .await?;
            let Some(cutoff) = cutoff else { return Ok(0) };
            let deleted = sqlx::query("DELETE FROM change_log WHERE revision <= $1")
                .bind(cutoff)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(
                "UPDATE coordinator_state SET compacted_revision = $1 WHERE id = 1 AND compacted_revision < $1",
            )
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(deleted)
        })
    }

    // ---- workers -------------------------------------------------------------

    /// Registers a worker, or re-registers it by name (same id, routes kept).
    /// `mint_token` is given the worker's id and answers the hash of its new token.
    pub async fn register_worker(
        &self,
        registration: WorkerRegistration,
        now: DateTime<Utc>,
        mint_token: impl FnOnce(Uuid) -> [u8; 32],
    ) -> Result<Registered> {
        let now = db_time(now);
        validate::registration(&registration)?;
        with_db!(&self.db, pool => {
            let _gate = self.write_gate().await;
            let mut tx = pool.begin_write().await?;
            let rev = lock_revision!(tx) + 1;
            let existing: Option<Uuid> = sqlx::query_scalar("SELECT id FROM workers WHERE name = $1")
                .bind(&registration.name)
                .fetch_optional(&mut *tx)
                .await?;
            let id = existing.unwrap_or_else(Uuid::now_v7);
            let token_hash = mint_token(id);
            match existing {
                Some(id) => {
                    sqlx::query(
                        "UPDATE workers SET spec = $2, status = 'Ready', token_hash = $3, \
                         last_heartbeat = $4, updated_at = $4 WHERE id = $1",
                    )
                    .bind(id)
                    .bind(Json(&registration))
                    .bind(&token_hash[..])
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                None => {
                    sqlx::query(
                        "INSERT INTO workers (id, name, spec, status, token_hash, last_heartbeat, \
                         acked_revision, created_at, updated_at) VALUES ($1, $2, $3, 'Ready', $4, $5, 0, $5, $5)",
                    )
                    .bind(id)
                    .bind(&registration.name)
                    .bind(Json(&registration))
                    .bind(&token_hash[..])
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            let worker = fetch_worker!(&mut *tx, id).ok_or(StoreError::NotFound)?;
            log_change!(tx, rev, "worker_upsert", route: None::<Uuid>, worker: Some(id), payload: Some(Json(&worker)), now);
            save_revision!(pool, tx, rev);
            let routes = fetch_routes!(&mut *tx, "worker_id = $1 ORDER BY id", id)
                .into_iter()
                .map(|r| r.into_route(Some(&worker)))
                .collect();
            commit!(self, tx, rev);
            Ok(Registered { worker, created: existing.is_none(), revision: rev, routes })
        })
    }

    /// SHA-256 of the worker's current token.
    pub async fn worker_token_hash(&self, id: Uuid) -> Result<Option<Vec<u8>>> {
        Ok(with_db!(&self.db, pool => {
            sqlx::query_scalar::<_, Vec<u8>>("SELECT token_hash FROM workers WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
        }))
    }

    /// Records a heartbeat and the revision the worker has applied; answers
    /// the worker's status and the current revision. (What a heartbeat does to
    /// the status is `health::observe`'s business.)
    pub async fn heartbeat(
        &self,
        id: Uuid,
        acked_revision: Revision,
        now: DateTime<Utc>,
    ) -> Result<(WorkerStatus, Revision)> {
        let now = db_time(now);
        let current = self.current_revision().await?;
        if acked_revision < 0 || acked_revision > current {
            return Err(StoreError::Invalid(ValidationError {
                field: "acked_revision".into(),
                message: format!(
                    "{acked_revision} is not a revision this coordinator has issued (current: {current})"
                ),
            }));
        }
        let status: Option<String> = with_db!(&self.db, pool => {
            sqlx::query_scalar(
                "UPDATE workers SET last_heartbeat = $2, \
                 acked_revision = CASE WHEN acked_revision < $3 THEN $3 ELSE acked_revision END \
                 WHERE id = $1 RETURNING status",
            )
            .bind(id)
            .bind(now)
            .bind(acked_revision)
            .fetch_optional(pool)
            .await?
        });
        let status = status
            .as_deref()
            .and_then(WorkerStatus::parse)
            .ok_or(StoreError::NotFound)?;
        Ok((status, current))
    }

    /// Changes a worker's status (a logged worker mutation). No-op if unchanged.
    pub async fn set_worker_status(
        &self,
        id: Uuid,
        status: WorkerStatus,
        now: DateTime<Utc>,
    ) -> Result<Worker> {
        let now = db_time(now);
        with_db!(&self.db, pool => {
            let _gate = self.write_gate().await;
            let mut tx = pool.begin_write().await?;
            let rev = lock_revision!(tx) + 1;
            let mut worker = fetch_worker!(&mut *tx, id).ok_or(StoreError::NotFound)?;
            if worker.status == status {
                return Ok(worker);
            }
            sqlx::query("UPDATE workers SET status = $2, updated_at = $3 WHERE id = $1")
                .bind(id)
                .bind(status.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            worker.status = status;
            worker.updated_at = now;
            log_change!(tx, rev, "worker_upsert", route: None::<Uuid>, worker: Some(id), payload: Some(Json(&worker)), now);
            save_revision!(pool, tx, rev);
            commit!(self, tx, rev);
            Ok(worker)
        })
    }

    pub async fn get_worker(&self, id: Uuid) -> Result<Worker> {
        with_db!(&self.db, pool => fetch_worker!(pool, id)).ok_or(StoreError::NotFound)
    }

    pub async fn list_workers(&self) -> Result<Vec<Worker>> {
        let mut workers = with_db!(&self.db, pool => fetch_workers!(pool));
        workers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(workers)
    }

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
        with_db!(&self.db, pool => {
            let _gate = self.write_gate().await;
            let mut tx = pool.begin_write().await?;
            let rev = lock_revision!(tx) + 1;
            // Draining workers are never chosen, so nothing new landed on it.
            let deleted = sqlx::query("DELETE FROM workers WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if deleted == 0 {
                return Err(StoreError::NotFound);
            }
            log_change!(tx, rev, "worker_delete", route: None::<Uuid>, worker: Some(id), payload: None::<Json<Worker>>, now);
            save_revision!(pool, tx, rev);
            commit!(self, tx, rev);
            Ok(removal)
        })
    }

    /// Moves up to `limit` routes off worker `from` in one transaction: each
    /// gets a `delete` on `from`'s stream and an `upsert` on its new worker's,
    /// or becomes `Pending` (with the reason) if no worker can take it.
    pub async fn relocate_routes(
        &self,
        from: Uuid,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<Moved>> {
        let now = db_time(now);
        with_db!(&self.db, pool => {
            let _gate = self.write_gate().await;
            let mut tx = pool.begin_write().await?;
            let mut rev = lock_revision!(tx);
            let routes = fetch_routes!(&mut *tx, "worker_id = $1 ORDER BY id LIMIT $2", from, i64::from(limit));
            if routes.is_empty() {
                return Ok(Vec::new());
            }
            let mut others: Vec<Worker> = fetch_workers!(&mut *tx).into_iter().filter(|w| w.id != from).collect();
            let mut used = HashMap::new();
            let mut moved = Vec::with_capacity(routes.len());
            for mut r in routes {
                rev += 1;
                log_change!(tx, rev, "route_delete", route: Some(r.id), worker: Some(from), payload: None::<Json<Route>>, now);
                // Free the old frontend before taking a new one.
                let preferred = r.subdomain.take();
                r.worker_id = None;
                r.port = None;
                r.revision = rev;
                r.updated_at = now;
                update_route!(tx, &r);
                rev += 1;
                r.revision = rev;
                let spec = relocation_spec(&r.spec, preferred.as_deref());
                let target = match place!(tx, &mut others, &mut used, &spec) {
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
                update_route!(tx, &r);
                let route = r.to_route(target.as_ref());
                log_change!(tx, rev, "route_upsert", route: Some(r.id), worker: r.worker_id, payload: Some(Json(&route)), now);
                moved.push(Moved { route_id: r.id, from: Some(from), to: r.worker_id, reason: r.pending_reason.clone() });
            }
            save_revision!(pool, tx, rev);
            commit!(self, tx, rev);
            Ok(moved)
        })
    }

    /// Places up to `limit` `Pending` routes on workers that can now take
    /// them, in one transaction. Routes that still fit nowhere keep waiting.
    pub async fn place_pending(&self, limit: u32, now: DateTime<Utc>) -> Result<Vec<Moved>> {
        let now = db_time(now);
        with_db!(&self.db, pool => {
            let _gate = self.write_gate().await;
            let mut tx = pool.begin_write().await?;
            let mut rev = lock_revision!(tx);
            let pending = fetch_routes!(&mut *tx, "worker_id IS NULL ORDER BY id LIMIT $1", i64::from(limit));
            if pending.is_empty() {
                return Ok(Vec::new());
            }
            let mut workers = fetch_workers!(&mut *tx);
            let mut used = HashMap::new();
            let mut placed = Vec::new();
            for mut r in pending {
                // Pending routes come from failover, where the pin was already given up.
                let spec = relocation_spec(&r.spec, r.spec.frontend.subdomain.clone().as_deref());
                match place!(tx, &mut workers, &mut used, &spec) {
                    Ok((worker, assignment)) => {
                        rev += 1;
                        r.worker_id = Some(worker.id);
                        r.port = assignment.port();
                        r.subdomain = assignment.subdomain().map(str::to_owned);
                        r.pending_reason = None;
                        r.revision = rev;
                        r.updated_at = now;
                        update_route!(tx, &r);
                        let route = r.to_route(Some(&worker));
                        log_change!(tx, rev, "route_upsert", route: Some(r.id), worker: r.worker_id, payload: Some(Json(&route)), now);
                        placed.push(Moved { route_id: r.id, from: None, to: Some(worker.id), reason: None });
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        if r.pending_reason.as_deref() != Some(reason.as_str()) {
                            // The reason is status, not spec: no revision, no event.
                            sqlx::query("UPDATE routes SET pending_reason = $2 WHERE id = $1")
                                .bind(r.id)
                                .bind(&reason)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                }
            }
            if placed.is_empty() {
                tx.commit().await?;
                return Ok(placed);
            }
            save_revision!(pool, tx, rev);
            commit!(self, tx, rev);
            Ok(placed)
        })
    }

    /// Ready or NotReady workers whose last heartbeat is older than `cutoff`.
    pub async fn silent_workers(&self, cutoff: DateTime<Utc>) -> Result<Vec<Uuid>> {
        let cutoff = db_time(cutoff);
        Ok(with_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT id FROM workers WHERE status IN ('Ready', 'NotReady') AND last_heartbeat < $1 ORDER BY id",
            )
            .bind(cutoff)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Lost workers that became lost before `cutoff` and still hold routes.
    pub async fn workers_to_fail_over(&self, cutoff: DateTime<Utc>) -> Result<Vec<Worker>> {
        let cutoff = db_time(cutoff);
        Ok(with_db!(&self.db, pool => {
            sqlx::query_as::<_, WorkerRow>(concat!(
                worker_select!(),
                " WHERE w.status = 'Lost' AND w.updated_at < $1 \
                  AND EXISTS (SELECT 1 FROM routes r WHERE r.worker_id = w.id) ORDER BY w.id"
            ))
            .bind(cutoff)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(Worker::from)
            .collect()
        }))
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
        with_db!(&self.db, pool => {
            let _gate = self.write_gate().await;
            let mut tx = pool.begin_write().await?;
            let mut rev = lock_revision!(tx);
            let expired: Vec<(Uuid, Option<Uuid>)> = sqlx::query_as(
                "SELECT id, worker_id FROM routes WHERE (expires_at IS NOT NULL AND expires_at < $1) \
                 OR ($3 IS NOT NULL AND updated_at < $3) ORDER BY id LIMIT $2",
            )
            .bind(now)
            .bind(i64::from(limit))
            .bind(idle_before)
            .fetch_all(&mut *tx)
            .await?;
            if expired.is_empty() {
                return Ok(Vec::new());
            }
            for (route_id, worker_id) in &expired {
                sqlx::query("DELETE FROM routes WHERE id = $1").bind(route_id).execute(&mut *tx).await?;
                rev += 1;
                log_change!(tx, rev, "route_delete", route: Some(*route_id), worker: *worker_id, payload: None::<Json<Route>>, now);
            }
            save_revision!(pool, tx, rev);
            commit!(self, tx, rev);
            Ok(expired.into_iter().map(|(id, _)| id).collect())
        })
    }

    // ---- routes --------------------------------------------------------------

    /// Validates `spec`, places it on a worker and stores it as route `id`.
    ///
    /// Creates go through one writer that commits every create queued at the
    /// moment in one transaction (see `Store::create_routes`); the answer
    /// comes after the commit.
    pub async fn create_route(
        &self,
        id: Uuid,
        spec: RouteSpec,
        now: DateTime<Utc>,
    ) -> Result<Route> {
        let now = db_time(now);
        validate::route_spec(&spec, now)?;
        let (reply, answer) = oneshot::channel();
        let request = NewRoute {
            id,
            spec,
            now,
            reply,
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
            .create_routes(std::slice::from_ref(&request), &mut UsedCache::default())
            .await?;
        answers.pop().unwrap_or(Err(StoreError::NotFound))
    }

    /// Creates `requests` in one transaction: one revision lock, one commit,
    /// consecutive revisions in request order. Each request gets its own
    /// answer: one that conflicts (with a stored route or an earlier request of
    /// the batch) or fits nowhere does not fail the others. `Err` only when
    /// the transaction itself fails, and then nothing was created.
    async fn create_routes(
        &self,
        requests: &[NewRoute],
        cache: &mut UsedCache,
    ) -> Result<Vec<Result<Route>>> {
        with_db!(&self.db, pool => {
            let _gate = self.write_gate().await;
            let mut tx = pool.begin_write().await?;
            let mut rev = lock_revision!(tx);
            // Filled from the cache, then holding this batch's placements,
            // uncommitted: the cache gets it back only after the commit.
            let mut used = if cache.revision == rev {
                std::mem::take(&mut cache.workers)
            } else {
                HashMap::new()
            };
            cache.workers.clear();

            // Stored routes that hold a requested id or unique key.
            let mut query = sqlx::QueryBuilder::new(concat!("SELECT ", route_columns!(), " FROM routes WHERE id IN ("));
            let mut ids = query.separated(", ");
            for r in requests {
                ids.push_bind(r.id);
            }
            query.push(")");
            let (mut sessions, mut endpoints) = (Vec::new(), Vec::new());
            for r in requests {
                match r.spec.key() {
                    crate::domain::RouteKey::Interactive { session_id, .. } => sessions.push(session_id),
                    crate::domain::RouteKey::Inference { endpoint_id } => endpoints.push(endpoint_id),
                }
            }
            for (condition, keys) in [
                (" OR (app_mode = 'interactive' AND session_id IN (", sessions),
                (" OR (app_mode = 'inference' AND endpoint_id IN (", endpoints),
            ] {
                if keys.is_empty() {
                    continue;
                }
                query.push(condition);
                let mut list = query.separated(", ");
                for key in keys {
                    list.push_bind(key);
                }
                query.push("))");
            }
            let stored: Vec<StoredRoute> = query
                .build_query_as::<RouteRow>()
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(StoredRoute::from)
                .collect();

            // Pinned routes need only their workers; otherwise every worker
            // is a candidate.
            let pinned: Option<Vec<Uuid>> = requests.iter().map(|r| r.spec.worker_id).collect();
            let mut workers = match pinned {
                Some(ids) => {
                    let mut query = sqlx::QueryBuilder::new(concat!(worker_select!(), " WHERE w.id IN ("));
                    let mut list = query.separated(", ");
                    for id in ids {
                        list.push_bind(id);
                    }
                    query.push(")");
                    query.build_query_as::<WorkerRow>().fetch_all(&mut *tx).await?.into_iter().map(Worker::from).collect()
                }
                None => fetch_workers!(&mut *tx),
            };
            let mut created: Vec<(StoredRoute, Route)> = Vec::new();
            let mut answers = Vec::with_capacity(requests.len());
            for request in requests {
                let spec = &request.spec;
                let key = spec.key();
                let claimed = || stored.iter().chain(created.iter().map(|(s, _)| s));
                if claimed().any(|r| r.id == request.id) {
                    answers.push(Err(StoreError::Conflict {
                        message: format!("route {} already exists", request.id),
                        existing: None,
                    }));
                    continue;
                }
                if let Some(r) = claimed().find(|r| r.spec.key() == key) {
                    let worker = workers.iter().find(|w| Some(w.id) == r.worker_id);
                    answers.push(Err(StoreError::Conflict {
                        message: conflict_message(spec),
                        existing: Some(Box::new(r.to_route(worker))),
                    }));
                    continue;
                }
                let (worker, assignment) = match place!(tx, &mut workers, &mut used, spec) {
                    Ok(placed) => placed,
                    Err(PlacementError::PortTaken(port)) => {
                        let worker = spec.worker_id.and_then(|id| workers.iter().find(|w| w.id == id));
                        let holder = match worker {
                            Some(w) => match created.iter().find(|(s, _)| s.worker_id == Some(w.id) && s.port == Some(port)) {
                                Some((s, _)) => Some(s.clone()),
                                None => fetch_route!(&mut *tx, "worker_id = $1 AND frontend_port = $2", w.id, i32::from(port)),
                            },
                            None => None,
                        };
                        answers.push(Err(StoreError::Conflict {
                            message: format!("frontend port {port} is already in use"),
                            existing: holder.map(|h| Box::new(h.to_route(worker))),
                        }));
                        continue;
                    }
                    Err(e) => {
                        answers.push(Err(e.into()));
                        continue;
                    }
                };
                rev += 1;
                let route = StoredRoute {
                    id: request.id,
                    worker_id: Some(worker.id),
                    port: assignment.port(),
                    subdomain: assignment.subdomain().map(str::to_owned),
                    pending_reason: None,
                    spec: spec.clone(),
                    revision: rev,
                    created_at: request.now,
                    updated_at: request.now,
                };
                let wire = route.to_route(Some(&worker));
                answers.push(Ok(wire.clone()));
                created.push((route, wire));
            }
            if created.is_empty() {
                tx.rollback().await?;
                *cache = UsedCache { revision: rev, workers: used };
                return Ok(answers);
            }

            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO routes (id, app_mode, session_id, endpoint_id, service, protocol, worker_id, \
                 frontend_port, frontend_subdomain, spec, expires_at, revision, created_at, updated_at) ",
            );
            insert.push_values(&created, |mut row, (r, _)| {
                row.push_bind(r.id)
                    .push_bind(r.spec.app_mode.as_str())
                    .push_bind(r.spec.session_id)
                    .push_bind(r.spec.endpoint_id)
                    .push_bind(r.spec.service.as_str())
                    .push_bind(r.spec.protocol.as_str())
                    .push_bind(r.worker_id)
                    .push_bind(r.port.map(i32::from))
                    .push_bind(r.subdomain.as_deref())
                    .push_bind(Json(&r.spec))
                    .push_bind(r.spec.expires_at)
                    .push_bind(r.revision)
                    .push_bind(r.created_at)
                    .push_bind(r.updated_at);
            });
            insert.build().execute(&mut *tx).await?;
            let mut log = sqlx::QueryBuilder::new(
                "INSERT INTO change_log (revision, kind, route_id, worker_id, payload, created_at) ",
            );
            log.push_values(&created, |mut row, (r, wire)| {
                row.push_bind(r.revision)
                    .push_bind("route_upsert")
                    .push_bind(r.id)
                    .push_bind(r.worker_id)
                    .push_bind(Json(wire))
                    .push_bind(r.created_at);
            });
            log.build().execute(&mut *tx).await?;
            save_revision!(pool, tx, rev);
            commit!(self, tx, rev);
            *cache = UsedCache { revision: rev, workers: used };
            Ok(answers)
        })
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
        with_db!(&self.db, pool => {
            // Most PUTs of a new id create it: find that out without the lock.
            if fetch_route!(pool, "id = $1", id).is_none() {
                return Ok(None);
            }
            let _gate = self.write_gate().await;
            let mut tx = pool.begin_write().await?;
            let rev = lock_revision!(tx) + 1;
            let Some(mut current) = fetch_route!(&mut *tx, "id = $1", id) else {
                return Ok(None);
            };
            let worker = match current.worker_id {
                Some(w) => fetch_worker!(&mut *tx, w),
                None => None,
            };
            if !current.spec.same_identity(spec)
                || current.spec.worker_id != spec.worker_id
                || current.spec.frontend != spec.frontend
            {
                return Err(StoreError::Conflict {
                    message: format!(
                        "route {id} exists with a different identity, protocol, worker pin or frontend; \
                         delete it first to change those"
                    ),
                    existing: Some(Box::new(current.to_route(worker.as_ref()))),
                });
            }
            if current.spec.mutable_fields_equal(spec) {
                // Re-sending a route unchanged keeps it from going idle; it is
                // not a change, so no revision and no event.
                sqlx::query("UPDATE routes SET updated_at = $2 WHERE id = $1")
                    .bind(id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                current.updated_at = now;
                return Ok(Some(Upserted::Unchanged(current.to_route(worker.as_ref()))));
            }
            current.spec = spec.clone();
            let route = update_spec_in_tx(&mut current, rev, now, worker.as_ref());
            update_route!(tx, &current);
            log_change!(tx, rev, "route_upsert", route: Some(id), worker: current.worker_id, payload: Some(Json(&route)), now);
            save_revision!(pool, tx, rev);
            commit!(self, tx, rev);
            Ok(Some(Upserted::Updated(route)))
        })
    }

    /// `PATCH /routes/{id}`.
    pub async fn patch_route(
        &self,
        id: Uuid,
        patch: RoutePatch,
        now: DateTime<Utc>,
    ) -> Result<Route> {
        let now = db_time(now);
        with_db!(&self.db, pool => {
            let _gate = self.write_gate().await;
            let mut tx = pool.begin_write().await?;
            let rev = lock_revision!(tx) + 1;
            let mut current = fetch_route!(&mut *tx, "id = $1", id).ok_or(StoreError::NotFound)?;
            let worker = match current.worker_id {
                Some(w) => fetch_worker!(&mut *tx, w),
                None => None,
            };
            let spec = current.spec.patched(patch);
            // An expiry already set in the past may stay; a new one must be in the future.
            let check_now = if spec.expires_at == current.spec.expires_at { DateTime::<Utc>::MIN_UTC } else { now };
            validate::route_spec(&spec, check_now)?;
            if current.spec.mutable_fields_equal(&spec) {
                return Ok(current.to_route(worker.as_ref()));
            }
            current.spec = spec;
            let route = update_spec_in_tx(&mut current, rev, now, worker.as_ref());
            update_route!(tx, &current);
            log_change!(tx, rev, "route_upsert", route: Some(id), worker: current.worker_id, payload: Some(Json(&route)), now);
            save_revision!(pool, tx, rev);
            commit!(self, tx, rev);
            Ok(route)
        })
    }

    pub async fn get_route(&self, id: Uuid) -> Result<Route> {
        with_db!(&self.db, pool => {
            let stored = fetch_route!(pool, "id = $1", id).ok_or(StoreError::NotFound)?;
            let worker = match stored.worker_id {
                Some(w) => fetch_worker!(pool, w),
                None => None,
            };
            Ok(stored.into_route(worker.as_ref()))
        })
    }

    /// Routes matching `filter`, `limit` at a time, after `cursor` (a route id).
    pub async fn list_routes(
        &self,
        filter: &RouteFilter,
        limit: u32,
        cursor: Option<Uuid>,
    ) -> Result<Page> {
        let limit = limit.clamp(1, 1000);
        let (stored, workers) = with_db!(&self.db, pool => {
            let rows = fetch_routes!(
                pool,
                "($1 IS NULL OR session_id = $1) AND ($2 IS NULL OR endpoint_id = $2) \
                 AND ($3 IS NULL OR worker_id = $3) AND ($4 IS NULL OR service = $4) \
                 AND ($5 IS NULL OR id > $5) ORDER BY id LIMIT $6",
                filter.session_id,
                filter.endpoint_id,
                filter.worker_id,
                filter.service.as_deref(),
                cursor,
                i64::from(limit) + 1
            );
            let workers = if rows.is_empty() { Vec::new() } else { fetch_workers!(pool) };
            (rows, workers)
        });
        Ok(page(stored, &workers, limit as usize))
    }

    /// Resolves a worker's frontend (a port or a subdomain) to its route.
    pub async fn lookup(
        &self,
        worker_id: Uuid,
        port: Option<u16>,
        subdomain: Option<&str>,
    ) -> Result<Route> {
        with_db!(&self.db, pool => {
            let stored = match (port, subdomain) {
                (Some(port), _) => fetch_route!(pool, "worker_id = $1 AND frontend_port = $2", worker_id, i32::from(port)),
                (None, Some(sub)) => fetch_route!(pool, "worker_id = $1 AND frontend_subdomain = $2", worker_id, sub),
                (None, None) => None,
            }
            .ok_or(StoreError::NotFound)?;
            let worker = fetch_worker!(pool, worker_id);
            Ok(stored.into_route(worker.as_ref()))
        })
    }

    /// Deletes one route; `NotFound` if it does not exist.
    pub async fn delete_route(&self, id: Uuid, now: DateTime<Utc>) -> Result<()> {
        let now = db_time(now);
        with_db!(&self.db, pool => {
            let _gate = self.write_gate().await;
            let mut tx = pool.begin_write().await?;
            let rev = lock_revision!(tx) + 1;
            let worker_id: Option<Option<Uuid>> = sqlx::query_scalar("DELETE FROM routes WHERE id = $1 RETURNING worker_id")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            let worker_id = worker_id.ok_or(StoreError::NotFound)?;
            log_change!(tx, rev, "route_delete", route: Some(id), worker: worker_id, payload: None::<Json<Route>>, now);
            save_revision!(pool, tx, rev);
            commit!(self, tx, rev);
            Ok(())
        })
    }

    /// Deletes every interactive route of a session in one transaction.
    pub async fn delete_session(&self, session_id: Uuid, now: DateTime<Utc>) -> Result<u64> {
        let now = db_time(now);
        with_db!(&self.db, pool => {
            let _gate = self.write_gate().await;
            let mut tx = pool.begin_write().await?;
            let mut rev = lock_revision!(tx);
            let deleted: Vec<(Uuid, Option<Uuid>)> = sqlx::query_as(
                "DELETE FROM routes WHERE app_mode = 'interactive' AND session_id = $1 RETURNING id, worker_id",
            )
            .bind(session_id)
            .fetch_all(&mut *tx)
            .await?;
            if deleted.is_empty() {
                return Ok(0);
            }
            for (route_id, worker_id) in &deleted {
                rev += 1;
                log_change!(tx, rev, "route_delete", route: Some(*route_id), worker: *worker_id, payload: None::<Json<Route>>, now);
            }
            save_revision!(pool, tx, rev);
            commit!(self, tx, rev);
            Ok(deleted.len() as u64)
        })
    }

    /// Route and worker counts by status.
    pub async fn counts(&self) -> Result<Counts> {
        // Mirrors RouteStatus::derive in SQL so a scrape does not read every route.
        type ByStatus = Vec<(String, i64)>;
        let (routes, workers): (ByStatus, ByStatus) = with_db!(&self.db, pool => {
            let routes = sqlx::query_as(
                "SELECT CASE WHEN r.worker_id IS NULL THEN 'Pending' \
                             WHEN w.status = 'Lost' THEN 'FailingOver' \
                             WHEN w.acked_revision >= r.revision THEN 'Active' \
                             ELSE 'Propagating' END AS status, COUNT(*) \
                 FROM routes r LEFT JOIN workers w ON w.id = r.worker_id GROUP BY 1",
            )
            .fetch_all(pool)
            .await?;
            let workers = sqlx::query_as("SELECT status, COUNT(*) FROM workers GROUP BY status")
                .fetch_all(pool)
                .await?;
            (routes, workers)
        });
        let mut counts = Counts::default();
        for (status, n) in routes {
            if let Some(s) = RouteStatus::ALL.into_iter().find(|s| s.as_str() == status) {
                counts.routes.insert(s, n);
            }
        }
        for (status, n) in workers {
            if let Some(s) = WorkerStatus::parse(&status) {
                counts.workers.insert(s, n);
            }
        }
        Ok(counts)
    }
}

/// Timestamps as both databases keep them (microseconds), so what a write
/// answers equals what a later read returns.
fn db_time(now: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::SubsecRound;
    now.trunc_subsecs(6)
}

/// Bumps a stored route to `rev` after its spec changed; returns it as served.
fn update_spec_in_tx(
    current: &mut StoredRoute,
    rev: Revision,
    now: DateTime<Utc>,
    worker: Option<&Worker>,
) -> Route {
    current.revision = rev;
    current.updated_at = now;
    current.to_route(worker)
}

fn page(mut stored: Vec<StoredRoute>, workers: &[Worker], limit: usize) -> Page {
    let next_cursor = if stored.len() > limit {
        stored.truncate(limit);
        stored.last().map(|r| r.id)
    } else {
        None
    };
    let by_id: HashMap<Uuid, &Worker> = workers.iter().map(|w| (w.id, w)).collect();
    let items = stored
        .into_iter()
        .map(|r| {
            let worker = r.worker_id.and_then(|w| by_id.get(&w).copied());
            r.into_route(worker)
        })
        .collect();
    Page { items, next_cursor }
}
