//! Persistence: one interface, two backends (PostgreSQL in production, an
//! embedded SQLite file by default), with the change log every mutation
//! appends to in the same transaction.
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | [`Store`]: opening, migrating, the types its operations answer |
//! | `sql.rs` | one statement on either backend: arguments, connections, transactions |
//! | `tx.rs` | the write transaction: revision lock, change rows, NOTIFY, commit |
//! | `rows.rs` | route and worker rows and the reads and writes shared by all |
//! | `routes.rs` | where a route is read, updated and deleted |
//! | `create_writer.rs` | where routes are created: the batching create writer |
//! | `workers.rs` | workers: registration, heartbeats, status transitions, counts |
//! | `moves.rs` | routes leaving a worker (failover, draining) and pending placement |
//! | `changes.rs` | the change log: reading after a revision, snapshots, compaction |
//! | `bus.rs` | the Backend.AI event bus's position and published circuits |
//! | `backendai.rs` | Backend.AI's conf tokens, routes by its keys, spec edits in one transaction |
//! | `sessions.rs` | a Backend.AI session's circuits, deleted when the session ends |
//! | `import.rs`, `export.rs` | taking a Backend.AI coordinator's state over, and reading ours to hand it back |
//!
//! The store fetches and writes; what to decide (placement, status,
//! failover) it asks of [`crate::domain`].

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::histogram::Histogram;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::domain::worker::RegistrationRefused;
use crate::domain::{
    PlacementError, Revision, Route, RouteStatus, ValidationError, Worker, WorkerStatus,
};

mod backendai;
mod bus;
mod changes;
mod create_writer;
mod export;
mod import;
mod moves;
mod placer_cache;
mod routes;
mod rows;
mod sessions;
mod sql;
mod tx;
mod workers;

pub use backendai::ConfToken;
pub use bus::{BusCircuit, BusRemoval, BusState, BusWrite};
pub use create_writer::{
    FOLLOW_EVERY, FORWARD_PATH, ForwardLabels, ForwardedAnswer, ForwardedCreate, Peers,
    follow as follow_leader,
};
pub use export::ExportState;
pub use import::{Conflict, Import, ImportMode, ImportReport, ImportedWorker};
pub use routes::RouteFilter;
pub use workers::{TOKEN_CACHE_TTL, Transition};

static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");
static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// PostgreSQL channel a commit notifies, with its revision as the payload.
pub const NOTIFY_CHANNEL: &str = "appproxy_changes";

/// How long a pooled PostgreSQL connection may sit idle before it is pinged
/// when taken from the pool.
const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

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
    /// SQLite's one writer at a time (see [`tx::WriteTx`]).
    sqlite_writer: Arc<tokio::sync::Mutex<()>>,
    /// Route creates queue here for the create writer; `None` in the
    /// writer's own copy.
    creates: Option<mpsc::Sender<create_writer::NewRoute>>,
    /// How many creates each of the writer's transactions committed.
    create_batches: Histogram,
    /// How this replica reaches the leader, to send it its creates
    /// (PostgreSQL, once set at start: [`Store::forward_creates`]).
    peers: Arc<std::sync::OnceLock<Arc<Peers>>>,
    /// Creates sent to the leader, by outcome.
    create_forwards: prometheus_client::metrics::family::Family<
        ForwardLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    /// Recently read worker token hashes.
    tokens: Arc<workers::TokenCache>,
    /// What failover and the placing of pending routes know of the workers
    /// between their transactions (one at a time; they are writes anyway).
    relocations: Arc<tokio::sync::Mutex<placer_cache::WorkerCache>>,
}

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
    #[error(transparent)]
    Refused(#[from] RegistrationRefused),
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
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Database(
                sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::WorkerCrashed,
            ) => true,
            StoreError::Database(sqlx::Error::Database(e)) => e
                .code()
                .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
            _ => false,
        }
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

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
    /// A Backend.AI circuit that stays on its lost worker (`to` is `None`,
    /// `reason` says why): a move would change its URL.
    pub stranded: bool,
}

/// A Backend.AI circuit that stays on its `Lost` worker because a move would
/// change the URL its Manager keeps ([`Store::stranded_routes`]).
#[derive(Clone, Debug, PartialEq)]
pub struct StrandedRoute {
    /// The route as served, on its lost worker (`status` is `FailingOver`).
    pub route: Route,
    /// Its worker, `Lost`.
    pub worker: Worker,
    /// Why it stays, in a sentence.
    pub reason: String,
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
    /// Backend.AI circuits stranded on a lost worker ([`Store::stranded_routes`]).
    pub stranded: i64,
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
            peers: Arc::default(),
            create_forwards: Default::default(),
            tokens: Arc::default(),
            relocations: Arc::default(),
        };
        let creates = create_writer::spawn(writer.clone());
        Store {
            creates: Some(creates),
            ..writer
        }
    }

    /// Connects to `database_url` (`postgres://…`, `sqlite://…`).
    pub async fn connect(database_url: &str, max_connections: u32) -> Result<Store> {
        if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
            // sqlx ignores a PGSSLMODE it cannot parse (and falls back to
            // prefer); libpq refuses it, and so do we.
            if let Some(mode) = std::env::var_os("PGSSLMODE") {
                let mode = mode.to_string_lossy();
                if !mode.is_empty() && mode.parse::<PgSslMode>().is_err() {
                    return Err(StoreError::Invalid(ValidationError {
                        field: "PGSSLMODE".into(),
                        message: format!(
                            "{mode:?} is not an sslmode: use disable, allow, prefer, require, \
                             verify-ca or verify-full"
                        ),
                    }));
                }
            }
            let mut options = PgConnectOptions::from_str(database_url)?;
            // As libpq: with a root certificate, `require` verifies the
            // server's certificate against it (as `verify-ca`).
            if matches!(options.get_ssl_mode(), PgSslMode::Require) && names_root_cert(database_url)
            {
                options = options.ssl_mode(PgSslMode::VerifyCa);
            }
            let options = options
                .application_name("appproxy-coordinator")
                .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(5))
                // sqlx pings every connection it hands out: a round trip per
                // acquire, several per create batch. A connection used in the
                // last second is taken as live; one idle longer is pinged.
                .test_before_acquire(false)
                .before_acquire(|conn, meta| {
                    Box::pin(async move {
                        if meta.idle_for > IDLE_PING_AFTER {
                            sqlx::Connection::ping(conn).await?;
                        }
                        Ok(true)
                    })
                })
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

    /// The database, for the hub's listener and for tests.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// How this store reaches PostgreSQL: whether the server reports one of
    /// its connections as encrypted (`pg_stat_ssl`), and to where; `None`
    /// on SQLite. Connects if no connection is open, so a refused
    /// certificate or an unreachable server is an error here.
    pub async fn transport(&self) -> Result<Option<Transport>> {
        let Db::Postgres(pool) = &self.db else {
            return Ok(None);
        };
        let encrypted: Option<bool> =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_optional(pool)
                .await?;
        let options = pool.connect_options();
        let (host, socket) = match options.get_socket() {
            Some(dir) => (dir.display().to_string(), true),
            None => (
                options.get_host().to_owned(),
                options.get_host().starts_with('/'),
            ),
        };
        let ssl_mode = match options.get_ssl_mode() {
            PgSslMode::Disable => "disable",
            PgSslMode::Allow => "allow",
            PgSslMode::Prefer => "prefer",
            PgSslMode::Require => "require",
            PgSslMode::VerifyCa => "verify-ca",
            PgSslMode::VerifyFull => "verify-full",
        };
        Ok(Some(Transport {
            encrypted: encrypted.unwrap_or(false),
            local: socket || is_loopback(&host),
            host,
            ssl_mode,
        }))
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
        let mut c = sql::acquire(&self.db).await?;
        c.conn().execute("SELECT 1", &[]).await?;
        Ok(())
    }

    pub async fn close(&self) {
        match &self.db {
            Db::Postgres(pool) => pool.close().await,
            Db::Sqlite(pool) => pool.close().await,
        }
    }

    /// The revision of the last committed change.
    pub async fn current_revision(&self) -> Result<Revision> {
        let mut c = sql::acquire(&self.db).await?;
        let (revision,): (i64,) = c
            .conn()
            .fetch_one("SELECT revision FROM coordinator_state WHERE id = 1", &[])
            .await?;
        Ok(revision)
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

    /// Worker token hashes read from the database (cache misses), for `/metrics`.
    pub fn token_reads(&self) -> prometheus_client::metrics::counter::Counter {
        self.tokens.reads_total.clone()
    }

    /// Sizes of the create writer's batches, for `/metrics`.
    pub fn create_batch_sizes(&self) -> Histogram {
        self.create_batches.clone()
    }

    /// Creates sent to the leader, by outcome, for `/metrics`.
    pub fn create_forwards(
        &self,
    ) -> prometheus_client::metrics::family::Family<
        ForwardLabels,
        prometheus_client::metrics::counter::Counter,
    > {
        self.create_forwards.clone()
    }
}

/// How the store reaches PostgreSQL ([`Store::transport`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transport {
    /// The server reports the connection as encrypted (TLS).
    pub encrypted: bool,
    /// The host connected to, or the directory of the Unix socket.
    pub host: String,
    /// A Unix socket or a loopback address: nothing crosses a network.
    pub local: bool,
    /// The `sslmode` in force.
    pub ssl_mode: &'static str,
}

impl Transport {
    /// Routes, kernel addresses and tokens cross a network unencrypted.
    pub fn plaintext_over_network(&self) -> bool {
        !self.encrypted && !self.local
    }
}

/// `localhost` or a loopback address.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// The URL (or `PGSSLROOTCERT`, which sqlx reads too) names a root
/// certificate to verify the server's against.
fn names_root_cert(database_url: &str) -> bool {
    let in_url = database_url.split_once('?').is_some_and(|(_, query)| {
        query.split('&').any(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            matches!(key, "sslrootcert" | "ssl-root-cert" | "ssl-ca") && !value.is_empty()
        })
    });
    in_url || std::env::var_os("PGSSLROOTCERT").is_some_and(|v| !v.is_empty())
}

/// Timestamps as both databases keep them (microseconds), so what a write
/// answers equals what a later read returns.
fn db_time(now: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::SubsecRound;
    now.trunc_subsecs(6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plaintext_to_another_host_crosses_a_network() {
        let t = |host: &str, encrypted: bool| Transport {
            encrypted,
            local: is_loopback(host) || host.starts_with('/'),
            host: host.to_owned(),
            ssl_mode: "prefer",
        };
        assert!(t("db.internal", false).plaintext_over_network());
        assert!(t("10.0.0.5", false).plaintext_over_network());
        assert!(!t("db.internal", true).plaintext_over_network());
        for local in [
            "localhost",
            "127.0.0.1",
            "127.0.0.2",
            "::1",
            "[::1]",
            "/var/run/postgresql",
        ] {
            assert!(!t(local, false).plaintext_over_network(), "{local}");
        }
    }

    #[tokio::test]
    async fn require_with_a_root_certificate_verifies_it() {
        assert!(names_root_cert(
            "postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem"
        ));
        assert!(names_root_cert("postgres://u@h/db?ssl-ca=/ca.pem"));
        assert!(!names_root_cert(
            "postgres://u@h/db?sslmode=require&sslrootcert="
        ));
        assert!(!names_root_cert("postgres://u@h/db?sslmode=require"));
        async fn mode(url: &str) -> PgSslMode {
            let store = Store::connect(url, 1).await.unwrap();
            let Db::Postgres(pool) = store.db() else {
                unreachable!()
            };
            pool.connect_options().get_ssl_mode()
        }
        assert!(matches!(
            mode("postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem").await,
            PgSslMode::VerifyCa
        ));
        assert!(matches!(
            mode("postgres://u@h/db?sslmode=require").await,
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem").await,
            PgSslMode::VerifyFull
        ));
    }
}
